"""Grouped-query attention in one place: which key/value head serves each query head, and
contractions over query heads that read a shared key/value head without copying it."""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Int, Shaped

from ..errors import TraceError

_PerHead = Int[torch.Tensor, "head"]


def expand_kv(x: Shaped[torch.Tensor, "..."], kv_head_of: _PerHead, dim: int
              ) -> Shaped[torch.Tensor, "..."]:
    """Per-query-head view of a key/value-head tensor: ``out[..., h, ...] = x[..., kv_head_of[h],
    ...]`` along ``dim`` (the ``kv_head`` axis there becomes ``head``; the other axes are
    unchanged). The one place grouped-query attention is resolved (:func:`grouped_einsum` is the
    same mapping fused into a contraction).

    >>> expand_kv(torch.tensor([[10, 20]]), group_mapping(4, 2), dim=1)   # 4 heads, 2 groups
    tensor([[10, 10, 20, 20]])
    """
    return x.index_select(dim, kv_head_of.to(x.device))


def group_mapping(n_heads: int, n_kv_heads: int) -> _PerHead:
    """``kv_head_of[h]``: the key/value group of query head ``h`` (consecutive query heads share
    a group, as in Llama's ``repeat_kv``)."""
    if n_heads % n_kv_heads:
        raise TraceError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv_heads}")
    return torch.arange(n_heads) // (n_heads // n_kv_heads)


def grouped_einsum(*tensors_and_pattern: torch.Tensor | str,
                   kv_head_of: _PerHead) -> torch.Tensor:
    """``einops.einsum`` in which operands with a ``kv_head`` axis (keys, values) meet operands
    with a ``head`` axis (queries, patterns) as if :func:`expand_kv` had expanded them.

    Equal to expanding every ``kv_head`` operand with :func:`expand_kv` and renaming
    ``kv_head`` to ``head``, but key_pos-long keys and values are never copied per query head
    (``n_heads / n_kv_heads`` times their memory): where the query heads of a group are
    consecutive (:func:`group_mapping`'s layout), the ``head`` axes are split as
    ``(kv_head head_in_group)`` instead. Any other ``kv_head_of`` goes through
    :func:`expand_kv`. Patterns name every axis (no ``...``); an operand has ``head`` or
    ``kv_head``, not both.

    >>> k = torch.randn(5, 2, 3)                            # key_pos kv_head d_head
    >>> q = torch.randn(4, 3)                               # head d_head
    >>> kv_head_of = group_mapping(4, 2)
    >>> s = grouped_einsum(k, q, "key_pos kv_head d_head, head d_head -> head key_pos",
    ...                    kv_head_of=kv_head_of)
    >>> ref = einops.einsum(expand_kv(k, kv_head_of, dim=1), q,
    ...                     "key_pos head d_head, head d_head -> head key_pos")
    >>> torch.allclose(s, ref)
    True
    """
    *tensors, pattern = tensors_and_pattern
    inputs, output = (side.strip() for side in str(pattern).split("->"))
    axes = [spec.split() for spec in inputs.split(",")]
    n_heads, n_kv = len(kv_head_of), int(kv_head_of.max()) + 1
    size = n_heads // n_kv
    if n_heads != size * n_kv or not torch.equal(kv_head_of.cpu(), torch.arange(n_heads) // size):
        tensors = [expand_kv(x, kv_head_of, a.index("kv_head")) if "kv_head" in a else x
                   for x, a in zip(tensors, axes)]
        return einops.einsum(*tensors, str(pattern).replace("kv_head", "head"))

    def split(a: list[str]) -> str:
        return " ".join("kv_head head_in_group" if t == "head" else t for t in a)

    def joined(a: list[str]) -> str:
        return " ".join("(kv_head head_in_group)" if t == "head" else t for t in a)

    tensors = [einops.rearrange(x, f"{joined(a)} -> {split(a)}", kv_head=n_kv) if "head" in a
               else x for x, a in zip(tensors, axes)]
    out = output.split()
    y = einops.einsum(*tensors, f"{', '.join(split(a) for a in axes)} -> {split(out)}")
    return einops.rearrange(y, f"{split(out)} -> {joined(out)}") if "head" in out else y



def n_kv_heads(cfg: Any) -> int:
    """The number of key/value heads of a model config (one per query head where the config
    names none)."""
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads

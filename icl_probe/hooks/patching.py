"""Activation patching over TransformerLens hook names: replace a hook's value, or add to it, for
some batch rows, positions and heads, during any forward run inside :func:`patching`.

>>> import torch, icl_probe as ip
>>> model = ip.tiny_model()
>>> ids = torch.tensor([[1, 5, 9, 4], [1, 7, 3, 2]])
>>> clean = model(ids)
>>> push = Patch(torch.ones(model.cfg.d_model), rows=[1], positions=[3], mode="add")
>>> with patching(model, {"blocks.1.hook_resid_pre": push}):
...     pushed = model(ids)
>>> torch.equal(pushed[0], clean[0]), torch.equal(pushed[1, :3], clean[1, :3])
(True, True)
>>> bool((pushed[1, 3] - clean[1, 3]).abs().max() > 0)
True

Positions index the token axis of ``(batch, pos, ...)`` hooks and the query axis of attention
scores and patterns (``(batch, head, q_pos, k_pos)``); heads index the head axis of 4-d hooks
(``hook_z``, ``hook_q`` ..., scores, patterns). A hook that never fired inside the block raises
on exit: this model computes that quantity elsewhere, and the patch did nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..errors import TraceError

PATCH_MODES = ("replace", "add")
_QUERY_KEY_HOOKS = ("hook_attn_scores", "hook_pattern")  # (batch, head, q_pos, k_pos)


@dataclass(frozen=True)
class Patch:
    """What to write at one hook. ``value`` (a tensor or a number) is broadcast to the selected
    slice of each selected row: ``(positions, heads, rest)`` where heads are selected,
    ``(positions, rest)`` otherwise (``(heads, positions, k_pos)`` for scores and patterns).
    ``rows``, ``positions``, ``heads``: index lists (None: all); ``mode``: ``"replace"`` or
    ``"add"``."""

    value: Any
    rows: Sequence[int] | None = None
    positions: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    mode: str = "replace"


@contextlib.contextmanager
def patching(model: Any, patches: Mapping[str, Patch | Sequence[Patch]]) -> Iterator[None]:
    """Every forward of ``model`` inside the block runs with ``patches`` applied, in order, at
    their hooks (full TransformerLens hook names, ``"blocks.3.hook_resid_pre"``). Names, modes
    and index lists are checked before any forward; a hook that never fired raises on exit."""
    plan = {name: [p] if isinstance(p, Patch) else list(p) for name, p in patches.items()}
    _check(model, plan)
    fired = dict.fromkeys(plan, 0)

    def hook_fn(name: str):
        def fn(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
            fired[name] += 1
            out = x.clone()
            for p in plan[name]:
                _apply(out, p, name)
            return out

        return fn

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(model.hooks(fwd_hooks=[(n, hook_fn(n)) for n in plan]))
        except ValueError as e:  # TransformerLens refuses some hooks unless switched on
            raise TraceError(f"patching: the model refuses a hook: {e}") from None
        yield
    silent = [name for name, n in fired.items() if n == 0]
    if silent:
        raise TraceError(f"patching: {silent} never fired inside the block, so nothing was "
                         "patched there; this model computes that quantity at another hook "
                         "(icl_probe.models.live_hooks lists the ones that fire)")


def _check(model: Any, plan: dict[str, list[Patch]]) -> None:
    names = getattr(model, "hook_dict", {})
    for name, ps in plan.items():
        if name not in names:
            near = sorted(n for n in names if n.split(".")[-1] == name.split(".")[-1])[:4]
            raise TraceError(f"patching: the model has no hook {name!r}"
                             + (f"; hooks with that ending: {near}" if near else ""))
        for p in ps:
            if not isinstance(p, Patch):
                raise TraceError(f"patching({name!r}): expected Patch(...), got "
                                 f"{type(p).__name__}")
            if p.mode not in PATCH_MODES:
                raise TraceError(f"patching({name!r}): mode={p.mode!r}; expected one of "
                                 f"{PATCH_MODES}")
            for field in ("rows", "positions", "heads"):
                idx = getattr(p, field)
                if idx is not None and (isinstance(idx, (int, str)) or not all(
                        isinstance(i, int) and not isinstance(i, bool) for i in idx)):
                    raise TraceError(f"patching({name!r}): {field}={idx!r}; expected a list of "
                                     f"integers, e.g. {field}=[{idx!r}]")


def _apply(x: torch.Tensor, p: Patch, name: str) -> None:
    """Write ``p`` into ``x`` in place, row by row."""
    qk = name.endswith(_QUERY_KEY_HOOKS)
    rows = range(x.shape[0]) if p.rows is None else p.rows
    value = torch.as_tensor(p.value, dtype=x.dtype, device=x.device)
    for b in rows:
        if not -x.shape[0] <= b < x.shape[0]:
            raise TraceError(f"patching({name!r}): row {b} is outside the batch of "
                             f"{x.shape[0]}")
        row = x[b]  # pos ... (or head q_pos k_pos)
        pos_axis, head_axis = (1, 0) if qk else (0, 1)
        if p.heads is not None and row.dim() < 3:
            raise TraceError(f"patching({name!r}): heads given, but this hook has no head "
                             f"axis (shape {tuple(x.shape)})")
        pos = _index(p.positions, row.shape[pos_axis], name, "position")
        heads = None if p.heads is None else _index(p.heads, row.shape[head_axis], name, "head")
        if heads is None:
            index: tuple = (pos,) if not qk else (slice(None), pos)
        elif qk:
            index = (heads.view(-1, 1), pos.view(1, -1))
        else:
            index = (pos.view(-1, 1), heads.view(1, -1))
        try:
            row[index] = value if p.mode == "replace" else row[index] + value
        except RuntimeError as e:
            raise TraceError(f"patching({name!r}): a value of shape {tuple(value.shape)} does "
                             f"not fit the selected slice {tuple(row[index].shape)}: "
                             f"{e}") from None


def _index(idx: Sequence[int] | None, size: int, name: str, what: str) -> Any:
    if idx is None:
        return torch.arange(size)
    bad = [i for i in idx if not -size <= i < size]
    if bad:
        raise TraceError(f"patching({name!r}): {what} {bad[0]} is out of range (size {size})")
    return torch.tensor(list(idx), dtype=torch.long)

"""The registry of traced quantities: for each, the TransformerLens hook it is read from, how
its positions are selected, and how many numbers it holds per position. The one place a
quantity is defined: :func:`~icl_probe.hooks.trace` captures it, and the planner sizes it
(:func:`icl_probe.experiments.sizing.record_bytes`) from the same entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from ..models import live_hooks


class Sizes(NamedTuple):
    """The sizes a quantity's width is made of: the model's, and the number of keys."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    keys: int


@dataclass(frozen=True)
class Quantity:
    """A traced quantity. ``layout`` says how positions are selected:

    - ``"query"``: (batch, pos, ...) gathered at the captured query positions;
    - ``"key"``: (batch, pos, kv_head, d_head) gathered at the key positions;
    - ``"row"``: (batch, head, q_pos, k_pos) rows gathered at the captured query positions;
    - ``"derived"``: computed from other quantities after the forward (``hook`` is the name
      it is known by).

    ``width(sizes)``: numbers per captured position (per key for ``"key"``); ``default``:
    traced when no ``what`` is given (the others only on request)."""

    hook: str
    layout: str
    width: Callable[[Sizes], int]
    default: bool = True


def _d_model(s: Sizes) -> int:
    return s.d_model


def _per_head(s: Sizes) -> int:
    return s.n_heads * s.d_head


def _per_kv_head(s: Sizes) -> int:
    return s.n_kv_heads * s.d_head


def _per_key(s: Sizes) -> int:
    return s.n_heads * s.keys


def _d_head(s: Sizes) -> int:
    return s.d_head


def _head_outputs(s: Sizes) -> int:
    return s.n_heads * s.d_model


REGISTRY: dict[str, Quantity] = {
    "resid_pre": Quantity("blocks.{l}.hook_resid_pre", "query", _d_model),
    "attn_in": Quantity("blocks.{l}.attn.hook_in", "query", _d_model),
    "q": Quantity("blocks.{l}.attn.hook_rot_q", "query", _per_head),
    "k": Quantity("blocks.{l}.attn.hook_rot_k", "key", _per_kv_head),
    "v": Quantity("blocks.{l}.attn.hook_v", "key", _per_kv_head),
    "scores": Quantity("blocks.{l}.attn.hook_attn_scores", "row", _per_key),
    "pattern": Quantity("blocks.{l}.attn.hook_pattern", "row", _per_key),
    "z": Quantity("blocks.{l}.attn.hook_z", "query", _per_head),
    "attn_out": Quantity("blocks.{l}.attn.hook_out", "query", _d_model),
    "resid_mid": Quantity("blocks.{l}.hook_resid_mid", "query", _d_model),
    "mlp_in": Quantity("blocks.{l}.mlp.hook_in", "query", _d_model),
    "mlp_out": Quantity("blocks.{l}.mlp.hook_out", "query", _d_model),
    # on request only: the pieces the model-space form of the implied update is built from
    "q_pre": Quantity("blocks.{l}.attn.hook_q", "query", _per_head, default=False),
    "q_normed": Quantity("blocks.{l}.attn.hook_q_normed", "query", _per_head, default=False),
    "rot_cos": Quantity("blocks.{l}.attn.hook_cos", "query", _d_head, default=False),
    "rot_sin": Quantity("blocks.{l}.attn.hook_sin", "query", _d_head, default=False),
    # W_O z per head, computed after the forward
    "head_out": Quantity("blocks.{l}.attn.hook_result", "derived", _head_outputs),
}

# quantity -> (hook name template, layout), read straight off a hook, traced by default
HOOKS: dict[str, tuple[str, str]] = {n: (q.hook, q.layout) for n, q in REGISTRY.items()
                                     if q.default and q.layout != "derived"}
# on request only
EXTRA: dict[str, tuple[str, str]] = {n: (q.hook, q.layout) for n, q in REGISTRY.items()
                                     if not q.default}
DERIVED: dict[str, str] = {n: q.hook for n, q in REGISTRY.items() if q.layout == "derived"}
QUANTITIES = tuple(HOOKS) + tuple(DERIVED)


def fired_hooks(model: Any) -> frozenset[str]:
    """The hook templates (of the architecture's and of every quantity above) that fire on
    ``model`` (:func:`icl_probe.models.live_hooks`)."""
    return live_hooks(model, tuple(q.hook for q in REGISTRY.values() if q.layout != "derived"))

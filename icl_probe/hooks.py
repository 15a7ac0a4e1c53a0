"""The attention-access layer: one uniform record of every attention layer, at the positions
asked for.

:func:`trace` runs a batch of prompts through a hooked model once and keeps, per layer, only
what was asked for and only at the positions asked for (always including the prediction
position), so memory grows with the request rather than with a full activation cache.

Quantities (TransformerLens hook names in brackets; ``pos`` = captured query positions,
``key_pos`` = key positions; notation of docs/science.md, Notation):

==============  =========================================  ===============================
name            hook                                       shape per layer
==============  =========================================  ===============================
resid_pre       ``blocks.{l}.hook_resid_pre``              batch pos d_model
attn_in         ``blocks.{l}.attn.hook_in`` (r_j)          batch pos d_model
q               ``blocks.{l}.attn.hook_rot_q`` (*)         batch pos head d_head
k               ``blocks.{l}.attn.hook_rot_k`` (*)         batch key_pos kv_head d_head
v               ``blocks.{l}.attn.hook_v``                 batch key_pos kv_head d_head
scores          ``blocks.{l}.attn.hook_attn_scores`` (*)   batch pos head key_pos
pattern         ``blocks.{l}.attn.hook_pattern``           batch pos head key_pos
z               ``blocks.{l}.attn.hook_z``                 batch pos head d_head
head_out        ``blocks.{l}.attn.hook_result`` (W_O z)    batch pos head d_model
attn_out        ``blocks.{l}.attn.hook_out`` (h^l)         batch pos d_model
resid_mid       ``blocks.{l}.hook_resid_mid``              batch pos d_model
mlp_in          ``blocks.{l}.mlp.hook_in`` (u)             batch pos d_model
mlp_out         ``blocks.{l}.mlp.hook_out``                batch pos d_model
==============  =========================================  ===============================

(*) q and k are always what the model multiplies: after QK-norm and rotary. Where the
bridge's post-rotary hooks do not fire (GPT-NeoX/Pythia, GPT-J) the captured ``hook_q`` /
``hook_k`` are rotated here with the model's own phases (:mod:`icl_probe.architectures`);
``record.meta["sources"]`` says how each quantity was obtained. Where the bridge has no genuine
pre-softmax hook (GPT-J fires ``hook_attn_scores`` with the pattern), ``scores`` are recomputed
from q and k exactly as the model computes them. ``attn_out`` and ``mlp_out`` are the attention
and MLP modules' own outputs (before Gemma's post-norms; elsewhere identical to
``hook_attn_out`` / ``hook_mlp_out``).

Also available on request (not in the default set): ``q_pre`` (``hook_q``: ``r W_Q + b_Q``
before QK-norm and rotary), ``q_normed`` (``hook_q_normed``, after QK-norm, before rotary),
``rot_cos`` / ``rot_sin`` (the layer's rotary phases at the captured positions).

Every quantity is stacked over the traced layers (a leading ``layer`` axis). Grouped-query
attention is resolved in one place, :func:`expand_kv` (:func:`grouped_einsum` fuses it into a
contraction): ``record.k``, ``record.v``, ``record.W_K`` and ``record.W_V`` are per *query*
head (``kv_head_of[h]`` is query head ``h``'s key/value group); ``record.data["k"]`` keeps the
``kv_head`` layout.
``record.scale`` holds each traced layer's factor multiplying ``q·k``; ``record.softcap`` and
``record.window`` its soft-capping and sliding window (None where the model has none).

Batches are right-padded, with no padding mask: the causal mask alone keeps every real
token off the padding, and positions (hence rotary phases) are unchanged, so each prompt's
record equals its unbatched one up to float rounding. Models in bfloat16/float16 keep their
records in float32, so that analyses downstream do not accumulate half-precision rounding.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> rec = ip.trace(model, [pair], what=("pattern", "z"))
>>> rec.pattern.shape[:3]          # layer batch pos (the prediction position only)
torch.Size([2, 1, 1])
>>> rec["blocks.1.attn.hook_z"].shape   # one layer, TransformerLens name
torch.Size([1, 1, 4, 12])
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import einops
import torch
from jaxtyping import Bool, Float, Int, Shaped
from tqdm.auto import tqdm

from .architectures import (AttentionSpec, allowed_keys, attention_scores, attention_spec,
                            gptj_phases, live_hooks, require_rotary_support, rotate_like_model)
from .errors import TraceError
from .prompts import PromptPair

# quantity -> (hook name template, layout); layout says how positions are selected:
#   "query": (batch, pos, ...) gathered at the captured positions
#   "key":   (batch, pos, kv_head, d_head) gathered at the key positions
#   "row":   (batch, head, q_pos, k_pos) rows gathered at the captured positions
HOOKS: dict[str, tuple[str, str]] = {
    "resid_pre": ("blocks.{l}.hook_resid_pre", "query"),
    "attn_in": ("blocks.{l}.attn.hook_in", "query"),
    "q": ("blocks.{l}.attn.hook_rot_q", "query"),
    "k": ("blocks.{l}.attn.hook_rot_k", "key"),
    "v": ("blocks.{l}.attn.hook_v", "key"),
    "scores": ("blocks.{l}.attn.hook_attn_scores", "row"),
    "pattern": ("blocks.{l}.attn.hook_pattern", "row"),
    "z": ("blocks.{l}.attn.hook_z", "query"),
    "attn_out": ("blocks.{l}.attn.hook_out", "query"),
    "resid_mid": ("blocks.{l}.hook_resid_mid", "query"),
    "mlp_in": ("blocks.{l}.mlp.hook_in", "query"),
    "mlp_out": ("blocks.{l}.mlp.hook_out", "query"),
}
# on request only: the pieces the model-space form of the implied update is built from
EXTRA: dict[str, tuple[str, str]] = {
    "q_pre": ("blocks.{l}.attn.hook_q", "query"),
    "q_normed": ("blocks.{l}.attn.hook_q_normed", "query"),
    "rot_cos": ("blocks.{l}.attn.hook_cos", "query"),
    "rot_sin": ("blocks.{l}.attn.hook_sin", "query"),
}
DERIVED = {"head_out": "blocks.{l}.attn.hook_result"}
QUANTITIES = tuple(HOOKS) + tuple(DERIVED)
_KV_NAMES = ("k", "v", "W_K", "W_V", "b_K", "b_V")
_HALF = (torch.float16, torch.bfloat16)

PositionSpec = str | Sequence[Any] | Callable[[PromptPair], Any]

# Shapes of the record's tensors, in the glossary's axis names (jaxtyping; tests/test_shapes.py
# checks them on a real record). Aliases rather than inline strings: pyflakes reads a string
# inside an annotation as Python and rejects "batch pos".
_PerHead = Int[torch.Tensor, "head"]
_PerPrompt = Int[torch.Tensor, "batch"]
_PositionIds = Int[torch.Tensor, "batch pos"]
_PositionMask = Bool[torch.Tensor, "batch pos"]
_KeyPositionIds = Int[torch.Tensor, "batch key_pos"]
_KeyPositionMask = Bool[torch.Tensor, "batch key_pos"]
_Logits = Float[torch.Tensor, "batch d_vocab"]
_PerLayer = Float[torch.Tensor, "layer"]
_AtPred = Shaped[torch.Tensor, "layer batch ..."]


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


def resolve_layers(layers: Iterable[int] | None, n_layers: int, where: str,
                   error: type[Exception] = TraceError) -> tuple[int, ...]:
    """``layers`` (None: every layer) as a tuple of block indices, or ``error`` naming the
    first one that is not an integer in ``0 .. n_layers - 1``."""
    if layers is None:
        return tuple(range(n_layers))
    valid = f"the model's layers are 0..{n_layers - 1}"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise error(f"{where}(layers={layers!r}): expected a list of layer indices, e.g. "
                    f"layers=[{layers!r}]; {valid}")
    given = list(layers)
    if not given:
        raise error(f"{where}(layers=[]): no layers given; {valid} (None: all)")
    out = []
    for l in given:
        try:
            if isinstance(l, bool):
                raise TypeError
            index = operator.index(l)
        except TypeError:
            raise error(f"{where}(layers={given!r}): layer {l!r} is not an integer; "
                        f"{valid}") from None
        if not 0 <= index < n_layers:
            raise error(f"{where}(layers={given!r}): layer {index} is out of range; {valid}")
        out.append(index)
    return tuple(out)


def check_batch_size(batch_size: Any, where: str, error: type[Exception] = TraceError) -> None:
    """``error`` unless ``batch_size`` is a positive integer."""
    ok = not isinstance(batch_size, bool) and isinstance(batch_size, int) and batch_size >= 1
    if not ok:
        raise error(f"{where}(batch_size={batch_size!r}): batch_size is the number of prompts "
                    "per forward pass and must be a positive integer, e.g. batch_size=8")


@dataclass
class AttentionRecord:
    """Per-layer attention quantities for a batch of prompts (see the module docstring).

    ``positions[b, i]`` is the token position of slot ``i`` (``pos_mask`` marks real slots);
    ``pred_slot[b]`` is the slot of the prediction position ``pred[b]``. ``key_positions`` /
    ``key_mask`` do the same for the key axis of ``k`` and ``v``; the key axis of ``scores`` and
    ``pattern`` is the token position itself (``key_pos < lengths[b]``). ``scale[i]`` is the
    factor layer ``layers[i]`` multiplies ``q·k`` by; ``softcap[i]`` / ``window[i]`` its logit
    soft-capping and sliding window (None where it has none).
    """

    layers: tuple[int, ...]
    n_heads: int
    n_kv_heads: int
    d_head: int
    kv_head_of: _PerHead
    lengths: _PerPrompt
    pred: _PerPrompt
    positions: _PositionIds
    pos_mask: _PositionMask
    pred_slot: _PerPrompt
    key_positions: _KeyPositionIds
    key_mask: _KeyPositionMask
    data: dict[str, torch.Tensor]  # shapes: the module docstring's table, after "layer"
    weights: dict[str, torch.Tensor]  # shapes: attention_weights
    logits: _Logits | None
    hook_names: dict[str, str]
    kind: str = "icl"
    q_rotated: bool = True
    meta: dict = field(default_factory=dict)
    scale: _PerLayer | None = None
    softcap: tuple[float | None, ...] = ()
    window: tuple[int | None, ...] = ()

    # ---------------------------------------------------------------- access
    def __getattr__(self, name: str) -> torch.Tensor:
        data = self.__dict__.get("data", {})
        weights = self.__dict__.get("weights", {})
        if name in ("k", "v") and name in data:
            return expand_kv(data[name], self.kv_head_of, dim=3)
        if name in data:
            return data[name]
        if name in ("W_K", "W_V", "b_K", "b_V") and name in weights:
            return expand_kv(weights[name], self.kv_head_of, dim=1)
        if name in weights:
            return weights[name]
        raise AttributeError(
            f"AttentionRecord has no {name!r}; captured: {sorted(data)}, weights: "
            f"{sorted(weights)}. Ask trace(..., what=[...]) for it"
        )

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise TraceError(f"layer {layer} was not traced; traced layers: {list(self.layers)}")

    def __getitem__(self, hook_name: str) -> torch.Tensor:
        """A TransformerLens hook name (``"blocks.3.attn.hook_pattern"``) -> that layer's
        tensor, or a quantity name (``"pattern"``) -> all traced layers."""
        if hook_name in self.data or hook_name in _KV_NAMES:
            return getattr(self, hook_name)
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
        if m:
            suffix = m.group(2)
            for q, template in self.hook_names.items():
                if template.split("{l}.", 1)[1] == suffix and q in self.data:
                    return getattr(self, q)[self.layer_index(int(m.group(1)))]
        raise KeyError(
            f"{hook_name!r} is not in this record; it holds "
            + ", ".join(self.hook_names[q] for q in self.data)
        )

    def at_pred(self, name: str) -> _AtPred:
        """A query-side quantity at each prompt's prediction position: (layer, batch, ...)."""
        x = getattr(self, name)
        b = torch.arange(x.shape[1], device=x.device)
        return x[:, b, self.pred_slot.to(x.device)]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


# ------------------------------------------------------------------------------ positions


def _spans(prompt: Any, kind: str):
    return prompt.spans_of(kind) if isinstance(prompt, PromptPair) else None


def _resolve_positions(spec: PositionSpec, prompt: Any, i: int, ids: torch.Tensor, kind: str,
                       what: str) -> torch.Tensor:
    n = len(ids)
    if isinstance(spec, str):
        if spec == "pred":
            return torch.tensor([n - 1])
        if spec == "all":
            return torch.arange(n)
        spans = _spans(prompt, kind)
        if spans is None:
            raise TraceError(f"trace({what}={spec!r}) needs PromptPairs with spans, got token ids")
        if spec == "demos":
            return spans.demo_indices()
        if spec == "query":
            return spans.query_indices()
        if spec == "labels":
            return torch.cat([d.label.indices() for d in spans.demos]) if spans.demos else \
                torch.zeros(0, dtype=torch.long)
        raise TraceError(
            f"trace({what}={spec!r}): expected 'pred', 'all', 'demos', 'query', 'labels', a "
            "callable(prompt) -> positions, or one index list per prompt"
        )
    pos = spec(prompt) if callable(spec) else spec[i]
    pos = torch.as_tensor(pos, dtype=torch.long).flatten()
    if pos.numel() and (pos.min() < 0 or pos.max() >= n):
        raise TraceError(
            f"trace({what}=...): prompt {i} has {n} tokens but positions "
            f"{pos.min().item()}..{pos.max().item()} were asked for"
        )
    return pos


def pad_stack(rows: list[torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


def pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# ------------------------------------------------------------------------------ weights


def _weights_fingerprint(model: Any) -> tuple:
    # A parameter replaced, re-allocated or modified in place (autograd's version counter)
    # changes the fingerprint. Edits through ``.data`` bypass the counter: call
    # ``clear_weight_cache(model)`` after those.
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def clear_weight_cache(model: Any) -> None:
    """Forget the stacked attention weights cached on ``model``."""
    model.__dict__.pop("_icl_probe_weights", None)


def attention_weights(model: Any, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """``W_Q`` (layer head d_model d_head), ``W_K``/``W_V`` (layer kv_head d_model d_head),
    ``W_O`` (layer head d_head d_model), and the biases the model has, for ``layers``.
    TransformerLens convention: ``q = attn_in @ W_Q + b_Q`` (the papers write ``W_Q r``;
    docs/science.md, Notation).

    Half-precision weights are widened to float32, as records are. Stacking (and widening)
    copies every attention matrix, so the result is cached on the model until its parameters
    change: every record of one model shares one stack."""
    key = (tuple(layers), _weights_fingerprint(model))
    cached = model.__dict__.get("_icl_probe_weights")
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    out = {k: (w.float() if w.dtype in _HALF else w)
           for k, w in _stack_weights(model, layers).items()}
    model.__dict__["_icl_probe_weights"] = (key, out)
    return dict(out)


def _stack_weights(model: Any, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    idx = list(layers)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            try:
                w = getattr(model, name)
            except (AttributeError, ValueError, RuntimeError):
                continue  # e.g. bias-free projections have no b_*
            if w is not None:
                out[name] = w[idx].detach()
    return out


# ------------------------------------------------------------------------------ trace


def hook_names(model: Any) -> tuple[dict[str, str], bool]:
    """The TransformerLens hook name (template) of each quantity, and whether every quantity
    is read straight off that hook. False where this module rotates q and k itself or
    recomputes the scores after the forward (GPT-NeoX, GPT-J): callers that register the hooks
    themselves must then go through :func:`trace`."""
    names = {q: t for q, (t, _) in HOOKS.items()}
    names.update(DERIVED)
    spec = attention_spec(model)
    if spec.rotary_from == "none":
        names["q"], names["k"] = "blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k"
    direct = spec.rotary_from in ("hooks", "none") and spec.scores_hooked
    return names, direct


def _q_normed_transform(model: Any, spec: AttentionSpec) -> Callable | None:
    """``hook_q_normed`` fires on (batch, head, pos, d_head) after a post-reshape QK-norm
    (Gemma 3, Qwen3) and on (batch, pos, head·d_head) before the reshape (OLMo 2)."""
    n_heads = model.cfg.n_heads
    if spec.qk_norm == "post_reshape":
        return lambda x: einops.rearrange(x, "batch head pos d_head -> batch pos head d_head")
    if spec.qk_norm == "pre_reshape":
        return lambda x: einops.rearrange(x, "batch pos (head d_head) -> batch pos head d_head",
                                          head=n_heads)
    return None


@dataclass(frozen=True)
class _Plan:
    """What to capture for one trace: direct hooks, and what ``_Capture.finish`` completes."""

    direct: dict[str, tuple[str, str]]  # quantity -> (hook template, layout)
    rotate: bool  # q/k come from hook_q/hook_k and are rotated after the forward
    qk_hooks: tuple[str, str]  # templates q and k are read from when they are stashed
    stash_q: bool
    stash_k: bool  # k at the key positions (the record's k)
    stash_k_all: bool  # k at every position (recomputed scores)
    derive: tuple[str, ...]  # "q", "k", "scores", "rot_cos", "rot_sin" completed in finish
    sources: dict[str, str]


def _plan(model: Any, spec: AttentionSpec, captured: Sequence[str], live: frozenset[str]
          ) -> tuple[_Plan, list[str]]:
    """The capture plan for ``captured`` quantities, and the ones this model cannot supply."""
    direct: dict[str, tuple[str, str]] = {}
    derive: list[str] = []
    sources: dict[str, str] = {}
    missing: list[str] = []
    needs_qk = [w for w in captured if w in ("q", "k")]
    derive_scores = "scores" in captured and not spec.scores_hooked
    if (needs_qk or derive_scores) and spec.rotary_from == "unknown":
        require_rotary_support(model, f"trace(what={list(captured)})")
    rotate = spec.rotary_from in ("phases", "buffer")
    q_t, k_t = (("blocks.{l}.attn.hook_rot_q", "blocks.{l}.attn.hook_rot_k")
                if spec.rotary_from == "hooks" else
                ("blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k"))
    phase_hooks = ("blocks.{l}.attn.hook_cos", "blocks.{l}.attn.hook_sin") \
        if spec.rotary_from == "phases" else ()
    how = {"hooks": "hook_rot_{x}", "none": "hook_{x}",
           "phases": "hook_{x} rotated with the layer's hook_cos/hook_sin",
           "buffer": "hook_{x} rotated with GPT-J's embed_positions phases",
           }.get(spec.rotary_from, "")

    def available(templates: Sequence[str]) -> bool:
        return all(t in live for t in templates)

    for w in captured:
        if w in ("q", "k"):
            need = ((q_t if w == "q" else k_t),) + phase_hooks
            if not available(need):
                missing.append(w)
            elif rotate:
                derive.append(w)
                sources[w] = how.format(x=w)
            else:
                direct[w] = (need[0], "query" if w == "q" else "key")
                sources[w] = how.format(x=w)
        elif w == "scores" and derive_scores:
            if not available((q_t, k_t) + phase_hooks) or \
                    "blocks.{l}.attn.hook_pattern" not in live:
                missing.append(w)
            else:
                derive.append(w)
                sources[w] = ("recomputed from q and k as the model computes them (this bridge "
                              "fires hook_attn_scores with the pattern)")
        elif w in ("rot_cos", "rot_sin"):
            if spec.rotary_from == "buffer":
                derive.append(w)
                sources[w] = "GPT-J's embed_positions table"
            elif spec.rotary_from in ("hooks", "phases") and available((EXTRA[w][0],)):
                direct[w] = EXTRA[w]
                sources[w] = EXTRA[w][0].split("{l}.", 1)[1]
            else:
                missing.append(w)
        else:
            template, layout = HOOKS[w] if w in HOOKS else EXTRA[w]
            if template not in live:
                missing.append(w)
            else:
                direct[w] = (template, layout)
                sources[w] = template.split("{l}.", 1)[1]
    stash_q = any(w in derive for w in ("q", "scores"))
    plan = _Plan(direct=direct, rotate=rotate, qk_hooks=(q_t, k_t), stash_q=stash_q,
                 stash_k="k" in derive, stash_k_all="scores" in derive, derive=tuple(derive),
                 sources=sources)
    return plan, missing


class _Capture:
    """Hook functions for one trace. ``set_batch`` points them at the current chunk;
    ``finish`` completes, after the chunk's forward, what needs more than one hook: q and k
    rotated with phases that fire after them, scores recomputed from q and k."""

    def __init__(self, model: Any, spec: AttentionSpec, plan: _Plan, outputs: Sequence[str],
                 layers: Sequence[int], store: torch.device | None):
        self.model, self.spec, self.plan, self.layers, self.store = model, spec, plan, layers, store
        self.out: dict[str, list[list[torch.Tensor]]] = {q: [[] for _ in layers] for q in outputs}
        self.stash: dict[tuple[str, int], torch.Tensor] = {}

    def set_batch(self, idx: torch.Tensor, key_idx: torch.Tensor | None,
                  lengths: torch.Tensor) -> None:
        self.idx, self.key_idx, self.lengths = idx, key_idx, lengths
        self.stash.clear()

    def _gather(self, x: torch.Tensor, layout: str, name: str) -> torch.Tensor:
        B = self.idx.shape[0]
        if x.shape[0] != B and x.shape[0] == 1:  # rotary phases are shared over the batch
            x = x.expand(B, *x.shape[1:])
        idx = self.idx.to(x.device)
        if layout == "row":  # rows of (batch, head, query token, key_pos) at the captured pos
            if x.dim() != 4:
                raise TraceError(f"{name}: expected (batch, head, q_pos, k_pos), got "
                                 f"{tuple(x.shape)}")
            _, H, _, T = x.shape
            rows = x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], T))
            return einops.rearrange(rows, "batch head pos key_pos -> batch pos head key_pos")
        if layout == "all" or (layout == "key" and self.key_idx is None):
            return x.clone()
        sel = idx if layout == "query" else self.key_idx.to(x.device)
        view = sel.view(*sel.shape, *([1] * (x.dim() - 2)))
        return x.gather(1, view.expand(*sel.shape, *x.shape[2:]))

    def _put(self, quantity: str, slot: int, y: torch.Tensor) -> None:
        if quantity not in self.out:
            return
        if y.dtype in _HALF:  # records of half-precision models are kept in float32
            y = y.float()
        if self.store is not None:
            y = y.to(self.store)
        self.out[quantity][slot].append(y)

    def direct(self, quantity: str, slot: int, layout: str, name: str,
               transform: Callable | None = None) -> Callable:
        def fn(x: torch.Tensor, hook: Any = None) -> None:
            if transform is not None:
                x = transform(x)
            self._put(quantity, slot, self._gather(x, layout, name))

        return fn

    def keep(self, key: str, slot: int, layout: str, name: str) -> Callable:
        def fn(x: torch.Tensor, hook: Any = None) -> None:
            self.stash[(key, slot)] = self._gather(x, layout, name).detach()

        return fn

    def _phases(self, slot: int, layout: str, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's rotary (cos, sin) at the query / key / every position: batch pos r."""
        B = self.idx.shape[0]
        if layout == "query":
            pos = self.idx
        elif layout == "key" and self.key_idx is not None:
            pos = self.key_idx
        else:
            pos = torch.arange(like.shape[1])[None].expand(B, -1)
        if self.spec.rotary_from == "buffer":
            return gptj_phases(self.model, self.layers[slot], pos.to(like.device), like.dtype)
        cos, sin = self.stash[("cos", slot)], self.stash[("sin", slot)]  # batch T r

        def at(x: torch.Tensor) -> torch.Tensor:
            x = x.expand(B, *x.shape[1:]) if x.shape[0] != B else x
            p = pos.to(x.device)
            return x.gather(1, p[..., None].expand(*p.shape, x.shape[-1]))

        return at(cos), at(sin)

    def _rotated(self, key: str, slot: int, layout: str) -> torch.Tensor:
        x = self.stash[(key, slot)]  # batch pos head d_head
        if not self.plan.rotate:
            return x
        cos, sin = self._phases(slot, layout, x)
        return rotate_like_model(self.spec, x, cos[:, :, None, :], sin[:, :, None, :])

    def finish(self) -> None:
        plan, spec = self.plan, self.spec
        for slot, layer in enumerate(self.layers):
            q = self._rotated("q", slot, "query") if plan.stash_q else None
            if "q" in plan.derive:
                self._put("q", slot, q)
            if "k" in plan.derive:
                self._put("k", slot, self._rotated("k", slot, "key"))
            if "scores" in plan.derive:
                k_all = self._rotated("k_all", slot, "all")  # batch T kv_head d_head
                kv_head_of = group_mapping(q.shape[2], k_all.shape[2])
                T = k_all.shape[1]
                allowed = allowed_keys(spec, layer, self.idx.to(q.device), T, self.lengths)
                self._put("scores", slot, attention_scores(
                    spec, layer, q, expand_kv(k_all, kv_head_of, dim=2), allowed))
            for name in ("rot_cos", "rot_sin"):
                if name in plan.derive:
                    dtype = next(self.model.parameters()).dtype  # GPT-J casts to the key's
                    cos, sin = gptj_phases(self.model, layer, self.idx, dtype)
                    self._put(name, slot, cos if name == "rot_cos" else sin)
        self.stash.clear()


def query_capture_hooks(model: Any, store: list[torch.Tensor]) -> list[tuple[str, Callable]]:
    """Forward hooks that append, for every layer in order, the first prompt's query vectors
    as the model uses them (after QK-norm and rotary; pos head d_head, detached) to ``store``.
    For code that runs its own forwards (the fine-tuning loop records the queries of each step
    for Kendall's τ); on GPT-NeoX and GPT-J the captured ``hook_q`` is rotated here with the
    layer's own phases, exactly as :func:`trace` does."""
    spec = require_rotary_support(model, "query_capture_hooks()")
    hooks: list[tuple[str, Callable]] = []
    for l in range(model.cfg.n_layers):
        if spec.rotary_from in ("hooks", "none"):
            name = f"blocks.{l}.attn.hook_{'rot_q' if spec.rotary_from == 'hooks' else 'q'}"
            hooks.append((name, lambda x, hook=None: store.append(x[0].detach().clone())))
        elif spec.rotary_from == "buffer":
            def gptj(x: torch.Tensor, hook: Any = None, l: int = l) -> None:
                pos = torch.arange(x.shape[1], device=x.device)
                cos, sin = gptj_phases(model, l, pos, x.dtype)  # pos r/2
                store.append(rotate_like_model(spec, x[0].detach(), cos[:, None], sin[:, None]))
            hooks.append((f"blocks.{l}.attn.hook_q", gptj))
        else:  # "phases": hook_q fires before the layer's hook_cos / hook_sin
            pending: dict[str, torch.Tensor] = {}

            def keep(x: torch.Tensor, hook: Any = None, key: str = "", pending=pending) -> None:
                pending[key] = x[0].detach()

            def done(x: torch.Tensor, hook: Any = None, pending=pending) -> None:
                cos, sin = pending.pop("cos"), x[0].detach()  # pos r
                store.append(rotate_like_model(spec, pending.pop("q"), cos[:, None], sin[:, None]))
            hooks += [(f"blocks.{l}.attn.hook_q", lambda x, hook=None, k=keep: k(x, key="q")),
                      (f"blocks.{l}.attn.hook_cos", lambda x, hook=None, k=keep: k(x, key="cos")),
                      (f"blocks.{l}.attn.hook_sin", done)]
    return hooks


def logits_to_keep(model: Any, last: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Only the prediction positions need logits: where the model's forward takes
    ``logits_to_keep`` (transformers' causal LMs), unembed just those positions (the
    unembedding of every position is most of a short prompt's forward on a 49k vocabulary).
    Returns, per row, the index into the returned logits' position axis, and the kwargs."""
    hf = getattr(model, "original_model", None)
    accepts = model.__dict__.get("_icl_probe_keeps_logits")
    if accepts is None:
        import inspect

        try:
            accepts = "logits_to_keep" in inspect.signature(hf.forward).parameters
        except (TypeError, ValueError, AttributeError):
            accepts = False
        model.__dict__["_icl_probe_keeps_logits"] = accepts
    if not accepts:
        return last, {}
    uniq, inverse = torch.unique(last, return_inverse=True)
    return inverse, {"logits_to_keep": uniq}


def trace(
    model: Any,
    prompts: Sequence[PromptPair] | Sequence[torch.Tensor],
    *,
    kind: str = "icl",
    what: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    positions: PositionSpec = "pred",
    key_positions: PositionSpec = "all",
    batch_size: int = 8,
    store_device: str | torch.device | None = None,
    progress: bool | None = None,
) -> AttentionRecord:
    """Run ``prompts`` (``PromptPair`` s, whose ``kind`` = ``"icl"`` or ``"zs"`` ids are used,
    or 1-D token id tensors) and record every attention layer.

    ``what``: quantities (default: all of :data:`QUANTITIES` this model has; the extras of
    the module docstring on request); ``layers``: default all; ``positions``: query positions to
    keep, ``"pred"`` (default), ``"all"``, ``"demos"``, ``"query"``, ``"labels"``, one index list
    per prompt, or ``callable(prompt)``; the prediction position is always added.
    ``key_positions``: positions of ``k`` and ``v`` (default ``"all"``). Batches of
    ``batch_size`` prompts of similar length are right-padded.
    """
    if not prompts:
        raise TraceError("trace(): no prompts given")
    wanted = tuple(QUANTITIES) if what is None else tuple(dict.fromkeys(what))
    known = tuple(QUANTITIES) + tuple(EXTRA)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise TraceError(f"trace(what={list(wanted)}): unknown {unknown}; known: {list(known)}")
    cfg = model.cfg
    layer_list = resolve_layers(layers, cfg.n_layers, "trace")
    check_batch_size(batch_size, "trace")
    spec = attention_spec(model)
    live = live_hooks(model)
    captured = [w for w in wanted if w not in DERIVED]
    if "head_out" in wanted and "z" not in captured:
        captured.append("z")
    if what is None and spec.rotary_from == "unknown":  # default request: what exists
        captured = [w for w in captured if w not in ("q", "k") and
                    (w != "scores" or spec.scores_hooked)]
    plan, missing = _plan(model, spec, captured, live)
    if missing and what is not None:
        names, _ = hook_names(model)
        template = {**names, **{q: t for q, (t, _) in EXTRA.items()}}[missing[0]]
        raise TraceError(
            f"trace(what={list(wanted)}): this model ({spec.family}) has no live hook "
            f"{template.format(l=layer_list[0])!r} (needed for {missing[0]!r}); e.g. parallel "
            "attention/MLP blocks have no resid_mid, and only QK-norm models have q_normed"
        )
    captured = [q for q in captured if q not in missing]

    id_list = [p.ids(kind) if isinstance(p, PromptPair) else torch.as_tensor(p) for p in prompts]
    for i, ids in enumerate(id_list):
        if ids.dim() != 1 or len(ids) == 0:
            raise TraceError(f"trace(): prompt {i} must be a non-empty 1-D id tensor, got "
                             f"{tuple(ids.shape)}")
        if len(ids) > cfg.n_ctx:
            raise TraceError(f"trace(): prompt {i} has {len(ids)} tokens; the context holds "
                             f"{cfg.n_ctx}")
    lengths = torch.tensor([len(x) for x in id_list])
    pos_rows, pred_slot = [], []
    for i, (p, ids) in enumerate(zip(prompts, id_list)):
        pos = _resolve_positions(positions, p, i, ids, kind, "positions")
        pos = torch.unique(torch.cat([pos, torch.tensor([len(ids) - 1])]))  # sorted
        pos_rows.append(pos)
        pred_slot.append(int((pos == len(ids) - 1).nonzero()[0, 0]))
    all_keys = isinstance(key_positions, str) and key_positions == "all"
    key_rows = [torch.arange(len(ids)) if all_keys else
                _resolve_positions(key_positions, p, i, ids, kind, "key_positions")
                for i, (p, ids) in enumerate(zip(prompts, id_list))]

    device = next(model.parameters()).device
    store = torch.device(store_device) if store_device is not None else None
    cap = _Capture(model, spec, plan, captured, layer_list, store)
    q_normed = _q_normed_transform(model, spec)
    fwd_hooks = []
    for slot, l in enumerate(layer_list):
        for q, (template, layout) in plan.direct.items():
            name = template.format(l=l)
            fwd_hooks.append((name, cap.direct(q, slot, layout, name,
                                               q_normed if q == "q_normed" else None)))
        q_t, k_t = (t.format(l=l) for t in plan.qk_hooks)
        if plan.stash_q:
            fwd_hooks.append((q_t, cap.keep("q", slot, "query", q_t)))
        if plan.stash_k:
            fwd_hooks.append((k_t, cap.keep("k", slot, "key", k_t)))
        if plan.stash_k_all:
            fwd_hooks.append((k_t, cap.keep("k_all", slot, "all", k_t)))
        if spec.rotary_from == "phases" and (plan.stash_q or plan.stash_k or plan.stash_k_all):
            for key in ("cos", "sin"):
                name = f"blocks.{l}.attn.hook_{key}"
                fwd_hooks.append((name, cap.keep(key, slot, "all", name)))
    tok = getattr(model, "tokenizer", None)
    pad_id = (getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
    order = sorted(range(len(id_list)), key=lambda i: len(id_list[i]))
    chunks = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    logits_parts = []
    bar = tqdm(chunks, desc="trace", unit="batch", disable=not (progress or
               (progress is None and len(chunks) > 4)))
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
        for chunk in bar:
            L = int(lengths[chunk].max())
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : lengths[i]] = id_list[i]
            idx, _ = pad_stack([pos_rows[i] for i in chunk])
            kidx = None if all_keys else pad_stack([key_rows[i] for i in chunk])[0]
            cap.set_batch(idx, kidx, lengths[chunk])
            # No padding mask: with right padding the causal mask already keeps every real
            # token off the padding. A padding mask would leave the padding's own rows fully
            # masked under a sliding window (Mistral, Gemma), and their NaNs reach real rows of
            # the next layer through 0 * NaN.
            last = lengths[chunk] - 1
            keep, kwargs = logits_to_keep(model, last)
            logits = model(ids.to(device), **kwargs)
            cap.finish()
            part = logits[torch.arange(len(chunk), device=logits.device), keep.to(logits.device)]
            part = part.float() if part.dtype in _HALF else part
            logits_parts.append(part.to(store) if store is not None else part)

    # Reassemble in the caller's order, padding chunk-local axes to the global widths.
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    positions_t, pos_mask = pad_stack(pos_rows)
    key_t, key_mask = pad_stack(key_rows)
    P, K, T = positions_t.shape[1], key_t.shape[1], int(lengths.max())
    layouts = {q: (HOOKS.get(q) or EXTRA[q])[1] for q in captured}
    data: dict[str, torch.Tensor] = {}
    for q in captured:
        layout = layouts[q]
        per_layer = []
        for slot in range(len(layer_list)):
            parts = cap.out[q][slot]
            parts = [pad_to(x, 1, K if layout == "key" else P) for x in parts]
            if layout == "row":
                parts = [pad_to(x, 3, T) for x in parts]
            per_layer.append(torch.cat(parts, 0)[inverse.to(parts[0].device)])
        data[q] = torch.stack(per_layer)
        if layout == "query" or layout == "row":
            m = pos_mask.to(data[q].device).view(1, *pos_mask.shape, *([1] * (data[q].dim() - 3)))
            data[q] = data[q] * m
    weights = attention_weights(model, layer_list)
    if store is not None:
        weights = {k: w.to(store) for k, w in weights.items()}
    if "head_out" in wanted:
        W_O = weights["W_O"].to(data["z"].device)
        data["head_out"] = einops.einsum(data["z"], W_O, "layer batch pos head d_head, "
                                         "layer head d_head d_model -> "
                                         "layer batch pos head d_model")
        if "z" not in wanted:
            del data["z"]
    logits_all = torch.cat(logits_parts, 0)[inverse.to(logits_parts[0].device)]
    if "scores" in data:
        # Keys the model masked hold the dtype's minimum (added by the bridge's mask: padding,
        # the causal triangle, a sliding window); they become -inf.
        x = data["scores"]
        valid = torch.arange(T)[None, :] < lengths[:, None]
        causal = torch.arange(T)[None, None, :] <= positions_t[:, :, None]
        ok = (valid[:, None, :] & causal).to(x.device)[None, :, :, None, :]
        data["scores"] = x.masked_fill(~ok | (x <= torch.finfo(x.dtype).min / 2), float("-inf"))
    names, _ = hook_names(model)
    names.update({q: t for q, (t, _) in EXTRA.items()})
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return AttentionRecord(
        layers=layer_list, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_head=cfg.d_head,
        kv_head_of=group_mapping(cfg.n_heads, n_kv),
        lengths=lengths, pred=lengths - 1, positions=positions_t, pos_mask=pos_mask,
        pred_slot=torch.tensor(pred_slot), key_positions=key_t, key_mask=key_mask, data=data,
        weights=weights, logits=logits_all,
        hook_names={q: names[q] for q in data}, kind=kind, q_rotated=True,
        meta={"sources": {q: plan.sources.get(q, DERIVED.get(q, "")) for q in data},
              "family": spec.family},
        scale=torch.tensor([spec.scale[l] for l in layer_list], dtype=torch.float64),
        softcap=tuple(spec.softcap[l] for l in layer_list),
        window=tuple(spec.window[l] for l in layer_list),
    )

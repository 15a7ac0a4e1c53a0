"""How each model family turns q and k into attention scores, read off the wrapped model.

TransformerLens's bridge exposes one hook vocabulary for every family, but which hooks carry
what depends on how the bridge wraps the family's attention:

=====================================  ==========================  ==========================
bridge attention class (families)      post-rotary q, k            pre-softmax scores
=====================================  ==========================  ==========================
PositionEmbeddingsAttentionBridge      ``hook_rot_q``/``hook_rot_k``  ``hook_attn_scores``
(Llama, Mistral, Qwen2/3, Gemma 2/3,   (after QK-norm, rotary,
OLMo 2, Phi ...)                       partial rotary)
JointQKVPositionEmbeddingsAttention    ``hook_q``/``hook_k`` rotated  ``hook_attn_scores``
(GPT-NeoX / Pythia)                    here with the layer's own
                                       ``hook_cos``/``hook_sin``
JointQKVAttentionBridge (GPT-2)        ``hook_q``/``hook_k`` (no      ``hook_attn_scores``
                                       rotary)
AttentionBridge, delegating to the     ``hook_q``/``hook_k`` rotated  none: the bridge fires
HF module (GPT-J)                      here with GPT-J's sinusoid     ``hook_attn_scores`` with
                                       table ``embed_positions``      the *pattern*; scores are
                                                                      recomputed from q and k
=====================================  ==========================  ==========================

:func:`attention_spec` reads the rest off the model: the factor ``scale`` that multiplies
``q·k`` in each layer (``1/√d_head``; Gemma's ``query_pre_attn_scalar^-1/2``; GPT-2's
``1/(√d_head (l+1))`` with ``scale_attn_by_inverse_layer_idx``), Gemma 2's logit soft-capping,
each layer's sliding window (Mistral; Gemma's local layers), the QK-norm phase (Gemma 3, Qwen3,
OLMo 2) and the dtypes the model computes scores and softmax in. :func:`attention_scores`
recomputes the scores from q and k with all of it::

    scores = softcap · tanh(scale · q·k / softcap)   (softcap only where the model has it)
    scores[key] = -inf  unless  q_pos - window < key_pos <= q_pos  and the key is a real token

Rotary embeddings are applied with the phases the model itself produced (:func:`rotate`),
so partial rotary (NeoX's ``rotary_pct``, Phi), per-layer-type rope (Gemma 3's local/global
bases) and rope scaling come out exactly as the forward used them.

>>> import icl_probe as ip
>>> spec = attention_spec(ip.tiny_model("neox", rotary_pct=0.25))
>>> spec.family, spec.rotary_from, spec.convention
('GPTNeoXForCausalLM', 'phases', 'rotate_half')
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

import einops
import torch
from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
from transformer_lens.model_bridge.generalized_components import (AttentionBridge,
                                                                  JointQKVAttentionBridge,
                                                                  JointQKVPositionEmbeddingsAttentionBridge,
                                                                  PositionEmbeddingsAttentionBridge)
from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config

from ..errors import IclProbeError, ModelLoadError, TraceError
from .compat import gptj_rotary_table

# ------------------------------------------------------------------------------ boot


def supported_architectures() -> list[str]:
    """The Hugging Face model classes TransformerLens's bridge can wrap."""
    return sorted(SUPPORTED_ARCHITECTURES)


def nearest_architectures(name: str, n: int = 3) -> list[str]:
    """The supported classes whose names are closest to ``name`` (for error messages)."""
    supported = supported_architectures()
    close = difflib.get_close_matches(name, supported, n=n, cutoff=0.0)
    return close or supported[:n]


def fill_architectures(config: Any, model_class: str) -> None:
    """Give ``config`` the ``architectures`` entry it lacks (models built in memory from a
    config, GGUF files), from the model's class: the bridge picks its adapter from that entry
    and fails to boot without it."""
    if not getattr(config, "architectures", None):
        config.architectures = [model_class]


def check_bridgeable(hf_model: Any) -> None:
    """Raise :class:`ModelLoadError` naming the class and the nearest supported families
    unless the bridge has an adapter for ``hf_model``'s class."""
    cls = type(hf_model).__name__
    supported = set(supported_architectures())
    try:
        chosen = determine_architecture_from_hf_config(hf_model.config)
    except ValueError:
        chosen = None
    # The bridge also maps a bare model_type to its canonical class; that class must be this
    # model's own, or the adapter would wrap modules that are not there.
    if cls in supported and chosen is not None:
        return
    if chosen == cls:
        return
    raise ModelLoadError(
        f"load_model(): TransformerLens's bridge cannot wrap a {cls} (model_type "
        f"{getattr(hf_model.config, 'model_type', None)!r}): it has no adapter for that class. "
        f"Nearest supported families: {', '.join(nearest_architectures(cls))}. Fix: load a "
        f"causal LM of a supported family (icl_probe.architectures.supported_architectures() "
        f"lists all {len(supported)})"
    )


# ------------------------------------------------------------------------------ live hooks


LIVE_HOOKS_CACHE = "_icl_probe_live_hooks"  # the attribute that remembers a model's probes


def live_hooks(model: Any, also: Iterable[str] = ()) -> frozenset[str]:
    """Layer-0 hook names (as ``{l}`` templates) that actually fire on this model, plus
    ``"scores_are_pattern"`` when ``hook_attn_scores`` fires with the softmaxed pattern (bridges
    that delegate attention to the HF module fire it post hoc with the weights HF returns).
    The hooks probed: those this module reads the architecture from, and ``also`` (the
    trace's quantities, :mod:`icl_probe.hooks.quantities`, pass theirs).

    Measured once per set of templates with a two-token forward and remembered on the model."""
    templates = tuple(dict.fromkeys(ARCHITECTURE_HOOKS + tuple(also)))
    cache = model.__dict__.setdefault(LIVE_HOOKS_CACHE, {})
    key = frozenset(templates)
    for probed, fired in cache.items():  # a probe of a superset answers without a forward
        if key <= probed:
            return frozenset(t for t in fired if t in key or t == "scores_are_pattern")
    cache[key] = _fired(model, templates)
    return cache[key]


# the hooks the architecture is read from (which q/k hooks fire, whether scores are hooked)
ARCHITECTURE_HOOKS = ("blocks.{l}.hook_resid_pre", "blocks.{l}.ln1.hook_out",
                      "blocks.{l}.hook_resid_mid", "blocks.{l}.attn.hook_in",
                      "blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k", "blocks.{l}.attn.hook_v",
                      "blocks.{l}.attn.hook_rot_q", "blocks.{l}.attn.hook_rot_k",
                      "blocks.{l}.attn.hook_q_normed", "blocks.{l}.attn.hook_cos",
                      "blocks.{l}.attn.hook_sin", "blocks.{l}.attn.hook_attn_scores",
                      "blocks.{l}.attn.hook_pattern", "blocks.{l}.attn.hook_z",
                      "blocks.{l}.attn.hook_out", "blocks.{l}.mlp.hook_in", "blocks.{l}.mlp.hook_out",
                      "blocks.{l}.hook_attn_out", "blocks.{l}.hook_mlp_out")


def _fired(model: Any, templates: tuple[str, ...]) -> frozenset[str]:
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for t in templates:
        name = t.format(l=0)
        if name in model.hook_dict:
            hooks.append((name, lambda x, hook=None, t=t: seen.__setitem__(t, x)))
    device = next(model.parameters()).device
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        model(torch.tensor([[1, 2, 3]], device=device))
    fired = set(seen)
    scores = seen.get("blocks.{l}.attn.hook_attn_scores")
    pattern = seen.get("blocks.{l}.attn.hook_pattern")
    if scores is not None and pattern is not None and scores.shape == pattern.shape and \
            torch.equal(scores, pattern):
        fired.add("scores_are_pattern")
    return frozenset(fired)


# ------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class AttentionSpec:
    """How one model computes its attention scores (see the module docstring).

    ``rotary_from``: where post-rotary q and k come from: ``"hooks"`` (``hook_rot_q/k``),
    ``"phases"`` (``hook_q/k`` rotated with ``hook_cos/sin``), ``"buffer"`` (``hook_q/k``
    rotated with GPT-J's ``embed_positions`` table), ``"none"`` (no rotary), ``"unknown"``
    (rotary the toolkit cannot reproduce: q and k are refused). ``convention``: how rotary pairs
    dimensions (``"rotate_half"``: (i, i + r/2) over the first r dims; ``"gptj"``: adjacent
    pairs, half-width phases; ``"adjacent_pairs"`` (GLM, ERNIE); ``"interleaved_cos_sin"``
    (Cohere)). ``scale``, ``window``: per layer. ``score_dtype`` / ``softmax_dtype``: the dtype
    the model computes q·k / the softmax in when it is not the model's own (None).
    """

    family: str
    rotary_from: str
    convention: str
    qk_norm: str | None
    scale: tuple[float, ...]
    softcap: tuple[float | None, ...]
    window: tuple[int | None, ...]
    scores_hooked: bool
    score_dtype: torch.dtype | None
    softmax_dtype: torch.dtype | None
    rotary_pct: float = 1.0

    @property
    def rotary(self) -> bool:
        return self.rotary_from != "none"


def _hf_attention(model: Any, layer: int) -> Any:
    return model.blocks[layer].attn.original_component


def _layer_scale(model: Any, layer: int, kind: str) -> float:
    attn, hf_attn = model.blocks[layer].attn, _hf_attention(model, layer)
    d_head = model.cfg.d_head
    if kind == "joint":  # JointQKVAttentionBridge._reconstruct_attention
        scale = d_head ** -0.5
        if getattr(model.cfg, "scale_attn_by_inverse_layer_idx", False):
            idx = attn._layer_idx if getattr(attn, "_layer_idx", None) is not None else layer
            scale /= float(idx + 1)
        return scale
    if kind == "joint_rotary":  # JointQKVPositionEmbeddingsAttentionBridge
        return d_head ** -0.5
    if kind == "delegating" and isinstance(getattr(hf_attn, "scale_attn", None), (int, float)):
        return 1.0 / float(hf_attn.scale_attn)  # GPT-J divides by sqrt(d_head)
    return float(getattr(hf_attn, "scaling", d_head ** -0.5))


def _bridge_kind(attn: Any) -> str:
    if isinstance(attn, JointQKVPositionEmbeddingsAttentionBridge):
        return "joint_rotary"
    if isinstance(attn, JointQKVAttentionBridge):
        return "joint"
    if isinstance(attn, PositionEmbeddingsAttentionBridge):
        return "position_embeddings"
    if type(attn) is AttentionBridge:
        return "delegating"
    return type(attn).__name__


def attention_spec(model: Any) -> AttentionSpec:
    """The :class:`AttentionSpec` of a bridged model (computed once, remembered on it)."""
    cached = model.__dict__.get("_icl_probe_spec")
    if cached is not None:
        return cached
    cfg = model.cfg
    hf_config = model.original_model.config
    live = live_hooks(model)
    kind = _bridge_kind(model.blocks[0].attn)
    rotary = getattr(cfg, "positional_embedding_type", None) == "rotary"
    hf_attn0 = _hf_attention(model, 0)
    if not rotary:
        rotary_from = "none"
    elif "blocks.{l}.attn.hook_rot_q" in live and "blocks.{l}.attn.hook_rot_k" in live:
        rotary_from = "hooks"
    elif "blocks.{l}.attn.hook_cos" in live and kind == "joint_rotary":
        rotary_from = "phases"
    elif kind == "delegating" and gptj_rotary_table(model.original_model, hf_attn0) is not None:
        rotary_from = "buffer"
    else:
        rotary_from = "unknown"
    if rotary_from == "buffer":
        convention = "gptj"
    elif getattr(cfg, "rotary_interleaved_cos_sin", False):
        convention = "interleaved_cos_sin"
    elif getattr(cfg, "rotary_adjacent_pairs", False):
        convention = "adjacent_pairs"
    else:
        convention = "rotate_half"
    if getattr(cfg, "qk_norm_after_rope", False):
        rotary_from = "unknown"  # HunYuan normalises after rotary: hook_rot_q is not the final q
    upcast = bool(getattr(model.blocks[0].attn, "_reorder_and_upcast_attn", False))
    float32_scores = kind == "delegating" and rotary_from == "buffer"  # GPT-J's _attn
    softmax32 = kind == "position_embeddings" or float32_scores or upcast
    n_layers = cfg.n_layers
    windows = []
    for l in range(n_layers):
        hf_attn = _hf_attention(model, l)
        # Per-layer windows live on the attention module (Gemma 2/3, Qwen2); Mistral-style
        # models apply the config's window to every layer.
        w = hf_attn.sliding_window if hasattr(hf_attn, "sliding_window") else \
            getattr(hf_config, "sliding_window", None)
        windows.append(int(w) if w else None)
    spec = AttentionSpec(
        family=type(model.original_model).__name__,
        rotary_from=rotary_from,
        convention=convention,
        qk_norm=getattr(model.blocks[0].attn, "_qk_norm_phase", None),
        scale=tuple(_layer_scale(model, l, kind) for l in range(n_layers)),
        softcap=tuple((getattr(_hf_attention(model, l), "attn_logit_softcapping", None)
                       if kind == "position_embeddings" else None) for l in range(n_layers)),
        window=tuple(windows),
        scores_hooked=("blocks.{l}.attn.hook_attn_scores" in live
                       and "scores_are_pattern" not in live),
        score_dtype=torch.float32 if (float32_scores or upcast) else None,
        softmax_dtype=torch.float32 if softmax32 else None,
        rotary_pct=float(get_rotary_pct_from_config(cfg)) if rotary else 1.0,
    )
    model.__dict__["_icl_probe_spec"] = spec
    return spec


def check_layer(model: Any) -> int:
    """The layer whose scores the fast paths' self-checks compare over every key: the last
    layer without a sliding window (a windowed layer's cache keeps only the window's keys, so
    its key axis is not the prompt's); -1 when every layer has a window."""
    window = attention_spec(model).window
    full = [l for l, w in enumerate(window) if w is None]
    return full[-1] if full else -1


def require_rotary_support(model: Any, what: str) -> AttentionSpec:
    """The spec, or a :class:`TraceError` when q and k after rotary cannot be recovered."""
    spec = attention_spec(model)
    if spec.rotary_from == "unknown":
        raise TraceError(
            f"{what}: icl-probe cannot recover q and k after rotary on {spec.family}: its bridge "
            "exposes neither post-rotary hooks nor the rotary phases, and the toolkit does not "
            "re-implement this family's rotary. Trace without 'q'/'k' (scores, pattern, z and "
            "the outputs are still exact), or see docs/architectures.md for supported families"
        )
    return spec


# ------------------------------------------------------------------------------ rotary


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, convention: str) -> torch.Tensor:
    """Rotary embedding of ``x`` (..., d_head) with the model's own phases ``cos``/``sin``
    (..., r), broadcast against ``x``'s leading axes by the caller. Only the first ``r``
    (``"gptj"``: ``2r``) dimensions rotate; the rest pass through (partial rotary).

    >>> x = torch.arange(6.0)
    >>> c, s = torch.zeros(4), torch.ones(4)      # a quarter turn on the first 4 dims
    >>> rotate(x, c, s, "rotate_half").tolist()   # (x0, x2) and (x1, x3) pairs
    [-2.0, -3.0, 0.0, 1.0, 4.0, 5.0]
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if convention == "gptj":  # GPT-J: sin/cos over r/2 frequencies, each repeated for a pair
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    elif convention == "adjacent_pairs":  # GLM/ERNIE: half-duplicated phases, adjacent pairs
        half = cos.shape[-1] // 2
        cos = cos[..., :half].repeat_interleave(2, -1)
        sin = sin[..., :half].repeat_interleave(2, -1)
    elif convention == "rotate_half_full":  # GPT-OSS: un-duplicated half-width phases
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    if convention in ("rotate_half", "rotate_half_full"):
        turned = torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], -1)
    elif convention in ("gptj", "adjacent_pairs", "interleaved_cos_sin"):
        turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        raise IclProbeError(f"rotate(): unknown rotary convention {convention!r}")
    return torch.cat([xr * cos + turned * sin, xp], -1)


def rotate_like_model(spec: "AttentionSpec", x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` with the convention the model's bridge picks for these phases: a full
    rotation given half-width phases is GPT-OSS's layout (the bridge duplicates the halves)."""
    convention = spec.convention
    if convention == "rotate_half" and 2 * cos.shape[-1] == x.shape[-1] and spec.rotary_pct == 1.0:
        convention = "rotate_half_full"
    return rotate(x, cos, sin, convention)


def gptj_phases(model: Any, layer: int, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J's (cos, sin) at ``positions`` (any shape) from the layer's ``embed_positions``
    table, cast to ``dtype`` as GPT-J does: each (..., rotary_dim / 2)."""
    # max_pos rotary_dim: [sin | cos]
    table = gptj_rotary_table(model.original_model, _hf_attention(model, layer))
    sincos = table.to(positions.device)[positions].to(dtype)
    sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    return cos, sin


# ------------------------------------------------------------------------------ scores


def allowed_keys(spec: AttentionSpec, layer: int, q_pos: torch.Tensor, n_keys: int,
                 lengths: torch.Tensor) -> torch.Tensor:
    """(batch, pos, key_pos) bool: which keys the query at ``q_pos`` (batch pos) may attend to:
    causal, inside the layer's sliding window, and a real token of its prompt."""
    keys = torch.arange(n_keys, device=q_pos.device)
    ok = keys[None, None, :] <= q_pos[:, :, None]
    ok &= keys[None, None, :] < lengths.to(q_pos.device)[:, None, None]
    w = spec.window[layer]
    if w is not None:
        ok &= keys[None, None, :] > q_pos[:, :, None] - w
    return ok


def attention_scores(spec: AttentionSpec, layer: int, q: torch.Tensor, k: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
    """The model's pre-softmax scores (batch, pos, head, key_pos) from post-rotary ``q``
    (batch pos head d_head) and ``k`` (batch key_pos head d_head, already per query head),
    with ``allowed`` from :func:`allowed_keys`; masked keys are -inf. Computed in the dtype the
    model computes them in (``spec.score_dtype``), returned in ``q``'s dtype."""
    dt = spec.score_dtype or q.dtype
    s = einops.einsum(q.to(dt), k.to(dt), "batch pos head d_head, batch key_pos head d_head -> "
                      "batch pos head key_pos") * spec.scale[layer]
    cap = spec.softcap[layer]
    if cap is not None:
        s = torch.tanh(s / cap) * cap
    s = s.masked_fill(~allowed[:, :, None, :].to(s.device), float("-inf"))
    return s.to(q.dtype)


def attention_pattern(spec: AttentionSpec, scores: torch.Tensor) -> torch.Tensor:
    """softmax over keys, in the dtype the model takes it in (``spec.softmax_dtype``)."""
    dt = spec.softmax_dtype or scores.dtype
    return torch.softmax(scores.to(dt), dim=-1).to(scores.dtype)



"""Implied weight updates read off ICL activations (docs/science.md, Implied weight updates).

For a batch of prompt pairs, :func:`implied_updates` runs one traced forward per prompt kind
(ICL and zero-shot) and returns, per layer and query head, at the prediction position ``p``:

1. **Linear-attention dual form** (Dai et al. 2023, eq. 4-7). Dropping the softmax, the head's
   output at ``p`` splits as ``F(q) = W_ZS q + ΔW_ICL q`` with ::

       ΔW_ICL = Σ_{j∈D} v_j ⊗ k_j        W_ZS = Σ_{j∈Q} v_j ⊗ k_j      (d_head x d_head)

   (``v ⊗ k = v kᵀ``; ``D`` = demonstration tokens, ``Q`` = BOS + query tokens; ``k`` after
   rotary). Per-demonstration terms ``ΔW_i`` sum to ``ΔW_ICL``. The model-space form is
   ``M = W_O^h ΔW_ICL R_p D_p W_Q^h`` (d_model x d_model) with offset
   ``c = W_O^h ΔW_ICL R_p D_p b_Q^h``: ``R_p`` is the rotary rotation at ``p`` with the model's
   own phases (partial rotary, per-layer rope; identity without rotary) and ``D_p`` the QK-norm's
   gain at ``p`` (identity without QK-norm), so that ``M r_p + c = W_O^h ΔW_ICL q_p`` exactly.
2. **Exact softmax split**: ``λ = Σ_{j∈D} a_j`` and ``z = (1-λ) z_Q + λ z_D`` with
   ``z_Q = Σ_{j∈Q} a_j v_j / (1-λ)``, ``z_D = Σ_{j∈D} a_j v_j / λ``.
3. **Exact rank-1 MLP update** (Dherin et al. 2025, arXiv 2507.16003): for each first-layer
   MLP matrix ``W`` (gate and up in gated MLPs), with ``u_ctx`` / ``u_0`` the MLP input at ``p``
   in the ICL / ZS run, ``ΔW = W (u_ctx − u_0) u_0ᵀ / ‖u_0‖²`` so that ``(W + ΔW) u_0 = W u_ctx``
   and ``MLP_{W+ΔW}(u_0) = MLP_W(u_ctx)``. Kept as its two factors ``a = W(u_ctx − u_0)`` and
   ``b = u_0 / ‖u_0‖²`` (``ΔW = a bᵀ``); the matrix only on request.
4. **Dual-form fidelity** of each head: ``min_c ‖h − c·h_lin‖ / ‖h‖`` between the head's true
   output ``h = W_O z`` and its linear relaxation ``h_lin = W_O Σ_j v_j (k_j·q)``.

Weights follow the papers' column orientation here (``ΔW`` maps ``q`` to ``z``: ``ΔW q``;
docs/science.md, Notation); the TransformerLens weights in the record are transposed
(``q = r @ W_Q``).

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pairs = [ip.build_prompt(model, "capital", query=q, k=3, seed=q) for q in range(2)]
>>> up = ip.implied_updates(model, pairs, per_demo=True)
>>> up.dW_icl.shape                      # layer batch head d_head d_head
torch.Size([3, 2, 4, 12, 12])
>>> bool((up.demo_terms.sum(2) - up.dW_icl).abs().max() < 1e-5)   # per-demo terms sum up
True
>>> sorted(up.table().quantity.unique())[:3]
['W_zs_norm', 'dW_icl_demo_norm', 'dW_icl_norm']
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import einops
import torch

from ..errors import ProbeError
from ..hooks import (AttentionRecord, check_batch_size, expand_kv, grouped_einsum, resolve_layers,
                     trace)
from ..models import attention_spec
from ..models.architectures import rotate_like_model
from ..prompts import PromptPair
from .checks import check_pairs
from .mlp import _mlp_weight, mlp_first_layers
from .result import ImpliedUpdates

_TRACE_WHAT = ("q", "k", "v", "pattern", "z", "mlp_in", "mlp_out")


def _index_mask(rows: Iterable[torch.Tensor], width: int) -> torch.Tensor:
    rows = list(rows)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, r] = True
    return mask


def _linear_attention(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
                      kv_head_of: torch.Tensor) -> torch.Tensor:
    """Σ_j v_j (k_j·q) over the key positions in ``keys`` (batch key_pos): the head's output
    with the softmax and scale dropped (layer batch head d_head). k, v: layer batch key_pos
    kv_head d_head (one per group, read per query head through ``kv_head_of``); q: layer batch
    head d_head."""
    s = grouped_einsum(k, q, "layer batch key_pos kv_head d_head, layer batch head d_head -> "
                       "layer batch head key_pos", kv_head_of=kv_head_of)
    s = s * keys[None, :, None, :]
    return grouped_einsum(s, v, "layer batch head key_pos, layer batch key_pos kv_head d_head -> "
                          "layer batch head d_head", kv_head_of=kv_head_of)


def model_space_trace_what(model: Any) -> tuple[str, ...]:
    """The extra trace quantities the model-space form needs on ``model``: the attention input
    ``r_p``, the rotary phases at ``p``, and (QK-norm models) ``q`` before and after the norm."""
    spec = attention_spec(model)
    extra = ["attn_in"]
    if spec.rotary:
        extra += ["rot_cos", "rot_sin"]
    if spec.qk_norm is not None:
        extra += ["q_pre", "q_normed"]
    return tuple(extra)


def _query_map(spec: Any, icl: AttentionRecord, li: int, b: int, W_Q: torch.Tensor,
               b_Q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``r -> q`` the model applies at ``p`` in traced layer ``li`` for prompt
    ``b``: ``q_p = r_p @ A + a`` with ``A = W_Q D_p R_p`` (head d_model d_head) and
    ``a = b_Q D_p R_p`` (head d_head). ``R_p`` is the rotary rotation with the model's own phases
    at ``p`` (partial, per layer type, scaled); ``D_p`` the QK-norm's gain at ``p``,
    ``diag(q̃_p / q_p)`` from ``hook_q`` and ``hook_q_normed``, identity without QK-norm. For
    the RMSNorms of Gemma 3, Qwen3 and OLMo 2 that is exactly ``γ / rms(q_p)``: the norm is
    linear once its input is fixed. (A LayerNorm-type QK-norm, which centres and adds a bias, is
    only matched at ``q_p`` itself by this ratio.)"""
    p = int(icl.pred_slot[b])
    H, D = W_Q.shape[0], W_Q.shape[-1]
    bias = b_Q if b_Q is not None else W_Q.new_zeros(H, D)
    if spec.qk_norm is not None:
        raw, normed = icl.q_pre[li, b, p], icl.q_normed[li, b, p]  # head d_head
        gain = torch.where(raw != 0, normed / torch.where(raw != 0, raw, 1), 0)
        W_Q, bias = W_Q * gain[:, None, :], bias * gain
    if spec.rotary:
        cos, sin = icl.rot_cos[li, b, p], icl.rot_sin[li, b, p]  # r
        W_Q, bias = rotate_like_model(spec, W_Q, cos, sin), rotate_like_model(spec, bias, cos, sin)
    return W_Q, bias


def _model_space(model: Any, icl: AttentionRecord, dW: torch.Tensor, layers: Sequence[int],
                 n_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = W_O^h ΔW_ICL A^h`` (layer batch head d_model d_model, column orientation) and
    ``c = W_O^h ΔW_ICL a^h`` (layer batch head d_model) such that ``M r_p + c = W_O ΔW q_p``."""
    spec = attention_spec(model)
    dev = dW.device
    W_Q = icl.W_Q.to(dev)  # layer head d_model d_head
    W_O = icl.W_O.to(dev)  # layer head d_head d_model
    b_Q = icl.b_Q.to(dev) if "b_Q" in icl.weights else None
    ms, mb = [], []
    for l in layers:
        li = icl.layer_index(l)
        per_b, per_c = [], []
        for b in range(n_prompts):
            A, a = _query_map(spec, icl, li, b, W_Q[li], None if b_Q is None else b_Q[li])
            # d_v, d_k: the two d_head axes of ΔW = Σ v ⊗ k; d_out, d_in: the two d_model
            # axes of M (column orientation: M r maps d_in to d_out)
            per_b.append(einops.einsum(W_O[li], dW[li, b], A, "head d_v d_out, head d_v d_k, "
                                       "head d_in d_k -> head d_out d_in"))
            per_c.append(einops.einsum(W_O[li], dW[li, b], a, "head d_v d_out, head d_v d_k, "
                                       "head d_k -> head d_out"))
        ms.append(torch.stack(per_b))
        mb.append(torch.stack(per_c))
    return torch.stack(ms), torch.stack(mb)


def implied_updates(
    model: Any,
    pairs: Sequence[PromptPair],
    *,
    layers: Iterable[int] | None = None,
    per_demo: bool = False,
    model_space: bool | Sequence[int] = False,
    batch_size: int = 8,
    progress: bool | None = None,
) -> ImpliedUpdates:
    """Every implied update of docs/science.md (Implied weight updates), per layer and query
    head, at ``p``.

    One traced forward per prompt kind (ICL, ZS); only the prediction position's query-side
    quantities and the keys/values are kept. ``per_demo=True`` keeps the per-demonstration
    matrices (``demo_terms``; their norms are always kept). ``model_space`` (True, or a list
    of layers) adds ``M = W_O ΔW_ICL R_p D_p W_Q`` (layer batch head d_model d_model) and its
    offset ``c = W_O ΔW_ICL R_p D_p b_Q`` (``model_space_bias``), so that
    ``M r_p + c = W_O ΔW_ICL q_p`` exactly: large, so only on request.
    """
    check_pairs(pairs)
    layer_list = resolve_layers(layers, model.cfg.n_layers, "implied_updates", ProbeError)
    check_batch_size(batch_size, "implied_updates", ProbeError)
    if model_space is not False and model_space is not True:
        ms_layers = resolve_layers(model_space, model.cfg.n_layers, "implied_updates", ProbeError)
        untraced = [l for l in ms_layers if l not in layer_list]
        if untraced:
            raise ProbeError(f"implied_updates(model_space={list(ms_layers)}): layers {untraced} "
                             f"are not among the traced layers {list(layer_list)}")
    for l in layer_list:
        mlp_first_layers(model, l)  # fail early on MLPs without a linear first layer
    what = _TRACE_WHAT + (model_space_trace_what(model) if model_space is not False else ())
    icl = trace(model, pairs, what=what, layers=layer_list, batch_size=batch_size,
                progress=progress)
    zs = trace(model, pairs, kind="zs", what=("mlp_in",), layers=layer_list,
               batch_size=batch_size, progress=progress)
    return _updates_from_records(model, list(pairs), icl, zs, layer_list, per_demo, model_space)


def _updates_from_records(model: Any, pairs: list[PromptPair], icl: AttentionRecord,
                          zs: AttentionRecord, layer_list: tuple[int, ...], per_demo: bool,
                          model_space: bool | Sequence[int]) -> ImpliedUpdates:
    T = icl.data["k"].shape[2]  # key_pos (all positions, padded)
    in_D, in_Q, demo_of = _key_masks(pairs, T, icl.data["v"].dtype, icl.data["v"].device)
    dual = _dual_form(icl, in_D, in_Q, demo_of, per_demo)
    demo_mask = torch.zeros(len(pairs), demo_of.shape[1], dtype=torch.bool)
    for b, p in enumerate(pairs):
        demo_mask[b, : p.k] = True
    lam, z, zQ, zD = _softmax_split(icl, in_D, in_Q, T)
    q, fidelity = _fidelity(icl, z, (in_D + in_Q).clamp(max=1))
    u_ctx, u_0, mlp_a, mlp_b = _mlp_factors(model, icl, zs, layer_list)
    ms = mb = None
    wanted: tuple[int, ...] = ()
    if model_space is not False:
        wanted = layer_list if model_space is True else tuple(model_space)
        ms, mb = _model_space(model, icl, dual["dW"], wanted, len(pairs))
    return ImpliedUpdates(
        layers=layer_list, pairs=pairs, dW_icl=dual["dW"], W_zs=dual["W_zs"],
        demo_norms=dual["demo_norms"], demo_mask=demo_mask, lam=lam, z=z, z_Q=zQ, z_D=zD, q=q,
        fidelity_err=fidelity, mlp_a=mlp_a, mlp_b=mlp_b, u_ctx=u_ctx, u_0=u_0,
        mlp_out_icl=icl.at_pred("mlp_out"), records={"icl": icl, "zs": zs},
        demo_terms=dual["demo_terms"], model_space=ms, model_space_bias=mb,
        model_space_layers=wanted,
    )


def _key_masks(pairs: list[PromptPair], T: int, dt: torch.dtype, dev: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key-position masks: demonstration tokens and query tokens (batch key_pos), and one per
    demonstration (batch demo key_pos)."""
    D = max(p.k for p in pairs)
    in_D = _index_mask((p.spans.demo_indices() for p in pairs), T).to(dt)
    in_Q = _index_mask((p.spans.query_indices() for p in pairs), T).to(dt)
    demo_of = torch.zeros(len(pairs), D, T, dtype=dt)
    for b, p in enumerate(pairs):
        for i, d in enumerate(p.spans.demos):
            demo_of[b, i, d.whole.slice] = 1
    return in_D.to(dev), in_Q.to(dev), demo_of.to(dev)


def _dual_form(icl: AttentionRecord, in_D: torch.Tensor, in_Q: torch.Tensor,
               demo_of: torch.Tensor, per_demo: bool) -> dict[str, torch.Tensor | None]:
    """1a: the dual form, ``ΔW = Σ_j v_j ⊗ k_j`` over D (and W_ZS over Q), per query head, and
    each demonstration's term (its norm always; its matrix with ``per_demo``)."""
    # Keys and values are shared within a key/value group, so everything built from k and v
    # alone is computed once per kv_head and expanded to query heads at the end.
    k, v = icl.data["k"], icl.data["v"]  # layer batch key_pos kv_head d_head

    def per_head(x: torch.Tensor, dim: int) -> torch.Tensor:
        return expand_kv(x, icl.kv_head_of, dim)

    # d_v, d_k: the two d_head axes of v ⊗ k. (Masks are applied to v first: a three-operand
    # einsum would materialise v ⊗ k per token.)
    outer = "layer batch key_pos kv_head d_v, layer batch key_pos kv_head d_k -> " \
            "layer batch kv_head d_v d_k"
    dW = per_head(einops.einsum(v * in_D[None, :, :, None, None], k, outer), 2)
    W_zs = per_head(einops.einsum(v * in_Q[None, :, :, None, None], k, outer), 2)
    demo_terms = per_head(einops.einsum(
        v[:, :, None] * demo_of[None, :, :, :, None, None], k,
        "layer batch demo key_pos kv_head d_v, layer batch key_pos kv_head d_k -> "
        "layer batch demo kv_head d_v d_k"), 3) if per_demo else None
    if per_demo:
        demo_norms = demo_terms.flatten(-2).norm(dim=-1)
    else:  # ‖Σ_{j∈i} v_j k_jᵀ‖_F² = Σ_{j,j'∈i} (v_j·v_j')(k_j·k_j'), without the matrices
        gram = "layer batch key_i kv_head d_head, layer batch key_j kv_head d_head -> " \
               "layer batch kv_head key_i key_j"  # key_i, key_j: two key_pos axes
        gram_vk = einops.einsum(v, v, gram) * einops.einsum(k, k, gram)
        demo_norms = per_head(einops.einsum(
            gram_vk, demo_of, demo_of, "layer batch kv_head key_i key_j, batch demo key_i, "
            "batch demo key_j -> layer batch demo kv_head").clamp_min(0).sqrt(), 3)
    return {"dW": dW, "W_zs": W_zs, "demo_terms": demo_terms, "demo_norms": demo_norms}


def _softmax_split(icl: AttentionRecord, in_D: torch.Tensor, in_Q: torch.Tensor, T: int
                   ) -> tuple[torch.Tensor, ...]:
    """1b: the exact softmax split at p, ``z = (1-λ) z_Q + λ z_D``: (λ, z, z_Q, z_D)."""
    a = icl.at_pred("pattern")[..., :T]  # layer batch head key_pos
    z = icl.at_pred("z")  # layer batch head d_head
    v = icl.data["v"]
    a_D, a_Q = a * in_D[None, :, None, :], a * in_Q[None, :, None, :]
    lam = a_D.sum(-1)
    # grouped: v is read per query head without being copied per query head
    mix = "layer batch head key_pos, layer batch key_pos kv_head d_head -> layer batch head d_head"
    zD = grouped_einsum(a_D, v, mix, kv_head_of=icl.kv_head_of)
    zQ = grouped_einsum(a_Q, v, mix, kv_head_of=icl.kv_head_of)
    # A side with no attention mass (a sliding window that no longer reaches BOS, say) has
    # no mean: its part is 0, and (1-λ) z_Q + λ z_D = z still holds.
    zD = torch.where(lam[..., None] > 0, zD / lam[..., None], 0)
    zQ = torch.where((1 - lam)[..., None] > 0, zQ / (1 - lam)[..., None], 0)
    return lam, z, zQ, zD


def _fidelity(icl: AttentionRecord, z: torch.Tensor, keys: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """4: dual-form fidelity with the best scalar rescaling, in model space (``h = W_O z``):
    (q at p, ``min_c ‖h − c·h_lin‖ / ‖h‖``)."""
    k, v = icl.data["k"], icl.data["v"]
    dt, dev = v.dtype, v.device
    q = icl.at_pred("q")  # layer batch head d_head
    z_lin = _linear_attention(k, v, q, keys, icl.kv_head_of)
    W_O = icl.W_O.to(dev)  # layer head d_head d_model
    per_head_out = "layer batch head d_head, layer head d_head d_model -> layer batch head d_model"
    h = einops.einsum(z, W_O, per_head_out)
    h_lin = einops.einsum(z_lin, W_O, per_head_out)
    c = (h * h_lin).sum(-1) / (h_lin * h_lin).sum(-1).clamp_min(torch.finfo(dt).tiny)
    return q, (h - c[..., None] * h_lin).norm(dim=-1) / h.norm(dim=-1)


def _mlp_factors(model: Any, icl: AttentionRecord, zs: AttentionRecord,
                 layer_list: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor,
                                                       dict[str, torch.Tensor], torch.Tensor]:
    """1c: the rank-1 MLP update kept as factors ``a = W (u_ctx − u_0)``, ``b = u_0 / ‖u_0‖²``:
    (u_ctx, u_0, a per first-layer map, b)."""
    dt, dev = icl.data["v"].dtype, icl.data["v"].device
    u_ctx, u_0 = icl.at_pred("mlp_in"), zs.at_pred("mlp_in")  # layer batch d_model
    n = u_ctx.shape[1]
    mlp_a: dict[str, torch.Tensor] = {}
    for li, l in enumerate(layer_list):
        for inp in mlp_first_layers(model, l):
            W = _mlp_weight(model, l, inp).to(dev, u_ctx.dtype)  # d_mlp d_model
            mlp_a.setdefault(inp.name, torch.zeros(len(layer_list), n, W.shape[0],
                                                   dtype=dt, device=dev))
            mlp_a[inp.name][li] = (u_ctx[li] - u_0[li]) @ W.T
    return u_ctx, u_0, mlp_a, u_0 / (u_0 * u_0).sum(-1, keepdim=True)

"""The identities of the implied updates checked on a real model (docs/science.md, Implied
weight updates): each quantity recomputed from the one before and compared with a separately
captured hook, and the algebra the probes rely on."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import einops
import pandas as pd
import torch

from ..errors import ProbeError
from ..hooks import resolve_layers, trace
from ..models import allowed_keys, attention_pattern, attention_scores, attention_spec
from ..prompts import PromptPair
from .checks import check_pairs
from .mlp import _mlp_weight, mlp_first_layers, run_mlp
from .result import ImpliedUpdates
from .updates import _TRACE_WHAT, _linear_attention, _updates_from_records, model_space_trace_what

MODEL_IDENTITY = "model identity"


CONSISTENCY_CHECK = "consistency check"


def _rel(err: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error ‖err‖/‖ref‖ over the last axis; 0/0 counts as 0."""
    num, den = err.norm(dim=-1), ref.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.where(num > 0, torch.inf, torch.zeros_like(num)))


def _rel_masked(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """:func:`_rel` over the finite entries of score rows (-inf = masked key); a row whose
    masked keys differ between ``x`` and ``ref`` gets an infinite error."""
    fx, fr = torch.isfinite(x), torch.isfinite(ref)
    err = _rel(torch.where(fr, x, 0) - torch.where(fr, ref, 0), torch.where(fr, ref, 0))
    return torch.where((fx != fr).any(-1), torch.inf, err)


def _rank1_residual(m: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """‖M − σ_1 u_1 v_1ᵀ‖_F / ‖M‖_F in float64: 0 exactly when M has rank 1 (the leading
    singular pair by power iteration, so no SVD of a d_mlp x d_model matrix is needed)."""
    m = m.double()
    fro = m.norm()
    if fro == 0:
        return torch.zeros((), dtype=torch.float64)
    x = torch.ones(m.shape[1], dtype=torch.float64, device=m.device)
    for _ in range(iters):
        x = m.T @ (m @ x)
        x = x / x.norm()
    # subtract the leading singular triple instead of σ_1² from ‖M‖_F²: no cancellation
    return (m - torch.outer(m @ x, x)).norm() / fro


def verify_identities(model: Any, pairs: Sequence[PromptPair], *,
                      layers: Iterable[int] | None = None,
                      updates: ImpliedUpdates | None = None) -> pd.DataFrame:
    """Check the identities of docs/science.md, Implied weight updates, on ``model`` and
    ``pairs`` at ``p``; return the worst relative error per identity and layer (columns
    ``identity``, ``kind``, ``layer``, ``max_rel_err``).

    **Model identities** (``kind == "model identity"``): each quantity is recomputed from the
    one before and compared with a separately captured hook, so a wrong q, k, scale, mask or
    rotary shows up here.

    - ``scores``: ``softcap(scale · q·k)`` + the causal/sliding-window mask against
      ``hook_attn_scores`` (where the bridge has a genuine pre-softmax hook; GPT-J has none)
    - ``pattern``: ``softmax(scores)`` against ``hook_pattern`` (scores recomputed from q and k
      where there is no scores hook)
    - ``z``: ``Σ_j a_j v_j`` against ``hook_z``
    - ``attn_out``: ``Σ_h W_O^h z^h + b_O`` against the attention module's output
      (``attn.hook_out``)
    - ``mlp_rank1``: the real MLP module with ``W + ΔW`` on ``u_0`` against the MLP's real
      output at ``p`` in the ICL run (``mlp.hook_out``)
    - ``model_space``: ``M r_p + c`` against ``W_O ΔW_ICL q_p`` with the recorded q: M is made
      of the weights, the rotary phases and the QK-norm gain, so this recomputes q from
      ``r_p`` (first, middle and last layer)

    **Consistency checks** (``kind == "consistency check"``): algebra that holds by
    construction for any q, k, v (it compares the recorded tensors with themselves,
    rearranged), so it tests the toolkit's einsums, not the model:
    ``dual_form`` (``(W_ZS + ΔW_ICL) q = Σ_{j≤p} v_j (k_j·q)``), ``demo_terms_sum``
    (``Σ_i ΔW_i = ΔW_ICL``), ``softmax_split`` (``(1-λ) z_Q + λ z_D = z``),
    ``mlp_pre_rank1`` (``(W + ΔW) u_0 = W u_ctx``), ``mlp_delta_rank1``
    (``‖ΔW − σ_1 u_1 v_1ᵀ‖_F / ‖ΔW‖_F``, 0 when ΔW has rank 1).
    """
    spec = attention_spec(model)
    extra = ("scores", "attn_out") if spec.scores_hooked else ("attn_out",)
    if updates is None:
        updates = _updates_for_checks(model, pairs, layers, extra)
    up = updates
    icl = up.records["icl"]
    more = trace(model, up.pairs, what=extra, layers=up.layers) \
        if any(w not in icl.data for w in extra) else icl
    rows: list[dict] = []

    def add(name: str, kind: str, errs: torch.Tensor, layers: Sequence[int] | None = None) -> None:
        worst = errs.flatten(1).max(dim=1).values  # errs: layer ...
        rows.extend({"identity": name, "kind": kind, "layer": l, "max_rel_err": float(e)}
                    for l, e in zip(layers or up.layers, worst.tolist()))

    _attention_identities(spec, up, more, add)
    pre_errs, rank_errs = _mlp_identities(model, up, add)
    if up.model_space is not None:
        _model_space_identity(up, add)
    _consistency_checks(up, add)
    add("mlp_pre_rank1", CONSISTENCY_CHECK, torch.stack(pre_errs))
    add("mlp_delta_rank1", CONSISTENCY_CHECK, torch.stack(rank_errs))
    return pd.DataFrame(rows)


def _updates_for_checks(model: Any, pairs: Sequence[PromptPair], layers: Iterable[int] | None,
                        extra: tuple[str, ...]) -> ImpliedUpdates:
    """The updates with everything the checks read: per-demonstration terms, and the
    model-space form of the first, middle and last layer (d_model x d_model per head)."""
    check_pairs(pairs)
    layer_list = resolve_layers(layers, model.cfg.n_layers, "verify_identities", ProbeError)
    for l in layer_list:
        mlp_first_layers(model, l)
    sample = sorted({layer_list[0], layer_list[len(layer_list) // 2], layer_list[-1]})
    icl = trace(model, pairs, what=_TRACE_WHAT + model_space_trace_what(model) + extra,
                layers=layer_list)
    zs = trace(model, pairs, kind="zs", what=("mlp_in",), layers=layer_list)
    return _updates_from_records(model, list(pairs), icl, zs, layer_list, True, sample)


def _attention_identities(spec: Any, up: ImpliedUpdates, more: Any, add: Any) -> None:
    """scores, pattern, z and attn_out, each against its own hook."""
    icl = up.records["icl"]
    T = icl.data["k"].shape[2]
    k_all = icl.k[..., :T, :, :]  # layer batch key_pos head d_head (per query head)
    q_pos = icl.pred[:, None]  # batch 1
    hooked_scores = more.at_pred("scores")[..., :T] if spec.scores_hooked else None
    s_errs, p_errs = [], []
    for li, l in enumerate(up.layers):
        allowed = allowed_keys(spec, l, q_pos, T, icl.lengths)
        s = attention_scores(spec, l, up.q[li][:, None], k_all[li], allowed)[:, 0]  # batch head T
        if hooked_scores is not None:
            s_errs.append(_rel_masked(s, hooked_scores[li]))
            s = hooked_scores[li]
        pattern = attention_pattern(spec, s)
        p_errs.append(_rel(pattern - icl.at_pred("pattern")[li, ..., :T],
                           icl.at_pred("pattern")[li, ..., :T]))
    if s_errs:
        add("scores", MODEL_IDENTITY, torch.stack(s_errs))
    add("pattern", MODEL_IDENTITY, torch.stack(p_errs))
    a = icl.at_pred("pattern")[..., :T]
    z_rec = einops.einsum(a, icl.v[..., :T, :, :], "layer batch head key_pos, "
                          "layer batch key_pos head d_head -> layer batch head d_head")
    add("z", MODEL_IDENTITY, _rel(z_rec - up.z, up.z))
    W_O = icl.W_O.to(up.z.device)
    out = einops.einsum(up.z, W_O, "layer batch head d_head, layer head d_head d_model -> "
                        "layer batch d_model")
    if "b_O" in icl.weights and icl.b_O is not None:
        out = out + icl.b_O.to(out.device)[:, None, :]
    attn_out = more.at_pred("attn_out")
    add("attn_out", MODEL_IDENTITY, _rel(out - attn_out, attn_out))


def _model_space_identity(up: ImpliedUpdates, add: Any) -> None:
    """model_space: ``M r_p + c`` against ``W_O ΔW_ICL q_p`` with the recorded q."""
    icl = up.records["icl"]
    W_O = icl.W_O.to(up.z.device)
    idx = [icl.layer_index(l) for l in up.model_space_layers]
    r_p = icl.at_pred("attn_in")[idx]
    via_m = einops.einsum(up.model_space, r_p, "layer batch head d_out d_in, "
                          "layer batch d_in -> layer batch head d_out") + up.model_space_bias
    via_q = einops.einsum(up.dW_icl[idx], up.q[idx], W_O[idx],
                          "layer batch head d_v d_k, layer batch head d_k, "
                          "layer head d_v d_model -> layer batch head d_model")
    add("model_space", MODEL_IDENTITY, _rel(via_m - via_q, via_q), up.model_space_layers)


def _mlp_identities(model: Any, up: ImpliedUpdates, add: Any
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """mlp_rank1: the real MLP with ``W + ΔW`` on ``u_0`` against its ICL output; returns the
    per-layer errors of the two MLP consistency checks (pre-activation, rank)."""
    pre_errs, out_errs, rank_errs = [], [], []
    for li, l in enumerate(up.layers):
        pre, outs, rk = [], [], []
        for b in range(len(up.pairs)):
            deltas = {name: up.mlp_delta(name, l, b) for name in up.mlp_a}
            for inp in mlp_first_layers(model, l):
                W = _mlp_weight(model, l, inp).to(up.u_0.device, up.u_0.dtype)
                want = W @ up.u_ctx[li, b]
                pre.append(_rel((W + deltas[inp.name]) @ up.u_0[li, b] - want, want))
                rk.append(_rank1_residual(deltas[inp.name]))
            dtype = next(model.parameters()).dtype
            patched = run_mlp(model, l, up.u_0[li, b][None, None].to(dtype), deltas)[0, 0]
            ref = up.mlp_out_icl[li, b]
            outs.append(_rel(patched.to(ref.dtype) - ref, ref))
        pre_errs.append(torch.stack(pre))
        out_errs.append(torch.stack(outs))
        rank_errs.append(torch.stack(rk))
    add("mlp_rank1", MODEL_IDENTITY, torch.stack(out_errs))
    return pre_errs, rank_errs


def _consistency_checks(up: ImpliedUpdates, add: Any) -> None:
    """Algebra on the recorded tensors: dual_form, demo_terms_sum, softmax_split."""
    icl = up.records["icl"]
    T = icl.data["k"].shape[2]
    keys = torch.zeros(len(up.pairs), T, dtype=up.q.dtype, device=up.q.device)
    for b, p in enumerate(up.pairs):
        keys[b, : len(p.icl_ids)] = 1
    lin = _linear_attention(icl.data["k"], icl.data["v"], up.q, keys, icl.kv_head_of)
    dual = einops.einsum(up.W_zs + up.dW_icl, up.q, "layer batch head d_v d_k, "
                         "layer batch head d_k -> layer batch head d_v")
    add("dual_form", CONSISTENCY_CHECK, _rel(dual - lin, lin))
    if up.demo_terms is not None:
        add("demo_terms_sum", CONSISTENCY_CHECK,
            _rel((up.demo_terms.sum(2) - up.dW_icl).flatten(-2), up.dW_icl.flatten(-2)))
    lam = up.lam[..., None]
    add("softmax_split", CONSISTENCY_CHECK, _rel((1 - lam) * up.z_Q + lam * up.z_D - up.z, up.z))

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
torch.Size([2, 2, 4, 12, 12])
>>> bool((up.demo_terms.sum(2) - up.dW_icl).abs().max() < 1e-5)   # per-demo terms sum up
True
>>> sorted(up.table().quantity.unique())[:3]
['W_zs_norm', 'dW_icl_demo_norm', 'dW_icl_norm']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import einops
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from .architectures import (allowed_keys, attention_pattern, attention_scores, attention_spec,
                            rotate_like_model)
from .errors import ProbeError
from .hooks import (AttentionRecord, check_batch_size, expand_kv, grouped_einsum, resolve_layers,
                    trace)
from .prompts import PromptPair


_TRACE_WHAT = ("q", "k", "v", "pattern", "z", "mlp_in", "mlp_out")

# Shapes of the results, in the glossary's axis names (jaxtyping; tests/test_shapes.py checks
# them on a real result, and against the table in ImpliedUpdates' docstring). Aliases rather
# than inline strings: pyflakes reads a string inside an annotation as Python.
_HeadMatrices = Float[torch.Tensor, "layer batch head d_head d_head"]
_DemoMatrices = Float[torch.Tensor, "layer batch demo head d_head d_head"]
_DemoNorms = Float[torch.Tensor, "layer batch demo head"]
_DemoMask = Bool[torch.Tensor, "batch demo"]
_HeadScalars = Float[torch.Tensor, "layer batch head"]
_HeadVectors = Float[torch.Tensor, "layer batch head d_head"]
_MlpVectors = Float[torch.Tensor, "layer batch d_mlp"]
_ResidVectors = Float[torch.Tensor, "layer batch d_model"]
# model_space_layer indexes model_space_layers (a subset of layers)
_ModelSpace = Float[torch.Tensor, "model_space_layer batch head d_model d_model"]
_ModelSpaceBias = Float[torch.Tensor, "model_space_layer batch head d_model"]
_HeadRanks = Int[torch.Tensor, "layer batch head"]
_PromptScalars = Float[torch.Tensor, "layer batch"]
_MlpDelta = Float[torch.Tensor, "d_mlp d_model"]
_MlpInputs = Float[torch.Tensor, "... d_model"]


# ------------------------------------------------------------------------------ validation


def check_pairs(pairs: Sequence[PromptPair]) -> None:
    """Every pair has demonstrations and spans that match its tokens."""
    if not pairs:
        raise ProbeError("implied_updates(): no prompt pairs given")
    for i, p in enumerate(pairs):
        if not isinstance(p, PromptPair):
            raise ProbeError(f"pair {i}: expected a PromptPair from ip.build_prompt, got "
                             f"{type(p).__name__}")
        if not p.spans.demos:
            raise ProbeError(
                f"pair {i} (task {p.task!r}, query {p.query}) has no demonstrations: an implied "
                "update needs k >= 1 (build it with ip.build_prompt(..., k=8))"
            )
        s, n = p.spans, len(p.icl_ids)
        covered = torch.cat([s.query_indices(), s.demo_indices()]).sort().values
        problems = []
        if s.pred != n - 1:
            problems.append(f"pred={s.pred} but the prompt has {n} tokens")
        if not torch.equal(covered, torch.arange(n)):
            problems.append("BOS + demonstration + query spans do not tile the prompt")
        q_idx = s.query_indices()
        if len(p.zs_ids) != len(q_idx) or (q_idx.numel() and q_idx.max() >= n) or \
                not torch.equal(p.icl_ids[q_idx.clamp(max=n - 1)], p.zs_ids):
            problems.append("the ZS ids are not the ICL prompt's BOS + query tokens")
        if problems:
            raise ProbeError(f"pair {i} (task {p.task!r}, query {p.query}): spans do not match "
                             f"the tokens: {'; '.join(problems)}. Rebuild it with ip.build_prompt")


# ------------------------------------------------------------------------------ MLP access


@dataclass(frozen=True)
class _MlpInput:
    name: str  # "gate" or "in" (TransformerLens names; "in" is Llama's up_proj)
    param: str  # parameter name inside the layer's MLP module
    transposed: bool  # True for GPT-2's Conv1D, whose weight is (d_model, d_mlp)


def mlp_first_layers(model: Any, layer: int) -> list[_MlpInput]:
    """The linear maps that read the MLP input ``u`` in ``layer`` (gate and up, or W_in)."""
    from transformers.pytorch_utils import Conv1D

    mlp = model.blocks[layer].mlp
    params = {id(p): n for n, p in mlp.named_parameters()}
    out = []
    for name in ("gate", "in"):
        sub = mlp._modules.get(name)
        inner = getattr(sub, "original_component", None)
        if inner is None:
            continue
        if not isinstance(inner, (torch.nn.Linear, Conv1D)) or id(inner.weight) not in params:
            raise ProbeError(
                f"layer {layer}: the MLP's {name!r} input map is a {type(inner).__name__}, not a "
                "linear layer, so the rank-1 update (Dherin et al.) does not apply"
            )
        out.append(_MlpInput(name, params[id(inner.weight)], isinstance(inner, Conv1D)))
    if not out:
        raise ProbeError(
            f"layer {layer}: the MLP ({type(mlp).__name__}) has no linear first layer "
            "('in'/'gate'), so the rank-1 update (Dherin et al.) does not apply"
        )
    return out


def _mlp_weight(model: Any, layer: int, inp: _MlpInput) -> torch.Tensor:
    """The first-layer matrix in column orientation: (d_mlp, d_model), ``pre = W u``."""
    w = dict(model.blocks[layer].mlp.named_parameters())[inp.param].detach()
    return w.T if inp.transposed else w


def run_mlp(model: Any, layer: int, u: _MlpInputs,
            deltas: dict[str, torch.Tensor] | None = None) -> _MlpInputs:
    """The real MLP module of ``layer`` on inputs ``u`` (..., d_model), optionally with its
    first-layer matrices replaced by ``W + deltas[name]`` (column orientation)."""
    mlp = model.blocks[layer].mlp
    params = dict(mlp.named_parameters())
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    # torch.func.functional_call is not used here: on a TransformerBridge, whose MLP weights
    # are registered under two aliases, it left the patched weight in place after returning
    # (seen with transformer-lens 4.3.0). Swapping .data and restoring it in `finally` is
    # explicit and exception-safe.
    try:
        with torch.inference_mode():
            for inp in mlp_first_layers(model, layer):
                if deltas is not None and inp.name in deltas:
                    p = params[inp.param]
                    w = _mlp_weight(model, layer, inp) + deltas[inp.name].to(p.dtype)
                    saved.append((p, p.data))
                    p.data = (w.T if inp.transposed else w).contiguous()
            return mlp(u)
    finally:
        for p, data in saved:
            p.data = data


# ------------------------------------------------------------------------------ results


@dataclass
class ImpliedUpdates:
    """Implied updates for a batch of prompt pairs (see the module docstring).

    Tensors (``layer`` indexes ``layers``, ``model_space_layer`` indexes
    ``model_space_layers``; the field annotations say the same, and tests/test_shapes.py checks
    both against a real result)::

        dW_icl            layer batch head d_head d_head       Σ_{j∈D} v_j ⊗ k_j
        W_zs              layer batch head d_head d_head       Σ_{j∈Q} v_j ⊗ k_j
        demo_terms        layer batch demo head d_head d_head  ΔW_i (only with per_demo=True)
        demo_norms        layer batch demo head                ‖ΔW_i‖_F
        demo_mask         batch demo                           real demonstrations
        lam               layer batch head                     attention mass on demonstrations
        z, z_Q, z_D       layer batch head d_head              the real z and the split's parts
                                                               (0 for a side without mass)
        q                 layer batch head d_head              the query at p (after rotary)
        fidelity_err      layer batch head                     min_c ‖h − c h_lin‖ / ‖h‖
        mlp_a[name]       layer batch d_mlp                    W (u_ctx − u_0)
        mlp_b             layer batch d_model                  u_0 / ‖u_0‖²   (ΔW = a bᵀ)
        u_ctx, u_0        layer batch d_model                  MLP inputs at p (ICL, ZS)
        mlp_out_icl       layer batch d_model                  MLP output at p (ICL)
        model_space       model_space_layer batch head d_model d_model    M (on request)
        model_space_bias  model_space_layer batch head d_model            c (on request)
    """

    layers: tuple[int, ...]
    pairs: list[PromptPair]
    dW_icl: _HeadMatrices
    W_zs: _HeadMatrices
    demo_norms: _DemoNorms
    demo_mask: _DemoMask
    lam: _HeadScalars
    z: _HeadVectors
    z_Q: _HeadVectors
    z_D: _HeadVectors
    q: _HeadVectors
    fidelity_err: _HeadScalars
    mlp_a: dict[str, _MlpVectors]
    mlp_b: _ResidVectors
    u_ctx: _ResidVectors
    u_0: _ResidVectors
    mlp_out_icl: _ResidVectors
    records: dict[str, AttentionRecord] = field(repr=False, default_factory=dict)
    demo_terms: _DemoMatrices | None = None
    model_space: _ModelSpace | None = None
    model_space_bias: _ModelSpaceBias | None = None
    model_space_layers: tuple[int, ...] = ()

    def dW_icl_rank(self) -> _HeadRanks:
        """Numerical rank of ΔW_ICL per layer, prompt and head (layer batch head). Heads of a
        key/value group share k and v, hence ΔW_ICL: one SVD per group, expanded."""
        kv_head_of = self.records["icl"].kv_head_of
        first = [kv_head_of.tolist().index(g) for g in range(int(kv_head_of.max()) + 1)]
        ranks = torch.linalg.matrix_rank(self.dW_icl[:, :, first])  # layer batch kv_head
        return expand_kv(ranks, kv_head_of, dim=2)

    def mlp_delta(self, name: str, layer: int, prompt: int) -> _MlpDelta:
        """The rank-1 matrix ΔW (d_mlp, d_model) of MLP input map ``name`` ("gate"/"in")."""
        li = self.layers.index(layer)
        return torch.outer(self.mlp_a[name][li, prompt], self.mlp_b[li, prompt])

    def mlp_delta_norm(self, name: str) -> _PromptScalars:
        """‖ΔW‖_F = ‖a‖ ‖b‖ per layer and prompt (layer batch)."""
        return self.mlp_a[name].norm(dim=-1) * self.mlp_b.norm(dim=-1)

    def table(self, ranks: bool = True) -> pd.DataFrame:
        """Tidy table: one row per (prompt, layer, head, demo, quantity). ``head`` and ``demo``
        are -1 where they do not apply."""
        L, B, H = self.lam.shape
        rows: list[pd.DataFrame] = []

        def add(q: str, x: torch.Tensor, per_head: bool) -> None:
            x = x.detach().float().cpu()
            li, b, h = torch.meshgrid(torch.arange(L), torch.arange(B),
                                      torch.arange(H if per_head else 1), indexing="ij")
            rows.append(pd.DataFrame({
                "prompt": b.flatten().numpy(),
                "layer": torch.tensor(self.layers)[li.flatten()].numpy(),
                "head": (h.flatten() if per_head else torch.full((li.numel(),), -1)).numpy(),
                "demo": -1, "quantity": q, "value": x.reshape(-1).numpy(),
            }))

        add("dW_icl_norm", self.dW_icl.flatten(-2).norm(dim=-1), True)
        add("W_zs_norm", self.W_zs.flatten(-2).norm(dim=-1), True)
        if ranks:
            add("dW_icl_rank", self.dW_icl_rank().float(), True)
        add("lambda", self.lam, True)
        add("fidelity_err", self.fidelity_err, True)
        for name, a in self.mlp_a.items():
            add(f"mlp_dW_{name}_norm", self.mlp_delta_norm(name), False)
        add("u_shift_rel", (self.u_ctx - self.u_0).norm(dim=-1) / self.u_0.norm(dim=-1), False)
        # per-demonstration norms
        Lz, Bz, D, Hz = self.demo_norms.shape
        li, b, d, h = torch.meshgrid(*(torch.arange(n) for n in (Lz, Bz, D, Hz)), indexing="ij")
        keep = self.demo_mask[b.flatten(), d.flatten()]
        rows.append(pd.DataFrame({
            "prompt": b.flatten()[keep].numpy(),
            "layer": torch.tensor(self.layers)[li.flatten()[keep]].numpy(),
            "head": h.flatten()[keep].numpy(), "demo": d.flatten()[keep].numpy(),
            "quantity": "dW_icl_demo_norm",
            "value": self.demo_norms.float().cpu().flatten()[keep].numpy(),
        }))
        df = pd.concat(rows, ignore_index=True)
        df.insert(0, "task", [self.pairs[i].task for i in df.prompt])
        return df


# ------------------------------------------------------------------------------ the probes


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
    D = max(p.k for p in pairs)
    dt = icl.data["v"].dtype
    # key-position masks: demonstration tokens, query tokens, and one per demonstration
    in_D = _index_mask((p.spans.demo_indices() for p in pairs), T).to(dt)
    in_Q = _index_mask((p.spans.query_indices() for p in pairs), T).to(dt)
    demo_of = torch.zeros(len(pairs), D, T, dtype=dt)
    for b, p in enumerate(pairs):
        for i, d in enumerate(p.spans.demos):
            demo_of[b, i, d.whole.slice] = 1
    dev = icl.data["v"].device
    in_D, in_Q, demo_of = in_D.to(dev), in_Q.to(dev), demo_of.to(dev)
    # Keys and values are shared within a key/value group, so everything built from k and v
    # alone is computed once per kv_head and expanded to query heads at the end.
    k, v = icl.data["k"], icl.data["v"]  # layer batch key_pos kv_head d_head

    def per_head(x: torch.Tensor, dim: int) -> torch.Tensor:
        return expand_kv(x, icl.kv_head_of, dim)

    # 1a: dual form, ΔW = Σ_j v_j ⊗ k_j over D (and W_ZS over Q); d_v, d_k: the two d_head
    # axes of v ⊗ k. (Masks are applied to v first: a three-operand einsum would materialise
    # v ⊗ k per token.)
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
    demo_mask = torch.zeros(len(pairs), D, dtype=torch.bool)
    for b, p in enumerate(pairs):
        demo_mask[b, : p.k] = True

    # 1b: exact softmax split at p
    a = icl.at_pred("pattern")[..., :T]  # layer batch head key_pos
    z = icl.at_pred("z")  # layer batch head d_head
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

    # 4: dual-form fidelity, best scalar rescaling, in model space (h = W_O z)
    q = icl.at_pred("q")  # layer batch head d_head
    keys = (in_D + in_Q).clamp(max=1)
    z_lin = _linear_attention(k, v, q, keys, icl.kv_head_of)
    W_O = icl.W_O.to(dev)  # layer head d_head d_model
    per_head_out = "layer batch head d_head, layer head d_head d_model -> layer batch head d_model"
    h = einops.einsum(z, W_O, per_head_out)
    h_lin = einops.einsum(z_lin, W_O, per_head_out)
    c = (h * h_lin).sum(-1) / (h_lin * h_lin).sum(-1).clamp_min(torch.finfo(dt).tiny)
    fidelity = (h - c[..., None] * h_lin).norm(dim=-1) / h.norm(dim=-1)

    # 1c: rank-1 MLP update, kept as factors a = W (u_ctx − u_0), b = u_0 / ‖u_0‖²
    u_ctx, u_0 = icl.at_pred("mlp_in"), zs.at_pred("mlp_in")  # layer batch d_model
    mlp_a: dict[str, torch.Tensor] = {}
    for li, l in enumerate(layer_list):
        for inp in mlp_first_layers(model, l):
            W = _mlp_weight(model, l, inp).to(dev, u_ctx.dtype)  # d_mlp d_model
            mlp_a.setdefault(inp.name, torch.zeros(len(layer_list), len(pairs), W.shape[0],
                                                   dtype=dt, device=dev))
            mlp_a[inp.name][li] = (u_ctx[li] - u_0[li]) @ W.T
    mlp_b = u_0 / (u_0 * u_0).sum(-1, keepdim=True)

    ms = mb = None
    wanted: tuple[int, ...] = ()
    if model_space is not False:
        wanted = layer_list if model_space is True else tuple(model_space)
        ms, mb = _model_space(model, icl, dW, wanted, len(pairs))

    return ImpliedUpdates(
        layers=layer_list, pairs=pairs, dW_icl=dW, W_zs=W_zs, demo_norms=demo_norms,
        demo_mask=demo_mask, lam=lam, z=z, z_Q=zQ, z_D=zD, q=q, fidelity_err=fidelity,
        mlp_a=mlp_a, mlp_b=mlp_b, u_ctx=u_ctx, u_0=u_0, mlp_out_icl=icl.at_pred("mlp_out"),
        records={"icl": icl, "zs": zs}, demo_terms=demo_terms, model_space=ms,
        model_space_bias=mb, model_space_layers=wanted,
    )


# ------------------------------------------------------------------------------ verification

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
    - ``model_space``: ``M r_p + c`` against ``W_O ΔW_ICL q_p`` with the recorded q: M is built
      from the weights, the rotary phases and the QK-norm gain, so this recomputes q from
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
        check_pairs(pairs)
        layer_list = resolve_layers(layers, model.cfg.n_layers, "verify_identities", ProbeError)
        for l in layer_list:
            mlp_first_layers(model, l)
        # the model-space matrices are d_model x d_model per head: check three layers
        sample = sorted({layer_list[0], layer_list[len(layer_list) // 2], layer_list[-1]})
        icl = trace(model, pairs, what=_TRACE_WHAT + model_space_trace_what(model) + extra,
                    layers=layer_list)
        zs = trace(model, pairs, kind="zs", what=("mlp_in",), layers=layer_list)
        updates = _updates_from_records(model, list(pairs), icl, zs, layer_list, True, sample)
    up = updates
    icl = up.records["icl"]
    if any(w not in icl.data for w in extra):
        more = trace(model, up.pairs, what=extra, layers=up.layers)
    else:
        more = icl
    rows = []

    def add(name: str, kind: str, errs: torch.Tensor, layers: Sequence[int] | None = None) -> None:
        worst = errs.flatten(1).max(dim=1).values  # errs: layer ...
        rows.extend({"identity": name, "kind": kind, "layer": l, "max_rel_err": float(e)}
                    for l, e in zip(layers or up.layers, worst.tolist()))

    # ---- model identities, each against its own hook
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
    if up.model_space is not None:
        idx = [icl.layer_index(l) for l in up.model_space_layers]
        r_p = icl.at_pred("attn_in")[idx]
        via_m = einops.einsum(up.model_space, r_p, "layer batch head d_out d_in, "
                              "layer batch d_in -> layer batch head d_out") + up.model_space_bias
        via_q = einops.einsum(up.dW_icl[idx], up.q[idx], W_O[idx],
                              "layer batch head d_v d_k, layer batch head d_k, "
                              "layer head d_v d_model -> layer batch head d_model")
        add("model_space", MODEL_IDENTITY, _rel(via_m - via_q, via_q), up.model_space_layers)

    # ---- consistency checks: algebra on the recorded tensors
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
    add("mlp_pre_rank1", CONSISTENCY_CHECK, torch.stack(pre_errs))
    add("mlp_delta_rank1", CONSISTENCY_CHECK, torch.stack(rank_errs))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ k = 1, 2, ...


def update_trajectory(model: Any, task: Any, query: int = 0, k: int = 8, seed: int = 0, *,
                      layers: Iterable[int] | None = None, batch_size: int = 8,
                      **prompt_kwargs: Any) -> pd.DataFrame:
    """How the implied updates change as demonstrations are added one at a time.

    Builds the ``k``-shot prompt for ``query`` once, then the prompts with its first
    ``n = 1 .. k`` demonstrations (same demonstrations, same order), and runs
    :func:`implied_updates` on all of them in one batch. Returns the tidy table of
    :meth:`ImpliedUpdates.table` with a column ``n_demos``, plus per layer
    ``mlp_dW_{gate,in}_step`` = ``‖ΔW(n) − ΔW(n−1)‖_F`` (``ΔW(0) = 0``): Dherin et al.'s view
    of the MLP update settling as context accumulates. The ZS input ``u_0`` is the same for
    every ``n``, so the step is ``‖a_n − a_{n−1}‖ ‖b‖`` exactly.
    """
    from .prompts import build_prompt

    if k < 1:
        raise ProbeError(f"update_trajectory(k={k}): needs at least one demonstration")
    # checked before the k prompts are built
    layers = resolve_layers(layers, model.cfg.n_layers, "update_trajectory", ProbeError)
    check_batch_size(batch_size, "update_trajectory", ProbeError)
    base = build_prompt(model, task, query, k, seed, **prompt_kwargs)
    rest = {key: val for key, val in prompt_kwargs.items() if key not in ("order", "balanced")}
    pairs = [build_prompt(model, task, query, n, seed, demos=base.demos[:n], **rest)
             for n in range(1, k + 1)]
    up = implied_updates(model, pairs, layers=layers, batch_size=batch_size)
    df = up.table(ranks=False)
    df.insert(1, "n_demos", [pairs[i].k for i in df.prompt])
    steps = []
    b_norm = up.mlp_b.norm(dim=-1)  # layer batch (identical across batch: one query)
    for name, a in up.mlp_a.items():
        prev = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)
        step = (a - prev).norm(dim=-1) * b_norm  # layer n
        for li, l in enumerate(up.layers):
            for i, p in enumerate(pairs):
                steps.append({"task": p.task, "n_demos": p.k, "prompt": i, "layer": l,
                              "head": -1, "demo": -1, "quantity": f"mlp_dW_{name}_step",
                              "value": float(step[li, i])})
    return pd.concat([df, pd.DataFrame(steps)], ignore_index=True)

"""The hand-constructed GD weights against real attention heads (docs/science.md, Linear
self-attention and GD on regression; Shen et al.'s critique of von Oswald et al.'s
construction).

Three measurements on a hooked model (a TransformerLens ``TransformerBridge``; stacked
weights ``W_Q`` (layer head d_model d_head), ``W_K``/``W_V`` (layer kv_head d_model d_head),
``W_O`` (layer head d_head d_model), ``q = x @ W_Q``):

**(a) Sparsity.** Per head and matrix, the fraction of entries with ``|w| < t · max|w|``
(threshold *relative* to the matrix's largest entry, so that heads, layers and models of
different weight scales are compared alike; ``relative=False`` uses ``|w| < t``), for
``t = 1e-2 … 1e-6``, beside the fraction of exact zeros the construction needs at the model's
width. Derivation: the construction is one head whose key size is the token width
``d_model = d_x + d_y``; ``W_K = W_Q = [[I_x, 0], [0, 0]]`` hold ``d_x`` non-zeros and
``W_V = [[0, 0], [W_0, −I_y]]`` holds ``d_y d_x + d_y`` (``W_0`` dense; ``d_y`` when
``W_0 = 0``), out of ``d_model²``:

    zeros(W_K) = zeros(W_Q) = 1 − d_x / d_model²
    zeros(W_V) = 1 − (d_y d_x + d_y) / d_model²

With the residual stream split evenly (``d_x = d_y = d_model / 2``, the default) this is
``1 − 1/(2 d_model)`` and ``3/4 − 1/(2 d_model)``: at LLaMA-7B's width 4096, 99.988 % and
74.99 % — Shen et al.'s "> 99.99 %" (99.990 % at 13B's 5120) and "~75 %".

**(b) Block structure.** The construction's QK form ``W_Kᵀ W_Q = [[I_x, 0], [0, 0]]`` is a
positive multiple of an orthogonal projection, ``c Π_S`` (``S``: the x-subspace), and its OV
circuit ``P W_V = −(η/N) [[0, 0], [0, I_y]]`` (``W_0 = 0``, the form trained LSAs converge to)
is a negative multiple of one. The residual basis of a real model is not the construction's,
so each head is scored against the *nearest* matrix of that form in any basis: for a
circuit ``M`` (``W_Q W_Kᵀ`` or ``W_V W_O``, d_model x d_model) with symmetric part
``M_s = (M + Mᵀ)/2`` and eigenvalues ``λ_1 ≥ λ_2 ≥ …``,

    score = max_k max_{S: dim k, c} cos(M, c Π_S) = max_k (Σ_{i≤k} λ_i) / (√k ‖M‖_F)

(Ky Fan: ``max tr(Uᵀ M_s U) = Σ_{i≤k} λ_i``); for OV the sign of ``c`` is left free (a
readout can flip it), i.e. the bottom eigenvalues of ``M_s`` count too. ``score²`` is the
fraction of ``‖M‖²_F`` that lies in the best such matrix; 1 means the head has exactly the
construction's form. Baseline: the same score for random Gaussian factors of the same shapes
and Frobenius norms. Rotary position is ignored (the weights-only form, relative offset 0).

**(c) Dual-form fidelity.** ``ip.implied_updates(model, pairs).fidelity_err`` (layer batch
head; docs/science.md, Exact softmax split), aggregated per head.

Measured on the embedded SmolLM2-135M (d_model 576, 30 layers x 9 heads over 3 key/value
heads; 8 s on one CPU thread): the construction needs 99.913 % zeros in W_Q/W_K and 74.913 %
in W_V; the real heads have, below ``t·max|w|``, a mean of 8.3 / 8.1 / 5.0 % (W_Q / W_K /
W_V; max over heads 28 / 32 / 15 %) at t = 1e-2 and 0.8 / 0.8 / 0.5 % at 1e-3 — no head
comes near. Below 1e-5 the fraction stops falling at ~0.03 %: exact zeros left by the GGUF
quantisation. Block-form score, mean over heads (random baseline): QK 0.51 (0.47), beating
its baseline in 60 % of heads; OV 0.59 (0.48), in 92 % (max 0.91), with best ranks near
d_head. Dual-form fidelity error on 4 eight-shot "capital" prompts: median 0.87 (layer 0:
0.20), i.e. the linear relaxation explains little of most heads' outputs.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> construction_zero_fraction(4096)["W_K"] > 0.9998
True
>>> sp = head_sparsity(model)
>>> sorted(sp.matrix.unique()), sp.threshold.nunique()
(['W_K', 'W_Q', 'W_V'], 5)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
import torch
from einops import einsum

from ..probes import implied_updates
from ._common import DualError

SPARSITY_THRESHOLDS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def construction_zero_fraction(d_model: int, d_x: int | None = None, d_y: int | None = None,
                               *, w0_dense: bool = True) -> dict[str, float]:
    """Fraction of exact zeros the construction needs in ``W_K``, ``W_Q``, ``W_V`` at width
    ``d_model = d_x + d_y`` (module docstring; default ``d_x = d_model // 2``).

    >>> z = construction_zero_fraction(4096)
    >>> round(100 * z["W_Q"], 3), round(100 * z["W_V"], 2)
    (99.988, 74.99)
    >>> construction_zero_fraction(11, d_x=10, d_y=1, w0_dense=False)["W_V"] == 1 - 1 / 121
    True
    """
    d_x = d_model // 2 if d_x is None else d_x
    d_y = d_model - d_x if d_y is None else d_y
    if d_x < 1 or d_y < 1 or d_x + d_y != d_model:
        raise DualError(f"construction_zero_fraction: d_x={d_x} + d_y={d_y} must equal "
                        f"d_model={d_model}, both >= 1")
    nnz_v = d_y * d_x * int(w0_dense) + d_y
    return {"W_Q": 1 - d_x / d_model ** 2, "W_K": 1 - d_x / d_model ** 2,
            "W_V": 1 - nnz_v / d_model ** 2}


def _weights(model: Any) -> dict[str, torch.Tensor]:
    """``W_Q``, ``W_K``, ``W_V``, ``W_O`` of a hooked model, detached, float64."""
    try:
        w = {k: getattr(model, k).detach().double() for k in ("W_Q", "W_K", "W_V", "W_O")}
    except AttributeError as e:
        raise DualError(f"expected a hooked model with stacked W_Q/W_K/W_V/W_O (a "
                        f"TransformerBridge from ip.load_model / ip.tiny_model), got "
                        f"{type(model).__name__}: {e}") from e
    L, H, d_model, d_head = w["W_Q"].shape
    if w["W_K"].shape[0] != L or H % w["W_K"].shape[1] or w["W_O"].shape != (L, H, d_head,
                                                                               d_model):
        raise DualError(f"inconsistent stacked weights: W_Q {tuple(w['W_Q'].shape)}, W_K "
                        f"{tuple(w['W_K'].shape)}, W_O {tuple(w['W_O'].shape)}")
    return w


def head_sparsity(model: Any, thresholds: Sequence[float] = SPARSITY_THRESHOLDS, *,
                  relative: bool = True, d_x: int | None = None) -> pd.DataFrame:
    """Per head, matrix and threshold ``t``: the fraction of entries with ``|w| < t·max|w|``
    (``relative=False``: ``|w| < t``), beside ``construction_zeros``, the zero fraction the
    construction needs at this model's ``d_model`` (:func:`construction_zero_fraction`).
    ``W_Q`` rows are per query head; ``W_K``/``W_V`` rows per key/value head (``head = -1``).
    Columns: ``layer, matrix, head, kv_head, threshold, frac_below, construction_zeros``.
    """
    w = _weights(model)
    L, H, d_model, _ = w["W_Q"].shape
    G = w["W_K"].shape[1]
    need = construction_zero_fraction(d_model, d_x)
    rows = []
    for name in ("W_Q", "W_K", "W_V"):
        a = w[name].abs()  # layer head_or_kv d_model d_head
        if relative:
            a = a / a.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        for t in thresholds:
            frac = (a < t).double().mean(dim=(-2, -1))  # layer head_or_kv
            for layer in range(L):
                for i in range(frac.shape[1]):
                    per_q = name == "W_Q"
                    rows.append({"layer": layer, "matrix": name, "head": i if per_q else -1,
                                 "kv_head": i // (H // G) if per_q else i,
                                 "threshold": float(t), "frac_below": float(frac[layer, i]),
                                 "construction_zeros": need[name]})
    return pd.DataFrame(rows)


def sparsity_summary(sparsity: pd.DataFrame) -> pd.DataFrame:
    """Per matrix and threshold: mean, min and max of ``frac_below`` over heads, beside the
    construction's requirement; ``heads_meeting`` = fraction of heads at least as sparse.

    >>> import icl_probe as ip
    >>> s = sparsity_summary(head_sparsity(ip.tiny_model(), thresholds=[1e-2]))
    >>> s.columns.tolist()
    ['matrix', 'threshold', 'mean', 'min', 'max', 'construction_zeros', 'heads_meeting']
    """
    g = sparsity.assign(meets=sparsity.frac_below >= sparsity.construction_zeros).groupby(
        ["matrix", "threshold"], sort=True)
    out = g.frac_below.agg(["mean", "min", "max"]).reset_index()
    out["construction_zeros"] = g.construction_zeros.first().values
    out["heads_meeting"] = g.meets.mean().values
    return out


def projection_form_score(A: torch.Tensor, B: torch.Tensor, *,
                          sign: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_k (Σ_{i≤k} λ_i(M_s)) / (√k ‖M‖_F)`` for ``M = A Bᵀ`` (module docstring), batched:
    A, B (..., d_model, r). ``sign=1``: ``c > 0``; ``-1``: ``c < 0``; ``0``: either. Returns
    ``(score, best_k)`` (...). ``M`` is never formed: with ``[A B] = QR``,
    ``M_s = Q (R J Rᵀ) Qᵀ``, ``J = [[0, I], [I, 0]]/2``, and ``‖M‖²_F = ⟨AᵀA, BᵀB⟩``.

    >>> I = torch.eye(6, dtype=torch.float64)[:, :2]          # construction: M = Π (rank 2)
    >>> score, k = projection_form_score(I, I)
    >>> round(float(score), 12), int(k)
    (1.0, 2)
    >>> [round(float(projection_form_score(I, -I, sign=s)[0]), 12) for s in (1, -1, 0)]
    [0.0, 1.0, 1.0]
    """
    if A.shape != B.shape or A.ndim < 2:
        raise DualError(f"projection_form_score: A {tuple(A.shape)} and B {tuple(B.shape)} "
                        "must share one (..., d_model, r) shape")
    if sign not in (-1, 0, 1):
        raise DualError(f"projection_form_score: sign={sign}; expected 1, -1 or 0")
    r = A.shape[-1]
    C = torch.cat([A, B], -1)  # ... d_model 2r
    R = torch.linalg.qr(C, mode="reduced").R  # ... m 2r  (m = min(d_model, 2r))
    J = torch.zeros(2 * r, 2 * r, dtype=A.dtype, device=A.device)
    J[:r, r:] = J[r:, :r] = 0.5 * torch.eye(r, dtype=A.dtype, device=A.device)
    core = einsum(R, J, R, "... m i, i j, ... n j -> ... m n")
    lam = torch.linalg.eigvalsh(0.5 * (core + core.mT))  # ascending
    gram = einsum(A, A, "... d i, ... d j -> ... i j")
    fro = einsum(gram, einsum(B, B, "... d i, ... d j -> ... i j"), "... i j, ... i j -> ...")
    fro = fro.clamp_min(torch.finfo(A.dtype).tiny).sqrt()
    k = torch.arange(1, lam.shape[-1] + 1, dtype=A.dtype, device=A.device)
    pos = lam.flip(-1).cumsum(-1) / k.sqrt()  # top-k sums
    neg = (-lam).cumsum(-1) / k.sqrt()  # bottom-k sums, sign flipped
    cand = {1: pos, -1: neg, 0: torch.maximum(pos, neg)}[sign] / fro[..., None]
    score, idx = cand.max(-1)
    return score, idx + 1


def head_block_similarity(model: Any, *, seed: int = 0) -> pd.DataFrame:
    """Per head, how close its QK and OV circuits are to the construction's form (module
    docstring, (b)), beside a random baseline. Columns: ``layer, head, circuit`` ("QK": ``W_Q
    W_Kᵀ``, positive projection; "OV": ``W_V W_O``, projection of either sign), ``score``
    (``score²`` = fraction of ``‖M‖²_F`` in the best-aligned construction-form matrix),
    ``best_k`` (its rank), ``random_score``, ``random_best_k``.

    >>> import icl_probe as ip
    >>> df = head_block_similarity(ip.tiny_model())
    >>> df.shape, bool(df.score.between(-1, 1).all())
    ((24, 7), True)
    """
    w = _weights(model)
    L, H, d_model, d_head = w["W_Q"].shape
    kv_of = torch.arange(H) // (H // w["W_K"].shape[1])
    W_K, W_V = w["W_K"][:, kv_of], w["W_V"][:, kv_of]  # per query head
    pairs = {"QK": (w["W_Q"], W_K, 1), "OV": (W_V, w["W_O"].mT, 0)}
    gen = torch.Generator().manual_seed(seed)

    def like(t: torch.Tensor) -> torch.Tensor:  # Gaussian, same shape and per-head norm
        g = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return g * (t.flatten(-2).norm(dim=-1) / g.flatten(-2).norm(dim=-1))[..., None, None]

    rows = []
    for circuit, (A, B, sign) in pairs.items():
        score, k = projection_form_score(A, B, sign=sign)
        r_score, r_k = projection_form_score(like(A), like(B), sign=sign)
        for layer in range(L):
            for h in range(H):
                rows.append({"layer": layer, "head": h, "circuit": circuit,
                             "score": float(score[layer, h]), "best_k": int(k[layer, h]),
                             "random_score": float(r_score[layer, h]),
                             "random_best_k": int(r_k[layer, h])})
    return pd.DataFrame(rows)


def head_fidelity(model: Any, pairs: Sequence[Any] | None = None, *,
                  updates: Any = None) -> pd.DataFrame:
    """Dual-form fidelity per head (docs/science.md, Exact softmax split):
    ``min_c ‖h − c h_lin‖ / ‖h‖`` between the head's true output and its linear-attention
    relaxation, from ``ip.implied_updates(model, pairs).fidelity_err`` (layer batch head),
    aggregated over prompts. Pass ``updates`` to reuse a computed
    :class:`~icl_probe.ImpliedUpdates`.
    Columns: ``layer, head, fidelity_err_mean, fidelity_err_median, fidelity_err_std,
    n_prompts``.

    >>> import icl_probe as ip
    >>> model = ip.tiny_model()
    >>> pairs = [ip.build_prompt(model, "capital", query=q, k=3, seed=q) for q in range(2)]
    >>> head_fidelity(model, pairs).shape                          # 3 layers x 4 heads
    (12, 6)
    """
    if updates is None:
        if pairs is None:
            raise DualError("head_fidelity: pass prompt pairs (ip.build_prompt) or updates")
        updates = implied_updates(model, pairs)
    err = updates.fidelity_err.detach().double().cpu()  # layer batch head
    n = err.shape[1]
    rows = []
    for li, layer in enumerate(updates.layers):
        for h in range(err.shape[2]):
            e = err[li, :, h]
            rows.append({"layer": layer, "head": h, "fidelity_err_mean": float(e.mean()),
                         "fidelity_err_median": float(e.median()),
                         "fidelity_err_std": float(e.std()) if n > 1 else math.nan,
                         "n_prompts": n})
    return pd.DataFrame(rows)


def real_head_claims(model: Any, pairs: Sequence[Any] | None = None, *,
                     thresholds: Sequence[float] = SPARSITY_THRESHOLDS, relative: bool = True,
                     seed: int = 0) -> dict[str, pd.DataFrame]:
    """All three measurements: ``{"sparsity", "sparsity_summary", "similarity"}`` and, when
    ``pairs`` are given, ``"fidelity"``.

    >>> import icl_probe as ip
    >>> sorted(real_head_claims(ip.tiny_model()))
    ['similarity', 'sparsity', 'sparsity_summary']
    """
    sp = head_sparsity(model, thresholds, relative=relative)
    out = {"sparsity": sp, "sparsity_summary": sparsity_summary(sp),
           "similarity": head_block_similarity(model, seed=seed)}
    if pairs is not None:
        out["fidelity"] = head_fidelity(model, pairs)
    return out

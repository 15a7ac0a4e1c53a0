"""ICL against real gradient descent: the field's metrics (docs/science.md, "Comparison
metrics") and Shen et al.'s order sensitivity (the random-weight baseline models are
:func:`icl_probe.models.untrained_copy`).

Three runs per query: **ZS** (base model, ZS prompt), **ICL** (base model, ICL prompt) and
**FT** (the fine-tuned model of :func:`icl_probe.finetune`, ZS prompt). The metric functions
below are pure (tensors in, numbers out) and are tested against slow references;
:func:`icl_probe.compare` (in :mod:`icl_probe.compare.protocol`) drives the runs over many queries.

>>> import torch
>>> from icl_probe.compare import metrics as C
>>> C.rec2ftp(zs=[0, 0, 1, 0], icl=[1, 0, 1, 1], ft=[1, 1, 1, 0])   # |{0}| / |{0, 1}|
50.0
>>> round(C.kendall_tau(torch.tensor([1., 2, 3, 4]), torch.tensor([1., 3, 2, 4])), 4)
0.6667
"""

from __future__ import annotations

from typing import Sequence

import einops
import torch
from scipy.stats import kendalltau

from ..errors import IclProbeError


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis, in float64; 0 where either vector is 0."""
    a, b = a.double(), b.double()
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))


def rec2ftp(zs: Sequence[bool], icl: Sequence[bool], ft: Sequence[bool]) -> float:
    """Dai et al.'s Rec2FTP = |(C_FT \\ C_ZS) ∩ (C_ICL \\ C_ZS)| / |C_FT \\ C_ZS| × 100 (%).

    The denominator is |C_FT \\ C_ZS| (dividing by |C_FT \\ C_ICL|, as one public
    reimplementation does, is a bug). NaN when fine-tuning fixes no zero-shot error."""
    zs, icl, ft = (torch.as_tensor(x, dtype=torch.bool) for x in (zs, icl, ft))
    ft_gain = ft & ~zs
    if int(ft_gain.sum()) == 0:
        return float("nan")
    return float((ft_gain & icl & ~zs).sum()) / float(ft_gain.sum()) * 100.0


def simaou(h_zs: torch.Tensor, h_icl: torch.Tensor, h_ft: torch.Tensor,
           normalize: bool) -> torch.Tensor:
    """SimAOU per layer: cos(h_ICL − h_ZS, h_FT − h_ZS), h = attention output at p
    (layer d_model). Dai et al. normalise each h to unit norm first (``normalize=True``);
    Deutch et al. show that inflates it and report the unnormalised form too."""
    if normalize:
        h_zs, h_icl, h_ft = (h / h.norm(dim=-1, keepdim=True) for h in (h_zs, h_icl, h_ft))
    return _cos(h_icl - h_zs, h_ft - h_zs)


def simam(m_zs: torch.Tensor, m_icl: torch.Tensor, m_ft: torch.Tensor) -> dict[str, torch.Tensor]:
    """SimAM per layer from the pre-softmax scores of p to the query's tokens (layer head
    query_tok): ``before`` = cos(m_ICL, m_ZS), ``after`` = cos(m_ICL, m_FT) (Dai), and
    ``delta`` = cos(m_ICL − m_ZS, m_FT − m_ZS) (Deutch), each averaged over heads."""
    return {
        "before": _cos(m_icl, m_zs).mean(-1),
        "after": _cos(m_icl, m_ft).mean(-1),
        "delta": _cos(m_icl - m_zs, m_ft - m_zs).mean(-1),
    }


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's τ-b between two weightings of the same items (ties handled): pair counting
    on the sign matrices for up to :data:`KENDALL_DIRECT_MAX` items (exact, fast for the
    demonstration-token counts the comparison sees), SciPy's O(n log n) routine beyond. NaN
    when either weighting is constant."""
    a, b = a.flatten(), b.flatten()
    if a.numel() != b.numel() or a.numel() < 2:
        raise IclProbeError(f"kendall_tau: need two vectors of equal length >= 2, got "
                            f"{a.numel()} and {b.numel()}")
    return kendall_tau_rows(a[None], b[None])[0]


def kendall_tau_rows(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """:func:`kendall_tau` of each row of ``a`` (rows items) with the same row of ``b``, the
    rows counted together (a few rows at a time, so that the sign matrices stay near
    :data:`KENDALL_BLOCK` numbers)."""
    return kendall_tau_against(a, [b])[0]


def kendall_tau_against(a: torch.Tensor, others: Sequence[torch.Tensor]) -> list[list[float]]:
    """:func:`kendall_tau_rows` of ``a`` with each tensor of ``others`` (a measurement and its
    baselines share one side: ``a``'s order is found once). Rows without ties count their
    discordant pairs as inversions (:func:`_inversions`), others on the sign matrices; both
    give the same integer counts, so the same tau to the last bit."""
    a = a.double().cpu()
    others = [b.double().cpu() for b in others]
    for b in others:
        if a.shape != b.shape or a.dim() != 2 or a.shape[1] < 2:
            raise IclProbeError(f"kendall_tau_rows: need two (rows, items) tensors of one "
                                f"shape with >= 2 items, got {tuple(a.shape)} and "
                                f"{tuple(b.shape)}")
    n = a.shape[1]
    if n > KENDALL_DIRECT_MAX:
        out = [[float(kendalltau(x.numpy(), y.numpy(), variant="b").statistic)
                for x, y in zip(a, b)] for b in others]
    else:
        taus = [torch.zeros(a.shape[0], dtype=torch.float64) for _ in others]
        # rows without ties on either side (from KENDALL_PAIRS_MIN items): the sum over ordered
        # pairs of sign x sign is n (n - 1) - 4 x the discordant pairs, the inversions of b in
        # a's order; divided by sqrt((n (n - 1))^2), which is n (n - 1) exactly
        fast = [torch.zeros(a.shape[0], dtype=torch.bool) for _ in others]
        if n >= KENDALL_PAIRS_MIN:
            untied_a, by_a = ~_tied(a), a.argsort(-1)
            fast = [untied_a & ~_tied(b) for b in others]
            inv = _inversions(torch.cat([b[f].gather(1, by_a[f]) for b, f in zip(others, fast)]))
            for tau, f, c in zip(taus, fast, inv.split([int(f.sum()) for f in fast])):
                tau[f] = (n * (n - 1) - 4 * c).double() / float(n * (n - 1))
        step = max(1, KENDALL_BLOCK // (n * n))
        for tau, b, f in zip(taus, others, fast):  # the other rows on the sign matrices
            slow = (~f).nonzero()[:, 0]
            for lo in range(0, len(slow), step):
                rows = slow[lo: lo + step]
                x, y = a[rows], b[rows]
                dx, dy = _signs(x), _signs(y)
                # |num| <= n^2 < 2^31 for n <= KENDALL_DIRECT_MAX: int32 sums are exact
                tau[rows] = (dx * dy).sum((1, 2), dtype=torch.int32).double() / (
                    _ordered_pairs(x, dx) * _ordered_pairs(y, dy)).double().sqrt()
        out = [tau.tolist() for tau in taus]
    constant_a = (a == a[:, :1]).all(1)
    return [[float("nan") if c else t
             for c, t in zip((constant_a | (b == b[:, :1]).all(1)).tolist(), col)]
            for b, col in zip(others, out)]


def _tied(x: torch.Tensor) -> torch.Tensor:
    """Per row, whether two items are equal (or one is NaN)."""
    return (x.sort(-1).values.diff(dim=-1) == 0).any(-1) | x.isnan().any(-1)


def _inversions(y: torch.Tensor) -> torch.Tensor:
    """Per row of ``y`` (rows items, at most :data:`KENDALL_DIRECT_MAX`), the number of pairs
    i < j with y_i > y_j (int64): one comparison per pair, half the work of two sign matrices
    and their product, in blocks of rows of about 2^20 pairs (which stay in cache)."""
    n = y.shape[1]
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    step = max(1, 2**20 // (n * n))
    return torch.cat([((x[:, :, None] > x[:, None, :]) & upper).flatten(1).sum(1, dtype=torch.int32)
                      for x in y.split(step)] or [torch.zeros(0, dtype=torch.int32)]).long()


def _signs(x: torch.Tensor) -> torch.Tensor:
    """sign(x_i − x_j) for every pair of each row (rows i j), as int8."""
    greater = (x[:, :, None] > x[:, None, :]).to(torch.int8)
    return greater - greater.mT


def _ordered_pairs(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Per row, the number of (i, j) pairs with a nonzero sign (int64): n (n − 1) for a row
    without ties, counted on the sign matrix for a row with ties (or NaNs)."""
    n = x.shape[1]
    out = torch.full((x.shape[0],), n * (n - 1), dtype=torch.int64)
    tied = _tied(x)
    if tied.any():
        out[tied] = (signs[tied] != 0).sum((1, 2))
    return out


KENDALL_DIRECT_MAX = 2048


KENDALL_BLOCK = 2**23  # numbers per sign matrix when rows are counted together


KENDALL_PAIRS_MIN = 64  # items from which rows without ties count inversions (below: signs)


KENDALL_LEVELS = ("token", "example")


def kendall_icl_ft(scores_icl: torch.Tensor, q_steps: torch.Tensor, q_ft: torch.Tensor, *,
                   scale: float, level: str = "token",
                   demo_lengths: Sequence[int] | None = None) -> float:
    """Dai et al.'s Kendall(ICL, FT) for one layer.

    ICL side: the model's scores from p to each demonstration token (``head demo_tok``,
    already scaled as the model scales them), summed over heads, softmax. FT side: for each
    demonstration token j, the query ``q_j`` recorded while the FT step used its
    demonstration (``demo_tok head d_head``) dotted with the FT model's query at p
    (``head d_head``), both multiplied by the attention ``scale`` as Dai's fairseq stores its
    queries (so the logits are ``scale² Σ_h q_j·q_p``), summed over heads, softmax.
    ``level="token"``: τ between the two weightings of the tokens; ``level="example"``: the
    weights summed per demonstration first (``demo_lengths`` gives each demonstration's token
    count), τ over demonstrations (Dai's example-level form)."""
    w_icl, w_ft = kendall_weights(scores_icl[None], q_steps[None], q_ft[None],
                                  scale=torch.tensor([float(scale)], dtype=torch.float64),
                                  level=level, demo_lengths=demo_lengths)
    return kendall_tau_rows(w_icl, w_ft)[0]


def kendall_weights(scores_icl: torch.Tensor, q_steps: torch.Tensor, q_ft: torch.Tensor, *,
                    scale: torch.Tensor | None, level: str = "token",
                    demo_lengths: Sequence[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two weightings :func:`kendall_icl_ft` ranks, for many layers at once (a leading
    ``layer`` axis on every argument; ``scale`` one factor per layer, or None where both
    queries were already multiplied by it with :func:`scale_queries`): ``(icl_w, ft_w)``,
    each ``layer demo_tok`` (``layer demo`` at the example level), in float64."""
    if level not in KENDALL_LEVELS:
        raise IclProbeError(f"kendall_icl_ft(level={level!r}): expected one of {KENDALL_LEVELS}")
    if scores_icl.shape[-1] != q_steps.shape[1]:
        raise IclProbeError(f"kendall_icl_ft: {scores_icl.shape[-1]} ICL demonstration tokens "
                            f"but {q_steps.shape[1]} recorded FT queries")
    icl_w = torch.softmax(scores_icl.double().sum(1), -1)
    if scale is not None:
        q_steps, q_ft = scale_queries(q_steps, scale), scale_queries(q_ft, scale)
    ft_w = torch.softmax(einops.einsum(q_steps, q_ft, "layer tok head d_head, "
                                       "layer head d_head -> layer tok"), -1)
    if level == "example":
        if demo_lengths is None or sum(demo_lengths) != icl_w.shape[-1]:
            raise IclProbeError(f"kendall_icl_ft(level='example'): demo_lengths must sum to the "
                                f"{icl_w.shape[-1]} demonstration tokens, got {demo_lengths}")
        icl_w, ft_w = per_demonstration(icl_w, demo_lengths), per_demonstration(
            ft_w.to(icl_w.device), demo_lengths)
    return icl_w, ft_w


def scale_queries(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Queries with a leading ``layer`` axis in float64, multiplied by each layer's attention
    scale (``scale``: one factor per layer), as :func:`kendall_weights` ranks them."""
    sc = scale.double().to(q.device)
    return q.double() * sc.reshape(-1, *[1] * (q.dim() - 1))


def per_demonstration(w: torch.Tensor, demo_lengths: Sequence[int]) -> torch.Tensor:
    """Token weights (``... demo_tok``) summed per demonstration (``... demo``), in order."""
    dev = w.device
    demo = torch.repeat_interleave(torch.arange(len(demo_lengths), device=dev),
                                   torch.tensor(list(demo_lengths), device=dev))
    out = torch.zeros(*w.shape[:-1], len(demo_lengths), dtype=w.dtype, device=dev)
    return out.index_add_(-1, demo, w)


def simaou_uniform_random(h_zs: torch.Tensor, h_icl: torch.Tensor, r: torch.Tensor,
                          normalize: bool) -> torch.Tensor:
    """Dai et al.'s SimAOU baseline: cos(h_ICL − h_ZS, r) with ``r`` a draw from U[0, 1)^d
    (given, so that the function is pure), along the last axis. ``normalize=True`` takes the
    update between unit-normalised outputs, as Dai's code does for its baseline (the
    ``SimAOU_norm`` form); ``False`` is the unnormalised form's baseline."""
    if normalize:
        h_zs, h_icl = (h / h.norm(dim=-1, keepdim=True) for h in (h_zs, h_icl))
    return _cos(h_icl - h_zs, r)


def top_overlap(p_icl: torch.Tensor, p_gd: torch.Tensor, k: int = 10) -> float:
    """|Top_k(p_ICL) ∩ Top_k(p_GD)| / k (Shen/Mishra; *unverified* definition)."""
    a = set(p_icl.topk(k).indices.tolist())
    b = set(p_gd.topk(k).indices.tolist())
    return len(a & b) / k


def overlap_cosine(p_icl: torch.Tensor, p_gd: torch.Tensor, k: int = 10) -> float:
    """Cosine of the two probability vectors restricted to the tokens in both top-k sets
    (*unverified* definition); NaN when the sets do not overlap."""
    common = sorted(set(p_icl.topk(k).indices.tolist()) & set(p_gd.topk(k).indices.tolist()))
    if not common:
        return float("nan")
    idx = torch.tensor(common)
    return float(_cos(p_icl[idx], p_gd[idx]))


def kl(p_icl: torch.Tensor, p_gd: torch.Tensor) -> float:
    """KL(p_ICL ‖ p_GD) in nats, from probabilities (float64)."""
    p, q = p_icl.double(), p_gd.double()
    mask = p > 0
    return float((p[mask] * (p[mask].log() - q[mask].clamp_min(1e-300).log())).sum())


def order_sensitivity(probs: torch.Tensor) -> float:
    """Shen et al.'s order sensitivity for R orderings of the same demonstrations (R d_vocab
    output distributions at p): the per-token standard deviation across orderings, summed
    over the vocabulary (*unverified* aggregation; 0 exactly when every ordering gives the
    same distribution)."""
    if probs.shape[0] < 2:
        raise IclProbeError("order_sensitivity needs at least two orderings")
    return float(probs.double().std(dim=0, correction=0).sum())


def uniform_random_cos(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dai's baseline: cos(x, r) with r ~ U[0, 1)^d, along the last axis."""
    r = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return _cos(x, r)


def same_norm_random(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random direction (Gaussian) with the norm of each row of ``x``."""
    r = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return r / r.norm(dim=-1, keepdim=True) * x.double().norm(dim=-1, keepdim=True)

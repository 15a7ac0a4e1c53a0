"""Comparison metrics against slow explicit references, Rec2FTP on hand-built sets, and a
small end-to-end run on the embedded model."""

import itertools
import math

import pandas as pd
import pytest
import torch

import icl_probe as ip
from icl_probe.compare import metrics as C
from icl_probe.compare import Comparison, order_sensitivity_table

TOL = 1e-12


def _cos_ref(a, b):
    a, b = a.double().tolist(), b.double().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("zs, icl, ft, expected", [
    ([0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], 50.0),   # FT fixes {0, 2}; ICL fixes 0 of them
    ([1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], 200 / 3),  # a ZS-right query FT breaks is ignored
    ([0, 0], [1, 1], [0, 0], float("nan")),             # FT fixes nothing: undefined
    ([0, 1, 0], [0, 1, 1], [1, 1, 1], 50.0),            # denominator |C_FT \ C_ZS| = 2, not
])                                                       # |C_FT \ C_ICL| = 1 (the known bug)
def test_rec2ftp_hand_built(zs, icl, ft, expected):
    got = C.rec2ftp(zs, icl, ft)
    assert (math.isnan(got) and math.isnan(expected)) or abs(got - expected) < 1e-9


def test_kendall_against_pair_counting():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 11):
        a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
        conc = disc = 0
        for i, j in itertools.combinations(range(n), 2):
            s = (a[i] - a[j]) * (b[i] - b[j])
            conc += s > 0
            disc += s < 0
        assert abs(C.kendall_tau(a, b) - (conc - disc) / (n * (n - 1) / 2)) < TOL
    # ties: tau-b
    a = torch.tensor([1.0, 1.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0, 2.0, 3.0])
    # pairs: (0,1) a-tie, (0,2)+, (0,3)+, (1,2) b-tie, (1,3)+, (2,3)+ -> 4 concordant
    assert abs(C.kendall_tau(a, b) - 4 / math.sqrt(5 * 5)) < TOL
    assert abs(C.kendall_tau(a, a) - 1) < TOL and abs(C.kendall_tau(a, -a) + 1) < TOL


def _tau_b_by_pairs(a, b):
    """Kendall's tau-b by explicit pair counting (NaN pairs count as ties, as the metric's)."""
    conc = disc = tie_a = tie_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = float(a[i] - a[j]), float(b[i] - b[j])
        tie_a += not (da > 0 or da < 0)
        tie_b += not (db > 0 or db < 0)
        conc += da * db > 0
        disc += da * db < 0
    pairs = len(a) * (len(a) - 1) / 2
    den = math.sqrt((pairs - tie_a) * (pairs - tie_b))
    return (conc - disc) / den if den else float("nan")


def test_kendall_against_many_shares_one_side_and_counts_ties():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(6, 9, generator=g, dtype=torch.float64)
    a[1] = (a[1] * 3).floor()   # ties on the shared side
    a[2, 4] = float("nan")
    others = [torch.rand(6, 9, generator=g, dtype=torch.float64) for _ in range(2)]
    others[1][3] = (others[1][3] * 2).floor()  # ties on one other side only
    others[0][5] = 0.5                           # a constant row: NaN
    got = C.kendall_tau_against(a, others)
    for b, col in zip(others, got):
        alone = C.kendall_tau_rows(a, b)  # one other at a time: the same counts
        assert all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(col, alone))
        for r in range(6):
            ref = _tau_b_by_pairs(a[r], b[r])
            assert (math.isnan(ref) and math.isnan(col[r])) or abs(col[r] - ref) < TOL, r


def test_kendall_counts_inversions_on_long_rows_to_the_last_bit():
    """From KENDALL_PAIRS_MIN items, rows without ties count discordant pairs as inversions;
    rows with ties (on either side) or NaNs keep the sign matrices. Both against explicit pair
    counting, and the untied rows bit for bit against the sign-matrix count."""
    g = torch.Generator().manual_seed(4)
    n = C.KENDALL_PAIRS_MIN + 9
    a = torch.rand(5, n, generator=g, dtype=torch.float64)
    a[1, :4] = 0.25  # ties on the shared side
    others = [torch.rand(5, n, generator=g, dtype=torch.float64) for _ in range(2)]
    others[0][2, 7] = others[0][2, 9]  # a tie on one other side only
    others[1][3, 5] = float("nan")
    got = C.kendall_tau_against(a, others)
    for b, col in zip(others, got):
        dx, dy = C._signs(a), C._signs(b)
        signs = ((dx * dy).sum((1, 2), dtype=torch.int32).double()
                 / (C._ordered_pairs(a, dx) * C._ordered_pairs(b, dy)).double().sqrt())
        for r in range(5):
            ref = _tau_b_by_pairs(a[r], b[r])
            assert (math.isnan(ref) and math.isnan(col[r])) or abs(col[r] - ref) < TOL, r
            if not math.isnan(ref):
                assert col[r] == float(signs[r]), r


def test_simaou_and_simam_against_explicit_loops():
    g = torch.Generator().manual_seed(1)
    L, H, T, d = 3, 4, 5, 7
    h = [torch.randn(L, d, generator=g, dtype=torch.float64) for _ in range(3)]
    for normalize in (False, True):
        got = C.simaou(*h, normalize=normalize)
        for l in range(L):
            zs, icl, ft = (x[l] / x[l].norm() if normalize else x[l] for x in h)
            assert abs(got[l] - _cos_ref(icl - zs, ft - zs)) < TOL
    m = [torch.randn(L, H, T, generator=g, dtype=torch.float64) for _ in range(3)]
    got = C.simam(*m)
    for l in range(L):
        zs, icl, ft = (x[l] for x in m)
        assert abs(got["before"][l] - sum(_cos_ref(icl[h], zs[h]) for h in range(H)) / H) < TOL
        assert abs(got["after"][l] - sum(_cos_ref(icl[h], ft[h]) for h in range(H)) / H) < TOL
        ref = sum(_cos_ref(icl[h] - zs[h], ft[h] - zs[h]) for h in range(H)) / H
        assert abs(got["delta"][l] - ref) < TOL


def test_kendall_icl_ft_follows_the_definition():
    g = torch.Generator().manual_seed(2)
    H, J, d = 3, 6, 4
    scores = torch.randn(H, J, generator=g, dtype=torch.float64)
    q_steps = torch.randn(J, H, d, generator=g, dtype=torch.float64)
    q_ft = torch.randn(H, d, generator=g, dtype=torch.float64)
    icl_w = torch.softmax(torch.tensor([sum(scores[h, j] for h in range(H)) for j in range(J)]), 0)
    ft_w = torch.softmax(torch.tensor([sum(float(q_steps[j, h] @ q_ft[h]) for h in range(H))
                                       for j in range(J)]), 0)
    assert abs(C.kendall_icl_ft(scores, q_steps, q_ft, scale=1.0)
               - C.kendall_tau(icl_w, ft_w)) < TOL


def _softmax_ref(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


def test_kendall_icl_ft_applies_the_scale_to_both_queries():
    """The FT logits are (scale·q_j)·(scale·q_p) summed over heads: scale² Σ_h q_j·q_p (Dai's
    fairseq scales its stored queries). Kendall's τ between two softmaxes is blind to the
    scale at the token level (a positive factor keeps every logit's order), so the check is
    at the example level, where the weights are summed per demonstration first and the
    temperature changes the sums' order. On this data τ with scale² (the definition), scale¹
    (the scale applied to one side only) and scale⁰ (dropped) all differ, so the test fails if
    the scale is dropped or applied once."""
    g = torch.Generator().manual_seed(9)
    H, d, scale = 3, 4, 0.37
    lengths = [2, 3, 1, 4, 2]  # tokens per demonstration
    J = sum(lengths)
    scores = torch.randn(H, J, generator=g, dtype=torch.float64)
    q_steps = torch.randn(J, H, d, generator=g, dtype=torch.float64)
    q_ft = torch.randn(H, d, generator=g, dtype=torch.float64)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]

    def per_example(w):
        return torch.tensor([sum(w[s:s + n]) for s, n in zip(starts, lengths)])

    icl_w = _softmax_ref([sum(float(scores[h, j]) for h in range(H)) for j in range(J)])

    def tau(s_step, s_pred):  # FT logits: Σ_h (s_step q_j)·(s_pred q_p)
        logits = [sum(float((s_step * q_steps[j, h]) @ (s_pred * q_ft[h])) for h in range(H))
                  for j in range(J)]
        return C.kendall_tau(per_example(icl_w), per_example(_softmax_ref(logits)))

    ref = tau(scale, scale)  # the definition: scale²
    # the check discriminates: scale applied once, or dropped, gives another τ here
    assert abs(tau(scale, 1.0) - ref) > 0.1 and abs(tau(1.0, 1.0) - ref) > 0.1
    got = C.kendall_icl_ft(scores, q_steps, q_ft, scale=scale, level="example",
                           demo_lengths=lengths)
    assert abs(got - ref) < TOL
    # token level: the same τ whatever the scale (see above), but still the definition
    token = C.kendall_tau(torch.tensor(icl_w), torch.tensor(_softmax_ref(
        [scale ** 2 * sum(float(q_steps[j, h] @ q_ft[h]) for h in range(H)) for j in range(J)])))
    assert abs(C.kendall_icl_ft(scores, q_steps, q_ft, scale=scale) - token) < TOL


def test_distribution_metrics():
    p = torch.tensor([0.5, 0.2, 0.12, 0.1, 0.05, 0.03], dtype=torch.float64)
    q = torch.tensor([0.1, 0.05, 0.5, 0.2, 0.12, 0.03], dtype=torch.float64)
    # top-2: {0, 1} vs {2, 3}; top-3: {0, 1, 2} vs {2, 3, 4}; top-4: {0..3} vs {2, 3, 4, 0}
    assert C.top_overlap(p, q, k=2) == 0.0
    assert abs(C.top_overlap(p, q, k=3) - 1 / 3) < TOL and C.top_overlap(p, q, k=4) == 0.75
    assert math.isnan(C.overlap_cosine(p, q, k=2))
    common = torch.tensor([0, 2, 3])
    assert abs(C.overlap_cosine(p, q, k=4) - _cos_ref(p[common], q[common])) < TOL
    kl_ref = sum(a * math.log(a / b) for a, b in zip(p.tolist(), q.tolist()))
    assert abs(C.kl(p, q) - kl_ref) < TOL and C.kl(p, p) == 0.0
    same = p.repeat(4, 1)
    assert C.order_sensitivity(same) == 0.0
    two = torch.stack([p, q])
    assert abs(C.order_sensitivity(two) - float(((p - q).abs() / 2).sum())) < TOL


def test_baselines_are_honest():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 64, generator=g, dtype=torch.float64)
    r = C.same_norm_random(x, g)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1))
    assert abs(float(C._cos(x, r).mean())) < 0.05  # a random direction: ~0 on average
    u = C.uniform_random_cos(torch.ones(10, 64, dtype=torch.float64), g)
    assert (u > 0.7).all()  # Dai's U[0,1) baseline is biased towards all-positive vectors


@pytest.mark.embedded
def test_compare_end_to_end_on_the_embedded_model(embedded):
    tables = ip.compare(embedded, "sentiment", k=4, queries=3,
                        gd=ip.FineTuneConfig(method="dai", params="kv", lr=1e-2), progress=False)
    assert tables.finetunes == 4  # the model and three baseline runs, one fine-tune each
    pq = tables.per_query
    assert {"query", "seed", "demos", "zs_correct", "icl_correct", "ft_correct"} <= set(pq.columns)
    assert set(pq.run) == {"model", "shuffled_labels", "untrained", "embeddings_only"}
    assert len(pq) == 12 and pq.demos.nunique() == 1  # one demonstration set for every query
    s = tables.summary
    assert {"task", "metric", "value", "ci_low", "ci_high", "layer", "baseline", "run",
            "verdict"} <= set(s.columns)
    needed = {"acc_ZS", "acc_ICL", "acc_FT", "Rec2FTP", "SimAOU", "SimAOU_norm", "SimAM_before",
              "SimAM_after", "SimAM_delta", "Kendall", "Kendall_example", "top10_overlap",
              "overlap_cosine", "kl_icl_ft", "weight_cos"}
    assert needed <= set(s.metric)
    ours = s[(s.layer == -1) & (s.run == "model") & (s.baseline == "")].set_index("metric").value
    for m in needed - {"Rec2FTP", "overlap_cosine"}:  # those two may be NaN by definition
        assert math.isfinite(ours[m]), m
    diffs = s[(s.metric == "SimAOU") & (s.kind == "difference")]
    assert set(diffs.baseline) == {"random_update", "uniform_random", "shuffled_labels",
                                   "untrained", "embeddings_only"}
    per_layer = s[(s.metric == "SimAOU") & (s.run == "model") & (s.baseline == "")
                  & (s.kind != "difference")]
    assert sorted(per_layer.layer) == list(range(-1, 30))
    ph = tables.per_head
    assert len(ph) == 12 * 30 * 9 and set(ph["head"]) == set(range(9))
    one = ph[(ph.run == "model") & (ph["query"] == pq["query"].iloc[0]) & (ph.layer == 7)]
    assert one.groupby("kv_head").weight_cos.nunique().eq(1).all()  # shared within a group
    assert set(tables.table.metric) >= {"Rec2FTP", "SimAOU", "Kendall"}


def test_order_sensitivity_zero_for_full_batch_gd():
    tiny = ip.tiny_model(dtype=torch.float64, seed=8)
    pair = ip.build_prompt(tiny, "capital", query=2, k=3, seed=1)
    t = order_sensitivity_table(tiny, pair, orderings=4, lr=0.05,
                                  methods=("batch", ip.FineTuneConfig("dai", lr=0.05), "v:1"))
    got = dict(zip(t.run, t.order_sensitivity))
    assert got["batch"] == 0.0 and got["dai"] > 0 and got["icl"] > 0 and got["dai[v:1]"] > 0
    with pytest.raises(ip.FineTuneError, match="FineTuneConfig takes"):
        order_sensitivity_table(tiny, pair, methods=[dict(method="dai", lrr=1.0)])


def test_untrained_copies_keep_what_they_say():
    tiny = ip.tiny_model(seed=9)
    norm = "model.layers.0.input_layernorm.weight"
    names = {n.replace("._original_component", ""): p for n, p in tiny.named_parameters()}
    with torch.no_grad():
        names[norm].mul_(1.5)  # a "trained" norm, unlike a fresh model's ones
    fresh = ip.models.untrained_copy(tiny, "none", seed=1)
    emb = ip.models.untrained_copy(tiny, "embeddings", seed=1)
    assert not torch.equal(fresh.W_Q, tiny.W_Q) and not torch.equal(fresh.W_E, tiny.W_E)
    assert torch.equal(emb.W_E, tiny.W_E) and torch.equal(emb.W_U, tiny.W_U)
    assert torch.equal(emb.W_Q, fresh.W_Q)  # attention stays random
    emb_names = {n.replace("._original_component", ""): p for n, p in emb.named_parameters()}
    fresh_names = {n.replace("._original_component", ""): p for n, p in fresh.named_parameters()}
    assert torch.equal(names[norm], emb_names[norm])
    assert not torch.equal(names[norm], fresh_names[norm])


def test_one_random_weight_baseline_model_at_a_time_and_rebuilt_identical():
    """A Comparison holds one random-weight baseline model at a time: building the other drops
    it, and a later run rebuilds it from its seed with identical results. Models the caller
    gives in baseline_models are never dropped."""
    model = ip.tiny_model(seed=3)
    mine = ip.models.untrained_copy(model, "none", seed=9)
    c = Comparison(model, "capital", k=2, queries=3, baseline_models={"mine": mine})
    cfg = ip.FineTuneConfig(method="dai", params="kv", lr=1e-2)
    first = c.run(cfg, 0, "untrained")["per_query"]
    assert set(c.models) == {"mine", "untrained"}
    c.run(cfg, 0, "embeddings_only")
    assert set(c.models) == {"mine", "embeddings_only"}  # untrained was dropped
    c._refs.clear()  # recompute the references on the rebuilt model too
    again = c.run(cfg, 0, "untrained")["per_query"]
    assert set(c.models) == {"mine", "untrained"} and c.models["mine"] is mine
    pd.testing.assert_frame_equal(first, again)

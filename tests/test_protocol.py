"""The anchors' shared protocol, prefix reuse, the fixed metrics and the intervals.

Tiny models use distinct sizes (3 layers, 6 query heads over 2 key/value groups, d_head 8,
d_model 48) so that a swapped axis cannot pass."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

import icl_probe as ip
from icl_probe.compare import metrics as C
from icl_probe.compare import protocol, queries, stats, summary
from icl_probe.compare.references import _shared_operator
from icl_probe.hooks import shared_prefix_length, trace_shared_prefix

# float64 tiny model: the bridge still takes softmaxes and rotary phases in float32 for some
# steps, so exact paths agree to ~1e-15 and the documented bound is 1e-10.
F64_TOL = 1e-10
# float32 embedded model: batching changes the summation order of every matmul; relative
# differences of ~1e-6 are float32 rounding, 1e-5 is the bound the issue sets.
F32_REL_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(dtype=torch.float64, n_layers=3, n_heads=6, n_key_value_heads=2,
                         d_model=48, d_head=8, d_mlp=80, seed=3)


def _pairs(model, task="capital", k=4, n=5, seed=0):
    t = ip.load_task(task)
    demos = queries.demonstrations(t, k, seed)
    return [ip.build_prompt(model, t, q, demos=demos) for q in t.split("test")[:n]]


# ------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("name", ip.shipped_tasks())
def test_task_splits_are_fixed_disjoint_and_cover_every_item(name):
    t = ip.load_task(name)
    sp = t.splits
    flat = [i for v in sp.values() for i in v]
    assert sorted(flat) == list(range(len(t)))
    assert t.splits == ip.load_task(name).splits  # fixed: no global randomness
    if t.is_classification:  # each label in each split
        for s in sp.values():
            assert {t.items[i].y for i in s} == set(t.labels)


def test_shared_demonstrations_are_one_set_per_seed_disjoint_from_queries(tiny, monkeypatch):
    calls = []
    real = ip.gd.finetune

    def counting(*a, **kw):
        calls.append(a[1])
        return real(*a, **kw)

    monkeypatch.setattr(protocol, "finetune", counting)
    t = protocol.Comparison(tiny, "capital", k=3, queries=4, dev_queries=3)
    cfg = ip.FineTuneConfig(lr=1e-2)
    for seed in (0, 1):
        out = t.run(cfg, seed, "model", ("test", "dev"))
        pairs = t.pairs("model", seed, "test") + t.pairs("model", seed, "dev")
        demos = {p.demos for p in pairs}
        assert len(demos) == 1  # one demonstration set serves every query of the seed
        (d,) = demos
        assert not set(d) & {p.query for p in pairs}  # disjoint from test and dev queries
        assert set(d) <= set(ip.load_task("capital").split("train"))
        assert len(out["finetune"]) == 1
    assert len(calls) == 2  # one fine-tune per (seed, setting), dev reuses it
    assert t.pairs("model", 0, "test")[0].demos != t.pairs("model", 1, "test")[0].demos
    # shuffled labels keep the shared prefix: the same permutation for every query
    sh = t.pairs("shuffled_labels", 0, "test")
    assert len({p.demo_labels for p in sh}) == 1
    assert sh[0].demos == t.pairs("model", 0, "test")[0].demos


def test_per_query_protocol_fine_tunes_each_query(tiny, monkeypatch):
    calls = []
    real = ip.gd.finetune
    monkeypatch.setattr(protocol, "finetune", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    c = protocol.Comparison(tiny, "capital", k=2, queries=3, protocol="per_query")
    out = c.run(ip.FineTuneConfig(lr=1e-2), 0)
    assert len(calls) == 3 and len(out["finetune"]) == 3
    assert len({p.demos for p in c.pairs("model", 0, "test")}) == 3


def test_compare_counts_fine_tunes_and_runs_baselines_at_the_selected_rate(tiny):
    t = ip.compare(tiny, "capital", k=2, queries=4, dev_queries=3, seeds=[0, 1],
                   gd=ip.FineTuneConfig(lr=1e-2), lrs=[1e-3, 1e-1],
                   baselines=("shuffled_labels",), progress=False)
    # 2 rates x 2 seeds on the model, then the baseline at the chosen rate x 2 seeds
    assert t.finetunes == 6
    chosen = t.sweep[t.sweep.selected].lr.unique()
    assert len(chosen) == 1
    assert set(t.per_query[t.per_query.run == "shuffled_labels"].lr) == {chosen[0]}
    s = t.summary
    assert s[s.kind == "difference"].verdict.isin(
        ["beats baseline", "below baseline", "not distinguishable", "n/a"]).all()
    assert (t.table.metric == "SimAOU_norm").any()


def test_the_rate_is_selected_per_task_and_method_on_dev_accuracy():
    import pandas as pd

    rows = []
    for task, best in (("a", 0.1), ("b", 0.01)):
        for lr in (0.01, 0.1, 1.0):
            rows.append({"task": task, "method": "dai", "lr": lr, "seed": 0,
                         "dev_ft_acc": 0.9 if lr == best else 0.5, "dev_gold_logprob": -1.0,
                         "diverged": lr == 1.0})
    # a diverged rate is never chosen, however accurate
    rows.append({"task": "a", "method": "dai", "lr": 1.0, "seed": 1, "dev_ft_acc": 1.0,
                 "dev_gold_logprob": 0.0, "diverged": True})
    # ties in accuracy go to the higher gold log-probability
    rows += [{"task": "c", "method": "dai", "lr": lr, "seed": 0, "dev_ft_acc": 0.7,
              "dev_gold_logprob": lp, "diverged": False} for lr, lp in ((0.01, -2.0), (0.1, -1.0))]
    chosen = summary.select_lr(pd.DataFrame(rows))
    assert chosen == {("a", "dai"): 0.1, ("b", "dai"): 0.01, ("c", "dai"): 0.1}


def test_bad_requests_get_clear_errors(tiny):
    with pytest.raises(ip.CompareError, match="protocol"):
        ip.compare(tiny, "capital", k=2, queries=2, protocol="per-query")
    with pytest.raises(ip.CompareError, match="FineTuneConfig takes"):
        ip.compare(tiny, "capital", k=2, queries=2, gd=dict(lrr=1e-2))
    with pytest.raises(ip.CompareError, match="test split"):
        ip.compare(tiny, "capital", k=2, queries=10_000)
    with pytest.raises(ip.CompareError, match="baselines"):
        ip.compare(tiny, "capital", k=2, queries=2, baselines=("random",))
    with pytest.raises(ip.CompareError, match="k="):
        ip.compare(tiny, "capital", k=0, queries=2)
    with pytest.raises(ip.CompareError, match="exactly the methods"):
        ip.compare(tiny, "capital", k=2, queries=2, lrs={"lcgd": [1e-2]})


# ------------------------------------------------------------------------------ prefix reuse


def _check_record(a, b, what, tol, relative):
    assert torch.equal(a.lengths, b.lengths)
    scale = b.logits.abs().max() if relative else 1.0
    assert ((a.logits - b.logits).abs().max() / scale) < tol, "logits"
    for q in what:
        if q in ("k", "v"):
            for i, n in enumerate(b.lengths.tolist()):
                x, y = a.data[q][:, i, :n], b.data[q][:, i, :n]
                assert ((x - y).abs().max() / (y.abs().max() if relative else 1)) < tol, q
            continue
        x, y = a.at_pred(q), b.at_pred(q)
        fin = torch.isfinite(y)
        assert torch.equal(fin, torch.isfinite(x)), f"{q}: masked keys differ"
        err = (x[fin] - y[fin]).abs().max() / (y[fin].abs().max() if relative else 1)
        assert err < tol, f"{q}: {err:.2e}"


WHAT = ("q", "k", "v", "scores", "pattern", "z", "attn_out", "mlp_in", "resid_pre")


def test_prefix_reuse_is_exact_on_a_tiny_model(tiny):
    pairs = _pairs(tiny, k=5, n=6)
    # at least the demonstrations (the byte tokenizer also shares "Input: " of the query)
    assert shared_prefix_length(pairs) >= pairs[0].spans.query.start
    a = trace_shared_prefix(tiny, pairs, what=WHAT, batch_size=4)
    assert a.meta["shared_prefix"] > 0  # the shortcut ran
    b = ip.trace(tiny, pairs, what=WHAT)
    _check_record(a, b, WHAT, F64_TOL, relative=False)


def test_the_prefix_keys_and_values_come_from_the_pass_that_builds_its_cache(tiny):
    # ΔM_ICL is summed from them: they must be the prefix's own k and v, which a forward of the
    # prefix alone computes independently; where the call takes the full prompts there are none
    pairs = _pairs(tiny, k=5, n=6)
    rec = trace_shared_prefix(tiny, pairs, what=("scores",), prefix_what=("k", "v"))
    P = rec.meta["shared_prefix"]
    alone = ip.trace(tiny, [pairs[0].icl_ids[:P]], what=("k", "v"))
    for q in ("k", "v"):
        got = rec.meta["prefix"][q]
        assert got.shape == (3, P, 2, 8)
        assert torch.allclose(got, alone.data[q][:, 0], rtol=0, atol=F64_TOL), q
    full = trace_shared_prefix(tiny, pairs, what=("scores",), prefix_what=("k", "v"), fast=False)
    assert "prefix" not in full.meta
    # ΔM_ICL from them equals ΔM_ICL from a forward of the demonstrations alone
    from_prefix = _shared_operator(tiny, pairs[0], rec.meta["prefix"])
    alone = _shared_operator(tiny, pairs[0], None)
    assert from_prefix.shape == (3, 2, 8, 8)
    assert torch.allclose(from_prefix, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.embedded
def test_prefix_reuse_is_exact_on_the_embedded_model(embedded):
    pairs = _pairs(embedded, task="sentiment", k=8, n=6)
    a = trace_shared_prefix(embedded, pairs, what=WHAT)
    assert a.meta["shared_prefix"] > 100
    b = ip.trace(embedded, pairs, what=WHAT)
    _check_record(a, b, WHAT, F32_REL_TOL, relative=True)


# ------------------------------------------------------------------------------ metrics


def test_kendall_icl_ft_against_an_explicit_reference():
    g = torch.Generator().manual_seed(4)
    H, J, D = 3, 7, 5
    lens = [2, 4, 1]
    scores = torch.randn(H, J, generator=g, dtype=torch.float64)
    q_steps = torch.randn(J, H, D, generator=g, dtype=torch.float64) * 3
    q_ft = torch.randn(H, D, generator=g, dtype=torch.float64) * 3
    scale = 0.125

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) for x in xs]
        return [v / sum(e) for v in e]

    icl_w = softmax([sum(float(scores[h, j]) for h in range(H)) for j in range(J)])
    ft_w = softmax([sum(scale * scale * float(q_steps[j, h] @ q_ft[h]) for h in range(H))
                    for j in range(J)])
    got = C.kendall_icl_ft(scores, q_steps, q_ft, scale=scale)
    assert abs(got - C.kendall_tau(torch.tensor(icl_w), torch.tensor(ft_w))) < 1e-12
    starts = [0, 2, 6]
    ex_icl = [sum(icl_w[s:s + n]) for s, n in zip(starts, lens)]
    ex_ft = [sum(ft_w[s:s + n]) for s, n in zip(starts, lens)]
    got = C.kendall_icl_ft(scores, q_steps, q_ft, scale=scale, level="example", demo_lengths=lens)
    assert abs(got - C.kendall_tau(torch.tensor(ex_icl), torch.tensor(ex_ft))) < 1e-12
    with pytest.raises(ip.IclProbeError, match="demo_lengths"):
        C.kendall_icl_ft(scores, q_steps, q_ft, scale=scale, level="example", demo_lengths=[1])


def test_kendall_scale_matters_where_an_unscaled_softmax_underflows():
    # logits spread over ~2e3: unscaled, the FT-side softmax underflows to exact zeros (ties)
    # and tau changes; with Dai's scale^2 the weights stay distinct.
    g = torch.Generator().manual_seed(5)
    H, J, D = 2, 40, 8
    scores = torch.randn(H, J, generator=g, dtype=torch.float64)
    q_steps = torch.randn(J, H, D, generator=g, dtype=torch.float64) * 10
    q_ft = torch.randn(H, D, generator=g, dtype=torch.float64) * 10
    unscaled = C.kendall_icl_ft(scores, q_steps, q_ft, scale=1.0)
    scaled = C.kendall_icl_ft(scores, q_steps, q_ft, scale=D ** -0.5)
    logits = torch.einsum("jhd,hd->j", q_steps, q_ft)
    ref = C.kendall_tau(torch.softmax(scores.sum(0), -1), logits)  # the order itself, no ties
    assert abs(scaled - ref) < 1e-12
    assert (torch.softmax(logits, -1) == 0).sum() > 0  # the underflow is real
    assert abs(unscaled - ref) > 0.01


def test_simaou_uniform_random_against_an_explicit_reference():
    g = torch.Generator().manual_seed(6)
    L, D = 3, 11
    h_zs, h_icl = (torch.randn(L, D, generator=g, dtype=torch.float64) for _ in range(2))
    r = torch.rand(L, D, generator=g, dtype=torch.float64)
    for normalize in (True, False):
        got = C.simaou_uniform_random(h_zs, h_icl, r, normalize)
        for l in range(L):
            a, b = h_zs[l].tolist(), h_icl[l].tolist()
            if normalize:
                na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
                a, b = [x / na for x in a], [x / nb for x in b]
            u = [y - x for x, y in zip(a, b)]
            dot = sum(x * y for x, y in zip(u, r[l].tolist()))
            ref = dot / math.sqrt(sum(x * x for x in u) * sum(x * x for x in r[l].tolist()))
            assert abs(float(got[l]) - ref) < 1e-12
    # the two forms differ (Dai's baseline is on the normalised update)
    assert not torch.allclose(C.simaou_uniform_random(h_zs, h_icl, r, True),
                              C.simaou_uniform_random(h_zs, h_icl, r, False))


def test_label_position_reads_one_token_later(tiny):
    pair = _pairs(tiny, n=1)[0]
    lab = queries._at_label(pair)
    assert lab.spans.pred == pair.spans.pred + 1 == len(lab.icl_ids) - 1
    assert int(lab.icl_ids[-1]) == int(pair.label_ids[0]) == int(lab.zs_ids[-1])
    t = ip.compare(tiny, "capital", k=2, queries=3, gd=ip.FineTuneConfig(lr=1e-2),
                   baselines=(), position="label", progress=False)
    p = ip.compare(tiny, "capital", k=2, queries=3, gd=ip.FineTuneConfig(lr=1e-2),
                   baselines=(), progress=False)
    # correctness is read at the prediction position in both; the similarities are not
    for c in ("zs_correct", "icl_correct", "ft_correct"):
        assert list(t.per_query[c]) == list(p.per_query[c])
    assert not np.allclose(t.per_layer.SimAOU, p.per_layer.SimAOU)


# ------------------------------------------------------------------------------ intervals


def test_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials, hits = 200, 0
    for i in range(trials):
        x = rng.exponential(1.0, size=40)  # skewed; true mean 1
        lo, hi = stats.bootstrap_ci(x, seed=i, n_resamples=999)
        hits += lo <= 1.0 <= hi
    # 95 % nominal; BCa on n = 40 skewed samples lands near it. 200 trials: binomial sd 1.5 %
    assert 0.89 <= hits / trials <= 0.99, hits / trials


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_bootstrap_interval_is_scipys_bit_for_bit(method):
    """bootstrap_ci computes scipy.stats.bootstrap's interval itself (without its input
    handling): the same resamples, levels and quantiles, so the same bits, on samples with
    ties, heavy tails, a single outlier, and sizes from 2 to 60."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(2, 61))
        x = [rng.normal(size=n), rng.integers(0, 3, n).astype(float),
             rng.standard_cauchy(n), np.r_[np.zeros(n - 1), 1.0]][trial % 4]
        if np.all(x == x[0]):
            continue
        want = None
        for m in ((method, "percentile") if method == "BCa" else (method,)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = scipy_stats.bootstrap((x,), stats._order_free(np.mean), method=m,
                                            n_resamples=stats.N_RESAMPLES, vectorized=True,
                                            random_state=np.random.default_rng(trial))
            want = tuple(float(v) for v in res.confidence_interval)
            if all(np.isfinite(want)):
                break  # a degenerate BCa falls back to the percentile interval
        assert stats.bootstrap_ci(x, seed=trial, method=method) == want, (trial, n)


def test_paired_difference_and_verdicts():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 60)
    better = base + 0.5 + rng.normal(0, 0.1, 60)
    m, lo, hi = stats.paired_difference(better, base)
    assert lo > 0 and stats.verdict(lo, hi) == "beats baseline" and abs(m - 0.5) < 0.1
    m, lo, hi = stats.paired_difference(base + rng.normal(0, 0.1, 60), base)
    assert stats.verdict(lo, hi) == "not distinguishable"
    assert stats.verdict(*stats.paired_difference(base - 1, base)[1:]) == "below baseline"
    assert stats.bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1.0]))


def test_intervals_do_not_move_with_one_ulp_of_input_noise():
    # Another CPU's kernels change values in the last bit. With four queries, BCa used to
    # count permutations of the sample as "below the observed mean" by the order of a float
    # sum, and one ulp moved intervals by up to 0.02 (94 of 200 samples moved).
    rng = np.random.default_rng(1)
    moved = 0
    for _ in range(200):
        x = rng.normal(0.1, 0.05, size=4)
        y = x * (1 + rng.choice([-1, 1], 4) * 2.3e-16)
        moved += not np.allclose(stats.bootstrap_ci(x), stats.bootstrap_ci(y), rtol=1e-9,
                                 atol=0)
    assert moved == 0


def test_rec2ftp_vectorised_matches_the_definition():
    rng = np.random.default_rng(2)
    for _ in range(20):
        zs, icl, ft = (rng.random(15) < 0.5 for _ in range(3))
        a = C.rec2ftp(zs, icl, ft)
        b = float(stats.rec2ftp_vec(zs, icl, ft))
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


def test_a_collapsed_fine_tune_is_detected_excluded_and_never_selected(tiny, monkeypatch):
    # a "fine-tune" whose deltas zero the unembedding: every logit 0, the output collapsed, as
    # lr = 1e6 does to the embedded model; its loss stays finite, so only the output shows it
    real = ip.gd.finetune

    def collapsing(model, pair, **kw):
        ft = real(model, pair, **kw)
        if kw["lr"] > 0.05:
            W = ip.gd.named_parameters(model)["lm_head.weight"]
            ft = ip.gd.FineTune(deltas={"lm_head.weight": -W.detach().clone()}, losses=ft.losses,
                                diverged=False, method=ft.method, params="all", lr=ft.lr,
                                step_queries=ft.step_queries, step_demos=ft.step_demos)
            ft.model = ip.gd.FineTunedModel(model, ft.deltas)
        return ft

    monkeypatch.setattr(protocol, "finetune", collapsing)
    t = ip.compare(tiny, "capital", k=2, queries=4, dev_queries=3, gd=ip.FineTuneConfig(lr=1e-2),
                   lrs=[1e-2, 0.1], baselines=(), progress=False)
    bad = t.per_query[t.per_query.lr == 0.1]
    assert bad.ft_collapsed.all() and bad.ft_diverged.all()
    assert set(bad.divergence) == {"collapsed output"}
    sw = t.sweep.set_index("lr")
    assert sw.loc[0.1, "diverged"] and sw.loc[0.1, "flag"] == "diverged"
    assert not sw.loc[0.1, "selected"] and sw.loc[0.01, "selected"]
    s = t.summary
    acc_ft = s[(s.metric == "acc_FT") & (s.lr == 0.1) & (s.baseline == "")]
    assert int(acc_ft.n.iloc[0]) == 0  # excluded from every metric
    share = s[(s.metric == "ft_diverged") & (s.lr == 0.1)].value.iloc[0]
    assert share == 1.0  # and counted
    assert t.per_layer[t.per_layer.lr == 0.1].ft_diverged.all()


def test_rec2ftp_interval_point_pairs_and_undefined():
    rng = np.random.default_rng(3)
    zs, icl, ft = (rng.random(40) < p for p in (0.3, 0.7, 0.6))
    v, lo, hi = stats.rec2ftp_interval((zs, icl, ft))
    assert abs(v - C.rec2ftp(zs, icl, ft)) < 1e-12 and lo <= v <= hi and lo < hi
    d, dlo, dhi = stats.rec2ftp_interval((zs, icl, ft), (zs, icl, ft))  # paired with itself
    assert d == dlo == dhi == 0.0
    never = np.zeros(40, dtype=bool)
    v, lo, hi = stats.rec2ftp_interval((zs, icl, zs & never))  # FT fixes nothing
    assert all(math.isnan(x) for x in (v, lo, hi))

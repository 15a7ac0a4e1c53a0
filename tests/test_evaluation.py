"""The comparison's per-layer and per-head metrics (icl_probe.compare.evaluation) against
references recomputed by hand: which positions, layers and key-value operators SimAOU, SimAM
and weight_cos read. Every reference comes from separate whole-prompt traces, one prompt at a
time (the comparison uses the shared-prefix and batched traces), and a separate fine-tune;
the metrics themselves are Python loops over positions, heads and vector entries."""

import math

import pytest
import torch

import icl_probe as ip
from conftest import TINY_LLAMA
from icl_probe.compare import Comparison, evaluation

# float64 on a tiny model: the references run the same forwards through other code paths
# (whole prompts alone instead of a shared prefix or a padded batch, a fine-tune of our own),
# which agree to summation-order rounding: measured <= 7e-16 on every metric but SimAM_delta,
# whose m_FT − m_ZS is a small difference of nearly equal scores (the fine-tune barely moves
# the scores), so that its rounding reaches 1.1e-10. A wrong position, layer, head or operator
# moves a cosine by far more than 1e-9.
F64_TOL = 1e-9
SEED = 0
CFG = ip.FineTuneConfig("dai", lr=1e-2)
LAYERS = range(3)  # TINY_LLAMA: 3 layers, 6 query heads over 2 kv heads (3 per group)
KV_OF = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}  # query head -> kv head, by hand
WHAT = ("attn_out", "scores", "k", "v")


@pytest.fixture(scope="module")
def model():
    return ip.tiny_model(dtype=torch.float64, seed=3, **TINY_LLAMA)


@pytest.fixture(scope="module", params=["shared", "per_query"])
def comparison(request, model):
    """One setting run through Comparison, the prompts it used, and, per query, the fine-tune
    the protocol prescribes, rerun here: under the shared protocol one fine-tune on the first
    query's pair (its demonstrations are every query's); under per_query one per query."""
    c = Comparison(model, "capital", k=3, queries=3, protocol=request.param, progress=False)
    out = c.run(CFG, SEED)
    pairs = c.pairs("model", SEED, "test")
    if request.param == "shared":
        assert len({p.demos for p in pairs}) == 1
        fts = [ip.finetune(model, pairs[0], CFG, seed=SEED)] * len(pairs)
    else:
        fts = [ip.finetune(model, p, CFG, seed=SEED) for p in pairs]
    assert not any(ft.diverged for ft in fts)
    return out, pairs, fts


def _cos(a, b):
    a, b = a.double().flatten().tolist(), b.double().flatten().tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _unit(h):
    return h / math.sqrt(sum(x * x for x in h.tolist()))


def _kv_sum(rec, layer, g, positions):
    """Σ_j v_j ⊗ k_j over ``positions`` of prompt 0 of ``rec`` (d_head d_head)."""
    k, v = rec.data["k"][layer, 0, :, g], rec.data["v"][layer, 0, :, g]
    return sum(torch.outer(v[j], k[j]) for j in positions)


def _traces(model, pair, ft):
    """The three runs of one query, each a whole prompt traced alone."""
    return {"zs": ip.trace(model, [pair], kind="zs", what=WHAT),
            "icl": ip.trace(model, [pair], kind="icl", what=WHAT),
            "ft": ip.trace(ft.model, [pair], kind="zs", what=WHAT)}


def _one(df, **match):
    sel = df
    for k, v in match.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (match, len(sel))
    return sel.iloc[0]


def test_tables_have_one_row_per_query_layer_and_head(comparison):
    out, pairs, _ = comparison
    per_layer, per_head = out["per_layer"], out["per_head"]
    assert len(per_layer) == 3 * 3 and len(per_head) == 3 * 3 * 6  # queries x layers (x heads)
    assert sorted(per_layer.layer.unique()) == list(LAYERS)
    assert sorted(per_layer["query"].unique()) == sorted(p.query for p in pairs)
    assert dict(zip(per_head["head"], per_head.kv_head)) == KV_OF


def test_simaou_reads_the_attention_output_at_the_prediction_position(model, comparison):
    """SimAOU = cos(h_ICL − h_ZS, h_FT − h_ZS), h the attention output at the prediction
    position (SimAOU_norm: each h unit-normalised first), per layer."""
    out, pairs, fts = comparison
    for pair, ft in zip(pairs, fts):
        runs = _traces(model, pair, ft)
        for layer in LAYERS:
            h = {kind: rec.at_pred("attn_out")[layer, 0] for kind, rec in runs.items()}
            row = _one(out["per_layer"], query=pair.query, layer=layer)
            ref = _cos(h["icl"] - h["zs"], h["ft"] - h["zs"])
            assert abs(row.SimAOU - ref) < F64_TOL, (pair.query, layer)
            u = {kind: _unit(x) for kind, x in h.items()}
            ref_norm = _cos(u["icl"] - u["zs"], u["ft"] - u["zs"])
            assert abs(row.SimAOU_norm - ref_norm) < F64_TOL, (pair.query, layer)
            assert abs(ref - ref_norm) > 1e-6  # the two forms differ: neither stands in


def test_simam_reads_the_query_tokens_scores_at_the_prediction_position(model, comparison):
    """SimAM: the pre-softmax scores from the prediction position to the query's own tokens
    (BOS excluded), per head; before = cos(m_ICL, m_ZS), after = cos(m_ICL, m_FT),
    delta = cos(m_ICL − m_ZS, m_FT − m_ZS), each averaged over the 6 heads."""
    out, pairs, fts = comparison
    for pair, ft in zip(pairs, fts):
        runs = _traces(model, pair, ft)
        q_icl = pair.spans.query.indices().tolist()  # positions in the ICL prompt
        q_zs = pair.zs_spans.query.indices().tolist()  # the same tokens in the ZS prompt
        assert len(q_icl) == len(q_zs) and 0 not in q_zs  # BOS is position 0: not read
        for layer in LAYERS:
            s = {kind: rec.at_pred("scores")[layer, 0] for kind, rec in runs.items()}
            before = after = delta = 0.0
            for h in range(6):
                m_icl = torch.stack([s["icl"][h, j] for j in q_icl])
                m_zs = torch.stack([s["zs"][h, j] for j in q_zs])
                m_ft = torch.stack([s["ft"][h, j] for j in q_zs])
                before += _cos(m_icl, m_zs) / 6
                after += _cos(m_icl, m_ft) / 6
                delta += _cos(m_icl - m_zs, m_ft - m_zs) / 6
            row = _one(out["per_layer"], query=pair.query, layer=layer)
            assert abs(row.SimAM_before - before) < F64_TOL, (pair.query, layer)
            assert abs(row["SimAM_after|SimAM_before"] - before) < F64_TOL
            assert abs(row.SimAM_after - after) < F64_TOL, (pair.query, layer)
            assert abs(row.SimAM_delta - delta) < F64_TOL, (pair.query, layer)


def test_weight_cos_compares_the_demonstrations_operator_with_the_finetunes(model, comparison):
    """weight_cos per (layer, kv head): cos(ΔM_ICL, ΔM_GD) with ΔM_ICL = Σ_{j ∈ demonstration
    tokens} v_j ⊗ k_j (ICL prompt, base model) and ΔM_GD = Σ_{j ∈ ZS prompt} v_j ⊗ k_j with the
    fine-tuned model minus the same with the base model; per_layer reads the mean over kv
    heads, and each query head's row its own kv head's value."""
    out, pairs, fts = comparison
    for pair, ft in zip(pairs, fts):
        runs = _traces(model, pair, ft)
        demo = pair.spans.demo_indices().tolist()
        zs_all = range(len(pair.zs_ids))
        for layer in LAYERS:
            w_cos = []
            for g in range(2):
                dM_icl = _kv_sum(runs["icl"], layer, g, demo)
                dM_gd = (_kv_sum(runs["ft"], layer, g, zs_all)
                         - _kv_sum(runs["zs"], layer, g, zs_all))
                w_cos.append(_cos(dM_icl, dM_gd))
            for h, g in KV_OF.items():
                row = _one(out["per_head"], query=pair.query, layer=layer, head=h)
                assert row.kv_head == g
                assert abs(row.weight_cos - w_cos[g]) < F64_TOL, (pair.query, layer, h)
            row = _one(out["per_layer"], query=pair.query, layer=layer)
            assert abs(row.weight_cos - sum(w_cos) / 2) < F64_TOL, (pair.query, layer)
            assert abs(w_cos[0] - w_cos[1]) > 1e-6  # the kv heads differ: a swap would fail


@pytest.mark.parametrize("protocol", ["shared", "per_query"])
def test_streaming_the_evaluation_in_chunks_changes_no_number(model, monkeypatch, protocol):
    # the evaluation scores its queries chunk by chunk, reading the base model's zero-shot k and
    # v from the reference set, or tracing them again per chunk once a newer set has taken
    # their place; the random baselines are drawn query by query, so every arrangement gives
    # the same tables
    def run(evicted):
        c = Comparison(model, "capital", k=3, queries=3, protocol=protocol, progress=False)
        refs = c.refs("model", SEED, "test")
        assert refs.zs_kv is not None
        if evicted:
            c.refs("shuffled_labels", SEED, "test")  # a newer set: this one's k and v go
            assert refs.zs_kv is None
        return c.run(CFG, SEED)

    whole = run(False)
    runs = {"evicted": run(True)}
    monkeypatch.setattr(evaluation, "EVAL_CHUNK", 1)
    runs.update({"streamed": run(False), "streamed, evicted": run(True)})
    for how, other in runs.items():
        for name in ("per_query", "per_layer", "per_head"):
            a, b = whole[name], other[name]
            assert list(a.columns) == list(b.columns) and len(a) == len(b) == {
                "per_query": 3, "per_layer": 9, "per_head": 54}[name]
            num = a.select_dtypes("number").columns
            assert ((a[num] - b[num]).abs().fillna(0).to_numpy() <= 1e-12).all(), (how, name)
            rest = [c for c in a.columns if c not in num]
            assert a[rest].equals(b[rest]), (how, name)

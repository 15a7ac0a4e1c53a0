"""Results that stay right when the stack moves: the fast paths' self-checks against a
simulated drift, `icl-probe doctor`, collapse inside finetune(), the stack in provenance,
the anchors' baseline values in the compact table, and the golden regression."""

import hashlib
import json

import pandas as pd
import pytest
import torch

import icl_probe as ip
from icl_probe import cli
from icl_probe.compare import metrics as comparison
from icl_probe.hooks import selfcheck
from icl_probe.doctor import last_verdict, run_doctor
from icl_probe.experiments.provenance import provenance
from icl_probe.experiments.provenance import provenance_mismatch as _provenance_mismatch
from icl_probe.hooks import trace_shared_prefix
from icl_probe.compare import compact_table
from icl_probe.report import ANCHORS
from icl_probe.hooks import answer_logprobs

import golden_regression as golden


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(dtype=torch.float64, n_layers=3, n_heads=6, n_key_value_heads=2,
                         d_head=10, d_model=42, d_mlp=72, seed=5)


def _pairs(model, n=4, k=4):
    return [ip.build_prompt(model, "capital", query=q, demos=list(range(20, 20 + k)))
            for q in range(n)]


def _assert_names_the_stack(err: Exception):
    msg = str(err)
    v = selfcheck.stack_versions()
    assert f"transformers {v['transformers']}" in msg
    assert f"transformer-lens {v['transformer-lens']}" in msg
    assert "fast=False" in msg and "ICL_PROBE_FAST=0" in msg
    assert "off by" in msg


def test_shared_prefix_trace_checks_itself_and_passes_on_this_stack(tiny):
    before = selfcheck.PASSED.get("trace_shared_prefix", 0)
    rec = trace_shared_prefix(tiny, _pairs(tiny), what=("scores",), min_prefix=1)
    assert rec.meta["shared_prefix"] > 0
    assert selfcheck.PASSED["trace_shared_prefix"] == before + 1


def test_a_drifted_cache_makes_the_shared_prefix_trace_raise(tiny, drifted_cache, monkeypatch):
    pairs = _pairs(tiny)
    with pytest.raises(ip.FastPathError) as e:
        trace_shared_prefix(tiny, pairs, what=("scores",), min_prefix=1)
    _assert_names_the_stack(e.value)
    # the escape hatch: the slow exact path, by argument or environment
    slow = ip.trace(tiny, pairs, what=("scores",))
    a = trace_shared_prefix(tiny, pairs, what=("scores",), min_prefix=1, fast=False)
    assert torch.equal(a.logits, slow.logits)
    monkeypatch.setenv("ICL_PROBE_FAST", "0")
    b = trace_shared_prefix(tiny, pairs, what=("scores",), min_prefix=1)
    assert torch.equal(b.logits, slow.logits)


def test_a_drifted_cache_makes_answer_scoring_raise(tiny, drifted_cache):
    pairs = _pairs(tiny, n=2)
    assert pairs[0].scoring == "full_answer"
    with pytest.raises(ip.FastPathError) as e:
        answer_logprobs(tiny, pairs, "icl")
    _assert_names_the_stack(e.value)
    slow = answer_logprobs(tiny, pairs, "icl", fast=False)
    assert torch.isfinite(slow[:, : len(pairs[0].candidates)]).all()


def test_answer_scoring_on_the_cache_equals_whole_forwards(tiny):
    pairs = _pairs(tiny, n=2)
    a = answer_logprobs(tiny, pairs, "icl")
    b = answer_logprobs(tiny, pairs, "icl", fast=False)
    assert (a - b).abs().max() < 1e-10


def test_the_self_check_compares_against_an_independent_forward(tiny, monkeypatch):
    """The slow side of the check is the whole prompt's own forward: if the check compared
    the fast path with itself, a shifted fast result would pass."""
    seen = {}
    original = selfcheck.check

    def spy(path, pairs, dtype):
        seen.update({k: (f.clone(), s.clone()) for k, (f, s) in pairs.items()})
        return original(path, pairs, dtype)

    monkeypatch.setattr(selfcheck, "check", spy)
    pairs = _pairs(tiny)
    trace_shared_prefix(tiny, pairs, what=("attn_out",), min_prefix=1)
    shortest = min(range(len(pairs)), key=lambda i: len(pairs[i].icl_ids))
    whole = ip.trace(tiny, [pairs[shortest]], what=("scores",), positions="pred")
    fast, slow = seen["logits at p"]
    assert torch.allclose(slow, whole.logits[0], rtol=0, atol=1e-12)
    fast_s, slow_s = seen["scores of layer 2"]
    n = len(pairs[shortest].icl_ids)
    assert torch.allclose(slow_s, whole["scores"][-1, 0, 0, :, :n], rtol=0, atol=1e-12)


def test_relative_error_flags_shape_and_finiteness_changes():
    x = torch.tensor([1.0, 2.0, float("-inf")])
    assert selfcheck.relative_error(x, x) == 0
    assert selfcheck.relative_error(torch.tensor([1.0, 2.0, 0.0]), x) == float("inf")
    assert selfcheck.relative_error(x[:2], x) == float("inf")
    assert selfcheck.relative_error(torch.tensor([1.0, 2.2, float("-inf")]), x) == \
        pytest.approx(0.1)


# ------------------------------------------------------------------------------ doctor


def test_doctor_passes_on_this_stack_and_records_its_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path))
    assert last_verdict()["verdict"] == "not run on this stack"
    assert cli.main(["doctor", "--tiny-only"]) == 0
    out = capsys.readouterr().out
    assert "doctor: passed (tiny models only)" in out and "transformers " in out
    assert "identity: mlp_rank1" in out
    assert last_verdict()["verdict"] == "passed (tiny models only)"
    saved = json.loads((tmp_path / "doctor.json").read_text())
    assert saved["versions"] == selfcheck.stack_versions()


def test_doctor_exits_non_zero_when_a_fast_path_is_broken(tmp_path, monkeypatch, capsys,
                                                         drifted_cache):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path))
    assert cli.main(["doctor", "--tiny-only"]) == 1
    out = capsys.readouterr().out
    assert "doctor: FAILED" in out and "FastPathError" in out
    assert last_verdict()["verdict"] == "FAILED (tiny models only)"


def test_doctor_reports_a_broken_identity(monkeypatch, tmp_path):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path))
    import icl_probe.doctor as D

    real = D.verify_identities

    def off(model, pairs, **kw):
        t = real(model, pairs, **kw)
        t.loc[t.identity == "mlp_rank1", "max_rel_err"] = 0.3
        return t

    monkeypatch.setattr(D, "verify_identities", off)
    monkeypatch.setattr(D, "TINY_FAMILIES", D.TINY_FAMILIES[:1])
    report = run_doctor(embedded=False, progress=lambda s: None)
    assert not report.ok
    bad = report.checks[~report.checks.ok]
    assert list(bad.check) == ["identity: mlp_rank1"]


# ------------------------------------------------------------------------------ finetune


def _digest(model) -> str:
    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.embedded
def test_finetune_flags_a_collapsed_output_and_restores_the_model(embedded):
    pair = ip.build_prompt(embedded, "sentiment", query=0, k=4)
    before = _digest(embedded)
    ft = ip.finetune(embedded, pair, params="all", lr=1e6)
    assert ft.diverged is True
    assert ft.divergence.startswith("collapsed output")
    assert _digest(embedded) == before  # restored bit for bit
    ok = ip.finetune(embedded, pair, params="kv", lr=1e-3)
    assert ok.diverged is False and ok.divergence is None
    assert _digest(embedded) == before


def test_is_collapsed_rule():
    from icl_probe.gd import COLLAPSE_STD, is_collapsed

    assert is_collapsed(torch.full((50,), 3.0))
    assert is_collapsed(torch.full((50,), float("nan")))
    assert not is_collapsed(torch.linspace(0, 1, 50))
    assert is_collapsed(torch.linspace(0, COLLAPSE_STD, 50))


# ------------------------------------------------------------------------------ provenance


def test_provenance_records_the_stack_and_a_changed_stack_is_refused(tiny):
    cfg = ip.load_config("experiments/default.toml")
    p = provenance(tiny, cfg)
    assert p["stack"] == selfcheck.stack_versions()
    assert "verdict" in p["doctor"] and p["fast_paths"].startswith("on")
    old = json.loads(json.dumps(p))
    old["stack"]["transformers"] = "4.0.0"
    assert any(d.startswith("stack:") for d in _provenance_mismatch(old, p))
    legacy = {k: v for k, v in p.items() if k != "stack"}
    assert _provenance_mismatch(legacy, p) == []


# ------------------------------------------------------------------------------ anchors


def test_dai_random_baseline_anchors_reach_the_compact_table():
    row = dict(task="t", method="dai", lr=0.01, selected=True, layer=-1, n=8, ci_low=0.0,
               ci_high=0.2, verdict="")
    summary = pd.DataFrame([
        {**row, "run": "model", "metric": "SimAOU_norm", "baseline": "", "kind": "",
         "value": 0.1},
        {**row, "run": "model", "metric": "SimAOU_norm", "baseline": "uniform_random",
         "kind": "baseline value", "value": 0.01},
        {**row, "run": "model", "metric": "SimAOU_norm", "baseline": "uniform_random",
         "kind": "difference", "value": 0.09, "verdict": "beats baseline"},
    ])
    table = compact_table(summary, ANCHORS).set_index("metric")
    assert table.loc["SimAOU_norm", "Dai et al. GPT 1.3B"] == "0.186"
    assert table.loc["SimAOU_norm", "Dai et al. GPT 1.3B, uniform_random"] == "0.002"
    assert table.loc["SimAOU_norm", "Dai et al. GPT 2.7B, uniform_random"] == "-0.001"
    assert not any("|" in c for c in table.columns)


# ------------------------------------------------------------------------------ golden


def test_golden_regression_tiny():
    assert golden.mismatches("tiny", golden.run_tiny()) == []


@pytest.mark.embedded
def test_golden_regression_embedded(embedded, monkeypatch):
    monkeypatch.setattr(ip, "load_model", lambda: embedded)
    assert golden.mismatches("embedded", golden.run_embedded()) == []


def test_golden_regression_fails_when_a_metric_formula_changes(monkeypatch):
    real = comparison.simaou

    def off_by_a_little(h_zs, h_icl, h_ft, normalize=True):  # a 1 % error in one metric
        return real(h_zs, h_icl, h_ft, normalize=normalize) * 1.01

    monkeypatch.setattr(comparison, "simaou", off_by_a_little)
    diffs = golden.mismatches("tiny", golden.run_tiny())
    assert diffs
    assert all(d.startswith("SimAOU") for d in diffs)
    assert any(d.startswith("SimAOU_norm (model, baseline -, layer -1) value") for d in diffs)

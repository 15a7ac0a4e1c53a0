"""Every experiment section in a reduced size on a tiny model, the report, and resuming."""


import pandas as pd
import pytest

import icl_probe as ip
from icl_probe.experiments import (SECTIONS, Config, ExperimentError, load_config, read_results,
                                   run_experiment, EXPERIMENTS_DIR)

REDUCED = {
    "icl_vs_gd": dict(tasks=["capital"], k=2, queries=3, dev_queries=2, lrs=[1e-3, 1e-1],
                      methods=["dai", "lcgd"]),
    "implied_updates": dict(tasks=["capital"], k=2, prompts=2, verify_prompts=1),
    "order_sensitivity": dict(tasks=["capital"], n_demos=[1, 2], lrs=[1e-2], orderings=3,
                              queries=1, methods=["dai", "batch", "v:1"]),
    "linear_attention": dict(line_search_tasks=300, eigen_tasks=100, steps=20, batch_size=64,
                             eval_every=10),
    "real_heads": dict(tasks=["capital"], prompts=2, k=2),
}


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(seed=11)


def _config(sections, **over):
    body = {"experiment": {"name": "t", "sections": list(sections)}}
    body.update({s: dict(REDUCED[s], **over.get(s, {})) for s in sections})
    return Config("t", tuple(sections), body)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_each_section_runs_and_reports(tiny, tmp_path, section):
    out = run_experiment(_config([section]), model=tiny, out=tmp_path / section, progress=False)
    results = read_results(out)
    assert section in results and results[section]
    page = (out / "report.html").read_text()
    assert "<table" in page and section in page and "versions" in page
    if section == "icl_vs_gd":
        pq = results[section]["per_query"]
        assert {"model", "shuffled_labels", "untrained", "embeddings_only"} == set(pq.run)
        assert set(pq.method) == {"dai", "lcgd"}
        summary = pd.read_csv(out / "summary.csv")
        assert {"task", "method", "lr", "selected", "metric", "baseline", "layer", "value",
                "ci_low", "ci_high", "n"} <= set(summary.columns)
        # one rate selected per method; the baselines ran at it and only at it
        chosen = summary[summary.selected].groupby("method").lr.unique()
        assert all(len(v) == 1 for v in chosen)
        for method, (lr,) in chosen.items():
            runs = set(pq[(pq.method == method) & (pq.run != "model")].lr)
            assert runs == {lr}
        assert "Learning-rate sweep" in page and "Dai et al. GPT 1.3B" in page
    if section == "implied_updates":
        assert results[section]["identities"].max_rel_err.max() < 1e-4
    if section == "order_sensitivity":
        os_ = results[section]["order_sensitivity"]
        assert (os_[os_.run == "batch"].order_sensitivity == 0).all()


def test_interrupted_run_resumes_without_redoing_units(tiny, tmp_path):
    cfg = _config(["implied_updates"], implied_updates=dict(tasks=["capital", "antonym", "plural"]))
    seen = []

    def interrupt_third(uid):
        seen.append(uid)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, model=tiny, out=tmp_path / "r", progress=False, unit_hook=interrupt_third)
    done = sorted(p.name for p in (tmp_path / "r" / "units").iterdir() if not p.name.startswith("."))
    assert done == sorted(seen[:2])  # the unit in flight left nothing behind
    again = []
    run_experiment(cfg, model=tiny, out=tmp_path / "r", progress=False, unit_hook=again.append)
    assert again == [seen[2]]
    assert set(read_results(tmp_path / "r")["implied_updates"]["probes"].task) == {
        "capital", "antonym", "plural"}
    changed = _config(["implied_updates"], implied_updates=dict(k=3))
    with pytest.raises(ExperimentError, match="different config"):
        run_experiment(changed, model=tiny, out=tmp_path / "r", progress=False)


def test_shipped_configs_parse():
    for path in sorted(EXPERIMENTS_DIR.glob("*.toml")):
        cfg = load_config(path)
        for s in cfg.sections:
            assert SECTIONS[s][0](cfg.section(s)), path
    with pytest.raises(ExperimentError, match="does not exist"):
        load_config(EXPERIMENTS_DIR / "nope.toml")

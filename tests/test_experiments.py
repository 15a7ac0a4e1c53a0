"""Every experiment section in a reduced size on a tiny model, the report, and resuming."""


import json
import shutil
import weakref

import pandas as pd
import pytest

import icl_probe as ip
import torch
from icl_probe import ExperimentError, run_experiment
from icl_probe.experiments import EXPERIMENTS_DIR, SECTIONS, Config, load_config, read_results

REDUCED = {
    "icl_vs_gd": dict(tasks=["capital"], k=2, queries=3, dev_queries=2, lrs=[1e-3, 1e-1],
                      methods=["dai", "lcgd"]),
    "implied_updates": dict(tasks=["capital"], k=2, prompts=2, verify_prompts=1),
    "order_sensitivity": dict(tasks=["capital"], n_demos=[1, 2], lrs=[1e-2], orderings=3,
                              queries=1, methods=["dai", "batch", "v:1"]),
    "linear_attention": dict(line_search_tasks=300, eigen_tasks=100, steps=20, batch_size=64,
                             eval_every=10),
    "real_heads": dict(tasks=["capital"], prompts=2, k=2),
    "shen": dict(tasks=["capital"], n_demos=[1, 2], queries=2, eval_every=2, orderings=2,
                 order_n_demos=2, order_queries=1, sparsity_thresholds=[1e-2, 1e-4],
                 methods=[dict(name="gd_mid", params="v:mid", epochs=2, lrs=[1e-2])],
                 order_methods=[dict(name="gd_full", epochs=2, lrs=[1e-2]),
                                dict(name="sgd_b1", batch_size=1, epochs=2, lrs=[1e-2])]),
    "causal": dict(k=2, queries=3, dev_queries=2, updates=["exact", "dual"], fv_prompts=2,
                   fv_heads=2, dummies=1),  # tasks: a file the test writes (first bytes differ)
}


def _first_byte_task(tmp_path):
    """Parity with no space before the answer: the byte tokenizer tells the labels apart by
    their first token, as replay and transfer need."""
    f = tmp_path / "parity.jsonl"
    rows = [{"task": "parity", "labels": ["even", "odd"],
             "template": "Input: {x}\nOutput:{y}\n\n"}]
    rows += [{"x": str(n), "y": "even" if n % 2 == 0 else "odd"} for n in range(30)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(f)


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(seed=11)


def _config(sections, **over):
    body = {"experiment": {"name": "t", "sections": list(sections)}}
    body.update({s: dict(REDUCED[s], **over.get(s, {})) for s in sections})
    return Config.from_dict(body, "t")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_each_section_runs_and_reports(tiny, tmp_path, section):
    over = {"causal": {"tasks": [_first_byte_task(tmp_path)]}} if section == "causal" else {}
    out = run_experiment(_config([section], **over), model=tiny, out=tmp_path / section,
                         progress=False)
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
    if section == "causal":
        c = pd.read_csv(out / "causal.csv", keep_default_na=False)
        assert {"replay:exact", "replay:dual", "transfer:other", "transfer:mean", "finetune",
                "task_vector", "function_vector"} <= set(c.hypothesis)
        exact = c[(c.hypothesis == "replay:exact") & (c.subset == "all") & (c.baseline == "")]
        assert abs(exact[exact.metric == "share"].value.iloc[0] - 1) < 1e-4
        assert "Share of the ICL logit shift recovered" in page
    if section == "order_sensitivity":
        os_ = results[section]["order_sensitivity"]
        assert (os_[os_.run == "batch"].order_sensitivity == 0).all()
    if section == "shen":
        curves, order = pd.read_csv(out / "shen_curves.csv"), pd.read_csv(out / "shen_order.csv")
        assert (out / "shen_sparsity.csv").is_file()
        assert {"icl", "icl_reordered", "gd_mid"} <= set(curves.method)
        assert set(curves[curves.method == "gd_mid"].epoch) == {2.0}  # eval_every 2 of 2
        assert (order[order.method == "gd_full"].value == 0).all()  # full batch: exactly 0
        assert "Fig. 2" in page and "Fig. 4" in page and "Fig. 5" in page
        assert "<b>Table 1</b> (GD with many demonstrations against ICL with 8) was skipped" \
            in page and not (out / "shen_many_demos.csv").exists()


def test_a_sections_shared_state_is_freed_before_the_next_section_runs(tiny, tmp_path,
                                                                       monkeypatch):
    """icl_vs_gd's comparisons and random-weight baseline models serve its own units; the
    next section of the same model runs without them (default.toml's peak was its
    implied-update unit beside them)."""
    cfg = _config(["icl_vs_gd", "implied_updates"],
                  icl_vs_gd=dict(methods=["dai"], lrs=[1e-3], baselines=["untrained"]))
    held, seen = [], []
    icl_run, iu_run = SECTIONS["icl_vs_gd"].run, SECTIONS["implied_updates"].run

    def icl(model, u, s, ctx):
        out = icl_run(model, u, s, ctx)
        held.extend(weakref.ref(m) for m in ctx.get("baseline_models", {}).values())
        return out

    def iu(model, u, s, ctx):
        seen.append((sorted(ctx), [r() is None for r in held]))
        return iu_run(model, u, s, ctx)

    monkeypatch.setattr(SECTIONS["icl_vs_gd"], "run", icl)
    monkeypatch.setattr(SECTIONS["implied_updates"], "run", iu)
    run_experiment(cfg, model=tiny, out=tmp_path / "r", progress=False)
    assert held and seen == [(["out"], [True] * len(held))]


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
            assert SECTIONS[s].units(cfg.settings(s)), path
    with pytest.raises(ExperimentError, match="does not exist"):
        load_config(EXPERIMENTS_DIR / "nope.toml")


# ------------------------------------------------------------------------------ faults


def _toml(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\nquerries = 2',
     r"no key 'querries' \(did you mean 'queries'\?\)"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\ntasks = "sentiment"',
     r"tasks = 'sentiment': expected a list"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\nk = "8"', r"k = '8': expected an integer"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\nk = 0', r"k = 0: expected an integer >= 1"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\ntasks = ["nosuchtask"]',
     r"tasks\[0\]: load_task\('nosuchtask'\)"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\nlrs = [-1.0]', r"lrs\[0\] = -1.0"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\nprotocol = "per-query"',
     r"did you mean 'per_query'"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vs_gd]\nmethods = ["dai"]\n'
     'lrs = {lcgd = [1e-2]}', r"exactly the methods"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[icl_vsgd]\nk = 2', r"unknown table \[icl_vsgd\]"),
    ('[experiment]\nsections = ["icl_vs_gd"]\n[real_heads]\nk = 2', r"not in \[experiment\] sections"),
    ('[experiment]\nsections = ["heads"]', r"expected one of"),
    ('[icl_vs_gd]\nk = 2', r"needs an \[experiment\] table"),
    ('[experiment]\nsections = ["real_heads"]\nmodel = "/nonexistent/m.gguf"',
     r"model = '/nonexistent/m.gguf': no such file"),
    ('[experiment]\nsections = ["real_heads"]\nmodel = "no-such-org/no-such-model"',
     r"not in the local Hugging Face cache"),
    # Shen et al.'s typed tables: each new key is checked before any load
    ('[experiment]\nsections = ["shen"]\n[[shen.methods]]\nname = "a"\nparam = "all"',
     r"\[shen\] methods\[0\] has no key 'param' \(did you mean 'params'\?\)"),
    ('[experiment]\nsections = ["shen"]\n[[shen.methods]]\nparams = "all"',
     r"methods\[0\]: needs a key 'name'"),
    ('[experiment]\nsections = ["shen"]\n[[shen.methods]]\nname = "a"\nparams = "v:middle"',
     r"params = 'v:middle': expected one of"),
    ('[experiment]\nsections = ["shen"]\n[[shen.methods]]\nname = "a"\noptimizer = "rmsprop"',
     r"optimizer = 'rmsprop': expected one of \['sgd', 'adam'\]"),
    ('[experiment]\nsections = ["shen"]\n[[shen.order_methods]]\nname = "a"\nbatch_size = -1',
     r"order_methods\[0\] batch_size = -1: expected an integer >= 0"),
    ('[experiment]\nsections = ["shen"]\n[[shen.methods]]\nname = "a"\nlrs = [0.0]',
     r"lrs\[0\] = 0.0: expected a positive finite number"),
    ('[experiment]\nsections = ["shen"]\n[[shen.methods]]\nname = "a"\n'
     '[[shen.order_methods]]\nname = "a"', r"both named 'a'"),
    ('[experiment]\nsections = ["shen"]\n[shen]\nmethods = "gd"', r"expected a list of tables"),
    ('[experiment]\nsections = ["shen"]\n[shen]\norderings = 1', r"orderings = 1: expected an "
     r"integer >= 2"),
    ('[experiment]\nsections = ["shen"]\n[shen]\ncheckpoints = ["/nonexistent/step1"]',
     r"checkpoints\[0\] = '/nonexistent/step1': no such file or directory"),
    ('[experiment]\nsections = ["shen"]\n[shen]\nmany_demos_tasks = ["agnews:/nonexistent/a.csv"]',
     r"many_demos_tasks\[0\]: load_task\('agnews:/nonexistent/a.csv'\): /nonexistent/a.csv does not "
     r"exist"),
    ('[experiment]\nsections = ["shen"]\n[shen]\nmany_demos_tasks = "sst2:a.csv"',
     r"many_demos_tasks = 'sst2:a.csv': expected a list"),
    ('[experiment]\nsections = ["shen"]\n[shen]\nmany_demos_n = [0]',
     r"many_demos_n\[0\] = 0: expected an integer >= 1"),
    ('[experiment]\nsections = ["shen"]\n[[shen.many_demos_methods]]\nname = "a"\n'
     '[[shen.many_demos_methods]]\nname = "a"', r"both named 'a'.*many_demos_methods"),
    ('[experiment]\nsections = ["shen"]\n[[shen.many_demos_methods]]\nname = "a"\nepochs = 0',
     r"many_demos_methods\[0\] epochs = 0: expected an integer >= 1"),
])
def test_config_errors_name_the_key_and_come_before_any_model_load(tmp_path, text, match):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ip.ConfigError, match=match) as e:
        load_config(_toml(tmp_path, text))
    assert str(tmp_path / "c.toml") in str(e.value)  # the file is named
    assert time.perf_counter() - t0 < 2.0  # validation alone: no model was loaded


@pytest.mark.parametrize("over, match", [
    (dict(many_demos_n=[8, 64]), r"many_demos_n: 64, but task 'sst2:.*' has 16 items in its "
     r"train split .* use many_demos_n <= 16"),
    (dict(many_demos_queries=40), r"many_demos_queries: 40, but task .* has 16 items in its "
     r"test split"),
    (dict(many_demos_tasks="rte"), r"many_demos_tasks\[0\]: .*sst2.jsonl:1: missing field\(s\) \['premise'"),
])
def test_table1_file_errors_come_before_any_model_load(tmp_path, over, match, monkeypatch):
    """Table 1's local copy is read, and sized against the demonstrations and queries asked
    for, before any model loads."""
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"film {i} was {'good' if i % 2 else 'bad'}",
                                        "label": i % 2}) + "\n" for i in range(40)))
    if over.get("many_demos_tasks") == "rte":  # an SST-2 file read as RTE: no premise column
        over = dict(over, many_demos_tasks=[f"rte:{path}"])
    shen = {"tasks": ["capital"], "many_demos_tasks": [f"sst2:{path}"], "many_demos_n": [8],
            **over}
    monkeypatch.setattr(ip, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ip.ConfigError, match=match):
        cfg = Config.from_dict({"experiment": {"name": "t", "sections": ["shen"]},
                                "shen": shen}, "t")
        run_experiment(cfg, out=tmp_path / "o", progress=False)


def test_cli_rejects_bad_runs_before_loading(tmp_path, capsys):
    import time

    from icl_probe.cli import main

    bad = _toml(tmp_path, '[experiment]\nsections = ["real_heads"]\n[real_heads]\nprompt = 2')
    t0 = time.perf_counter()
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'prompts'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no stamp from a config that failed validation
    assert main(["run", str(bad), "--all"]) == 2
    assert "not both" in capsys.readouterr().err
    for args, msg in ((["--task", "nosuchtask"], "nosuchtask"), (["--k", "-1"], "--k -1"),
                      (["--query", "99999"], "--query 99999")):
        assert main(["inspect", "--model", "/nonexistent/model.gguf", *args]) == 2
        assert msg in capsys.readouterr().err  # the argument, not the missing model
    assert time.perf_counter() - t0 < 10.0


def test_results_of_another_model_are_refused(tiny, tmp_path):
    cfg = _config(["real_heads"])
    run_experiment(cfg, model=tiny, out=tmp_path / "r", progress=False)
    other = ip.tiny_model(seed=12)  # same architecture, other weights
    with pytest.raises(ExperimentError, match=r"another setting \(model: .*--out|delete"):
        run_experiment(cfg, model=other, out=tmp_path / "r", progress=False)
    with pytest.raises(ExperimentError, match="dtype: float32 before, float64 now"):
        run_experiment(cfg, model=ip.tiny_model(seed=11, dtype=torch.float64),
                       out=tmp_path / "r", progress=False)
    import json
    meta = json.loads(next((tmp_path / "r" / "units").iterdir()).joinpath("unit.json").read_text())
    assert meta["provenance"]["model"]["digest"] and meta["provenance"]["dtype"] == "float32"


def test_an_empty_or_partial_unit_directory_is_redone(tiny, tmp_path):
    cfg = _config(["real_heads"], real_heads=dict(tasks=["capital", "antonym"]))
    out = run_experiment(cfg, model=tiny, out=tmp_path / "r", progress=False)
    units = sorted(p for p in (out / "units").iterdir())
    shutil.rmtree(units[0])
    units[0].mkdir()  # an empty directory where a unit was
    (units[1] / "sparsity.csv").write_text("garbage")  # a unit whose files changed
    (out / "units" / f".{units[0].name}.abc").mkdir()  # a temp dir of a killed run
    # a unit another process (a shard of a bigger config) is writing right now
    (out / "units" / ".real_heads__model=other__task=x.abc").mkdir()
    redone = []
    run_experiment(cfg, model=tiny, out=out, progress=False, unit_hook=redone.append)
    assert sorted(redone) == sorted(u.name for u in units)
    assert [p.name for p in (out / "units").iterdir() if p.name.startswith(".")] == [
        ".real_heads__model=other__task=x.abc"]  # only this run's own leftovers are removed


def test_a_second_run_on_the_same_directory_is_refused(tiny, tmp_path):
    import platform
    import subprocess
    import sys

    cfg = _config(["real_heads"])
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid} {platform.node()}\n")
        with pytest.raises(ExperimentError, match=f"in use by another icl-probe run \\(a whole run, pid {holder.pid}\\)"):
            run_experiment(cfg, model=tiny, out=out, progress=False)
    finally:
        holder.kill()
        holder.wait()
    run_experiment(cfg, model=tiny, out=out, progress=False)  # a dead holder's lock is stale
    assert not (out / ".lock").exists()


@pytest.mark.embedded
def test_sigint_keeps_finished_units_and_exits_130(embedded, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cfg = _toml(tmp_path, '[experiment]\nsections = ["linear_attention"]\n[linear_attention]\n'
                'seeds = [0, 1, 2, 3]\nline_search_tasks = 200\neigen_tasks = 50\n'
                'steps = 1500\nbatch_size = 128\neval_every = 500')
    out = tmp_path / "o"
    # SIGINT back to its default in the child: a suite started in the background of a
    # non-interactive shell (`make test &`) inherits it ignored, and Python then never raises
    # KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "icl_probe.cli", "run", str(cfg), "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "units").is_dir():
        time.sleep(0.2)
    while time.time() < deadline and not any(
            p for p in (out / "units").iterdir() if not p.name.startswith(".")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err

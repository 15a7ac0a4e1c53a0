"""Results of different inputs never mix: task contents, colliding paths, shared header
names, and a refused run that writes nothing."""

import json

import pandas as pd
import pytest

import icl_probe as ip
from icl_probe import run_experiment
from icl_probe.experiments import SECTIONS, Config, read_results, task_labels, unit_id


@pytest.fixture(scope="module")
def tiny():
    return ip.tiny_model(seed=11)


def _task_file(path, name="pairs", n=12, suffix=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"task": name, "labels": None, "template": "Input: {x}\nOutput: {y}\n\n"}] + [
        {"x": f"word{i}{suffix}", "y": f"drow{i}"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _config(tasks, name="t", prompts=2):
    return Config.from_dict({"experiment": {"name": name, "sections": ["real_heads"]},
                             "real_heads": {"tasks": [str(t) for t in tasks], "prompts": prompts,
                                            "k": 2}}, name)


def test_an_edited_task_file_is_refused_on_resume_naming_the_file(tiny, tmp_path):
    task = _task_file(tmp_path / "t.jsonl")
    out = tmp_path / "out"
    run_experiment(_config([task]), model=tiny, out=out, progress=False)
    stamp = json.loads((out / "config.json").read_text())
    assert str(task) in stamp["inputs"]
    _task_file(task, suffix="-edited")  # same path, other items
    with pytest.raises(ip.ExperimentError, match=r"t\.jsonl has changed since"):
        run_experiment(_config([task]), model=tiny, out=out, progress=False)


def test_paths_that_used_to_collide_get_their_own_units(tiny, tmp_path):
    a = _task_file(tmp_path / "x" / "good.jsonl", name="a")
    b = _task_file(tmp_path / "x_good.jsonl", name="b", suffix="!")
    assert unit_id("real_heads", {"task": str(a)}) != unit_id("real_heads", {"task": str(b)})
    out = run_experiment(_config([a, b]), model=tiny, out=tmp_path / "out", progress=False)
    units = [d for d in (out / "units").iterdir() if not d.name.startswith(".")]
    assert len(units) == 2
    tables = read_results(out)["real_heads"]
    seen = set(pd.concat(tables.values(), ignore_index=True).task.dropna())
    assert {str(a), str(b)} <= seen


def test_plain_unit_ids_are_unchanged():
    # output directories of earlier releases resume
    assert unit_id("icl_vs_gd", dict(task="sentiment", lr=0.01, seed=0, stage="sweep",
                                     method="dai", model="embedded")) == \
        "icl_vs_gd__lr=0.01__method=dai__model=embedded__seed=0__stage=sweep__task=sentiment"
    # the typed unit names the same directory, with only the fields that are set
    unit = SECTIONS["icl_vs_gd"].Unit(model="embedded", stage="sweep", task="sentiment", seed=0,
                                      method="dai", lr=0.01)
    assert unit.id == \
        "icl_vs_gd__lr=0.01__method=dai__model=embedded__seed=0__stage=sweep__task=sentiment"
    assert list(unit.key()) == ["model", "stage", "task", "seed", "method", "lr"]


def test_model_keys_with_double_underscores_get_their_own_units(tmp_path):
    """Unit ids hash values that are not plain, so a key may hold '__'; a key with a path
    separator would name a file elsewhere and is refused."""
    a, b = ip.tiny_model(seed=3), ip.tiny_model(seed=4)
    cfg = _config(["capital"])
    out = run_experiment(cfg, model={"m__1": a, "m": b}, out=tmp_path / "out", progress=False)
    ids = {d.name for d in (out / "units").iterdir() if not d.name.startswith(".")}
    assert len(ids) == 2 and any("__h=" in i for i in ids), ids
    assert set(read_results(out)["real_heads"]["sparsity"].model) == {"m__1", "m"}
    with pytest.raises(ip.ExperimentError, match="without '/'"):
        run_experiment(cfg, model={"a/b": a}, out=tmp_path / "out2", progress=False)


def _classification_file(path, suffix):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"task": "sentiment", "labels": ["yes", "no"],  # first bytes differ: 'y', 'n'
             "template": "Input: {x}\nOutput:{y}\n\n"}] + [
        {"x": f"item {i}{suffix}", "y": ["yes", "no"][i % 2]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_two_files_with_one_header_name_are_two_tasks(tiny, tmp_path):
    a = _classification_file(tmp_path / "a" / "s.jsonl", "")
    b = _classification_file(tmp_path / "b" / "s.jsonl", "?")
    labels = task_labels([str(a), str(b), "capital"])
    assert labels == {str(a): f"sentiment ({a})", str(b): f"sentiment ({b})",
                      "capital": "capital"}
    body = {"experiment": {"name": "two", "sections": ["icl_vs_gd"]},
            "icl_vs_gd": dict(tasks=[str(a), str(b)], k=2, queries=3, dev_queries=2,
                              lrs=[1e-2, 1e-1], methods=["dai"], baselines=["shuffled_labels"])}
    out = run_experiment(Config.from_dict(body, "two"), model=tiny, out=tmp_path / "out",
                         progress=False)
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert set(summary.task) == {labels[str(a)], labels[str(b)]}
    # each file's rate is selected on its own, and its baseline ran at it (not skipped)
    for label in (labels[str(a)], labels[str(b)]):
        d = summary[(summary.task == label) & summary.selected.astype(str).eq("True")]
        assert d.lr.nunique() == 1
        assert "shuffled_labels" in set(d.run)


def test_a_refused_run_writes_nothing(tiny, tmp_path):
    task = _task_file(tmp_path / "t.jsonl")
    out = tmp_path / "out"
    run_experiment(_config([task]), model=tiny, out=out, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*.json")}
    with pytest.raises(ip.ExperimentError, match="different config"):
        run_experiment(_config([task], prompts=3), model=tiny, out=out, progress=False)
    other = ip.tiny_model(seed=12)  # other weights: refused by provenance
    with pytest.raises(ip.ExperimentError, match="another setting"):
        run_experiment(_config([task]), model=other, out=out, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*.json")} == before
    # the original config still resumes
    run_experiment(_config([task]), model=tiny, out=out, progress=False)


def test_a_run_that_fails_before_its_first_unit_leaves_no_stamp(tiny, tmp_path):
    task = _task_file(tmp_path / "t.jsonl")
    out = tmp_path / "out"

    def fail(uid):
        raise RuntimeError("a unit failed")

    with pytest.raises(RuntimeError):
        run_experiment(_config([task]), model=tiny, out=out, progress=False, unit_hook=fail)
    assert not (out / "config.json").exists() and not (out / "provenance").exists()
    # so a corrected config is not refused
    run_experiment(_config([task], prompts=3), model=tiny, out=out, progress=False)

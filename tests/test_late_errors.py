"""Every error comes before the model loads, and none is a raw traceback."""

import errno
import json
import os
import time

import numpy as np
import pytest
import torch

import icl_probe as ip
from icl_probe import models, run_experiment
from icl_probe.experiments import Config, finished_units, runner, stamp, store
from icl_probe.models import sizing
from icl_probe.report import rebuild_report
from icl_probe.runs import launch


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any weight load fails the test: the errors below must come before one."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(runner, "load_model", refuse)


def _cfg(section, **settings):
    return Config.from_dict({"experiment": {"name": "late", "sections": [section]},
                             section: settings}, "late.toml")


def _one_item_task(tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"task": "one", "labels": None, "template": "{x} -> {y}\n"}) + "\n"
                 + json.dumps({"x": "a", "y": "b"}) + "\n")
    return str(f)


@pytest.mark.parametrize("section, settings, words", [
    ("icl_vs_gd", dict(tasks=["sentiment"], k=1000), ["k", "train split", "use k <="]),
    ("icl_vs_gd", dict(tasks=["sentiment"], queries=1000), ["queries", "test split"]),
    ("icl_vs_gd", dict(tasks=["sentiment"], dev_queries=1000), ["dev_queries", "dev split"]),
    ("icl_vs_gd", dict(tasks=["sentiment"], params="kvv"), ["params", "'kvv'", "v:L"]),
    ("icl_vs_gd", dict(tasks=["sentiment"], params="v:99"), ["params", "'v:99'", "0..29"]),
    ("order_sensitivity", dict(tasks=["capital"], methods=["dai", "v:99"]), ["'v:99'", "0..29"]),
    ("order_sensitivity", dict(tasks=["capital"], n_demos=[1, 500]), ["n_demos", "500"]),
    ("real_heads", dict(tasks=["capital"], prompts=1000), ["prompts", "1000"]),
    ("implied_updates", dict(tasks=["capital"], prompts=2, verify_prompts=3),
     ["verify_prompts"]),
    ("causal", dict(queries=1000), ["[causal] queries", "test split"]),
    ("causal", dict(fv_prompts=1000), ["[causal] fv_prompts", "train split"]),
    ("causal", dict(tests=["replay", "vectors"]), ["tests[1]", "'vectors'"]),
    ("causal", dict(updates=["sgd"]), ["updates[0]", "'sgd'", "'exact'"]),
    ("causal", dict(baselines=["noise"]), ["baselines[0]", "'random'"]),
    ("causal", dict(tasks=["capital"]), ["'capital'", "open-ended", "first token"]),
    ("causal", dict(tests=["replay", "replay"]), ["names a test twice"]),
])
def test_late_errors_come_before_any_weight_loads(section, settings, words, no_model_loads,
                                                  tmp_path):
    t = time.perf_counter()
    with pytest.raises(ip.ConfigError) as e:
        run_experiment(_cfg(section, **settings), out=tmp_path / "out", progress=False)
    assert time.perf_counter() - t < 5
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    if "dev_queries" in settings:
        assert "[icl_vs_gd] dev_queries" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_one_item_task_is_refused_before_loading(no_model_loads, tmp_path):
    with pytest.raises(ip.ConfigError, match="has 1 item"):
        run_experiment(_cfg("real_heads", tasks=[_one_item_task(tmp_path)]), out=tmp_path / "o",
                       progress=False)


def test_a_failed_validation_does_not_refuse_the_corrected_config(tmp_path):
    tiny = ip.tiny_model(seed=2)
    out = tmp_path / "out"
    with pytest.raises(ip.ConfigError):
        run_experiment(_cfg("real_heads", tasks=["capital"], prompts=1000, k=2), model=tiny,
                       out=out, progress=False)
    run_experiment(_cfg("real_heads", tasks=["capital"], prompts=2, k=2), model=tiny, out=out,
                   progress=False)
    assert len(finished_units(out)) == 1


# ------------------------------------------------------------------------------ tracebacks


def test_slurm_without_slurm_is_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ip.ExperimentError, match="no Slurm"):
        launch(_cfg("real_heads", tasks=["capital"], prompts=1, k=2), out=out,
               launcher="slurm", jobs=2)
    assert not out.exists()


@pytest.mark.parametrize("size", [10, 2_000_000])
def test_a_truncated_gguf_is_a_clear_error(tmp_path, size, monkeypatch):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "cut.gguf"
    with open(models.embedded_gguf_path(), "rb") as src:
        f.write_bytes(src.read(size))
    with pytest.raises(ip.ModelLoadError, match="not a readable GGUF file.*truncated"):
        ip.load_model(str(f))


def test_out_on_an_existing_file_is_refused(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ip.ExperimentError, match="existing file"):
        stamp.output_dir(_cfg("real_heads"), f)


def test_an_unwritable_out_is_refused(tmp_path, monkeypatch):
    # the suite runs as root, which ignores permissions: the check's answer is simulated
    monkeypatch.setattr(stamp.os, "access", lambda *a: False)
    with pytest.raises(ip.ExperimentError, match="not writable"):
        stamp.output_dir(_cfg("real_heads"), tmp_path / "new")


def test_a_garbage_completion_marker_blocks_neither_run_nor_report(tmp_path):
    tiny = ip.tiny_model(seed=2)
    cfg = _cfg("real_heads", tasks=["capital"], prompts=2, k=2)
    out = run_experiment(cfg, model=tiny, out=tmp_path / "out", progress=False)
    bad = out / "units" / "real_heads__model=x__task=y"
    bad.mkdir()
    (bad / "COMPLETE").write_bytes(b"\xff\xfe\x00garbage\x80")
    assert bad not in finished_units(out)
    run_experiment(cfg, model=tiny, out=out, progress=False)
    assert rebuild_report(out).is_file()


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "replace", full)
    with pytest.raises(ip.ExperimentError, match="disk .*full.*resume"):
        store.write_text(tmp_path / "report.html", "x" * 1_400_000)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ip.ExperimentError, match="disk .*full"):
        store.write_unit(tmp_path / "units", "u", {}, {"section": "s", "unit": {}})
    assert list((tmp_path / "units").iterdir()) == []


def test_pickled_weights_are_refused_with_the_safetensors_fix(tmp_path):
    hf, tok = models.tiny_hf_model("llama")
    d = tmp_path / "pickled"
    hf.config.save_pretrained(d)
    tok.save_pretrained(d)
    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**hf.state_dict(), "x": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(ip.ModelLoadError) as e:
        ip.load_model(str(d))
    assert "safetensors" in str(e.value) and "weights_only=False" not in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------ messages


def test_a_directory_without_weights_is_not_told_to_download(tmp_path):
    hf, tok = models.tiny_hf_model("llama")
    hf.config.save_pretrained(tmp_path / "d")
    tok.save_pretrained(tmp_path / "d")
    with pytest.raises(ip.ModelLoadError) as e:
        ip.load_model(str(tmp_path / "d"))
    assert "no weights" in str(e.value) and "huggingface-cli" not in str(e.value)


def test_a_non_string_item_says_which_field_and_how_to_fix(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"task": "t", "labels": None}) + "\n" + json.dumps({"x": 5, "y": "b"})
                 + "\n")
    with pytest.raises(ip.TaskFileError, match=r"'x' must be a string, got int 5"):
        ip.load_task(str(f))


def test_learning_rates_of_any_real_type_and_never_a_bool():
    assert ip.FineTuneConfig(lr=np.float32(0.5)).lr == 0.5
    assert ip.FineTuneConfig(lr=np.float64(1e-3)).lr == 1e-3
    for bad in (True, False, "0.1", 0, -1e-3, float("nan")):
        with pytest.raises(ip.FineTuneError):
            ip.FineTuneConfig(lr=bad)
    tiny = ip.tiny_model(seed=2)
    pair = ip.build_prompt(tiny, "capital", query=0, k=2)
    with pytest.raises(ip.FineTuneError, match="bool"):
        ip.finetune(tiny, pair, lr=True)


def test_a_rising_loss_is_flagged_on_few_step_runs():
    tiny = ip.tiny_model(dtype=torch.float64, seed=2)
    pair = ip.build_prompt(tiny, "capital", query=0, k=3)
    one = ip.finetune(tiny, pair, method="batch", params="all", lr=1e3)  # one recorded loss
    assert len(one.losses) == 1 and one.diverged
    assert one.divergence.startswith("loss rose on a trained example")
    ok = ip.finetune(tiny, pair, method="batch", params="all", lr=1e-2)
    assert not ok.diverged, ok.divergence


def test_the_memory_check_is_not_switched_off_by_a_bug(monkeypatch):
    def bug(spec):
        raise AttributeError("a bug in sizing")

    monkeypatch.setattr(sizing, "model_shape", bug)
    with pytest.raises(AttributeError):
        sizing.check_memory(None)

    def unreadable(spec):
        raise ip.ModelLoadError("no config")

    monkeypatch.setattr(sizing, "model_shape", unreadable)
    sizing.check_memory(None)  # the loader reports an unreadable config itself

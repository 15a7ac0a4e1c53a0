"""No code from a model directory ever runs, and the report escapes what it shows."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import icl_probe as ip
from icl_probe.models import remote_code

PAYLOAD = '''
from pathlib import Path
Path({marker!r}).write_text("the directory's code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def _evil_directory(root: Path, *, tokenizer_only: bool = False) -> tuple[Path, Path]:
    d = root / "evil-model"
    d.mkdir()
    marker = root / "PAYLOAD_RAN"
    (d / "configuration_evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    (d / "modeling_evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    config = {"model_type": "llama" if tokenizer_only else "evil",
              "architectures": ["EvilModel"], "hidden_size": 8}
    if not tokenizer_only:
        config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                              "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    if tokenizer_only:
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "EvilTokenizer",
             "auto_map": {"AutoTokenizer": ["configuration_evil.EvilTokenizer", None]}}))
    return d, marker


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The command line as a user runs it, with `yes` answering every prompt."""
    return subprocess.run([sys.executable, "-m", "icl_probe.cli", *args], cwd=cwd,
                          input="y\n" * 50, capture_output=True, text=True, timeout=120)


def test_a_directory_whose_code_would_run_is_refused_everywhere(tmp_path):
    d, marker = _evil_directory(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text(f'[experiment]\nname = "evil"\nsections = ["implied_updates"]\n'
                      f'model = "{d}"\n[implied_updates]\ntasks = ["capital"]\n')
    for args in (["plan", str(config)], ["inspect", "--model", str(d)],
                 ["run", str(config), "--out", str(tmp_path / "out")]):
        t = time.perf_counter()
        r = _cli(args, tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "auto_map" in r.stderr and "never" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert time.perf_counter() - t < 60  # no prompt waited on
        assert not marker.exists(), f"{args}: the directory's code ran"


def test_load_model_refuses_it_before_transformers_reads_it(tmp_path):
    d, marker = _evil_directory(tmp_path)
    with pytest.raises(ip.ModelLoadError, match="auto_map"):
        ip.load_model(str(d))
    with pytest.raises(ip.ModelLoadError, match="never runs code"):
        ip.load_model(str(d), trust_remote_code=True)
    assert not marker.exists()


def test_a_custom_tokenizer_class_is_refused_too(tmp_path):
    d, marker = _evil_directory(tmp_path, tokenizer_only=True)
    assert "tokenizer_class 'EvilTokenizer'" in remote_code(d)
    with pytest.raises(ip.ModelLoadError, match="auto_map"):
        ip.load_model(str(d))
    assert not marker.exists()


def test_a_known_architecture_with_an_auto_map_is_not_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(
        {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    assert remote_code(d) is None  # transformers' own Llama class is used; nothing runs


# ------------------------------------------------------------------------------ the report

SCRIPT = "<script>alert(1)</script>"


def test_the_report_escapes_every_piece_of_user_text(tmp_path):
    from icl_probe import run_experiment
    from icl_probe.experiments import Config

    # a task whose name, labels and items carry markup, byte-tokenizer friendly (labels whose
    # first bytes differ)
    task = tmp_path / "evil.jsonl"
    header = {"task": SCRIPT, "description": "<img src=x onerror=alert(2)>",
              "labels": ["<b>yes</b>", "no<i>"], "template": "Input: {x}\nOutput:{y}\n\n"}
    items = [{"x": f"item <em>{i}</em> {SCRIPT}", "y": header["labels"][i % 2]}
             for i in range(40)]
    task.write_text("\n".join(json.dumps(r) for r in [header, *items]) + "\n")
    body = {"experiment": {"name": "<svg onload=alert(3)>", "sections": ["icl_vs_gd"]},
            "icl_vs_gd": dict(tasks=[str(task)], k=2, queries=3, dev_queries=2, lrs=[1e-2],
                              methods=["dai"], baselines=["shuffled_labels"])}
    out = run_experiment(Config.from_dict(body, "evil"), model=ip.tiny_model(seed=3),
                         out=tmp_path / "out", progress=False)
    page = (out / "report.html").read_text()
    for raw in (SCRIPT, "<img src=x", "<b>yes</b>", "no<i>", "<em>", "<svg onload"):
        assert raw not in page, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text

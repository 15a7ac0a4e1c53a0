"""Bad input gets an IclProbeError naming the input and the fix, before any model loads."""

import json
import time

import pytest
import torch

import icl_probe as ip
from icl_probe import models


def test_a_file_named_gguf_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ip.ModelLoadError, match=r"is not a GGUF file .*b'PK\\x03\\x04'"):
        ip.load_model(str(fake))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_an_unavailable_device_is_named_before_loading():
    t0 = time.perf_counter()
    with pytest.raises(ip.ModelLoadError, match=r"device='cuda'.*available here: cpu"):
        ip.load_model(device="cuda")
    with pytest.raises(ip.ModelLoadError, match="not a device"):
        ip.load_model(device="gpu0")
    assert time.perf_counter() - t0 < 2.0  # refused before any weight was read


@pytest.mark.parametrize("dtype, match", [(torch.float8_e4m3fn, "storage formats"),
                                          (torch.int8, "storage formats"),
                                          ("float8", "unknown dtype")])
def test_dtypes_a_model_cannot_run_in(dtype, match):
    with pytest.raises(ip.ModelLoadError, match=match):
        ip.load_model(dtype=dtype)


def test_non_utf8_task_file_names_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(json.dumps({"task": "t", "labels": None}).encode() + b"\n"
                  + b'{"x": "caf\xe9", "y": "a"}\n')
    with pytest.raises(ip.TaskFileError, match=r"t\.jsonl:2: not UTF-8 \(byte 0xe9 at column 11\)"):
        ip.load_task(str(p))


@pytest.mark.parametrize("template, match", [
    ("Q: {x} {z}\nA: {y}\n\n", r"placeholder \{z\}"),
    ("Q: {x} } \nA: {y}\n\n", r"literal brace"),
    ("Q: {x}\nA: {{y}}\n\n", r"exactly once"),
])
def test_bad_templates(tmp_path, template, match):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"task": "t", "labels": None, "template": template}) + "\n"
                 + json.dumps({"x": "a", "y": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(ip.TaskFileError, match=match):
        ip.load_task(str(p))


def test_a_literal_brace_written_doubled_is_fine(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"task": "t", "labels": None, "template": "{{Q}}: {x}\nA: {y}\n\n"})
                 + "\n" + json.dumps({"x": "a", "y": "b"}) + "\n"
                 + json.dumps({"x": "c", "y": "d"}) + "\n", encoding="utf-8")
    tiny = ip.tiny_model(seed=2)
    pair = ip.build_prompt(tiny, ip.load_task(str(p)), query=0, k=1, seed=0)
    assert pair.text.startswith("{Q}: c")


@pytest.mark.parametrize("kw, match", [(dict(k=2.5), r"k=2\.5"), (dict(k=-1), r"k=-1"),
                                       (dict(query=1.5), r"query=1\.5")])
def test_build_prompt_argument_types(kw, match):
    tiny = ip.tiny_model(seed=2)
    with pytest.raises(ip.PromptError, match=match):
        ip.build_prompt(tiny, "capital", **{"query": 0, "k": 2, **kw})


@pytest.mark.parametrize("edit", [
    lambda m: m["files"][next(iter(m["files"]))].pop("size"),
    lambda m: m.update(files={}),
    lambda m: m.update(files=[]),
])
def test_any_malformed_manifest_is_a_corrupt_cache(tmp_path, edit):
    d = tmp_path / "entry"
    d.mkdir()
    (d / "w.bin").write_bytes(b"abc")
    manifest = {"format": models.cache.CACHE_FORMAT,
                "files": {"w.bin": {"size": 3, "sha256": models.cache._sha256(d / "w.bin")}}}
    (d / models.cache._MANIFEST).write_text(json.dumps(manifest))
    models.verify_cache(d)  # the intact entry verifies
    edit(manifest)
    (d / models.cache._MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ip.CacheError):
        models.verify_cache(d)


def test_every_exception_lives_in_errors_and_is_exported():
    import importlib
    import inspect
    import pkgutil

    import icl_probe as ip

    found = set()
    for info in pkgutil.walk_packages(ip.__path__, "icl_probe."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and \
                    obj.__module__.startswith("icl_probe"):
                assert obj.__module__ == "icl_probe.errors", (info.name, name)
                found.add(obj.__name__)
    assert found and found <= set(ip.__all__)
    assert all(issubclass(getattr(ip, n), ip.IclProbeError) for n in found)


def test_the_public_surface_is_the_readme_s_and_holds_no_plumbing():
    import re
    from pathlib import Path

    import icl_probe as ip

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    used = set(re.findall(r"\bip\.([A-Za-z_]\w*)", readme)) - {"models", "gd"}  # submodules
    assert used <= set(ip.__all__), used - set(ip.__all__)
    for plumbing in ("expand_kv", "cache_dir", "embedded_gguf_path", "Spans", "QUANTITIES"):
        assert plumbing not in ip.__all__
    assert all(hasattr(ip, n) for n in ip.__all__)

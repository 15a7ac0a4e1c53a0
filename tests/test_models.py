"""Model loading: the embedded default against plain transformers, the cache, other sources,
and the errors a user sees."""

import json
import os
import shutil

import pytest
import torch

import icl_probe as ip
from icl_probe import models

LOGIT_TOL = 1e-4  # float32 bridge vs float32 transformers on the same weights


def test_embedded_model_shape_and_source(embedded):
    cfg = embedded.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 9, 3, 64)
    info = embedded.icl_probe_info
    assert info.source == "embedded" and info.path.endswith(models.cache.EMBEDDED_FILE)
    # SmolLM2's tokenizer adds no BOS itself, but prompts start with it: a sink of its own
    assert info.prepend_bos is True and embedded.tokenizer.bos_token_id is not None
    entry = models.cached_gguf_dir()  # the entry the fixture loaded from
    models.verify_cache(entry)
    manifest = json.loads((entry / "icl_probe_manifest.json").read_text())
    assert "lm_head.weight" not in open(entry / "model.safetensors", "rb").read(200_000).decode(
        "latin-1")  # the tied copy is not stored twice
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_embedded_trace_logits_match_plain_transformers(embedded):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(models.cached_gguf_dir()), dtype=torch.float32)
    hf.eval()
    pairs = [ip.build_prompt(embedded, "capital", query=q, k=4, seed=q) for q in range(3)]
    rec = ip.trace(embedded, pairs, what=("attn_out",))
    for b, pair in enumerate(pairs):
        with torch.no_grad():
            ref = hf(pair.icl_ids[None]).logits[0, -1]
        drift = (rec.logits[b] - ref).abs().max().item()
        assert drift < LOGIT_TOL, f"bridge vs HF logits drift={drift:.2e}: hooks changed the forward?"


def test_embedded_capital_icl_beats_zero_shot(embedded):
    # Measured before the foundation issue: 14/16 with 8 demonstrations, 0/16 zero-shot.
    pairs = [ip.build_prompt(embedded, "capital", query=q, k=8, seed=q) for q in range(16)]
    icl = ip.trace(embedded, pairs, what=("pattern",), layers=[0])
    zs = ip.trace(embedded, pairs, kind="zs", what=("pattern",), layers=[0])
    gold = torch.tensor([p.target_id for p in pairs])
    icl_right = int((icl.logits.argmax(-1) == gold).sum())
    zs_right = int((zs.logits.argmax(-1) == gold).sum())
    assert icl_right >= 12 and zs_right <= 2, (icl_right, zs_right)


def _fake_gguf_cache(tmp_path, monkeypatch):
    """A cache root holding a copy of the embedded model's entry (hard links where possible)."""
    src = models.cached_gguf_dir()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    dst = models.gguf_cache_path(models.embedded_gguf_path())
    dst.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    return src, dst


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, monkeypatch, embedded, damage):
    src, dst = _fake_gguf_cache(tmp_path, monkeypatch)
    victim = dst / "tokenizer_config.json"
    data = victim.read_bytes()
    victim.unlink()  # break the hard link before writing
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
    else:
        victim.write_bytes(data)
        (dst / "icl_probe_manifest.json").unlink()
    with pytest.raises(ip.CacheError):
        models.verify_cache(dst)
    rebuilt = []

    def fake_write(gguf, target):  # stands in for the 20 s dequantisation
        rebuilt.append(target)
        shutil.rmtree(target)
        shutil.copytree(src, target)
    monkeypatch.setattr(models.cache, "_write_cache", fake_write)
    with pytest.warns(UserWarning, match="rebuilding"):
        out = models.cached_gguf_dir()
    assert rebuilt == [dst] and out == dst
    models.verify_cache(dst)


def test_local_directory_and_in_memory_model(tmp_path):
    hf, tok = models.tiny_hf_model(seed=3)
    hf.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = hf(ids).logits
    again = ip.load_model(str(tmp_path / "tiny"), device="cpu")
    assert again.icl_probe_info.source == "directory"
    with torch.no_grad():
        assert (again(ids) - ref).abs().max() < 1e-5
    mem = ip.load_model(hf, tokenizer=tok, device="cpu")
    assert mem.icl_probe_info.source == "memory" and mem.icl_probe_info.prepend_bos
    with torch.no_grad():
        assert (mem(ids) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name, match", [
    ("./no/such/dir", "no file or directory"),
    ("no-such-org/no-such-model-xyz", "not available offline"),
    ("/tmp/missing.gguf", "does not exist"),
])
def test_unknown_models_explain_themselves(monkeypatch, name, match):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ip.ModelLoadError, match=match):
        ip.load_model(name, device="cpu")


def test_bad_arguments():
    with pytest.raises(ip.ModelLoadError, match="unknown dtype"):
        ip.load_model(dtype="float8")
    with pytest.raises(ip.ModelLoadError, match="needs its tokenizer"):
        ip.load_model(models.tiny_hf_model()[0])
    with pytest.raises(ip.ModelLoadError, match="expected None, a name"):
        ip.load_model(42)
    (p := __import__("pathlib").Path("/tmp/icl_probe_not_a_model")).mkdir(exist_ok=True)
    with pytest.raises(ip.ModelLoadError, match="no config.json"):
        ip.load_model(str(p))
    with pytest.raises(ip.ModelLoadError, match="n_devices=2.*requires CUDA|n_devices=2.*CUDA"):
        ip.load_model(str(p), n_devices=2) if not torch.cuda.is_available() else pytest.skip()


def test_device_map_loads_through_accelerate_and_traces_like_one_device(tmp_path):
    hf, tok = models.tiny_hf_model(seed=4, n_layers=3)
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    one = ip.load_model(str(tmp_path / "m"), device="cpu")
    mapped = ip.load_model(str(tmp_path / "m"), device_map="auto")  # accelerate's placement
    pairs = ip.build_prompts(one, "capital", range(2), k=2)
    a, b = ip.trace(one, pairs), ip.trace(mapped, pairs)
    for name in a.data:
        assert torch.equal(a.data[name], b.data[name]), name
    assert torch.equal(a.logits, b.logits)
    with pytest.raises(ip.ModelLoadError, match="already placed"):
        ip.load_model(hf, tokenizer=tok, device_map="auto")


def test_untrained_copy_of_something_else_is_a_clear_error():
    with pytest.raises(ip.ModelLoadError, match="load it with icl_probe.load_model"):
        models.untrained_copy(torch.nn.Linear(2, 2))
    with pytest.raises(ip.ModelLoadError, match="expected 'none' or 'embeddings'"):
        models.untrained_copy(ip.tiny_model(), keep="all")

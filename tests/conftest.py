import pytest
import torch
from transformers import DynamicCache

import icl_probe as ip

# Core tiny-model sizes, all distinct, and distinct from the core tests' batch sizes (5 prompts;
# 2 on the fused families), so that a swapped axis cannot pass (tests/test_shapes.py checks
# this on a real record): layers 3, query heads 6 over key/value groups 2 (3 query heads per
# group), d_head 10, d_model 42, d_mlp 72. Fused-QKV families (GPT-2, NeoX) tie
# d_model = n_heads * d_head and have one key/value head per query head: 3 layers, 4 heads,
# d_head 10, d_model 40.
TINY_LLAMA = dict(n_layers=3, n_heads=6, n_key_value_heads=2, d_head=10, d_model=42, d_mlp=72)
TINY_FUSED = dict(n_layers=3, n_heads=4, d_head=10, d_model=40, d_mlp=72)


@pytest.fixture()
def drifted_cache(monkeypatch):
    """A stand-in for a release that mishandles the key/value cache: every repeated cache
    comes back with its keys shifted, so the fast paths' logits move (as under transformers
    5.24, where the cache was never filled) while every call still completes."""
    original = DynamicCache.batch_repeat_interleave

    def shifted(self, repeats):
        original(self, repeats)
        for layer in self.layers:
            layer.keys += 0.5

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", shifted)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (float32, CPU), loaded once per session."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return ip.load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny64():
    """Tiny Llama (:data:`TINY_LLAMA`: 3 layers, 6 query heads over 2 key/value groups,
    rotary) in float64."""
    return ip.tiny_model(dtype=torch.float64, seed=1, **TINY_LLAMA)


def pytest_collection_modifyitems(config, items):
    """Every test that uses the embedded model carries the ``embedded`` marker, so that
    ``pytest -m "not embedded"`` runs the fast suite."""
    for item in items:
        if "embedded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.embedded)


def assert_row_equals_alone(batched, b, alone, n_tokens, tol, label=""):
    """Prompt ``b`` of a batched trace against the same prompt traced alone: every captured
    quantity over its real positions (k/v over its tokens, score rows over its captured
    positions), the masked entries masked alike, the rest within ``tol``."""
    n_pos = int(alone.pos_mask.sum())
    for name, x in alone.data.items():
        y = batched.data[name][:, b]
        if name in ("k", "v"):
            y, x0 = y[:, :n_tokens], x[:, 0, :n_tokens]
        elif name in ("scores", "pattern"):
            y, x0 = y[:, :n_pos, :, :n_tokens], x[:, 0, :n_pos, :, :n_tokens]
        else:
            y, x0 = y[:, :n_pos], x[:, 0]
        fin = torch.isfinite(x0)
        assert torch.equal(fin, torch.isfinite(y)), (label, name)
        assert (y[fin] - x0[fin]).abs().max() < tol, (label, name)

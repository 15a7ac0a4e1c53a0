import pytest
import torch

import icl_probe as ip


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (float32, CPU), loaded once per session."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return ip.load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny64():
    """Tiny Llama (2 layers, 4 query heads over 2 key/value groups, rotary) in float64."""
    return ip.tiny_model(dtype=torch.float64, n_layers=2, n_heads=4, n_key_value_heads=2,
                         d_model=40, d_head=10, d_mlp=72, seed=1)


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

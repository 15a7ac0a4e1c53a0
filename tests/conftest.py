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

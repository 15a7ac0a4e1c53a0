"""Random-weight baseline models (Deutch et al.): the same architecture with fresh weights,
or fresh weights under the trained embeddings, norms and unembedding."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelLoadError
from .bridge import ModelInfo, _bridge


def untrained_copy(model: Any, keep: str = "none", seed: int = 0) -> Any:
    """The same architecture with random weights (``keep="none"``), or random weights except
    the trained embeddings, norms and unembedding (``keep="embeddings"``): Deutch et al.'s
    baselines. Built from the model's Hugging Face config (seeded); the tokenizer is shared.
    ``model`` is a model of :func:`load_model` or :func:`tiny_model`."""
    if keep not in ("none", "embeddings"):
        raise ModelLoadError(f"untrained_copy(keep={keep!r}): expected 'none' or 'embeddings'")
    hf = getattr(model, "original_model", None)
    info = getattr(model, "icl_probe_info", None)
    if hf is None or info is None or not hasattr(hf, "config"):
        raise ModelLoadError(
            f"untrained_copy(): got a {type(model).__name__} without the Hugging Face model and "
            "origin a bridge of load_model() carries; load it with icl_probe.load_model(...)")
    param = next(hf.parameters())
    torch.manual_seed(seed)
    if param.device.type == "cpu" and param.dtype not in (torch.float16, torch.bfloat16):
        fresh = type(hf)(hf.config).to(param.dtype).eval()  # as always: the goldens' draws
    else:
        # built where the model lives, in its dtype: a 7B float32 copy on the CPU first is
        # 27 GB and minutes of initialisation
        default = torch.get_default_dtype()
        torch.set_default_dtype(param.dtype)
        try:
            with torch.device(param.device):
                fresh = type(hf)(hf.config).eval()
        finally:
            torch.set_default_dtype(default)
    if keep == "embeddings":
        src = {n.replace("._original_component", ""): p for n, p in hf.named_parameters()}
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                if ("embed" in n or "norm" in n or "lm_head" in n or n.endswith("wte.weight")
                        or ".ln_" in n) and n in src:
                    p.copy_(src[n])
    label = f"{info.label}-untrained-{keep}"
    return _bridge(fresh, model.tokenizer, info=ModelInfo("memory", label, None,
                                                          info.prepend_bos),
                   device=param.device, dtype=param.dtype)

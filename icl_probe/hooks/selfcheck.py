"""Fast paths that check themselves against the slow exact path, on every call.

A shortcut (the shared-prefix trace, answer scoring on a key/value cache, fine-tune steps on
the unwrapped Hugging Face model) relies on internals
of transformers and TransformerLens that a release can change without an error: transformers
5.24 renamed the cache argument and the shared-prefix trace went 74 % off while every run
completed. So each call of a fast path also computes one of its prompts the slow way, in the
same forward it needs anyway where it can, and compares: the logits, and the pre-softmax
scores of one layer over every key. A disagreement beyond :data:`TOLERANCE` for the dtype
raises :class:`~icl_probe.errors.FastPathError`, which names the installed versions, the
measured error, and the way to the slow path: ``fast=False`` on the call, or the environment
variable ``ICL_PROBE_FAST=0`` for everything (compare, experiments, the command line).

Any future shortcut follows the same rule: compute one prompt both ways, call :func:`check`.

>>> check("demo path", {"logits": (torch.ones(3), torch.ones(3))}, torch.float32)
{'logits': 0.0}
>>> fast_enabled(False), TOLERANCE[torch.float32]
(False, 0.0001)
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Mapping

import torch

from ..errors import FastPathError

FAST_ENV = "ICL_PROBE_FAST"

# Largest relative error (max |fast - slow| / max |slow|) a fast path may show against the
# slow path on the same prompt, per dtype. Measured: float64 0 to 4e-16, float32 2.2e-6 on the
# embedded model; the 5.24 breakage gave 0.74. Half precision reorders sums differently on the
# two paths: bf16 keeps 8 bits of mantissa (2^-8 = 3.9e-3 per rounding, a few dozen layers).
# bf16 measured 0.0505 on the scores of layer 31 of a LLaMA-7B-shaped model with random weights
# on an H200 (32 layers; 5e-2 raised a false alarm there): 0.15 is 3x that, 5x below 0.74.
# float16 keeps 3 bits more (8x finer).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 0.15,
}

# how many checks passed in this process, per fast path (reported by doctor and provenance)
PASSED: dict[str, int] = {}


def fast_enabled(fast: bool | None = None) -> bool:
    """``fast`` when given, else the environment: ``ICL_PROBE_FAST=0`` (or false/no/off)
    sends every fast path down the slow exact path."""
    if fast is not None:
        return bool(fast)
    return os.environ.get(FAST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def stack_versions() -> dict[str, str]:
    """The versions numbers depend on: python, torch, transformers, transformer-lens and
    icl-probe itself."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"),
            "transformer-lens": _version("transformer-lens"),
            "icl-probe": _version("icl-probe")}


def relative_error(fast: torch.Tensor, slow: torch.Tensor) -> float:
    """``max |fast - slow| / max |slow|`` over the entries finite in ``slow`` (float64);
    ``inf`` when the shapes differ or an entry finite in one is not in the other."""
    fast, slow = fast.detach().double().cpu(), slow.detach().double().cpu()
    if fast.shape != slow.shape:
        return float("inf")
    finite = torch.isfinite(slow)
    if not torch.equal(finite, torch.isfinite(fast)):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = float(slow[finite].abs().max())
    return float((fast[finite] - slow[finite]).abs().max()) / max(scale, 1e-30)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def check(path: str, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
          dtype: torch.dtype) -> dict[str, float]:
    """Compare each ``name: (fast, slow)`` and return the relative errors; raise
    :class:`FastPathError` when one exceeds the dtype's tolerance."""
    errors = {name: relative_error(f, s) for name, (f, s) in pairs.items()}
    tol = tolerance(dtype)
    bad = {name: e for name, e in errors.items() if not e <= tol}
    if bad:
        v = stack_versions()
        measured = ", ".join(f"{name} off by {e:.3g}" for name, e in bad.items())
        raise FastPathError(
            f"{path}: the fast path disagrees with the slow exact path on the same prompt: "
            f"{measured} relative (tolerance {tol:g} in {str(dtype).removeprefix('torch.')}). "
            f"Installed: transformers {v['transformers']}, transformer-lens "
            f"{v['transformer-lens']}, torch {v['torch']}. A release has probably changed an "
            "internal the fast path relies on, and its results would be wrong. Use the slow "
            f"exact path: pass fast=False, or set {FAST_ENV}=0 (compare, experiments and the "
            "command line read it); `icl-probe doctor` checks the whole stack, and "
            "`make setup` installs the tested versions from the lock file.")
    PASSED[path] = PASSED.get(path, 0) + 1
    return errors


__all__ = ["FAST_ENV", "PASSED", "TOLERANCE", "check", "fast_enabled", "relative_error",
           "stack_versions", "tolerance"]

"""What must match for two units' results to be comparable: the model's identity (a digest of
its configuration and weights), dtype, device kind, package version, config and the versions
of the stack, recorded per model in ``OUT/provenance/MODEL.json`` and checked on resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..doctor import last_verdict
from ..errors import ExperimentError
from ..hooks import FAST_ENV, fast_enabled, stack_versions
from ..version import __version__
from .config import Config
from .store import write_text


def model_identity(model: Any) -> dict:
    """Where the model came from and a digest of its configuration and weights (float64 sums
    of every parameter: a different checkpoint, or the same one in another dtype, differs)."""
    info = getattr(model, "icl_probe_info", None)
    hf = getattr(model, "original_model", model)
    h = hashlib.sha256()
    cfg = getattr(hf, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters()):
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            x = p.detach().double()
            h.update(np.array([float(x.sum()), float((x * x).sum())]).tobytes())
    return {"source": getattr(info, "source", "memory"), "label": getattr(info, "label", "model"),
            "path": getattr(info, "path", None), "digest": h.hexdigest()[:16]}


def provenance(model: Any, config: Config) -> dict:
    """Everything that must match for two units' results to be comparable."""
    p = next(model.parameters())
    return {"model": model_identity(model), "dtype": str(p.dtype).replace("torch.", ""),
            "device": p.device.type, "icl_probe": __version__, "config": config.digest,
            # the versions numbers depend on (refused on a change, as the weights are), the
            # verdict of `icl-probe doctor` on this stack, and whether the fast paths ran
            "stack": stack_versions(), "doctor": last_verdict(),
            "fast_paths": "on (self-checked)" if fast_enabled() else f"off ({FAST_ENV}=0)"}


def provenance_mismatch(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in ("model", "dtype", "device", "icl_probe", "config", "stack"):
        a, b = old.get(key), new.get(key)
        if key == "stack" and a is None:  # recorded before versions were: not comparable
            continue
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            if a.get("digest") != b.get("digest"):
                diffs.append(f"model: {a.get('label')} ({a.get('digest')}) before, "
                             f"{b.get('label')} ({b.get('digest')}) now")
        elif a != b:
            diffs.append(f"{key}: {a} before, {b} now")
    return diffs


def check_provenance(out: Path, key: str, prov: dict, *, record: bool = True) -> None:
    """Refuse results of another setting under the same model key; record the first
    (``record=False``: check only)."""
    path = out / "provenance" / f"{key}.json"
    if path.is_file():
        diffs = provenance_mismatch(json.loads(path.read_text()), prov)
        if diffs:
            raise ExperimentError(
                f"{out} holds results of another setting for model {key!r} ({'; '.join(diffs)})"
                f": mixing them would give a report of neither. Use another --out, or delete "
                f"{out} to start afresh")
        return
    if record:
        path.parent.mkdir(exist_ok=True)
        write_text(path, json.dumps(prov, indent=2))

"""Everything a run would otherwise find out only after a model loads (minutes on a 7B model),
checked before any weight is read; and the digests of the task files a config reads."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from ..gd import PARAM_SETS
from ..models import model_layers
from .checks import need
from .config import Config
from .labels import task_file
from .sections import SECTIONS


def check_params(params: str, n_layers: int, where: str, model: str) -> None:
    """A parameter set (``kv``, ``qkvo``, ``mlp``, ``all``, ``v:L``) against a model's layers."""
    m = re.fullmatch(r"v:(\d+)", params)
    if m is None:
        need(params in PARAM_SETS, where, f"{params!r} is not a parameter set; expected one "
             f"of {list(PARAM_SETS)} or 'v:L' (layer L's W_V)")
        return
    need(int(m.group(1)) < n_layers, where, f"{params!r}: model {model!r} has layers "
         f"0..{n_layers - 1}")


def check_inputs(config: Config, specs: dict[str, Any]) -> None:
    """Each section's settings against the tasks it reads (sizes and splits against ``k``,
    ``queries``, ``dev_queries``, ``n_demos``, ``prompts``), then parameter sets and ``v:L``
    methods against each model's layers (read from its config on the meta device)."""
    where = f"config {config.path or config.name!r}"
    layer_sets = []
    for name in config.sections:
        layer_sets += SECTIONS[name].check_inputs(config.settings(name), where)
    if not layer_sets:
        return
    for key, spec in specs.items():
        n_layers = spec.cfg.n_layers if hasattr(spec, "cfg") else model_layers(spec)
        for w, params in layer_sets:
            check_params(params, n_layers, w, key)


def input_digests(config: Config) -> dict[str, str]:
    """``{task spec: sha256 of its file}`` for every task the config reads: the results of a
    task depend on its contents, not just its path."""
    specs = sorted({t for sec in config.sections
                    for t in getattr(config.settings(sec), "tasks", []) or []})
    files = {t: task_file(t) for t in specs}
    for sec in config.sections:
        files.update(SECTIONS[sec].data_files(config.settings(sec)))
    return {t: _digest(Path(f)) for t, f in sorted(files.items())}


def _digest(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, in sorted order)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else "").encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]

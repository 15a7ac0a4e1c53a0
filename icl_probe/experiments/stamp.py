"""An output directory's identity: where results go (refused when that is a file or not
writable), and the stamp (``config.json``) saying which config and which task files their
results come from, refused on a mismatch so that results never mix."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ExperimentError
from .config import Config
from .inputs import input_digests
from .labels import task_file
from .store import write_text


def output_dir(config: Config, out: str | Path | None) -> Path:
    """``out``, or ``runs/NAME-DIGEST``; refused when it names an existing file, or a place
    this process cannot write (before any work)."""
    path = Path(out) if out is not None else Path("runs") / f"{config.name}-{config.digest}"
    if path.exists() and not path.is_dir():
        raise ExperimentError(f"--out {path}: that is an existing file, not a directory; give "
                              "a new or existing directory for the results")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExperimentError(f"--out {path}: {probe} is not writable by this user; give a "
                              "directory you can write to (or fix its permissions)")
    return path


def check_stamp(out: Path, config: Config, inputs: dict[str, str]) -> bool:
    """Refuse an ``OUT`` that holds another config's results, or results of a task file whose
    contents have changed since (naming the file); True when OUT is stamped already. Writes
    nothing."""
    stamp = out / "config.json"
    if not stamp.is_file():
        return False
    try:
        old = json.loads(stamp.read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{stamp} is unreadable ({e}); delete {out} to start afresh, or "
                              "use another --out") from e
    if old.get("digest") != config.digest:
        raise ExperimentError(
            f"{out} holds results of a different config (digest {old.get('digest')}, this "
            f"one {config.digest}); use another --out, or delete {out}")
    before = old.get("inputs") or {}
    changed = [t for t in inputs if t in before and before[t] != inputs[t]]
    if changed:
        t = changed[0]
        raise ExperimentError(
            f"task file {task_file(t)} has changed since the results in {out} were computed "
            f"(sha256 {before[t]}... then, {inputs[t]}... now): resuming would mix results of "
            f"its old and new items{f' (and {len(changed) - 1} more changed)' if changed[1:] else ''}"
            f". Use another --out, or delete {out} to start afresh")
    return True


def stamp_output(out: Path, config: Config, inputs: dict[str, str] | None = None) -> None:
    """``OUT/config.json``: the validated config and the digests of the task files it read
    (refused when OUT holds another's results; see :func:`check_stamp`). A run writes it only
    with its first finished unit, so a run refused or failed before that leaves nothing."""
    inputs = input_digests(config) if inputs is None else inputs
    if check_stamp(out, config, inputs):
        return
    write_text(out / "config.json",
               json.dumps({"digest": config.digest, "name": config.name, "config": config.body,
                           "path": config.path, "inputs": inputs}, indent=2))


def stamped_config(out: str | Path) -> Config:
    """The config an output directory was written by (from its ``config.json``)."""
    stamp = Path(out) / "config.json"
    if not stamp.is_file():
        raise ExperimentError(f"{out} is not an experiment output directory (no config.json); "
                              "give the --out of an icl-probe run")
    s = json.loads(stamp.read_text())
    body = s["config"]
    return Config(s.get("name") or body["experiment"].get("name") or Path(out).name,
                  tuple(body["experiment"]["sections"]), body, s.get("path"))

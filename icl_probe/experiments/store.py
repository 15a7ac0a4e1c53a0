"""An experiment's output directory: atomic unit directories, their completion markers,
reading every finished unit back, and the lock that keeps two runs from computing the same
units.

Layout of ``OUT``::

    config.json                the validated config and its digest (written once validated)
    provenance/MODEL.json      where each model's results came from (see experiments.provenance)
    units/UNIT_ID/             one finished unit: its tables (*.csv), unit.json, COMPLETE
    units/.UNIT_ID.xxxx/       a unit being written (renamed into place when sealed)
    .lock, .lock.shard-I-of-N  the run (or shard) writing here, with its pid and host
    summary.csv, report.html   rebuilt from the finished units

A unit counts only when its ``COMPLETE`` marker, written last, matches the digest of the
files beside it, so a process killed at any point leaves nothing that is taken as finished.
Several processes (shards, job-array tasks) may write units into one directory at once: each
unit is renamed into place in one step, and each process cleans only its own leftovers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..errors import ExperimentError

COMPLETE = "COMPLETE"  # a unit's completion marker, written last: the digest of its files


_PLAIN = re.compile(r"[A-Za-z0-9._=+-]+")


def unit_id(section: str, unit: dict) -> str:
    """The unit's directory name: its section and every key, sorted (``icl_vs_gd__lr=0.01__
    method=dai__...``). Where a value is not plain (a path's ``/``, a space, ``__``), the
    readable part is squeezed and a digest of the exact unit follows (``__h=1a2b3c4d5e``), so
    two units never share a directory (``x/good.jsonl`` and ``x_good.jsonl`` did). Plain ids
    are unchanged, so output directories of earlier releases resume."""
    parts = [section] + [f"{k}={v}" for k, v in sorted(unit.items())]
    if all(_PLAIN.fullmatch(p) and "__" not in p for p in parts):
        return "__".join(parts)
    exact = json.dumps([section, sorted((k, str(v)) for k, v in unit.items())])
    readable = "__".join(re.sub(r"[^A-Za-z0-9._=+-]+", "_", p).replace("__", "_")
                         for p in parts)
    return f"{readable[:120]}__h={hashlib.sha256(exact.encode()).hexdigest()[:10]}"


def _files_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name != COMPLETE:
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def unit_finished(d: Path) -> bool:
    """A unit directory counts as finished only when its completion marker, written last,
    matches the digest of the files beside it (an empty or partial directory does not)."""
    marker = d / COMPLETE
    try:
        return marker.is_file() and marker.read_text().strip() == _files_digest(d)
    except (OSError, ValueError):  # unreadable, or not text (a garbage marker): not finished
        return False


def write_unit(root: Path, uid: str, tables: dict[str, pd.DataFrame], meta: dict) -> None:
    """All of a unit's tables appear at once or not at all: written into a temporary
    directory, sealed with the completion marker, then renamed into place."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{uid}.", dir=root))
    except OSError as e:
        raise disk_error(root, e) from e
    try:
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        (tmp / "unit.json").write_text(json.dumps(meta, indent=2, default=str))
        (tmp / COMPLETE).write_text(_files_digest(tmp))
        final = root / uid
        if final.exists():  # an unfinished leftover of an earlier run
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(root / uid, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finished_units(out: str | Path) -> list[Path]:
    units = Path(out) / "units"
    return [d for d in sorted(units.iterdir()) if not d.name.startswith(".")
            and d.is_dir() and unit_finished(d)] if units.is_dir() else []


def clean_leftovers(out: Path, uids: Iterable[str]) -> int:
    """Remove the temporary directories of interrupted writes of ``uids`` and their unit
    directories without a valid completion marker; returns how many were removed. Only the
    given units are touched: other processes may be writing theirs."""
    units = out / "units"
    mine = set(uids)
    n = 0
    for d in units.iterdir() if units.is_dir() else []:
        if not d.is_dir():
            continue
        name = d.name[1:].rsplit(".", 1)[0] if d.name.startswith(".") else d.name
        if name in mine and (d.name.startswith(".") or not unit_finished(d)):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def read_results(out: str | Path, uids: Iterable[str] | None = None
                 ) -> dict[str, dict[str, pd.DataFrame]]:
    """Every finished unit's tables (only those of ``uids`` when given), concatenated per
    section and table; each row carries its unit's keys (``model``, ``task``, ...) as
    columns."""
    res: dict[str, dict[str, list[pd.DataFrame]]] = {}
    dirs = finished_units(out) if uids is None else [
        d for d in (Path(out) / "units" / uid for uid in sorted(uids))
        if d.is_dir() and unit_finished(d)]
    for d in dirs:
        meta = json.loads((d / "unit.json").read_text())
        for f in sorted(d.glob("*.csv")):
            try:
                df = pd.read_csv(f)
            except pd.errors.EmptyDataError:
                continue
            for k, v in meta["unit"].items():
                if k not in df.columns and k != "stage":
                    df.insert(0, k, v)
            res.setdefault(meta["section"], {}).setdefault(f.stem, []).append(df)
    return {s: {t: pd.concat(v, ignore_index=True) for t, v in tabs.items()}
            for s, tabs in res.items()}


def disk_error(path: Path, error: OSError) -> ExperimentError:
    """A write that failed for want of space, quota or permission, as a clear error."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk (or your quota) is full"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "this user cannot write there (read-only, or permissions)"
    else:
        why = f"the write failed ({error.strerror or error})"
    return ExperimentError(f"writing {path}: {why}. Finished units are kept; free space or fix "
                           "the permissions and run the same command again to resume")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers see the old file or the new one); a
    failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, e) from e


def write_csv(path: Path, df: pd.DataFrame) -> None:
    write_text(path, df.to_csv(index=False))


# ------------------------------------------------------------------------------ locking


class Lock:
    """``OUT/.lock`` (a whole run) or ``OUT/.lock.shard-I-of-N`` (one shard) while a process
    writes to OUT. A run is refused when a live process holds a lock whose units overlap its
    own: the whole run overlaps everything, shards of one split overlap only themselves, and
    shards of different splits overlap each other. A lock whose process is gone (a killed
    run) is stale and taken over."""

    def __init__(self, out: Path, shard: tuple[int, int] | None = None):
        self.out = out
        self.shard = shard
        self.path = out / (".lock" if shard is None else f".lock.shard-{shard[0]}-of-{shard[1]}")

    @staticmethod
    def _shard_of(name: str) -> tuple[int, int] | None:
        if name == ".lock":
            return None
        i, _, n = name.removeprefix(".lock.shard-").partition("-of-")
        return int(i), int(n)

    def _overlaps(self, other: tuple[int, int] | None) -> bool:
        if self.shard is None or other is None:
            return True
        return other[1] != self.shard[1] or other[0] == self.shard[0]

    def _holder_alive(self, path: Path) -> tuple[bool, str]:
        """Whether the process holding the lock at ``path`` may still run, and who it is."""
        try:
            fields = path.read_text().split()
            pid_s, host, job = (fields + ["", "", "-"][len(fields):])[:3]
            pid = int(pid_s)
        except (OSError, ValueError):
            return False, "?"
        who = f"pid {pid}" + (f" on {host}" if host != platform.node() else "") + (
            f", job {job}" if job != "-" else "")
        if host == platform.node():
            return pid != os.getpid() and _alive(pid), who
        # another machine: its process cannot be checked from here, unless this is the same
        # scheduler job running again (a requeued job-array task)
        return job == "-" or job != _job_id(), who

    def __enter__(self) -> "Lock":
        for path in sorted(self.out.glob(".lock*")):
            try:
                other = self._shard_of(path.name)
            except ValueError:
                continue
            if not self._overlaps(other):
                continue
            alive, who = self._holder_alive(path)
            if alive:
                what = "a whole run" if other is None else f"shard {other[0]}/{other[1]}"
                raise ExperimentError(
                    f"{self.out} is in use by another icl-probe run ({what}, {who}) whose "
                    "units overlap this one's. Wait for it to finish, or give this run another "
                    f"--out (if that run is gone, delete {path})")
            if path != self.path:
                path.unlink(missing_ok=True)  # stale: its process is gone
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:  # another process took it in between
                alive, who = self._holder_alive(self.path)
                if alive:
                    raise ExperimentError(f"{self.out} is in use by another icl-probe run "
                                          f"({who}); wait for it, or use another --out") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {platform.node()} {_job_id()}\n")
            return self
        raise ExperimentError(f"could not take the lock {self.path}; remove it if no run is "
                              "active")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _job_id() -> str:
    """The scheduler's id of this job (a Slurm array task: JOB_TASK), or "-"."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID", "-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

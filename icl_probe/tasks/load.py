"""One entry point for every task spec: a shipped task's name, the path of a task file, or an
anchor dataset's local copy written ``name:path`` (``agnews:/data/ag_news/train.csv``; see
docs/datasets.md)."""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import TaskFileError
from .datasets import ANCHOR_DATASETS, load_anchor_dataset
from .task import DATA_DIR, Task, read_task_file, shipped_tasks


def load_task(name_or_path: str | Path | Task) -> Task:
    """A shipped task by name (``ip.load_task("capital")``), a task file by path, or an
    anchor dataset from a local copy, ``"sst2:path/to/sst2.jsonl"`` (read once per file
    version: a spec is loaded many times in a run)."""
    if isinstance(name_or_path, Task):
        return name_or_path
    text = str(name_or_path)
    shipped = DATA_DIR / f"{text}.jsonl"
    if "/" not in text and shipped.is_file():
        return read_task_file(shipped)
    name, sep, rest = text.partition(":")
    if sep and name.lower().replace("-", "").replace("_", "") in ANCHOR_DATASETS:
        path = Path(rest).expanduser()
        if not path.exists():
            raise TaskFileError(f"load_task({text!r}): {path} does not exist (an anchor "
                                f"dataset's local copy, {name}:PATH; docs/datasets.md)")
        stat = path.stat()
        return _anchor(name, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    path = Path(text).expanduser()
    if path.is_file():
        return read_task_file(path)
    raise TaskFileError(
        f"load_task({text!r}): no shipped task of that name and no such file. "
        f"Shipped tasks: {', '.join(shipped_tasks())}; or pass the path of a .jsonl task file, "
        f"or an anchor dataset's local copy as NAME:PATH (NAME one of "
        f"{', '.join(sorted(ANCHOR_DATASETS))}; docs/datasets.md)"
    )


@functools.lru_cache(maxsize=16)
def _anchor(name: str, path: str, mtime_ns: int, size: int) -> Task:
    """An anchor dataset's copy, cached per (path, modification time, size): a Task is frozen."""
    return load_anchor_dataset(name, path)

"""The name each of a section's tasks carries in tables and the report, and the file each task
spec reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from ..tasks import Task, load_task


def task_labels(tasks: Iterable[str]) -> dict[str, str]:
    """The name each of a section's tasks carries in tables and the report: its header name,
    or, where two sources share a header name, ``name (source)``. A task's identity is its
    source (the shipped name or the file's path, as the config gives it), never its header,
    so two files that both call themselves ``sentiment`` are never pooled."""
    names = {t: load_task(t).name for t in tasks}
    count: dict[str, int] = {}
    for n in names.values():
        count[n] = count.get(n, 0) + 1
    return {t: n if count[n] == 1 else f"{n} ({t})" for t, n in names.items()}


def labeled_task(spec: str, tasks: Iterable[str]) -> Task:
    """The task of ``spec``, named by :func:`task_labels` among ``tasks``."""
    return dataclasses.replace(load_task(spec), name=task_labels(tasks)[spec])


def task_file(spec: str) -> Path:
    """The file a task spec reads (a shipped task's own file, or the path given)."""
    task = load_task(spec)
    return Path(task.path) if task.path else Path(spec)

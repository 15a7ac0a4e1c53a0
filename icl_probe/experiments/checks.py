"""Checks of a section's settings against the tasks it reads, made before any model loads."""

from __future__ import annotations

from ..errors import ConfigError
from ..tasks import load_task


def need(cond: bool, where: str, message: str) -> None:
    """Raise :class:`ConfigError` ``where: message`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{where}: {message}")


def task_size(spec: str, where: str) -> int:
    """The number of items of task ``spec``, which must hold a demonstration and a query."""
    n = len(load_task(spec))
    need(n >= 2, where, f"has {n} item; a prompt needs at least one demonstration and a query")
    return n


def task_sizes_by_split(spec: str, where: str) -> dict[str, int]:
    """The number of items in each split of task ``spec`` (docs/protocol.md, Splits)."""
    task_size(spec, where)
    task = load_task(spec)
    return {name: len(task.split(name)) for name in ("train", "dev", "test")}


def check_split_sizes(section: str, tasks: list[str], wants: list[tuple[str, int, str]],
                      where: str) -> None:
    """Each ``(key, n, split)`` of ``wants`` against each task: ``n`` items drawn from its
    ``split`` (docs/protocol.md, Splits) must be there."""
    for spec in tasks:
        sizes = task_sizes_by_split(spec, f"{where} [{section}] tasks: {spec!r}")
        for key, n, split in wants:
            need(n <= sizes[split], f"{where} [{section}] {key}",
                 f"{n}, but task {spec!r} has {sizes[split]} items in its {split} split "
                 f"(docs/protocol.md, Splits); use {key} <= {sizes[split]}")


def check_prompt_sizes(section: str, tasks: list[str], k: int, k_key: str, queries: int,
                       queries_key: str, where: str) -> None:
    """``k`` demonstrations and ``queries`` prompts drawn from each task: the query is never
    its own demonstration, so a task of n items allows ``k <= n - 1`` and ``queries <= n``."""
    for spec in tasks:
        n = task_size(spec, f"{where} [{section}] tasks: {spec!r}")
        need(k < n, f"{where} [{section}] {k_key}", f"{k} demonstrations, but task {spec!r} has "
             f"{n} items (the query is never its own demonstration); use at most {n - 1}")
        need(queries <= n, f"{where} [{section}] {queries_key}", f"{queries}, but task "
             f"{spec!r} has {n} items; use at most {n}")

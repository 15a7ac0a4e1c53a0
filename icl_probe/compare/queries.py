"""Which queries a comparison evaluates and which demonstrations it shows: the test and dev
queries, the shared protocol's demonstration set, and the label reading point."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import CompareError
from ..prompts import PromptPair, Spans
from ..tasks import Task


def resolve_queries(task: Task, queries: Any, split: str) -> list[int]:
    """``None``: every item of ``split``; an int n: its first n items; else item indices."""
    pool = list(task.split(split))
    if queries is None:
        return pool
    if isinstance(queries, (int, np.integer)) and not isinstance(queries, bool):
        if queries < 1:
            raise CompareError(f"queries={queries}: expected at least 1")
        if queries > len(pool):
            raise CompareError(f"queries={queries}: task {task.name!r} has {len(pool)} items in "
                               f"its {split} split; ask for at most that many")
        return pool[:queries]
    out = [int(q) for q in queries]
    bad = [q for q in out if not 0 <= q < len(task)]
    if bad or not out:
        raise CompareError(f"queries={out[:5]}...: item indices must lie in 0..{len(task) - 1}")
    return out


def demonstrations(task: Task, k: int, seed: int, *, balanced: bool = False,
                   exclude: Iterable[int] = ()) -> list[int]:
    """The shared protocol's demonstration set: the first ``k`` items of the task's train
    split shuffled with ``seed`` (Dai et al.); ``balanced`` takes the same number per label.
    Items in ``exclude`` (the queries) are never drawn."""
    ex = set(exclude)
    pool = [i for i in task.split("train") if i not in ex]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if k > len(pool):
        raise CompareError(f"k={k}: task {task.name!r} has {len(pool)} demonstration items in "
                           "its train split; use a smaller k")
    if not balanced or not task.is_classification:
        return pool[:k]
    per, extra = divmod(k, len(task.labels))
    want = {lab: per + (i < extra) for i, lab in enumerate(task.labels)}
    out = []
    for i in pool:
        if want[task.items[i].y] > 0:
            want[task.items[i].y] -= 1
            out.append(i)
    return out


def _at_label(pair: PromptPair) -> PromptPair:
    """``pair`` with the first candidate label's first token appended to both prompts: Dai's
    reading point, one position after the prediction position."""
    tok = pair.label_ids[:1]

    def grow(spans: Spans, n: int) -> Spans:
        return dataclasses.replace(spans, pred=n)

    return dataclasses.replace(
        pair, icl_ids=torch.cat([pair.icl_ids, tok]), zs_ids=torch.cat([pair.zs_ids, tok]),
        spans=grow(pair.spans, len(pair.icl_ids)), zs_spans=grow(pair.zs_spans, len(pair.zs_ids)),
        meta={**pair.meta, "position": "label"})


def _strip_label(pair: PromptPair) -> PromptPair:
    return dataclasses.replace(pair, icl_ids=pair.icl_ids[:-1], zs_ids=pair.zs_ids[:-1])

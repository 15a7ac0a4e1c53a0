"""Task vectors (Hendel, Geva and Globerson 2023): ICL compressed into one hidden state.

The hidden state entering block L (``hook_resid_pre``) at the prediction position of ICL
prompts, averaged over several prompts (each with its own demonstrations and a dummy query
from the demonstration pool), replaces the same hidden state of zero-shot prompts of new
queries. If the context acts as one vector, the patched zero-shot forward answers as ICL does.
The layer is chosen on dev queries; the test queries report its accuracy beside zero-shot and
ICL, with 95 % intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..compare.stats import bootstrap_ci
from ..errors import CausalError
from ..hooks import Patch, patching, predictions, resolve_layers, trace
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task

BATCH = 32  # zero-shot prompts per patched forward


@dataclass
class VectorResult:
    """``vectors`` (layer d_model, float32, on the CPU): one per layer tried; ``per_layer``:
    accuracy per split and layer; ``layer``: the one chosen on the dev queries; ``summary``:
    test accuracy of zero-shot, ICL and the vector at ``layer``, with intervals."""

    method: str
    vectors: torch.Tensor
    layers: tuple[int, ...]
    per_layer: pd.DataFrame
    layer: int
    summary: pd.DataFrame


def task_vector(model: Any, task: Any, *, k: int = 5, prompts: int = 8, queries: int = 32,
                dev_queries: int = 16, layers: Sequence[int] | None = None, seed: int = 0,
                progress: bool | None = None) -> VectorResult:
    """Hendel et al.'s task vector of ``task`` at every layer in ``layers`` (default all):
    the mean of ``resid_pre`` at the prediction position over ``prompts`` ICL prompts of ``k``
    demonstrations, each with a dummy query from the train split; patched into the zero-shot
    prompts of ``dev_queries`` dev queries (which choose the layer) and ``queries`` test
    queries."""
    task = load_task(task)
    _check_counts(k=k, prompts=prompts, queries=queries, dev_queries=dev_queries)
    layer_list = resolve_layers(layers, model.cfg.n_layers, "task_vector", CausalError)
    train = task.split("train")
    if len(train) < prompts or len(train) <= k:
        raise CausalError(f"task_vector: task {task.name!r} has {len(train)} train items; "
                          f"prompts={prompts} dummy queries and k={k} demonstrations need more")
    dummy = [build_prompt(model, task, q, k, seed=seed + i, pool=train)
             for i, q in enumerate(train[:prompts])]
    rec = trace(model, dummy, what=("resid_pre",), layers=layer_list, weights=False)
    vectors = rec.at_pred("resid_pre").mean(1).float().cpu()  # layer d_model
    splits = {"dev": task.split("dev")[:dev_queries], "test": task.split("test")[:queries]}
    rows, hits = [], {}
    bar = tqdm(total=2 * len(layer_list), desc=f"task vector {task.name}", unit="layer",
               disable=not (progress or progress is None and len(layer_list) > 8))
    for split, qs in splits.items():
        pairs = [build_prompt(model, task, q, k, seed=seed + q, pool=train) for q in qs]
        hits[(split, "zero_shot")] = patched_hits(model, pairs, None)
        hits[(split, "icl")] = patched_hits(model, pairs, None, kind="icl")
        for li, l in enumerate(layer_list):
            hits[(split, l)] = patched_hits(model, pairs, (f"blocks.{l}.hook_resid_pre",
                                                           vectors[li]))
            rows.append({"split": split, "layer": l, "accuracy": hits[(split, l)].mean(),
                         "n": len(pairs)})
            bar.update()
    bar.close()
    per_layer = pd.DataFrame(rows)
    dev = per_layer[per_layer.split == "dev"]
    best = int(dev.layer.iloc[int(np.argmax(dev.accuracy.to_numpy()))])  # ties: earliest
    summary = accuracy_rows(task.name, {"zero_shot": hits[("test", "zero_shot")],
                                        "icl": hits[("test", "icl")],
                                        "task_vector": hits[("test", best)]}, seed)
    summary["layer"] = [None, None, best]
    return VectorResult("task_vector", vectors, layer_list, per_layer, best, summary)


def patched_hits(model: Any, pairs: Sequence[PromptPair], patch: tuple[str, torch.Tensor] | None,
                 kind: str = "zs") -> np.ndarray:
    """Whether each prompt's prediction is its gold answer, with ``patch`` (a hook name and a
    vector) replacing that hook's value at each prompt's prediction position (None: as is).
    Answers scored whole run each candidate whole under the same patch."""
    logits = patched_logits(model, pairs, patch, kind)
    if patch is None:  # nothing patched: answers scored whole on the prompt's cache
        picks = predictions(model, pairs, kind, logits)
        return (picks.numpy() == np.array([p.target for p in pairs])).astype(float)
    picks = torch.empty(len(pairs), dtype=torch.long)
    first = [b for b, p in enumerate(pairs) if p.scoring != "full_answer"]
    if first:
        picks[first] = predictions(model, [pairs[b] for b in first], kind, logits[first])
    for b, p in enumerate(pairs):
        if p.scoring == "full_answer":
            with patching(model, {patch[0]: Patch(patch[1], positions=[len(p.ids(kind)) - 1])}):
                picks[b] = predictions(model, [p], kind, logits[b: b + 1], fast=False)[0]
    return (picks.numpy() == np.array([p.target for p in pairs])).astype(float)


def patched_logits(model: Any, pairs: Sequence[PromptPair], patch: tuple[str, torch.Tensor] | None,
                   kind: str = "zs") -> torch.Tensor:
    """The logits at each prompt's prediction position (batch d_vocab, float32 on the CPU),
    in right-padded batches, ``patch`` applied at that position of every row."""
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(pairs), BATCH):
        ids = [p.ids(kind) for p in pairs[lo: lo + BATCH]]
        last = [len(x) - 1 for x in ids]
        batch = torch.zeros(len(ids), max(last) + 1, dtype=torch.long)
        for r, x in enumerate(ids):
            batch[r, : len(x)] = x
        patches = {} if patch is None else {patch[0]: [
            Patch(patch[1], rows=[r], positions=[p]) for r, p in enumerate(last)]}
        with torch.inference_mode(), patching(model, patches):
            logits = model(batch.to(device))
        out.append(logits[torch.arange(len(ids)), torch.tensor(last)].float().cpu())
    return torch.cat(out)


def accuracy_rows(task: str, hits: dict[str, np.ndarray], seed: int) -> pd.DataFrame:
    """One tidy row per hypothesis: its accuracy with a 95 % bootstrap interval."""
    rows = []
    for name, h in hits.items():
        lo, hi = bootstrap_ci(h, seed=seed)
        rows.append({"task": task, "hypothesis": name, "metric": "accuracy",
                     "value": float(h.mean()), "ci_low": lo, "ci_high": hi, "n": len(h)})
    return pd.DataFrame(rows)


def _check_counts(**counts: Any) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CausalError(f"{name}={v!r}: expected an integer >= 1")

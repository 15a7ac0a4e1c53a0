"""Task vectors (Hendel, Geva and Globerson 2023): ICL compressed into one hidden state.

Each query's own demonstrations, followed by a dummy query from the demonstration pool, run
as an ICL prompt; the hidden state leaving block L at the prediction position, averaged over
``dummies`` dummy queries, is that query's task vector. It replaces the same hidden state of
the query's zero-shot prompt, at its prediction position. If the demonstrations act through
that one vector, the patched zero-shot forward answers as ICL with those demonstrations does.
The layer is chosen on dev queries; the test queries report its accuracy beside zero-shot
and ICL (the same demonstrations), with 95 % intervals. This follows the authors' code
(roeehendel/icl_task_vectors, single-context task hiddens: one vector per test prompt, two
dummy queries); ``shared=True`` instead uses one vector for every query, the mean over all
of a split's dummy prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..compare.stats import bootstrap_ci, paired_difference, verdict
from ..errors import CausalError
from ..hooks import Patch, patching, predictions, resolve_layers
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task
from .patches import at_pred, batches, wide

BATCH = 32  # prompts per forward
HIDDEN = "blocks.{l}.hook_resid_post"  # the hidden state leaving block l


@dataclass
class VectorResult:
    """``per_layer``: accuracy per split and layer; ``layer``: the one chosen on the dev
    queries; ``summary``: test accuracy of zero-shot, ICL and the vector at ``layer``, with
    intervals; ``vectors``: the test queries' vectors at ``layer`` (query d_model, float32; one
    row for a function vector); ``heads``: a function vector's heads, with their effects."""

    method: str
    layers: tuple[int, ...]
    per_layer: pd.DataFrame
    layer: int
    summary: pd.DataFrame
    vectors: torch.Tensor
    heads: pd.DataFrame | None = None


def task_vector(model: Any, task: Any, *, k: int = 5, dummies: int = 2, queries: int = 32,
                dev_queries: int = 16, layers: Sequence[int] | None = None, seed: int = 0,
                shared: bool = False, progress: bool | None = None) -> VectorResult:
    """Hendel et al.'s task vectors of ``task`` at every block in ``layers`` (default all),
    from ``k`` demonstrations per query (the train split, seeded by ``seed`` + query) and
    ``dummies`` dummy queries each; ``dev_queries`` dev queries choose the block, ``queries``
    test queries report it."""
    task = load_task(task)
    _check_counts(k=k, dummies=dummies, queries=queries, dev_queries=dev_queries)
    layer_list = resolve_layers(layers, model.cfg.n_layers, "task_vector", CausalError)
    train = task.split("train")
    if len(train) < k + dummies:
        raise CausalError(f"task_vector: task {task.name!r} has {len(train)} train items; "
                          f"k={k} demonstrations and dummies={dummies} dummy queries need more")
    rows, hits, kept = [], {}, {}
    bar = tqdm(total=2 * len(layer_list), desc=f"task vector {task.name}", unit="layer",
               disable=not (progress or progress is None and len(layer_list) > 8))
    for split, qs in (("dev", task.split("dev")[:dev_queries]),
                      ("test", task.split("test")[:queries])):
        pairs = [build_prompt(model, task, q, k, seed=seed + q, pool=train) for q in qs]
        vecs = _vectors(model, task, pairs, train, dummies, layer_list, seed, shared)
        hits[(split, "zero_shot")] = patched_hits(model, pairs, None)
        hits[(split, "icl")] = patched_hits(model, pairs, None, kind="icl")
        for li, l in enumerate(layer_list):
            hits[(split, l)] = patched_hits(model, pairs, (HIDDEN.format(l=l), vecs[:, li]))
            rows.append({"split": split, "layer": l, "accuracy": hits[(split, l)].mean(),
                         "n": len(pairs)})
            bar.update()
        kept[split] = vecs
    bar.close()
    per_layer, best, summary = chosen_layer("task_vector", task.name, rows, hits, seed)
    return VectorResult("task_vector", layer_list, per_layer, best, summary,
                        kept["test"][:, layer_list.index(best)].float().cpu())


def chosen_layer(method: str, task: str, rows: list[dict], hits: dict, seed: int
                 ) -> tuple[pd.DataFrame, int, pd.DataFrame]:
    """The per-layer table, the block with the best dev accuracy (the earliest on a tie), and
    the test summary: zero-shot, ICL and ``method`` at that block."""
    per_layer = pd.DataFrame(rows)
    dev = per_layer[per_layer.split == "dev"]
    best = int(dev.layer.iloc[int(np.argmax(dev.accuracy.to_numpy()))])
    summary = accuracy_rows(task, {"zero_shot": hits[("test", "zero_shot")],
                                   "icl": hits[("test", "icl")], method: hits[("test", best)]},
                            seed)
    summary["layer"] = [None, None, best]
    return per_layer, best, summary


def _vectors(model: Any, task: Any, pairs: list[PromptPair], train: Sequence[int],
             dummies: int, layers: Sequence[int], seed: int, shared: bool) -> torch.Tensor:
    """Per query (query layer d_model): the mean hidden state leaving each block at the
    prediction position of its demonstrations followed by each of ``dummies`` dummy queries
    (train items, not among its demonstrations); ``shared``: the mean over every query's."""
    dummy_pairs = []
    for p in pairs:
        rng = np.random.default_rng([seed, p.query])
        pool = [i for i in train if i not in p.demos]
        for q in rng.choice(pool, size=dummies, replace=False).tolist():
            dummy_pairs.append(build_prompt(model, task, q, demos=list(p.demos)))
    h = hidden_at_pred(model, dummy_pairs, layers, "icl")  # query*dummies layer d_model
    h = h.view(len(pairs), dummies, *h.shape[1:]).mean(1)
    return h.mean(0, keepdim=True).expand_as(h) if shared else h


def hidden_at_pred(model: Any, pairs: Sequence[PromptPair], layers: Sequence[int],
                   kind: str = "icl") -> torch.Tensor:
    """The hidden state leaving each of ``layers`` at each prompt's prediction position
    (batch layer d_model), in right-padded batches."""
    return at_pred(model, pairs, layers, HIDDEN, kind).transpose(0, 1)


def patched_hits(model: Any, pairs: Sequence[PromptPair],
                 patch: tuple[str, torch.Tensor] | None, kind: str = "zs",
                 mode: str = "replace") -> np.ndarray:
    """Whether each prompt's prediction is its gold answer, with ``patch`` (a hook name and
    one vector per prompt, batch d_model) replacing that hook's value at each prompt's
    prediction position (None: as is; ``mode="add"``: added to it). Answers scored whole run
    each candidate whole under the same patch."""
    logits = patched_logits(model, pairs, patch, kind, mode)
    if patch is None:  # nothing patched: answers scored whole on the prompt's cache
        picks = predictions(model, pairs, kind, logits)
    else:
        picks = torch.empty(len(pairs), dtype=torch.long)
        first = [b for b, p in enumerate(pairs) if p.scoring != "full_answer"]
        if first:
            picks[first] = predictions(model, [pairs[b] for b in first], kind, logits[first])
        for b, p in enumerate(pairs):
            if p.scoring == "full_answer":
                at = Patch(patch[1][b], positions=[len(p.ids(kind)) - 1], mode=mode)
                with patching(model, {patch[0]: at}):
                    picks[b] = predictions(model, [p], kind, logits[b: b + 1], fast=False)[0]
    return (picks.numpy() == np.array([p.target for p in pairs])).astype(float)


def patched_logits(model: Any, pairs: Sequence[PromptPair],
                   patch: tuple[str, torch.Tensor] | None, kind: str = "zs",
                   mode: str = "replace") -> torch.Tensor:
    """The logits at each prompt's prediction position (batch d_vocab, on the CPU; float32, or
    float64 for a float64 model), in right-padded batches, ``patch`` (a hook name, one vector
    per prompt) applied there."""
    device = next(model.parameters()).device
    out, lo = [], 0
    for ids, last in batches(pairs, kind, BATCH):
        patches = {} if patch is None else {patch[0]: [
            Patch(patch[1][lo + r], rows=[r], positions=[int(p)], mode=mode)
            for r, p in enumerate(last)]}
        with torch.inference_mode(), patching(model, patches):
            logits = model(ids.to(device))
        at_p = logits[torch.arange(len(last)), last.to(logits.device)]
        out.append(at_p.to(wide(logits.dtype)).cpu())
        lo += len(last)
    return torch.cat(out)


def accuracy_rows(task: str, hits: dict[str, np.ndarray], seed: int) -> pd.DataFrame:
    """One tidy row per hypothesis: its accuracy with a 95 % bootstrap interval and, beside
    ``zero_shot``'s, its verdict against it (the paired difference over the same queries)."""
    rows = []
    for name, h in hits.items():
        lo, hi = bootstrap_ci(h, seed=seed)
        row = {"task": task, "hypothesis": name, "metric": "accuracy", "value": float(h.mean()),
               "ci_low": lo, "ci_high": hi, "n": len(h)}
        if name != "zero_shot" and "zero_shot" in hits:
            row["vs_zero_shot"] = verdict(*paired_difference(h, hits["zero_shot"],
                                                             seed=seed)[1:])
        rows.append(row)
    return pd.DataFrame(rows)


def _check_counts(**counts: Any) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CausalError(f"{name}={v!r}: expected an integer >= 1")

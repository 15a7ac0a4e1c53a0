"""ICL against fine-tuning as the anchors ran it: :func:`compare`.

**The shared protocol** (``protocol="shared"``, the default; Dai et al.'s and Deutch et al.'s
code). For each seed, one demonstration set: the first ``k`` items of the task's train split
shuffled with that seed (``Task.split``; the pool is disjoint from the evaluation queries).
It is prepended to every query (ICL), and one fine-tune per (seed, method, learning rate)
trains on it; every query is then evaluated with that one fine-tuned model (FT). The ICL
prompts of a seed share their demonstration prefix, which runs once
(:func:`icl_probe.hooks.trace_shared_prefix`). ``protocol="per_query"`` draws each query its
own demonstrations (seed ``seed + query``) and fine-tunes once per query: more expensive, kept
for studies of per-query variation.

**Learning rate.** With several ``lrs`` each method is fine-tuned at every rate and seed; the
rate with the best FT accuracy on the dev split's queries (ties: the higher mean log-probability
of the gold answer) is *selected*, and the baselines run at it. Diverged runs (non-finite,
a rising loss, a collapsed output) never get selected and are left out of every metric.

**Baselines** (Deutch et al.), each run through the same pipeline: ``shuffled_labels``
(demonstrations with permuted labels), ``untrained`` (the architecture with random weights),
``embeddings_only`` (random weights but the trained embeddings, norms and unembedding);
per query and layer: a random update direction (``random_update``) and Dai's ``U[0, 1)``
vector (``uniform_random``); for SimAM_after, SimAM_before.

**Statistics.** Every number carries a 95 % bootstrap interval over queries (pooled over
seeds: the interval does not include the variation between demonstration sets, which the
per-seed rows of ``per_query`` show), and every similarity its paired difference to each
baseline with an interval and a verdict (:mod:`icl_probe.compare.stats`).

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> t = ip.compare(model, "capital", k=2, queries=3, gd=ip.FineTuneConfig(lr=1e-2),
...                baselines=(), progress=False)
>>> sorted(t.per_query.run.unique())
['model']
>>> {"value", "ci_low", "ci_high", "n"} <= set(t.summary.columns)
True
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import CompareError
from ..gd import FineTuneConfig, as_configs, finetune
from ..models import untrained_copy
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task
from .evaluation import _dev_rows, _evaluate
from .queries import demonstrations, resolve_queries
from .references import _reference_runs, _Refs
from .summary import compact_table, lr_grid, select_lr, summarise, sweep_rows
from .vocabulary import BASELINES, POSITIONS, PROTOCOLS


@dataclass
class Tables:
    """The comparison's tidy tables.

    ``summary``: task, method, lr, selected, run, metric, baseline, layer (-1 = mean over
    layers), value, ci_low, ci_high, n; a row with ``baseline`` set is the paired difference
    ours − baseline, with ``verdict``. ``table``: the compact per-task view (rows = metrics).
    ``per_query``: every query's three runs (correctness, FT status, output similarity), with
    its ``seed`` and ``demos`` (the demonstrations' item indices in prompt order; ``query``
    and ``demos`` index the same task items);
    ``per_layer`` and ``per_head``: layer- and head-wise metrics; ``sweep``: one row per
    (method, lr, seed) with dev and test accuracy, the fixes FT makes and divergence."""

    summary: pd.DataFrame
    table: pd.DataFrame
    per_query: pd.DataFrame
    per_layer: pd.DataFrame
    per_head: pd.DataFrame
    sweep: pd.DataFrame
    finetunes: int = 0


BUILT = "_icl_probe_built_baseline"  # marks the random-weight models a Comparison built


class Comparison:
    """The pieces of :func:`compare`, for callers (the experiment runner) that schedule the
    settings themselves. ZS/ICL runs and demonstration sets are computed once per (variant,
    seed, split) and reused by every method and rate; ``finetunes`` counts fine-tunes."""

    def __init__(self, model: Any, task: Any, *, k: int = 32, queries: Any = None,
                 dev_queries: Any = None, protocol: str = "shared", position: str = "pred",
                 balanced: bool = False, baseline_models: dict[str, Any] | None = None,
                 model_seed: int = 0, progress: bool | None = None):
        if protocol not in PROTOCOLS:
            raise CompareError(f"protocol={protocol!r}: expected one of {PROTOCOLS}")
        if position not in POSITIONS:
            raise CompareError(f"position={position!r}: expected one of {POSITIONS}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CompareError(f"k={k!r}: expected an integer >= 1 demonstrations")
        self.model, self.task, self.k = model, load_task(task), k
        self.protocol, self.position, self.balanced = protocol, position, balanced
        self.queries = resolve_queries(self.task, queries, "test")
        self.dev_queries = resolve_queries(self.task, dev_queries, "dev")
        # not copied: a caller may share one dict (and the models built into it) across tasks
        self.models = baseline_models if baseline_models is not None else {}
        self.model_seed, self.progress = model_seed, progress
        self._refs: dict[tuple, _Refs] = {}
        self._pairs: dict[tuple, list[PromptPair]] = {}
        self.finetunes = 0

    # -- variants and prompts
    def variant_model(self, run: str) -> Any:
        if run in ("model", "shuffled_labels"):
            return self.model
        if run not in self.models:
            if run not in ("untrained", "embeddings_only"):
                raise CompareError(f"baseline {run!r}: expected one of {BASELINES} or a name "
                                   "given in baseline_models")
            # one random-weight model at a time: the other is dropped (rebuilt, identical from
            # its seed, if a later unit needs it); models given in baseline_models stay
            for name in [n for n, m in self.models.items() if getattr(m, BUILT, False)]:
                del self.models[name]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            keep = "none" if run == "untrained" else "embeddings"
            built = untrained_copy(self.model, keep, seed=self.model_seed)
            built.__dict__[BUILT] = True
            self.models[run] = built
        return self.models[run]

    def pairs(self, run: str, seed: int, split: str) -> list[PromptPair]:
        key = (run, seed, split)
        if key not in self._pairs:
            given = self.models.get(run)
            if run in ("untrained", "embeddings_only") and (
                    given is None or getattr(given, BUILT, False)):
                model = self.model  # built here: the same tokenizer, context and BOS rule
            else:
                model = self.variant_model(run)  # a model the caller gave tokenizes its own
            queries = self.queries if split == "test" else self.dev_queries
            shuffle = run == "shuffled_labels"
            if self.protocol == "shared":
                # one set for the seed, whatever the split: test and dev queries both excluded
                demos = demonstrations(self.task, self.k, seed, balanced=self.balanced,
                                       exclude=self.queries + self.dev_queries)
                # with explicit demonstrations build_prompt's label permutation depends on the
                # seed alone: every query of the seed gets the same one (the prefix stays shared)
                out = [build_prompt(model, self.task, q, demos=demos, seed=seed,
                                    shuffle_labels=shuffle) for q in queries]
            else:
                out = [build_prompt(model, self.task, q, self.k, seed + q, balanced=self.balanced,
                                    shuffle_labels=shuffle, pool=self.task.split("train"))
                       for q in queries]
            self._pairs[key] = out
        return self._pairs[key]

    def refs(self, run: str, seed: int, split: str) -> _Refs:
        key = (run, seed, split)
        if key not in self._refs:
            for held in self._refs.values():  # zero-shot k and v: the newest set's alone
                held.zs_kv = None
            self._refs[key] = _reference_runs(self.variant_model(run), self.pairs(run, seed, split),
                                              self.protocol, self.position)
        return self._refs[key]

    # -- one setting
    def run(self, cfg: FineTuneConfig, seed: int, run: str = "model",
            splits: Sequence[str] = ("test",)) -> dict[str, pd.DataFrame]:
        """Fine-tune once (shared protocol) or once per query, and evaluate ``splits``: every
        metric on the test queries; FT accuracy and the gold answer's log-probability on the
        dev queries (what the learning-rate choice needs). Returns the per_query, per_layer
        and per_head tables and ``finetune`` (one row per fine-tune)."""
        model = self.variant_model(run)
        out: dict[str, list] = {"per_query": [], "per_layer": [], "per_head": [], "finetune": []}
        gen = torch.Generator().manual_seed(seed)
        shared = None
        for split in splits:
            pairs = self.pairs(run, seed, split)
            keys = {"task": self.task.name, "method": cfg.name, "lr": cfg.lr, "seed": seed,
                    "run": run, "split": split}
            if self.protocol == "shared":
                # the same demonstrations serve every split: one fine-tune
                if shared is None:
                    shared = finetune(model, pairs[0], **cfg.kwargs(), seed=seed)
                    self.finetunes += 1
                    out["finetune"].append(_ft_row(keys, shared))
                fts = [shared]
            else:
                fts = []
                for p in tqdm(pairs, desc=f"fine-tune {cfg.name}", unit="query",
                              disable=not self.progress):
                    fts.append(finetune(model, p, **cfg.kwargs(), seed=seed))
                    self.finetunes += 1
                    out["finetune"].append(_ft_row(keys, fts[-1]))
            if split == "test":
                q, l, h = _evaluate(model, self.refs(run, seed, split), fts, cfg, gen=gen,
                                    keys=keys, position=self.position)
                out["per_layer"] += l
                out["per_head"] += h
            else:
                q = _dev_rows(pairs, fts, keys)
            out["per_query"] += q
        return {k: pd.DataFrame(v) for k, v in out.items()}


def _ft_row(keys: dict, ft: Any) -> dict:
    return {**keys, "steps": len(ft.losses),
            "first_loss": ft.losses[0] if ft.losses else np.nan,
            "final_loss": ft.losses[-1] if ft.losses else np.nan,
            "diverged": ft.diverged, "divergence": ft.divergence or ""}


def compare(model: Any, task: Any, *, k: int = 32, queries: Any = None,
            seeds: Sequence[int] = (0,), gd: Any = None, lrs: Any = None,
            dev_queries: Any = None, protocol: str = "shared",
            baselines: Sequence[str] = BASELINES, baseline_models: dict[str, Any] | None = None,
            position: str = "pred", balanced: bool = False, progress: bool | None = None,
            anchors: pd.DataFrame | None = None) -> Tables:
    """ZS, ICL and FT runs of ``task`` and every comparison metric, beside its baselines,
    with intervals (see the module docstring for the protocol).

    ``k``: demonstrations (Dai: 32); ``queries``: ``None`` (the test split), an int (its
    first n) or item indices; ``seeds``: one demonstration set and fine-tune each; ``gd``: a
    :class:`FineTuneConfig` or a list (one per method); ``lrs``: a learning-rate sweep (each
    method fine-tuned at every rate; the dev split's queries pick one, the baselines run at
    it; a dict gives each method its own rates, see :func:`lr_grid`); ``dev_queries``: as
    ``queries``, for the dev split; ``baselines``: baseline runs
    (:data:`BASELINES`, or names of ``baseline_models``); ``position``: ``"pred"`` (the
    prediction position) or ``"label"`` (Dai's reading point, one token later)."""
    configs = as_configs(gd, where="compare(gd=...)", error=CompareError)
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds:
        raise CompareError("seeds=[]: give at least one seed")
    grid = lr_grid(lrs, [c.name for c in configs])
    unknown = [b for b in baselines if b not in BASELINES and b not in (baseline_models or {})]
    if unknown:
        raise CompareError(f"baselines={list(baselines)}: unknown {unknown}; expected some of "
                           f"{BASELINES} or names given in baseline_models")
    c = Comparison(model, task, k=k, queries=queries, dev_queries=dev_queries, protocol=protocol,
                   position=position, balanced=balanced,
                   baseline_models=dict(baseline_models or {}),
                   model_seed=seeds[0], progress=progress)
    tables: dict[str, list[pd.DataFrame]] = {"per_query": [], "per_layer": [], "per_head": [],
                                             "finetune": []}

    def add(t: dict[str, pd.DataFrame]) -> None:
        for name, df in t.items():
            tables[name].append(df)

    sweep_settings = [(dataclasses.replace(cfg, lr=lr), s) for cfg in configs
                      for lr in grid.get(cfg.name, [cfg.lr]) for s in seeds]
    bar = tqdm(total=len(sweep_settings) + len(configs) * len(seeds) * len(baselines),
               desc=f"compare {c.task.name}", unit="fine-tune",
               disable=not (progress or progress is None and len(sweep_settings) > 2))
    splits = ("test", "dev") if any(len(v) > 1 for v in grid.values()) else ("test",)
    for cfg, s in sweep_settings:
        add(c.run(cfg, s, "model", splits))
        bar.update()
    per_query = pd.concat(tables["per_query"], ignore_index=True)
    ft_rows = pd.concat(tables["finetune"], ignore_index=True)
    sweep = sweep_rows(per_query, ft_rows)
    chosen = {m: lr for (_, m), lr in select_lr(sweep).items()} if splits == ("test", "dev") \
        else {cfg.name: cfg.lr for cfg in configs}
    for cfg in configs:
        if cfg.name not in chosen:
            continue  # every rate diverged: reported in the sweep, no baselines
        at = dataclasses.replace(cfg, lr=chosen[cfg.name])
        for run in baselines:
            for s in seeds:
                add(c.run(at, s, run))
                bar.update()
    bar.close()
    per_query = pd.concat(tables["per_query"], ignore_index=True)
    per_layer = pd.concat(tables["per_layer"], ignore_index=True)
    per_head = pd.concat(tables["per_head"], ignore_index=True)
    summary = summarise(per_query, per_layer)
    summary["selected"] = [chosen.get(m) == lr for m, lr in zip(summary.method, summary.lr)]
    return Tables(summary=summary, table=compact_table(summary, anchors), per_query=per_query,
                  per_layer=per_layer, per_head=per_head, sweep=sweep, finetunes=c.finetunes)

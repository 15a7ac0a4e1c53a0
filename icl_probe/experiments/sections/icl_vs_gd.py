"""``[icl_vs_gd]``: ICL against fine-tuning under the anchors' protocol (docs/protocol.md).

Stage 1 (``sweep``) runs every (task, seed, method, rate) on the model itself, on the test and
(with several rates) dev queries; stage 2 (``baseline``) runs every baseline at the rate stage 1
selected, read from the finished sweep units. A (model, task, method) sweep and its baselines
travel in one shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...compare import (ANCHORS, EVAL_CHUNK, ICL_WHAT, ZS_HELD, ZS_WHAT, Comparison,
                        anchor_column, compact_table, lr_grid, select_lr, sweep_rows)
from ...compare import summarise as summarise_rows
from ...errors import CompareError, ConfigError, ExperimentError
from ...gd import FineTuneConfig
from ...html import esc
from ...models import ModelShape
from ..checks import check_split_sizes
from ..labels import labeled_task, task_labels
from ..settings import (all_baselines, baselines, boolean, integer, list_of, loss_tokens,
                        lrs_by_method, methods, position, protocol, setting, task_spec, text)
from ..sizing import finetune_bytes, prompt_tokens, record_bytes, trainable_count
from ..store import read_results, unit_finished
from .base import Memory, Section, Unit, VerdictTable, model_order
from .icl_vs_gd_figures import figures

SUMMARY_COLUMNS = ["task", "method", "lr", "selected", "run", "metric", "baseline", "kind",
                   "layer", "value", "ci_low", "ci_high", "n", "verdict"]


@dataclass(frozen=True)
class IclVsGdSettings:
    """``[icl_vs_gd]``: ICL against fine-tuning under the anchors' protocol
    (docs/protocol.md)."""

    tasks: list[str] = setting(list_of(task_spec), ["sentiment"])
    k: int = setting(integer(1), 32)
    queries: int = setting(integer(1), 32)
    dev_queries: int = setting(integer(1), 16)
    seeds: list[int] = setting(list_of(integer(0)), [0])
    lrs: Any = setting(lrs_by_method, [1e-3])
    methods: list[str] = setting(methods, ["dai"])
    params: str = setting(text, "kv")
    loss_tokens: str = setting(loss_tokens, "demo")
    baselines: list[str] = setting(baselines, factory=all_baselines)
    protocol: str = setting(protocol, "shared")
    position: str = setting(position, "pred")
    balanced: bool = setting(boolean, False)


@dataclass(frozen=True)
class IclVsGdUnit(Unit):
    """A sweep unit (``lr`` set) or a baseline unit (``run`` set, at the selected rate)."""

    section = "icl_vs_gd"
    stage: str = "sweep"
    task: str = ""
    seed: int = 0
    method: str = "dai"
    lr: float | None = None
    run: str | None = None


class IclVsGd(Section):
    name = "icl_vs_gd"
    Settings = IclVsGdSettings
    Unit = IclVsGdUnit
    output_files = {"summary": "summary.csv"}
    per_model = False  # the tables set the models side by side

    def units(self, c: IclVsGdSettings) -> list[IclVsGdUnit]:
        grid = lr_grid(c.lrs, c.methods)
        sweep = [IclVsGdUnit(stage="sweep", task=t, seed=seed, method=m, lr=lr)
                 for t in c.tasks for m in c.methods for lr in grid[m] for seed in c.seeds]
        base = [IclVsGdUnit(stage="baseline", task=t, seed=seed, method=m, run=b)
                for t in c.tasks for m in c.methods for b in c.baselines for seed in c.seeds]
        return sweep + base

    def group(self, u: IclVsGdUnit) -> tuple:
        return (self.name, u.model, u.task, u.method)

    def validate(self, values: dict, where: str) -> None:
        if isinstance(values["lrs"], dict):
            try:
                lr_grid(values["lrs"], values["methods"])
            except CompareError as e:
                raise ConfigError(f"{where}: [icl_vs_gd] {e}") from None

    def check_inputs(self, s: IclVsGdSettings, where: str) -> list[tuple[str, str]]:
        check_split_sizes(self.name, s.tasks, [("k", s.k, "train"), ("queries", s.queries, "test"),
                                               ("dev_queries", s.dev_queries, "dev")], where)
        return [(f"{where} [icl_vs_gd] params", s.params)]

    def run(self, model: Any, u: IclVsGdUnit, c: IclVsGdSettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        comp = _comparison(model, c, u.task, ctx)
        if u.stage == "sweep":
            cfg = FineTuneConfig(method=u.method, params=c.params, lr=u.lr,
                                 loss_tokens=c.loss_tokens)
            splits = ("test", "dev") if len(lr_grid(c.lrs, c.methods)[u.method]) > 1 \
                else ("test",)
            return comp.run(cfg, u.seed, "model", splits)
        done = _sweep_results(ctx["out"], u, c)
        name = FineTuneConfig(method=u.method, params=c.params).name
        label = task_labels(c.tasks)[u.task]  # the name the sweep's tables carry
        chosen = select_lr(sweep_rows(done["per_query"], done["finetune"])) if done else {}
        if (label, name) not in chosen:
            # every rate diverged: nothing to compare the baseline with
            return {"finetune": pd.DataFrame([{"task": label, "method": name, "run": u.run,
                                               "seed": u.seed,
                                               "skipped": "every rate diverged"}])}
        cfg = FineTuneConfig(method=u.method, params=c.params, lr=chosen[(label, name)],
                             loss_tokens=c.loss_tokens)
        return comp.run(cfg, u.seed, u.run, ("test",))

    def memory(self, shape: ModelShape, s: IclVsGdSettings, b: int) -> Memory:
        icl, zs, demos, one, how = prompt_tokens(shape, s.tasks, s.k)
        n = s.queries  # reference runs are traced for the test queries (dev: FT logits only)
        opt = 2 if "adam" in s.methods else 0
        # every method but "batch" steps on one demonstration at a time
        ft_tokens = demos if "batch" in s.methods else one
        ft = finetune_bytes(shape, trainable_count(shape, s.params), ft_tokens, b, opt)
        # kept per (task, seed, variant): the ICL and ZS records of the test queries (the ZS
        # one without its full-length k and v) and ΔM_ICL, the demonstrations' Σ v ⊗ k per
        # layer and kv head (docs/protocol.md, Cost), a half-precision model's activations in
        # its own dtype and ΔM_ICL in float32 (compare.references); per unit, transiently, the
        # demonstration prefix's k and v (ΔM_ICL is summed from them), and per chunk of the
        # evaluation a ZS record of the fine-tuned model and the base model's ZS k and v
        # (traced again where the newest set, the only one that keeps them, is another's)
        held, op = min(b, 4), (4 if b < 4 else 8)
        refs = (record_bytes(shape, ICL_WHAT, n, icl, weights=False, data_bytes=held)
                + record_bytes(shape, ZS_HELD, n, zs, weights=False, data_bytes=held)
                + op * shape.n_layers * shape.n_kv_heads * shape.d_head ** 2)
        newest = record_bytes(shape, ("k", "v"), n, zs, logits=False, weights=False,
                              data_bytes=held)
        chunk = min(s.queries, EVAL_CHUNK)  # the evaluation's traces, streamed per chunk
        transient = (record_bytes(shape, ("k", "v"), 1, demos, logits=False, weights=False)
                     + record_bytes(shape, ZS_WHAT, chunk, zs, weights=False)
                     + record_bytes(shape, ("k", "v"), chunk, zs, weights=False))
        models = {"untrained", "embeddings_only"} & set(s.baselines)
        variants = 1 + len({"shuffled_labels"} & set(s.baselines)) + len(models)
        # the comparison's records keep no stack of attention weights (trace(weights=False))
        return Memory(
            finetune=ft, finetune_note=(
                f"params {s.params!r}: {trainable_count(shape, s.params):,} trained, "
                f"{'Adam' if opt else 'SGD'}, backward over {ft_tokens} tokens"),
            traces=refs + newest + transient, traces_note=(
                f"{n} queries, ICL prompts up to {icl} tokens; a process holds "
                f"{len(s.tasks)} tasks x {len(s.seeds)} seeds x {variants} variants of "
                "reference records"),
            held=len(s.tasks) * len(s.seeds) * variants * refs + newest + transient,
            extra_models=min(1, len(models)), how=how)

    # ---------------------------------------------------------------- the report
    def summarise(self, tabs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return icl_vs_gd_summary(tabs) if "per_query" in tabs else {}

    def intro(self, values: dict, tabs: dict[str, pd.DataFrame]) -> str:
        return _intro(IclVsGdSettings(**values), tabs)

    def tables(self, tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
        return _tables(tabs)

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        return figures(tabs) if "summary" in tabs else []


def _comparison(model: Any, c: IclVsGdSettings, task: str, ctx: dict) -> Comparison:
    """One Comparison per task and process, so that ZS/ICL runs are shared across units."""
    cache = ctx.setdefault("comparisons", {})
    if task not in cache:
        # the random-weight baseline models are built once and shared by every task
        cache[task] = Comparison(model, labeled_task(task, c.tasks), k=c.k, queries=c.queries,
                                 dev_queries=c.dev_queries, protocol=c.protocol,
                                 position=c.position, balanced=c.balanced,
                                 baseline_models=ctx.setdefault("baseline_models", {}),
                                 progress=False)
    return cache[task]


def _sweep_results(out: Path, u: IclVsGdUnit, c: IclVsGdSettings) -> dict[str, pd.DataFrame]:
    """The finished sweep units of this baseline unit's (model, task, method), all of them:
    the rate is selected over every seed and rate, so a missing one is an error, not a
    smaller sweep."""
    need_ids = {IclVsGdUnit(model=u.model, stage="sweep", task=u.task, seed=seed,
                            method=u.method, lr=lr).id
                for lr in lr_grid(c.lrs, c.methods)[u.method] for seed in c.seeds}
    have = {uid for uid in need_ids if unit_finished(out / "units" / uid)}
    if need_ids - have:
        missing = sorted(need_ids - have)
        raise ExperimentError(
            f"baseline unit {u.id} needs the finished sweep units {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} to select its rate; run them first (they "
            "travel in the same shard unless units were picked by hand)")
    # only the sweep units this selection needs: reading every unit of the directory for each
    # baseline unit grew with the square of the run
    return read_results(out, need_ids).get("icl_vs_gd", {})


def icl_vs_gd_summary(tabs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The summary with intervals, the compact table and the sweep, from the units' tables;
    each model (the ``model`` column of its units) is summarised on its own, with its own rate
    selection, and the tables carry the model as their first column."""
    pq = tabs["per_query"]
    if "model" not in pq:  # units written before models were keyed
        return _summary_one(tabs)
    parts: dict[str, list[pd.DataFrame]] = {}
    for m in model_order(pq.model):
        one = {k: (v[v.model == m] if "model" in v else v) for k, v in tabs.items()}
        for k, v in _summary_one(one).items():
            parts.setdefault(k, []).append(v.assign(model=m))
    out = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    return {k: v[["model"] + [c for c in v.columns if c != "model"]] for k, v in out.items()}


def _summary_one(tabs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    pq, ft = tabs["per_query"], tabs.get("finetune", pd.DataFrame())
    if "lr" in ft:
        ft = ft[ft.lr.notna()]
    sweep = sweep_rows(pq, ft)
    summary = summarise_rows(pq, tabs.get("per_layer", pd.DataFrame()))
    sel = {(t, m): lr for t, m, lr in zip(sweep.task, sweep.method, sweep.lr)
           if sweep.selected[(sweep.task == t) & (sweep.method == m) & (sweep.lr == lr)].any()}
    summary["selected"] = [sel.get((t, m)) == lr for t, m, lr in
                           zip(summary.task, summary.method, summary.lr)]
    summary = summary.reindex(columns=SUMMARY_COLUMNS + [c for c in summary.columns
                                                         if c not in SUMMARY_COLUMNS])
    return {"summary": summary, "table": compact_table(summary, ANCHORS), "sweep": sweep}


def _intro(c: IclVsGdSettings, tabs: dict[str, pd.DataFrame]) -> str:
    sw = tabs["sweep"]
    flagged = sw[sw.flag != ""]
    items = [f"protocol <b>{esc(c.protocol)}</b>: one demonstration set of k = {esc(c.k)} per "
             f"seed (train split), one fine-tune per (seed, method, rate), {esc(c.queries)} "
             f"test queries per seed, seeds {esc(c.seeds)}, read at the <b>{esc(c.position)}</b> "
             "position",
             f"learning rates {esc(c.lrs)}: the rate with the best FT accuracy on "
             f"{esc(c.dev_queries)} dev queries is selected (ties: gold log-probability); "
             "baselines run at it",
             "every value: mean over queries (pooled over seeds) with a 95 % bootstrap interval; "
             "a baseline cell shows the baseline's value and the verdict on ours − baseline "
             "(paired by query): <span class=beats>beats baseline</span> only when that "
             "difference's interval lies above 0",
             f"{len(flagged)} of {len(sw)} sweep settings flagged (diverged, or FT fixes no "
             "zero-shot error: Rec2FTP undefined); diverged fine-tunes are excluded from every "
             "metric",
             "predictions scored by " + "; ".join(
                 f"{esc(task)}: {esc(', '.join(sorted(set(d['scoring'].dropna()))))}"
                 if "scoring" in d
                 else f"{esc(task)}: not recorded by these units (older than the scoring column)"
                 for task, d in
                 tabs["per_query"].groupby("task")) + " (first_token: argmax over the "
             "candidates' first tokens, the anchors' label accuracy; full_answer: each "
             "answer's whole log-probability, where answers share a first token)"]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _tables(tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    table = tabs["table"]
    anchors = {anchor_column(a) for a in ANCHORS.itertuples()}
    for (task, method), d in table.groupby(["task", "method"], sort=False):
        groups, anchor_part = [], None
        models = model_order(d.model) if "model" in d else [None]
        for m in models:
            g = (d[d.model == m] if m is not None else d).drop(
                columns=["task", "method"] + (["model"] if m is not None else []))
            lr = g.pop("lr").iloc[0]
            g = g.set_index("metric")
            keep = [c for c in g.columns if (g[c] != "").any()]
            own = [c for c in keep if c not in anchors]
            groups.append((f"{m}, lr = {lr:g}" if len(models) > 1 else None, g[own]))
            anchor_part = g[[c for c in keep if c in anchors]]
        if len(models) == 1:
            title = f"{task}: ICL vs {method} (selected lr = {lr:g})"
            out.append((title, VerdictTable(pd.concat([groups[0][1], anchor_part], axis=1))))
            continue
        if anchor_part is not None and anchor_part.shape[1]:
            groups.append(("anchors (published)", anchor_part))
        out.append((f"{task}: ICL vs {method}, models side by side (each at its selected lr)",
                    VerdictTable(pd.concat([g for _, g in groups], axis=1),
                                 groups=[(name, g.shape[1]) for name, g in groups])))
    sw = tabs["sweep"].copy()
    sw["selected"] = np.where(sw.selected, "selected", "")
    out.append(("Learning-rate sweep (per seed)", sw.round(3)))
    return out

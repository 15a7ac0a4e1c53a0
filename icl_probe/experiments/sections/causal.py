"""``[causal]``: is ICL an implicit weight update? Replayed and transferred implied updates
beside the real fine-tune, task vectors and function vectors, on the same test queries
(docs/science.md, Causal tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...causal import (REPLAY_BASELINES, REPLAY_UPDATES, function_vector, replay, task_vector,
                       transfer)
from ...gd import FineTuneConfig
from ...hooks import QUANTITIES
from ...models import ModelShape
from ...prompts import build_prompt
from ...tasks import load_task
from ..checks import check_split_sizes, need
from ..labels import labeled_task
from ..settings import choice, integer, list_of, rate, setting, task_spec
from ..sizing import finetune_bytes, prompt_tokens, record_bytes, trainable_count
from .base import Memory, Section, Unit, VerdictTable

TESTS = ("replay", "transfer", "task_vector", "function_vector")
COLUMNS = ["task", "seed", "test", "hypothesis", "subset", "baseline", "metric", "value",
           "ci_low", "ci_high", "n", "vs_random", "vs_shuffled_labels", "vs_zero_shot", "layer"]


@dataclass(frozen=True)
class CausalSettings:
    """``[causal]``: the causal tests of "ICL is an implicit weight update"."""

    tasks: list[str] = setting(list_of(task_spec), ["sentiment"])
    tests: list[str] = setting(list_of(choice(*TESTS)), list(TESTS))
    k: int = setting(integer(1), 8)
    queries: int = setting(integer(2), 24)
    dev_queries: int = setting(integer(1), 8)
    updates: list[str] = setting(list_of(choice(*REPLAY_UPDATES)), list(REPLAY_UPDATES))
    baselines: list[str] = setting(list_of(choice(*REPLAY_BASELINES), nonempty=False),
                                   list(REPLAY_BASELINES))
    transfer_updates: str = setting(choice(*REPLAY_UPDATES), "exact")
    finetune_lr: float = setting(rate, 1e-3)
    dummies: int = setting(integer(1), 2)
    fv_prompts: int = setting(integer(1), 8)
    fv_heads: int = setting(integer(1), 10)
    seeds: list[int] = setting(list_of(integer(0)), [0])


@dataclass(frozen=True)
class CausalUnit(Unit):
    section = "causal"
    task: str = ""
    seed: int = 0


class Causal(Section):
    name = "causal"
    output_files = {"causal": "causal.csv"}
    Settings = CausalSettings
    Unit = CausalUnit

    def units(self, s: CausalSettings) -> list[CausalUnit]:
        return [CausalUnit(task=t, seed=seed) for t in s.tasks for seed in s.seeds]

    def check_inputs(self, s: CausalSettings, where: str) -> list[tuple[str, str]]:
        wants = [("queries", s.queries, "test"), ("dev_queries", s.dev_queries, "dev"),
                 ("k + dummies", s.k + s.dummies, "train"),
                 ("fv_prompts", s.fv_prompts, "train"), ("k", s.k + 1, "train")]
        check_split_sizes(self.name, s.tasks, wants, where)
        need(len(set(s.tests)) == len(s.tests), f"{where} [causal] tests",
             f"{s.tests} names a test twice")
        if {"replay", "transfer"} & set(s.tests):
            for spec in s.tasks:
                need(load_task(spec).is_classification, f"{where} [causal] tasks: {spec!r}",
                     "open-ended answers; replay and transfer score a candidate by its first "
                     "token at the prediction position, where their patches are computed: use "
                     "a task with a fixed label set (sentiment, subjectivity, topic), or drop "
                     "replay and transfer from tests")
        return []

    def run(self, model: Any, u: CausalUnit, s: CausalSettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        task = labeled_task(u.task, s.tasks)
        train = task.split("train")
        tables, per_layer, heads = [], [], pd.DataFrame()
        if "replay" in s.tests:
            pairs = [build_prompt(model, task, q, s.k, seed=u.seed + q, pool=train)
                     for q in task.split("test")[: s.queries]]
            r = replay(model, pairs, updates=s.updates, baselines=s.baselines, task=task,
                       seed=u.seed)
            tables.append(r.summary.assign(test="replay"))
        if "transfer" in s.tests:
            r = transfer(model, task, k=s.k, queries=s.queries, dev_queries=s.dev_queries,
                         updates=s.transfer_updates, seed=u.seed,
                         finetune_config=FineTuneConfig("dai", params="kv", lr=s.finetune_lr))
            tables.append(r.summary.assign(test="transfer", subset="all"))
        common = dict(k=s.k, queries=s.queries, dev_queries=s.dev_queries, seed=u.seed)
        for name, fn, extra in (("task_vector", task_vector, dict(dummies=s.dummies)),
                                ("function_vector", function_vector,
                                 dict(prompts=s.fv_prompts, heads=s.fv_heads))):
            if name in s.tests:
                v = fn(model, task, **common, **extra)
                tables.append(v.summary.assign(test=name))
                per_layer.append(v.per_layer.assign(test=name))
                if v.heads is not None:
                    heads = v.heads
        causal = pd.concat(tables, ignore_index=True).assign(seed=u.seed, task=task.name)
        out = {"causal": causal.reindex(columns=COLUMNS)}
        if per_layer:
            out["vector_layers"] = pd.concat(per_layer, ignore_index=True)
        if len(heads):
            out["fv_heads"] = heads
        return out

    def memory(self, shape: ModelShape, s: CausalSettings, b: int) -> Memory:
        icl, _, demos, _, how = prompt_tokens(shape, s.tasks, s.k)
        traced = record_bytes(shape, QUANTITIES, s.queries, icl, weight_bytes=b)  # dual form
        # function vectors: a prompt's key/value cache, copied once per head of a layer (+1)
        kv = 2 * shape.n_layers * shape.n_kv_heads * shape.d_head * icl * b
        fv = kv * (shape.n_heads + 2) if "function_vector" in s.tests else 0
        ft = finetune_bytes(shape, trainable_count(shape, "kv"), demos, b, 0)
        return Memory(finetune=ft, finetune_note="causal: transfer's Dai-FT on k and v",
                      traces=max(traced, fv), held=traced, how=how, traces_note=(
                          f"causal: the larger of the dual form's trace of {s.queries} prompts "
                          f"of up to {icl} tokens and function vectors' cache copies"))

    def intro(self, values: dict, tabs: dict[str, pd.DataFrame]) -> str:
        return ("<p>Each hypothesis on the same test queries. <b>share</b>: the share of the "
                "ICL logit shift recovered at the prediction position, 1 &minus; "
                "&Vert;&ell;<sub>replay</sub> &minus; &ell;<sub>ICL</sub>&Vert; / "
                "&Vert;&ell;<sub>ZS</sub> &minus; &ell;<sub>ICL</sub>&Vert;; <b>top1</b>: "
                "agreement with ICL's top token; <b>kl</b>: KL(ICL &Vert; replay). The exact "
                "replay reproduces ICL by construction wherever its patched layers include the "
                "last one; the informative rows are Dherin's MLP update (<code>mlp</code>), "
                "the dual form (<code>dual</code>) and subsets that stop early.</p>")

    def tables(self, tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
        c = tabs.get("causal")
        if c is None:
            return []
        out = [(title, VerdictTable(_wide(_filled(c), metric))) for metric, title in (
            ("share", "Share of the ICL logit shift recovered (each baseline beside)"),
            ("accuracy", "Test accuracy per hypothesis (each baseline beside)"),
            ("kl", "KL(ICL || hypothesis) at the prediction position (lower is closer)"))]
        if "fv_heads" in tabs:
            h = tabs["fv_heads"]
            out.append(("Function vector: the chosen heads", h[h.chosen].sort_values(
                "effect", ascending=False).reset_index(drop=True)))
        return out

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        c = tabs.get("causal")
        figs = []
        if c is not None:
            c = _filled(c)
            figs += [f for f in (_share_figure(c), _accuracy_figure(c)) if f is not None]
        if "vector_layers" in tabs:
            d = tabs["vector_layers"]
            fig = go.Figure()
            for (test, split), g in d.groupby(["test", "split"]):
                fig.add_trace(go.Scatter(x=g.layer, y=g.accuracy, mode="lines+markers",
                                         name=f"{test} ({split})"))
            fig.update_layout(title="Task and function vectors: accuracy per patched layer",
                              xaxis_title="layer", yaxis_title="accuracy")
            figs.append(fig)
        return figs


def _filled(c: pd.DataFrame) -> pd.DataFrame:
    """Empty keys read back from CSV as NaN: empty strings again."""
    return c.assign(**{k: c[k].fillna("") for k in ("subset", "baseline") if k in c})


def _wide(c: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (task, test, hypothesis, subset): the value with its interval, each
    baseline's beside it, and the verdicts."""
    d = c[c.metric == metric]
    cell = d.apply(lambda r: f"{r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]", axis=1)
    d = d.assign(cell=cell)
    keys = ["task", "test", "hypothesis", "subset"]
    rows = []
    for key, g in d.groupby(keys, sort=False):
        own = g[g.baseline == ""].iloc[0]
        row = dict(zip(keys, key), value=own.cell, n=own.n)
        for b in REPLAY_BASELINES:
            if (g.baseline == b).any():
                row[b] = g[g.baseline == b].cell.iloc[0]
        for v in ("vs_random", "vs_shuffled_labels", "vs_zero_shot"):
            if v in own and isinstance(own[v], str) and own[v]:
                row[v] = f"({own[v]})"  # coloured by the report
        if pd.notna(own.get("layer")):
            row["layer"] = int(own["layer"])
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def _share_figure(c: pd.DataFrame) -> Any:
    d = c[(c.test == "replay") & (c.metric == "share")
          & c.hypothesis.str.startswith("replay:")]
    if d.empty:
        return None
    tasks = list(dict.fromkeys(d.task))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    colors = {"": "#1f77b4", "random": "#aaaaaa", "shuffled_labels": "#ff7f0e"}
    for i, t in enumerate(tasks, 1):
        for base, g in d[d.task == t].groupby("baseline", sort=False):
            x = [g.hypothesis.str.removeprefix("replay:"), g.subset]
            fig.add_trace(go.Bar(
                x=x, y=g.value, name=base or "ICL's updates", marker_color=colors.get(base),
                legendgroup=base, showlegend=i == 1,
                error_y=dict(type="data", symmetric=False, array=g.ci_high - g.value,
                             arrayminus=g.value - g.ci_low)), row=1, col=i)
    fig.update_layout(barmode="group", title="Replay: share of the ICL logit shift recovered, "
                      "per update and layer subset (95 % intervals)",
                      yaxis_title="share recovered")
    return fig


def _accuracy_figure(c: pd.DataFrame) -> Any:
    d = c[(c.metric == "accuracy") & (c.baseline.fillna("") == "")
          & (c.subset.fillna("").isin(["", "all"]))]
    if d.empty:
        return None
    d = d.assign(label=d.test + ": " + d.hypothesis)
    fig = go.Figure()
    for t, g in d.groupby("task", sort=False):
        fig.add_trace(go.Bar(x=g.label, y=g.value, name=t, error_y=dict(
            type="data", symmetric=False, array=g.ci_high - g.value,
            arrayminus=g.value - g.ci_low)))
    fig.update_layout(title="Test accuracy per hypothesis (95 % intervals; replay: every layer)",
                      yaxis_title="accuracy", barmode="group")
    return fig

"""``[shen]``: Shen, Mishra and Khashabi's figures (REFERENCE §6, docs/protocol.md): the
sparsity of W_Q/W_K/W_V against the threshold (Fig. 2), ICL accuracy and weight change across
checkpoints (Fig. 3), order sensitivity over epochs (Fig. 4), ICL against GD over epochs beside
the ICL-reordered reference (Fig. 5), and GD with many demonstrations against ICL with 8
(Table 1, on a local copy of an anchor dataset; skipped with a note without one).

Fine-tuning settings are typed tables, each read at checkpoints of one run::

    [[shen.methods]]            # a column of Fig. 5
    name = "gd_mid"
    params = "v:mid"            # all, kv, qkvo, mlp, v:mid, v:deep or v:L
    optimizer = "sgd"           # sgd or adam
    batch_size = 0              # 0: full batch
    epochs = 20
    lrs = [1e-3, 1e-4]
    loss_tokens = "label"       # Shen et al.'s choice

``[[shen.order_methods]]`` lists the settings of Fig. 4 the same way, and
``[[shen.many_demos_methods]]`` those of Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ... import dual
from ...compare import checkpoint_table, many_demos_table, order_curves, shen_curves
from ...errors import ConfigError
from ...html import esc
from ...gd import OPTIMIZERS, PARAM_SETS, SUB_MODEL_LAYERS, EpochFineTune
from ...models import ModelShape, load_model
from ..checks import check_split_sizes
from ..labels import labeled_task, task_file
from ..settings import (choice, integer, list_of, loss_tokens, model_spec, rate, setting,
                        tables_of, task_spec, text)
from ..sizing import finetune_bytes, prompt_tokens, trainable_count
from .base import Memory, Section, Unit
from .shen_figures import figures


def shen_params(v: Any, where: str) -> str:
    """A parameter set of Shen et al.'s fine-tunes: one of :data:`~icl_probe.gd.PARAM_SETS`,
    ``v:mid``, ``v:deep`` or ``v:L``."""
    text(v, where)
    if v in PARAM_SETS or v in SUB_MODEL_LAYERS or (v.startswith("v:") and v[2:].isdigit()):
        return v
    raise ConfigError(f"{where} = {v!r}: expected one of {list(PARAM_SETS)}, 'v:mid', "
                      "'v:deep' or 'v:L' (layer L's W_V)")


@dataclass(frozen=True)
class ShenMethod:
    """One ``[[shen.methods]]`` or ``[[shen.order_methods]]`` table."""

    name: str = setting(text, required=True)
    params: str = setting(shen_params, "all")
    optimizer: str = setting(choice(*OPTIMIZERS), "sgd")
    batch_size: int = setting(integer(0), 0)  # 0: full batch
    epochs: int = setting(integer(1), 10)
    lrs: list[float] = setting(list_of(rate), [1e-3])
    loss_tokens: str = setting(loss_tokens, "label")

    def fine_tune(self) -> EpochFineTune:
        return EpochFineTune(params=self.params, optimizer=self.optimizer,
                             batch_size=self.batch_size or None, epochs=self.epochs,
                             lr=self.lrs[0], loss_tokens=self.loss_tokens)


def _methods() -> list[dict]:
    return [dict(name=n, params=p, optimizer="sgd", batch_size=0, epochs=10, lrs=[1e-3],
                 loss_tokens="label")
            for n, p in (("gd_all", "all"), ("gd_mid", "v:mid"), ("gd_deep", "v:deep"))]


def _order_methods() -> list[dict]:
    return [dict(name=n, params="all", optimizer=o, batch_size=b, epochs=10, lrs=[1e-3],
                 loss_tokens="label")
            for n, o, b in (("gd_full", "sgd", 0), ("sgd_b1", "sgd", 1), ("sgd_b2", "sgd", 2),
                            ("sgd_b4", "sgd", 4), ("adam_b1", "adam", 1))]


def _many_demos_methods() -> list[dict]:
    return [dict(name="gd_all", params="all", optimizer="sgd", batch_size=8, epochs=10,
                 lrs=[1e-4], loss_tokens="label")]


@dataclass(frozen=True)
class ShenSettings:
    """``[shen]``: Shen et al.'s Fig. 2, 4 and 5 (see the module docstring)."""

    tasks: list[str] = setting(list_of(task_spec), ["sentiment"])
    n_demos: list[int] = setting(list_of(integer(1)), [1, 2, 4, 8])
    queries: int = setting(integer(1), 8)
    seeds: list[int] = setting(list_of(integer(0)), [0])
    eval_every: int = setting(integer(1), 1)
    methods: list[dict] = setting(tables_of(ShenMethod), factory=_methods)
    order_n_demos: int = setting(integer(2), 8)
    orderings: int = setting(integer(2), 10)
    order_queries: int = setting(integer(1), 4)
    order_methods: list[dict] = setting(tables_of(ShenMethod, nonempty=False),
                                        factory=_order_methods)
    sparsity_thresholds: list[float] = setting(list_of(rate), [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    # Fig. 3: checkpoints of one model, in training order (local directories, GGUF files or
    # hub ids in the local cache); none by default
    checkpoints: list[str] = setting(list_of(model_spec, nonempty=False), [])
    checkpoint_n_demos: int = setting(integer(1), 8)
    # Table 1: GD trained on many_demos_n demonstrations against ICL with many_demos_icl_n, on
    # local copies of anchor datasets, "NAME:PATH" (docs/datasets.md); none by default (the
    # report says it was skipped)
    many_demos_tasks: list[str] = setting(list_of(task_spec, nonempty=False), [])
    many_demos_n: list[int] = setting(list_of(integer(1)), [8, 32, 128, 512])
    many_demos_icl_n: int = setting(integer(1), 8)
    many_demos_queries: int = setting(integer(1), 16)
    many_demos_methods: list[dict] = setting(tables_of(ShenMethod, nonempty=False),
                                             factory=_many_demos_methods)


@dataclass(frozen=True)
class ShenUnit(Unit):
    """``part``: ``sparsity`` (one per model), ``curves`` (per task, N and seed), ``order`` or
    ``checkpoints`` (per task and seed), ``many_demos`` (per seed; ``task`` is the anchor
    dataset, ``n_demos`` ICL's demonstrations)."""

    section = "shen"
    part: str = "curves"
    task: str | None = None
    n_demos: int | None = None
    seed: int | None = None


class Shen(Section):
    name = "shen"
    Settings = ShenSettings
    Unit = ShenUnit
    output_files = {"curves": "shen_curves.csv", "order": "shen_order.csv",
                    "sparsity": "shen_sparsity.csv", "checkpoints": "shen_checkpoints.csv",
                    "many_demos": "shen_many_demos.csv"}

    def units(self, s: ShenSettings) -> list[ShenUnit]:
        out = [ShenUnit(part="sparsity")]
        out += [ShenUnit(part="curves", task=t, n_demos=n, seed=seed) for t in s.tasks
                for n in s.n_demos for seed in s.seeds]
        if s.checkpoints:
            out += [ShenUnit(part="checkpoints", task=t, n_demos=s.checkpoint_n_demos,
                             seed=seed) for t in s.tasks for seed in s.seeds]
        if s.order_methods:
            out += [ShenUnit(part="order", task=t, n_demos=s.order_n_demos, seed=seed)
                    for t in s.tasks for seed in s.seeds]
        if s.many_demos_methods:
            out += [ShenUnit(part="many_demos", task=t, n_demos=s.many_demos_icl_n, seed=seed)
                    for t in s.many_demos_tasks for seed in s.seeds]
        return out

    def validate(self, values: dict, where: str) -> None:
        for tables in (("methods", "order_methods"), ("many_demos_methods",)):
            names = [m["name"] for t in tables for m in values[t]]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(
                    f"{where}: [shen] two methods are both named {dup[0]!r}; each "
                    f"{' / '.join(f'[[shen.{t}]]' for t in tables)} table needs its own name "
                    "(it labels the curves)")

    def check_inputs(self, s: ShenSettings, where: str) -> list[tuple[str, str]]:
        check_split_sizes(self.name, s.tasks, [
            ("n_demos", max(s.n_demos), "train"), ("order_n_demos", s.order_n_demos, "train"),
            ("checkpoint_n_demos", s.checkpoint_n_demos, "train"),
            ("queries", s.queries, "test"), ("order_queries", s.order_queries, "test")], where)
        if s.many_demos_tasks:
            check_split_sizes(self.name, s.many_demos_tasks, [
                ("many_demos_n", max(*s.many_demos_n, s.many_demos_icl_n), "train"),
                ("many_demos_queries", s.many_demos_queries, "test")], where)
        return [(f"{where} [shen] methods {m['name']!r} params", m["params"])
                for m in s.methods + s.order_methods + s.many_demos_methods
                if m["params"].startswith("v:") and m["params"] not in SUB_MODEL_LAYERS]

    def data_files(self, s: ShenSettings) -> dict[str, str]:
        return {t: str(task_file(t)) for t in s.many_demos_tasks}

    def run(self, model: Any, u: ShenUnit, s: ShenSettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        if u.part == "checkpoints":
            return {"checkpoints": checkpoint_table(
                s.checkpoints, labeled_task(u.task, s.tasks), n_demos=u.n_demos,
                queries=s.queries, seed=u.seed, load=load_model)}
        if u.part == "many_demos":
            task = labeled_task(u.task, s.many_demos_tasks)
            return {"many_demos": pd.concat([many_demos_table(
                model, task, n_train=s.many_demos_n, method=ShenMethod(**m).fine_tune(),
                lrs=m["lrs"], icl_n=u.n_demos, queries=s.many_demos_queries, seed=u.seed,
                references=i == 0).pipe(_named, m["name"])
                for i, m in enumerate(s.many_demos_methods)], ignore_index=True).assign(
                    task=task.name)}
        if u.part == "sparsity":
            return {"sparsity": pd.concat([
                dual.head_sparsity(model, s.sparsity_thresholds, relative=r).assign(
                    mode="relative" if r else "absolute") for r in (False, True)],
                ignore_index=True)}
        task = labeled_task(u.task, s.tasks)
        methods = [ShenMethod(**m) for m in (s.methods if u.part == "curves"
                                             else s.order_methods)]
        parts = []
        for i, m in enumerate(methods):
            kw = dict(n_demos=u.n_demos, methods=[m.fine_tune()], lrs=m.lrs, seed=u.seed,
                      eval_every=s.eval_every, references=i == 0)
            t = shen_curves(model, task, queries=s.queries, **kw) if u.part == "curves" \
                else order_curves(model, task, queries=s.order_queries,
                                  orderings=s.orderings, **kw)
            parts.append(_named(t, m.name))
        return {u.part: pd.concat(parts, ignore_index=True)}

    def memory(self, shape: ModelShape, s: ShenSettings, b: int) -> Memory:
        _, _, demos, one, how = prompt_tokens(shape, s.tasks, max(s.n_demos + [s.order_n_demos]))
        ft, note = 0, ""
        for m in s.methods + s.order_methods:
            opt = 2 if m["optimizer"] == "adam" else 0
            tokens = demos if m["batch_size"] in (0, None) or m["batch_size"] > 1 else one
            params = "v:0" if m["params"] in SUB_MODEL_LAYERS else m["params"]
            x = finetune_bytes(shape, trainable_count(shape, params), tokens, b, opt)
            if x > ft:
                ft, note = x, (f"shen {m['name']!r}: {m['optimizer']} on {m['params']}, "
                               f"backward over {tokens} tokens")
        if s.many_demos_tasks and s.many_demos_methods:
            # a batch holds one graph per example: batch size x the longest demonstration
            one = prompt_tokens(shape, s.many_demos_tasks, 1)[3]
            for m in s.many_demos_methods:
                opt = 2 if m["optimizer"] == "adam" else 0
                tokens = one * min(m["batch_size"] or max(s.many_demos_n), max(s.many_demos_n))
                params = "v:0" if m["params"] in SUB_MODEL_LAYERS else m["params"]
                x = finetune_bytes(shape, trainable_count(shape, params), tokens, b, opt)
                if x > ft:
                    ft, note = x, (f"shen Table 1 {m['name']!r}: {m['optimizer']} on "
                                   f"{m['params']}, backward over {tokens} tokens")
        return Memory(finetune=ft, finetune_note=note, how=how)

    def tables(self, tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
        out = []
        if "curves" in tabs:
            c = tabs["curves"]
            last = c[c.epoch.isna() | (c.epoch == c.groupby("method").epoch.transform("max"))]
            out.append(("Fig. 5 at the last epoch (mean over queries, 95 % interval)",
                        last.drop(columns=[x for x in ("part",) if x in last]).round(4)))
        if "order" in tabs:
            o = tabs["order"]
            out.append(("Fig. 4: order sensitivity per epoch", o.drop(
                columns=[x for x in ("part",) if x in o]).round(4)))
        if "many_demos" in tabs:
            m = tabs["many_demos"]
            out.append(("Table 1: GD trained on n_train demonstrations (last epoch) against "
                        "ICL with n_demos (mean over queries, 95 % interval)",
                        m.drop(columns=[x for x in ("part",) if x in m]).round(4)))
        return out

    def intro(self, values: dict, tabs: dict[str, pd.DataFrame]) -> str:
        s = ShenSettings(**values)
        if s.many_demos_tasks:
            return ""
        return (f"<p><b>Table 1</b> (GD with many demonstrations against ICL with "
                f"{esc(s.many_demos_icl_n)}) was skipped: it needs a local copy of an anchor "
                "dataset, and <code>many_demos_tasks</code> names none. Set it in "
                "<code>[shen]</code> to a list of NAME:PATH, e.g. "
                "<code>[\"sst2:/data/sst2/train.jsonl\"]</code>; docs/datasets.md lists the "
                "files accepted.</p>")

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        return figures(tabs)


def _named(t: pd.DataFrame, name: str) -> pd.DataFrame:
    """``t`` with its fine-tune rows named by their config table (references keep theirs)."""
    return t.assign(method=t.method.where(t.method.isin(["icl", "icl_reordered"]), name))


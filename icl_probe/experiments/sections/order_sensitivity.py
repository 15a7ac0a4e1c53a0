"""``[order_sensitivity]``: Shen et al.'s orderings, ICL against gradient-descent variants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.express as px

from ...compare import order_sensitivity_table
from ...models import ModelShape
from ...prompts import build_prompt
from ..checks import check_prompt_sizes
from ..labels import labeled_task
from ..settings import ft_method, integer, list_of, rate, setting, task_spec
from ..sizing import finetune_bytes, prompt_tokens, trainable_count
from .base import Memory, Section, Unit


@dataclass(frozen=True)
class OrderSensitivitySettings:
    """``[order_sensitivity]``: Shen et al.'s orderings, ICL against GD variants."""

    tasks: list[str] = setting(list_of(task_spec), ["sentiment"])
    n_demos: list[int] = setting(list_of(integer(1)), [1, 2, 4, 8])
    lrs: list[float] = setting(list_of(rate), [1e-3])
    orderings: int = setting(integer(2), 10)
    queries: int = setting(integer(1), 4)
    methods: list[str] = setting(list_of(ft_method), ["dai", "batch", "adam"])


@dataclass(frozen=True)
class OrderSensitivityUnit(Unit):
    section = "order_sensitivity"
    task: str = ""
    n_demos: int = 1
    lr: float = 1e-3


class OrderSensitivity(Section):
    name = "order_sensitivity"
    Settings = OrderSensitivitySettings
    Unit = OrderSensitivityUnit

    def units(self, s: OrderSensitivitySettings) -> list[OrderSensitivityUnit]:
        return [OrderSensitivityUnit(task=t, n_demos=n, lr=lr) for t in s.tasks
                for n in s.n_demos for lr in s.lrs]

    def check_inputs(self, s: OrderSensitivitySettings, where: str) -> list[tuple[str, str]]:
        check_prompt_sizes(self.name, s.tasks, max(s.n_demos), "n_demos", s.queries, "queries",
                           where)
        return [(f"{where} [order_sensitivity] methods", m) for m in s.methods
                if m.startswith("v:")]

    def run(self, model: Any, u: OrderSensitivityUnit, s: OrderSensitivitySettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        rows = []
        task = labeled_task(u.task, s.tasks)
        for q in range(s.queries):
            if u.n_demos < 2:
                break  # one demonstration has a single ordering
            pair = build_prompt(model, task, q, u.n_demos, seed=q)
            t = order_sensitivity_table(model, pair, orderings=s.orderings, methods=s.methods,
                                        lr=u.lr, seed=q)
            t.insert(0, "query", q)
            rows.append(t)
        df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
            columns=["query", "run", "orderings", "order_sensitivity"])
        return {"order_sensitivity": df}

    def memory(self, shape: ModelShape, s: OrderSensitivitySettings, b: int) -> Memory:
        _, _, demos, one, how = prompt_tokens(shape, s.tasks, max(s.n_demos))
        opt = 2 if "adam" in s.methods else 0
        ft = finetune_bytes(shape, trainable_count(shape, "kv"),
                            demos if "batch" in s.methods else one, b, opt)
        return Memory(finetune=ft, how=how, finetune_note=(
            f"order_sensitivity: {'Adam' if opt else 'SGD'} on k and v"))

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        if "order_sensitivity" not in tabs:
            return []
        d = tabs["order_sensitivity"].groupby(["n_demos", "run"],
                                              as_index=False).order_sensitivity.mean()
        return [px.line(d, x="n_demos", y="order_sensitivity", color="run", markers=True,
                        title="Order sensitivity (std of p(output) across orderings)")]

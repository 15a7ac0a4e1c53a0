"""``[real_heads]``: the dual form's requirements checked on the model's own heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ... import dual
from ...models import ModelShape
from ...prompts import build_prompts
from ..checks import check_prompt_sizes
from ..labels import labeled_task
from ..settings import integer, list_of, setting, task_spec
from .base import Memory, Section, Unit
from .implied_updates import traced_memory


@dataclass(frozen=True)
class RealHeadsSettings:
    """``[real_heads]``: the dual form's requirements checked on the model's heads."""

    tasks: list[str] = setting(list_of(task_spec), ["capital"])
    prompts: int = setting(integer(1), 4)
    k: int = setting(integer(1), 8)


@dataclass(frozen=True)
class RealHeadsUnit(Unit):
    section = "real_heads"
    task: str = ""


class RealHeads(Section):
    name = "real_heads"
    Settings = RealHeadsSettings
    Unit = RealHeadsUnit

    def units(self, s: RealHeadsSettings) -> list[RealHeadsUnit]:
        return [RealHeadsUnit(task=t) for t in s.tasks]

    def check_inputs(self, s: RealHeadsSettings, where: str) -> list[tuple[str, str]]:
        check_prompt_sizes(self.name, s.tasks, s.k, "k", s.prompts, "prompts", where)
        return []

    def run(self, model: Any, u: RealHeadsUnit, s: RealHeadsSettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        pairs = build_prompts(model, labeled_task(u.task, s.tasks), range(s.prompts), k=s.k)
        return dual.real_head_claims(model, pairs)

    def memory(self, shape: ModelShape, s: RealHeadsSettings, b: int) -> Memory:
        return traced_memory(self.name, shape, s, b)

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        return [dual.plot_head_sparsity(tabs["sparsity"])] if "sparsity" in tabs else []

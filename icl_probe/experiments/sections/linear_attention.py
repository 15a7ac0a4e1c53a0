"""``[linear_attention]``: von Oswald et al. on synthetic regression; trains its own small
models, no language model (:mod:`icl_probe.dual`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ... import dual
from ..settings import integer, list_of, setting
from .base import Section, Unit


@dataclass(frozen=True)
class LinearAttentionSettings:
    """``[linear_attention]``: von Oswald et al. on synthetic regression (no language
    model)."""

    seeds: list[int] = setting(list_of(integer(0)), [0])
    line_search_tasks: int = setting(integer(1), 10_000)
    eigen_tasks: int = setting(integer(1), 10_000)
    steps: int = setting(integer(1), 1000)
    batch_size: int = setting(integer(1), 2048)
    eval_every: int = setting(integer(1), 100)


@dataclass(frozen=True)
class LinearAttentionUnit(Unit):
    section = "linear_attention"
    seed: int = 0


class LinearAttention(Section):
    name = "linear_attention"
    Settings = LinearAttentionSettings
    Unit = LinearAttentionUnit
    uses_model = False

    def units(self, s: LinearAttentionSettings) -> list[LinearAttentionUnit]:
        return [LinearAttentionUnit(seed=seed) for seed in s.seeds]

    def run(self, model: Any, u: LinearAttentionUnit, s: LinearAttentionSettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        lr, loss = dual.best_one_step_lr(n_tasks=s.line_search_tasks, seed=u.seed)
        eig = dual.eigenvalue_table(n_tasks=s.eigen_tasks, seed=u.seed)
        cfg = dual.LSATrainConfig(steps=s.steps, batch_size=s.batch_size,
                                  eval_every=s.eval_every, seed=u.seed, gd_lr=lr)
        res = dual.train_lsa(cfg, progress=False)
        ood = dual.ood_curves(res.model, lr, seed=u.seed)
        anchor = pd.DataFrame([{"quantity": "best one-step lr", "ours": lr,
                                "anchor": dual.ANCHOR_BEST_LR},
                               {"quantity": "loss at best lr", "ours": loss,
                                "anchor": dual.ANCHOR_BEST_LOSS}])
        return {"line_search": anchor, "eigenvalues": eig, "training": res.history, "ood": ood}

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        figs = []
        if "training" in tabs:
            figs.append(dual.plot_lsa_training(tabs["training"]))
            figs.append(dual.plot_gd_alignment(tabs["training"]))
        if "ood" in tabs:
            figs.append(dual.plot_ood(tabs["ood"]))
        return figs

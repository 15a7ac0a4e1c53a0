"""``[implied_updates]``: the probes on every layer and head, with their identities checked on
the model and their trajectory over demonstrations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.express as px

from ...hooks import QUANTITIES
from ...models import ModelShape
from ...probes import implied_updates, update_trajectory, verify_identities
from ...prompts import build_prompts
from ..checks import check_prompt_sizes, need
from ..labels import labeled_task
from ..settings import integer, list_of, setting, task_spec
from ..sizing import prompt_tokens, record_bytes
from .base import Memory, Section, Unit


@dataclass(frozen=True)
class ImpliedUpdatesSettings:
    """``[implied_updates]``: the probes on every layer and head, with their identities."""

    tasks: list[str] = setting(list_of(task_spec), ["capital"])
    k: int = setting(integer(1), 8)
    prompts: int = setting(integer(1), 8)
    verify_prompts: int = setting(integer(1), 2)
    trajectory_query: int = setting(integer(0), 0)
    seeds: list[int] = setting(list_of(integer(0)), [0])


@dataclass(frozen=True)
class ImpliedUpdatesUnit(Unit):
    section = "implied_updates"
    task: str = ""
    seed: int = 0


class ImpliedUpdates(Section):
    name = "implied_updates"
    Settings = ImpliedUpdatesSettings
    Unit = ImpliedUpdatesUnit

    def units(self, s: ImpliedUpdatesSettings) -> list[ImpliedUpdatesUnit]:
        return [ImpliedUpdatesUnit(task=t, seed=seed) for t in s.tasks for seed in s.seeds]

    def check_inputs(self, s: ImpliedUpdatesSettings, where: str) -> list[tuple[str, str]]:
        check_prompt_sizes(self.name, s.tasks, s.k, "k", s.prompts, "prompts", where)
        need(s.verify_prompts <= s.prompts, f"{where} [implied_updates] verify_prompts",
             f"{s.verify_prompts} > prompts = {s.prompts}; verify at most the prompts run")
        return []

    def run(self, model: Any, u: ImpliedUpdatesUnit, s: ImpliedUpdatesSettings, ctx: dict
            ) -> dict[str, pd.DataFrame]:
        task = labeled_task(u.task, s.tasks)
        pairs = build_prompts(model, task, range(s.prompts), k=s.k, seed=u.seed)
        up = implied_updates(model, pairs)
        traj = update_trajectory(model, task, query=s.trajectory_query, k=s.k, seed=u.seed)
        ident = verify_identities(model, pairs[: s.verify_prompts])
        return {"probes": up.table(), "trajectory": traj, "identities": ident}

    def memory(self, shape: ModelShape, s: ImpliedUpdatesSettings, b: int) -> Memory:
        return traced_memory(self.name, shape, s, b)

    def tables(self, tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
        p = tabs["probes"]
        return [("Identities: worst relative error", tabs["identities"].groupby("identity")
                 .max_rel_err.max().to_frame()),
                ("Probe quantities (median over prompts, layers, heads)",
                 p.groupby("quantity").value.describe()[["50%", "min", "max"]])]

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        figs = []
        p = tabs.get("probes")
        if p is not None:
            for q in ("lambda", "fidelity_err"):
                d = p[(p.quantity == q) & (p["head"] >= 0)]
                m = d.groupby(["layer", "head"]).value.mean().unstack("head")
                figs.append(px.imshow(m, aspect="auto", origin="upper", zmin=0, zmax=1,
                                      title=f"{q} (layer x head, mean over prompts)"))
        t = tabs.get("trajectory")
        if t is not None:
            d = t[t.quantity.isin(["mlp_dW_gate_norm", "mlp_dW_gate_step"])]
            d = d.groupby(["n_demos", "quantity"], as_index=False).value.mean()
            figs.append(px.line(d, x="n_demos", y="value", color="quantity", markers=True,
                                log_y=True, title="Rank-1 MLP update vs demonstrations (mean "
                                "over layers)"))
        return figs


def traced_memory(section: str, shape: ModelShape, s: Any, b: int) -> Memory:
    """A full trace of every quantity of ``s.prompts`` prompts with ``s.k`` demonstrations
    (``b`` bytes per weight: the stack is in the model's dtype)."""
    icl, _, _, _, how = prompt_tokens(shape, s.tasks, s.k)
    t = record_bytes(shape, QUANTITIES, s.prompts, icl, weight_bytes=b)
    return Memory(traces=t, traces_note=f"{section}: {s.prompts} prompts of up to {icl} tokens",
                  held=t, how=how)

"""How the implied updates change as demonstrations are added one at a time."""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd
import torch

from ..errors import ProbeError
from ..hooks import check_batch_size, resolve_layers
from ..prompts import build_prompt
from .updates import implied_updates


def update_trajectory(model: Any, task: Any, query: int = 0, k: int = 8, seed: int = 0, *,
                      layers: Iterable[int] | None = None, batch_size: int = 8,
                      **prompt_kwargs: Any) -> pd.DataFrame:
    """How the implied updates change as demonstrations are added one at a time.

    Builds the ``k``-shot prompt for ``query`` once, then the prompts with its first
    ``n = 1 .. k`` demonstrations (same demonstrations, same order), and runs
    :func:`implied_updates` on all of them in one batch. Returns the tidy table of
    :meth:`ImpliedUpdates.table` with a column ``n_demos``, plus per layer
    ``mlp_dW_{gate,in}_step`` = ``‖ΔW(n) − ΔW(n−1)‖_F`` (``ΔW(0) = 0``): Dherin et al.'s view
    of the MLP update settling as context accumulates. The ZS input ``u_0`` is the same for
    every ``n``, so the step is ``‖a_n − a_{n−1}‖ ‖b‖`` exactly.
    """
    if k < 1:
        raise ProbeError(f"update_trajectory(k={k}): needs at least one demonstration")
    # checked before the k prompts are built
    layers = resolve_layers(layers, model.cfg.n_layers, "update_trajectory", ProbeError)
    check_batch_size(batch_size, "update_trajectory", ProbeError)
    base = build_prompt(model, task, query, k, seed, **prompt_kwargs)
    rest = {key: val for key, val in prompt_kwargs.items() if key not in ("order", "balanced")}
    pairs = [build_prompt(model, task, query, n, seed, demos=base.demos[:n], **rest)
             for n in range(1, k + 1)]
    up = implied_updates(model, pairs, layers=layers, batch_size=batch_size)
    df = up.table(ranks=False)
    df.insert(1, "n_demos", [pairs[i].k for i in df.prompt])
    steps = []
    b_norm = up.mlp_b.norm(dim=-1)  # layer batch (identical across batch: one query)
    for name, a in up.mlp_a.items():
        prev = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)
        step = (a - prev).norm(dim=-1) * b_norm  # layer n
        for li, l in enumerate(up.layers):
            for i, p in enumerate(pairs):
                steps.append({"task": p.task, "n_demos": p.k, "prompt": i, "layer": l,
                              "head": -1, "demo": -1, "quantity": f"mlp_dW_{name}_step",
                              "value": float(step[li, i])})
    return pd.concat([df, pd.DataFrame(steps)], ignore_index=True)

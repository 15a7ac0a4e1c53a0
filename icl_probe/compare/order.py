"""Shen et al.'s order sensitivity: how much the output at p moves when the demonstrations are
reordered, for ICL and for gradient descent on each ordering."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch

from ..gd import as_configs, finetune
from ..hooks import trace
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task
from .metrics import order_sensitivity


def order_sensitivity_table(model: Any, pair: PromptPair, orderings: int = 10,
                            methods: Sequence[Any] = ("dai", "batch", "adam"),
                            *, lr: float = 1e-3, params: str = "kv",
                            seed: int = 0) -> pd.DataFrame:
    """Shen et al.'s order sensitivity of ``pair``'s demonstrations: ``orderings`` random
    permutations (the prompt's own order first), the output distribution at p of ICL and of
    each GD variant (fine-tuned on that ordering, run on the ZS prompt), and
    :func:`order_sensitivity` of each. Full-batch GD gives exactly 0 by construction.

    ``methods``: :class:`~icl_probe.FineTuneConfig` s, or method names / ``"v:L"`` run at
    ``lr`` and ``params`` (see :func:`icl_probe.gd.as_config`)."""
    configs = as_configs(list(methods), where="order_sensitivity_table(methods=[...])", lr=lr,
                         params=params)
    gen = torch.Generator().manual_seed(seed)
    perms = [list(range(pair.k))] + [torch.randperm(pair.k, generator=gen).tolist()
                                     for _ in range(orderings - 1)]
    task = load_task(pair.task) if isinstance(pair.task, str) else pair.task
    variants = [build_prompt(model, task, pair.query, demos=[pair.demos[i] for i in p])
                for p in perms]
    icl = trace(model, variants, what=("pattern",), layers=[0])
    rows = [{"run": "icl", "orderings": orderings,
             "order_sensitivity": order_sensitivity(torch.softmax(icl.logits.double(), -1))}]
    for cfg in configs:
        probs = []
        for v in variants:
            ft = finetune(model, v, cfg, record_queries=False)
            out = trace(ft.model, [v], kind="zs", what=("pattern",), layers=[0])
            probs.append(torch.softmax(out.logits[0].double(), -1))
        rows.append({"run": cfg.name, "orderings": orderings,
                     "order_sensitivity": order_sensitivity(torch.stack(probs))})
    return pd.DataFrame(rows)

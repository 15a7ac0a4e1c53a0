"""Shen et al.'s curves over epochs (REFERENCE §6): ICL against a fine-tune read at every
checkpoint of one run, each beside the ICL-vs-ICL-reordered reference that a GD curve is read
against; and order sensitivity over epochs (docs/protocol.md, Shen et al.).

**Protocol** (our choices, each a parameter): one demonstration set per (task, N, seed), as in
the shared protocol (:func:`~icl_probe.compare.demonstrations`). It is shown to every test
query (ICL), and one fine-tune of each setting trains on it, read at each checkpoint on every
query's zero-shot prompt (GD). The reference runs ICL with the same demonstrations in another
order, drawn with the seed.

**Metrics**, per query at the prediction position, then the mean over queries with a 95 %
bootstrap interval:

- ``accuracy``: the argmax over the whole vocabulary is the gold answer's first token;
- ``token_overlap``: ``|Top10(p_ICL) ∩ Top10(p)| / 10``;
- ``overlap_cosine``: the cosine of the two distributions on the tokens both top-10 sets hold.

``method`` is ``icl`` (accuracy only), ``icl_reordered`` (the reference: ICL with the
demonstrations reordered, against ICL), or a fine-tune setting's name.

>>> import icl_probe as ip
>>> from icl_probe.gd import EpochFineTune
>>> model = ip.tiny_model()
>>> t = shen_curves(model, "capital", n_demos=2, queries=3, lrs=[1e-2], eval_every=2,
...                 methods=[EpochFineTune(params="v:mid", epochs=2)])
>>> sorted(t.method.unique()), sorted(t.metric.unique())
(['icl', 'icl_reordered', 'sgd[full][v:mid]'], ['accuracy', 'overlap_cosine', 'token_overlap'])
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import CompareError
from ..gd import EpochFineTune, finetune_epochs
from ..models import load_model
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task
from . import stats
from .metrics import order_sensitivity, overlap_cosine, top_overlap
from .queries import demonstrations, resolve_queries
from .references import _logits

SHEN_METRICS = ("accuracy", "token_overlap", "overlap_cosine")


def shen_curves(model: Any, task: Any, *, n_demos: int, methods: Sequence[EpochFineTune],
                lrs: Sequence[float], queries: Any = 8, seed: int = 0, eval_every: int = 1,
                ci_seed: int = 0, references: bool = True) -> pd.DataFrame:
    """The tidy table of Fig. 5: one row per (method, lr, epoch, metric) with ``value``,
    ``ci_low``, ``ci_high`` and ``n``, plus (``references``) the ``icl`` and
    ``icl_reordered`` rows (no lr, no epoch), for ``n_demos`` demonstrations of ``task`` (see
    the module docstring)."""
    task = load_task(task)
    pairs, reordered = _prompt_sets(model, task, n_demos, queries, seed)
    p_icl = _probs(model, pairs, "icl")
    p_re = _probs(model, reordered, "icl")
    gold = [p.target_id for p in pairs]
    rows = [*_summary_rows({"method": "icl"}, {"accuracy": _accuracy(p_icl, gold)}, ci_seed),
            *_summary_rows({"method": "icl_reordered"}, _against(p_icl, p_re, gold), ci_seed)
            ] if references else []
    for cfg in methods:
        for lr in lrs:
            run_cfg = dataclasses.replace(cfg, lr=lr)
            keys = {"method": run_cfg.name, "params": cfg.params, "optimizer": cfg.optimizer,
                    "batch_size": cfg.batch_size, "lr": lr}

            def read(epoch: int, trained: Any) -> None:
                per_query = _against(p_icl, _probs(trained, pairs, "zs"), gold)
                rows.extend(_summary_rows({**keys, "epoch": epoch}, per_query, ci_seed))

            run = finetune_epochs(model, pairs[0], run_cfg, eval_every=eval_every,
                                  checkpoint=read, seed=seed, keep_deltas=False)
            if run.diverged_at is not None:
                rows.append({**keys, "epoch": run.diverged_at, "metric": "diverged",
                             "value": 1.0, "n": len(pairs)})
    return pd.DataFrame(rows)


def order_curves(model: Any, task: Any, *, n_demos: int, methods: Sequence[EpochFineTune],
                 lrs: Sequence[float], orderings: int = 10, queries: Any = 4, seed: int = 0,
                 eval_every: int = 1, ci_seed: int = 0, references: bool = True
                 ) -> pd.DataFrame:
    """Fig. 4: order sensitivity (:func:`~icl_probe.compare.metrics.order_sensitivity` over
    ``orderings`` orderings of one demonstration set) per query, mean over queries with a 95 %
    interval: one row for ICL (``references``), and per (method, lr, epoch) for each
    fine-tune, trained once per ordering with checkpoints."""
    if not isinstance(orderings, int) or orderings < 2:
        raise CompareError(f"order_curves(orderings={orderings!r}): expected an integer >= 2")
    task = load_task(task)
    pairs, _ = _prompt_sets(model, task, n_demos, queries, seed)
    gen = random.Random(seed)
    perms = [list(range(n_demos))] + [gen.sample(range(n_demos), n_demos)
                                      for _ in range(orderings - 1)]
    ordered = [[build_prompt(model, task, p.query, demos=[p.demos[i] for i in perm], seed=seed)
                for p in pairs] for perm in perms]
    rows = []
    if references:
        icl = torch.stack([_probs(model, o, "icl") for o in ordered])  # ordering query d_vocab
        rows = _summary_rows({"method": "icl"}, {"order_sensitivity": _spread(icl)}, ci_seed)
    for cfg in methods:
        for lr in lrs:
            run_cfg = dataclasses.replace(cfg, lr=lr)
            per_epoch: dict[int, list[torch.Tensor]] = {}
            for o in ordered:
                finetune_epochs(model, o[0], run_cfg, eval_every=eval_every, seed=seed,
                                keep_deltas=False,
                                checkpoint=lambda epoch, m, o=o: per_epoch.setdefault(
                                    epoch, []).append(_probs(m, o, "zs")))
            keys = {"method": run_cfg.name, "params": cfg.params, "optimizer": cfg.optimizer,
                    "batch_size": cfg.batch_size, "lr": lr}
            for epoch, probs in sorted(per_epoch.items()):
                if len(probs) == orderings:  # a diverged ordering leaves the epoch out
                    rows += _summary_rows({**keys, "epoch": epoch},
                                          {"order_sensitivity": _spread(torch.stack(probs))},
                                          ci_seed)
    return pd.DataFrame(rows)


def many_demos_table(model: Any, task: Any, *, n_train: Sequence[int],
                     method: EpochFineTune, lrs: Sequence[float], icl_n: int = 8,
                     queries: Any = 16, seed: int = 0, ci_seed: int = 0,
                     references: bool = True) -> pd.DataFrame:
    """Table 1: GD trained on many demonstrations against ICL with ``icl_n``, on ``queries``
    test queries. The demonstration sets are nested, the first N items of the seed's shuffle of
    the train split (:func:`~icl_probe.compare.demonstrations`), so GD with N = ``icl_n``
    trains on exactly ICL's demonstrations. GD's N demonstrations are cut into prompts of
    ``icl_n`` (no prompt need hold all of them; each demonstration is its own training example
    anyway) and trained for ``method.epochs`` epochs at each rate. Rows: ``icl`` (accuracy,
    ``n_train`` = ``icl_n``), and per (N, lr) at the last epoch the accuracy of GD and its
    token overlap and overlap cosine with ICL (as :func:`shen_curves`); a ``diverged`` row
    where training diverged."""
    task = load_task(task)
    if not isinstance(icl_n, int) or icl_n < 1 or not n_train or \
            any(not isinstance(n, int) or n < 1 for n in n_train):
        raise CompareError(f"many_demos_table(icl_n={icl_n!r}, n_train={list(n_train)!r}): "
                           "expected positive integers")
    query_idx = resolve_queries(task, queries, "test")
    order = demonstrations(task, max(*n_train, icl_n), seed, exclude=query_idx)
    pairs = [build_prompt(model, task, q, demos=order[:icl_n], seed=seed) for q in query_idx]
    p_icl = _probs(model, pairs, "icl")
    gold = [p.target_id for p in pairs]
    rows = _summary_rows({"method": "icl", "n_train": icl_n},
                         {"accuracy": _accuracy(p_icl, gold)}, ci_seed) if references else []
    for n in n_train:
        chunks = [build_prompt(model, task, query_idx[0], demos=order[i:min(i + icl_n, n)],
                               seed=seed) for i in range(0, n, icl_n)]
        for lr in lrs:
            cfg = dataclasses.replace(method, lr=lr)
            keys = {"method": cfg.name, "params": cfg.params, "optimizer": cfg.optimizer,
                    "batch_size": cfg.batch_size, "lr": lr, "n_train": n}
            last: dict[str, torch.Tensor] = {}
            run = finetune_epochs(model, chunks, cfg, eval_every=cfg.epochs, seed=seed,
                                  keep_deltas=False, checkpoint=lambda epoch, m: last.update(
                                      p=_probs(m, pairs, "zs")))
            if run.diverged_at is not None:
                rows.append({**keys, "epoch": run.diverged_at, "metric": "diverged",
                             "value": 1.0, "n": len(pairs)})
                continue
            rows += _summary_rows({**keys, "epoch": cfg.epochs},
                                  _against(p_icl, last["p"], gold), ci_seed)
    return pd.DataFrame(rows)


def checkpoint_table(checkpoints: Sequence[Any], task: Any, *, n_demos: int, queries: Any = 8,
                     seed: int = 0, load: Callable[[Any], Any] = load_model,
                     ci_seed: int = 0) -> pd.DataFrame:
    """Fig. 3: across checkpoints of one model (``load(spec)`` each, one at a time), ICL
    accuracy (the argmax over the vocabulary is the gold answer's first token) on ``queries``
    test queries with one set of ``n_demos`` demonstrations, and the average weight change:
    the mean of ``|θ_c − θ_first|`` over every parameter entry, against the first checkpoint
    (*choice*: the paper plots an "average weight change" without its formula). One row per
    (checkpoint, metric); ``step`` is the checkpoint's position in the list."""
    task = load_task(task)
    rows, first = [], None
    for step, spec in enumerate(checkpoints):
        model = load(spec)
        pairs, _ = _prompt_sets(model, task, n_demos, queries, seed)
        acc = _accuracy(_probs(model, pairs, "icl"), [p.target_id for p in pairs])
        params = {n: p.detach().to("cpu") for n, p in  # in the model's dtype: 7B in bf16 = 14 GB
                  getattr(model, "original_model", model).named_parameters()}
        first = params if first is None else first
        missing = sorted(set(first) ^ set(params))
        if missing:
            raise CompareError(f"checkpoint_table: checkpoint {step} ({spec!r}) has other "
                               f"parameters than the first ({missing[:3]}): not one model")
        total = sum(float((params[n].double() - first[n].double()).abs().sum()) for n in first)
        change = total / sum(x.numel() for x in first.values())
        keys = {"checkpoint": str(spec), "step": step}
        rows += _summary_rows(keys, {"icl_accuracy": acc}, ci_seed)
        rows.append({**keys, "metric": "weight_change", "value": change, "n": len(first)})
        del model
    return pd.DataFrame(rows)


def _prompt_sets(model: Any, task: Any, n_demos: int, queries: Any, seed: int
                 ) -> tuple[list[PromptPair], list[PromptPair]]:
    """The ICL prompts of the test queries with the seed's demonstration set, and the same
    prompts with the demonstrations in another order (a seeded permutation that moves at
    least one demonstration; with one demonstration there is no other order)."""
    query_idx = resolve_queries(task, queries, "test")
    demos = demonstrations(task, n_demos, seed, exclude=query_idx)
    perm = list(range(n_demos))
    rng = random.Random(seed + 1)
    while n_demos > 1 and perm == list(range(n_demos)):
        rng.shuffle(perm)
    pairs = [build_prompt(model, task, q, demos=demos, seed=seed) for q in query_idx]
    reordered = [build_prompt(model, task, q, demos=[demos[i] for i in perm], seed=seed)
                 for q in query_idx]
    return pairs, reordered


def _probs(model: Any, pairs: list[PromptPair], kind: str) -> torch.Tensor:
    """Each prompt's output distribution over the vocabulary at the prediction position
    (query d_vocab, float64, on the CPU: the metrics are per query), from the comparison's own
    logits (the shared prefix run once for ICL, self-checked)."""
    return torch.softmax(_logits(model, pairs, kind).double().cpu(), -1)


def _accuracy(p: torch.Tensor, gold: list[int]) -> np.ndarray:
    return (p.argmax(-1) == torch.tensor(gold)).double().numpy()


def _against(p_icl: torch.Tensor, p: torch.Tensor, gold: list[int]) -> dict[str, np.ndarray]:
    """Per query: the accuracy of ``p``, and its token overlap and overlap cosine with ICL."""
    return {"accuracy": _accuracy(p, gold),
            "token_overlap": np.array([top_overlap(a, b) for a, b in zip(p_icl, p)]),
            "overlap_cosine": np.array([overlap_cosine(a, b) for a, b in zip(p_icl, p)])}


def _spread(probs: torch.Tensor) -> np.ndarray:
    """Order sensitivity per query of (ordering query d_vocab) distributions."""
    return np.array([order_sensitivity(probs[:, q]) for q in range(probs.shape[1])])


def _summary_rows(keys: dict, per_query: dict[str, np.ndarray], seed: int) -> list[dict]:
    rows = []
    for metric, x in per_query.items():
        lo, hi = stats.bootstrap_ci(x, seed=seed)
        finite = np.isfinite(x)
        rows.append({**keys, "metric": metric,
                     "value": float(x[finite].mean()) if finite.any() else float("nan"),
                     "ci_low": lo, "ci_high": hi, "n": int(finite.sum())})
    return rows

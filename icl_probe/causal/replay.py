"""Does putting ICL's implied update into the weights reproduce ICL without its context
(:func:`replay`), and does it help other queries as a fine-tune does (:func:`transfer`)?
How the updates are built and patched: :mod:`icl_probe.causal.patches`; docs/science.md,
"Causal tests".

Per query, with ``ℓ`` the logits at the prediction position ``p``:

- **share of the ICL logit shift recovered**: ``1 − ‖ℓ_replay − ℓ_ICL‖ / ‖ℓ_ZS − ℓ_ICL‖``
  (1: ICL's logits; 0: no closer than zero-shot; negative: further away);
- **top-1 agreement** with ICL over the whole vocabulary;
- **accuracy** on the task (the candidates' first tokens);
- **KL(ICL ‖ replay)** of the next-token distributions.

Each is a mean over queries with a 95 % bootstrap interval, and is set against each baseline
(random updates of the same norm, the updates of shuffled-label demonstrations) through the
paired difference over the same queries (a lower KL is better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..compare import demonstrations
from ..compare.stats import bootstrap_ci, paired_difference, verdict
from ..errors import CausalError
from ..gd import FineTuneConfig, finetune
from ..hooks import predictions
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task
from .patches import check_replayable, icl_targets, mean_factors, replay_logits
from .vectors import patched_logits

REPLAY_BASELINES = ("random", "shuffled_labels")
METRICS = ("share", "top1", "accuracy", "kl")
LOWER_IS_BETTER = ("kl",)


@dataclass
class ReplayResult:
    """``per_query``: one row per (hypothesis, subset, baseline, query) with every metric;
    ``summary``: the tidy table (task, hypothesis, subset, baseline, metric, value, ci_low,
    ci_high, n, and ``vs_<baseline>`` verdicts on the hypothesis's own rows)."""

    per_query: pd.DataFrame
    summary: pd.DataFrame


def layer_subsets(n_layers: int, layers: Any = None) -> dict[str, tuple[int, ...]]:
    """``None``: every layer, and the first, middle and last third; a list of layers: that one
    subset; a mapping: named subsets. Checked against the model's layers."""
    if layers is None:
        cut = [round(i * n_layers / 3) for i in range(4)]
        subs = {"all": range(n_layers), "early": range(cut[0], cut[1]),
                "middle": range(cut[1], cut[2]), "late": range(cut[2], cut[3])}
    elif isinstance(layers, Mapping):
        subs = dict(layers)
    else:
        subs = {"layers " + ",".join(map(str, layers)): layers}
    out = {}
    for name, ls in subs.items():
        ls = tuple(ls)
        bad = [l for l in ls if isinstance(l, bool) or not isinstance(l, int)
               or not 0 <= l < n_layers]
        if not ls or bad:
            raise CausalError(f"replay: layer subset {name!r} = {list(ls)}: expected layers in "
                              f"0..{n_layers - 1}, at least one")
        out[str(name)] = tuple(sorted(set(ls)))
    return out


def replay(model: Any, pairs: Sequence[PromptPair], *, updates: Sequence[str] = ("exact",
           "mlp", "dual"), layers: Any = None, baselines: Sequence[str] = REPLAY_BASELINES,
           task: Any = None, seed: int = 0, progress: bool | None = None) -> ReplayResult:
    """Replay each of ``updates`` (:data:`~icl_probe.causal.patches.REPLAY_UPDATES`) on the
    zero-shot prompts of ``pairs``, patching the blocks of each subset of ``layers`` (see
    :func:`layer_subsets`), beside ``baselines``. ``task`` (default: the pairs' task by name)
    builds the shuffled-label prompts."""
    pairs = list(pairs)
    updates = (updates,) if isinstance(updates, str) else tuple(updates)
    _check(model, pairs, updates, baselines)
    subsets = layer_subsets(model.cfg.n_layers, layers)
    ref = references(model, pairs)
    shuffled = _shuffled(model, pairs, task) if "shuffled_labels" in baselines else None
    all_layers = tuple(sorted({l for ls in subsets.values() for l in ls}))
    rows = []
    bar = tqdm(total=len(updates) * len(subsets) * (1 + len(baselines)), unit="replay",
               desc="replay", disable=not (progress or progress is None and len(pairs) > 8))
    sources = {"": pairs, "shuffled_labels": shuffled}
    cache: dict[tuple[str, bool], Any] = {}  # exact and mlp read the same targets
    for u in updates:
        tg = {}
        for which, src in sources.items():
            if src is not None:
                key = (which, u == "dual")
                if key not in cache:
                    cache[key] = icl_targets(model, src, all_layers, u)
                tg[which] = cache[key]
        for name, ls in subsets.items():
            for base in ("",) + tuple(baselines):
                gen = torch.Generator().manual_seed(seed) if base == "random" else None
                logits, _ = replay_logits(model, pairs, ls, u, randomize=gen,
                                          targets=tg.get(base, tg[""]))
                rows += _query_rows(model, pairs, ref, logits, f"replay:{u}", name, base)
                bar.update()
    bar.close()
    per_query = pd.DataFrame(rows)
    ref_rows = _reference_rows(model, pairs, ref)
    return ReplayResult(per_query, summarise(pd.concat([ref_rows, per_query]),
                                             pairs[0].task, seed))


def transfer(model: Any, task: Any, *, k: int = 8, queries: int = 32, dev_queries: int = 16,
             updates: str = "exact", seed: int = 0, finetune_config: Any = None
             ) -> ReplayResult:
    """One demonstration set (the shared protocol's, ``k`` items, ``seed``) before every
    query. ``transfer:other`` gives each test query the update computed on the next test
    query's prompt; ``transfer:mean`` the mean of the dev queries' updates. Beside them, the
    real fine-tune on the same demonstrations (``finetune_config``, default Dai-FT on k/v at
    lr 1e-3), whose transfer is its test accuracy. Every update patches every block."""
    task = load_task(task)
    check_replayable(model, updates)
    if queries < 2:
        raise CausalError(f"transfer: queries={queries}; at least 2 (each gets another's update)")
    test, dev = task.split("test")[:queries], task.split("dev")[:dev_queries]
    demos = demonstrations(task, k, seed, exclude=list(test) + list(dev))
    pairs = [build_prompt(model, task, q, demos=demos, seed=seed) for q in test]
    dev_pairs = [build_prompt(model, task, q, demos=demos, seed=seed) for q in dev]
    _check(model, pairs + dev_pairs, (updates,), ())
    every = tuple(range(model.cfg.n_layers))
    ref = references(model, pairs)
    own = replay_logits(model, pairs, every, updates,
                        targets=icl_targets(model, pairs, every, updates))[1]
    dev_f = replay_logits(model, dev_pairs, every, updates,
                          targets=icl_targets(model, dev_pairs, every, updates))[1]
    n = len(pairs)
    rows = []
    for name, fs, src in (("transfer:other", own, [[(i + 1) % n] for i in range(n)]),
                          ("transfer:mean", dev_f, [list(range(len(dev)))] * n)):
        given = {l: mean_factors(f, src) for l, f in fs.items()}
        logits, _ = replay_logits(model, pairs, every, updates, factors=given)
        rows += _query_rows(model, pairs, ref, logits, name, "all", "")
    cfg = finetune_config or FineTuneConfig("dai", params="kv", lr=1e-3)
    ft = finetune(model, pairs[0], cfg, seed=seed)
    rows += _query_rows(model, pairs, ref, patched_logits(ft.model, pairs, None), "finetune",
                        "", "")
    per_query = pd.DataFrame(rows)
    return ReplayResult(per_query, summarise(
        pd.concat([_reference_rows(model, pairs, ref), per_query]), task.name, seed))


def references(model: Any, pairs: Sequence[PromptPair]) -> dict[str, torch.Tensor]:
    """The zero-shot and ICL logits at ``p`` (batch d_vocab, float32)."""
    return {"zs": patched_logits(model, pairs, None, "zs"),
            "icl": patched_logits(model, pairs, None, "icl")}


def _query_rows(model: Any, pairs: Sequence[PromptPair], ref: dict[str, torch.Tensor],
                logits: torch.Tensor, hypothesis: str, subset: str, baseline: str,
                kind: str = "zs") -> list[dict]:
    """One row per query: every metric of ``logits`` against the references; accuracy read
    with the candidates of the ``kind`` prompt the logits came from."""
    icl, zs = ref["icl"].double(), ref["zs"].double()
    x = logits.double()
    share = 1 - (x - icl).norm(dim=-1) / (zs - icl).norm(dim=-1)
    top1 = x.argmax(-1) == icl.argmax(-1)
    p_icl = icl.log_softmax(-1)
    kl = (p_icl.exp() * (p_icl - x.log_softmax(-1))).sum(-1)
    hits = predictions(model, pairs, kind, logits).numpy() == np.array([p.target for p in pairs])
    return [{"hypothesis": hypothesis, "subset": subset, "baseline": baseline,
             "query": p.query, "share": float(share[i]), "top1": float(top1[i]),
             "accuracy": float(hits[i]), "kl": float(kl[i])} for i, p in enumerate(pairs)]


def _reference_rows(model: Any, pairs: Sequence[PromptPair], ref: dict[str, torch.Tensor]
                    ) -> pd.DataFrame:
    """Zero-shot and ICL themselves (share 0 and 1 by definition)."""
    return pd.DataFrame(_query_rows(model, pairs, ref, ref["zs"], "zero_shot", "", "")
                        + _query_rows(model, pairs, ref, ref["icl"], "icl", "", "", "icl"))


def summarise(per_query: pd.DataFrame, task: str, seed: int) -> pd.DataFrame:
    """The tidy table: a row per (hypothesis, subset, baseline, metric) with its interval,
    and on each hypothesis's own rows its verdict against each of its baselines."""
    out = []
    keys = ["hypothesis", "subset", "baseline"]
    for (h, sub, base), d in per_query.groupby(keys, sort=False):
        for m in METRICS:
            x = d[m].to_numpy(float)
            lo, hi = bootstrap_ci(x, seed=seed)
            row = {"task": task, "hypothesis": h, "subset": sub, "baseline": base, "metric": m,
                   "value": float(np.nanmean(x)), "ci_low": lo, "ci_high": hi,
                   "n": int(np.isfinite(x).sum())}
            if base == "":
                for b in REPLAY_BASELINES:
                    other = per_query[(per_query.hypothesis == h) & (per_query.subset == sub)
                                      & (per_query.baseline == b)]
                    if len(other):
                        ours, theirs = (x, other[m].to_numpy(float))
                        if m in LOWER_IS_BETTER:
                            ours, theirs = -ours, -theirs
                        row[f"vs_{b}"] = verdict(*paired_difference(ours, theirs, seed=seed)[1:])
            out.append(row)
    return pd.DataFrame(out)


def _shuffled(model: Any, pairs: Sequence[PromptPair], task: Any) -> list[PromptPair]:
    """The same queries and demonstrations, the labels shuffled among the demonstrations."""
    t = load_task(task if task is not None else pairs[0].task)
    return [build_prompt(model, t, p.query, demos=list(p.demos), seed=p.meta.get("seed", 0),
                         shuffle_labels=True) for p in pairs]


def _check(model: Any, pairs: list[PromptPair], updates: Sequence[str],
           baselines: Sequence[str]) -> None:
    if not pairs:
        raise CausalError("replay: no prompt pairs")
    for u in updates:
        check_replayable(model, u)
    bad = [b for b in baselines if b not in REPLAY_BASELINES]
    if bad:
        raise CausalError(f"replay: baselines {bad}; expected some of {REPLAY_BASELINES}")
    full = sorted({p.task for p in pairs if p.scoring != "first_token"})
    if full:
        raise CausalError(f"replay: task {full[0]!r} scores whole answers; the replay patches "
                          "are computed at the prediction position only, so it scores a "
                          "candidate by its first token: use a task whose candidates' first "
                          "tokens differ (sentiment, subjectivity, topic)")
    if any(not p.spans.demos for p in pairs):
        raise CausalError("replay: a prompt has no demonstrations: nothing to replay")



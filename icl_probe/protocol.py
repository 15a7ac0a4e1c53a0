"""ICL against fine-tuning as the anchors ran it: :func:`compare`.

**The shared protocol** (``protocol="shared"``, the default; Dai et al.'s and Deutch et al.'s
code). For each seed, one demonstration set: the first ``k`` items of the task's train split
shuffled with that seed (``Task.split``; the pool is disjoint from the evaluation queries).
It is prepended to every query (ICL), and one fine-tune per (seed, method, learning rate)
trains on it; every query is then evaluated with that one fine-tuned model (FT). The ICL
prompts of a seed share their demonstration prefix, which runs once
(:func:`icl_probe.prefix.trace_shared_prefix`). ``protocol="per_query"`` draws each query its
own demonstrations (seed ``seed + query``) and fine-tunes once per query: more expensive, kept
for studies of per-query variation.

**Learning rate.** With several ``lrs`` each method is fine-tuned at every rate and seed; the
rate with the best FT accuracy on the dev split's queries (ties: the higher mean log-probability
of the gold answer) is *selected*, and the baselines run at it. Diverged runs (non-finite,
a rising loss, a collapsed output) never get selected and are left out of every metric.

**Baselines** (Deutch et al.), each run through the same pipeline: ``shuffled_labels``
(demonstrations with permuted labels), ``untrained`` (the architecture with random weights),
``embeddings_only`` (random weights but the trained embeddings, norms and unembedding);
per query and layer: a random update direction (``random_update``) and Dai's ``U[0, 1)``
vector (``uniform_random``); for SimAM_after, SimAM_before.

**Statistics.** Every number carries a 95 % bootstrap interval over queries (pooled over
seeds: the interval does not include the variation between demonstration sets, which the
per-seed rows of ``per_query`` show), and every similarity its paired difference to each
baseline with an interval and a verdict (:mod:`icl_probe.stats`).

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> t = ip.compare(model, "capital", k=2, queries=3, gd=ip.FineTuneConfig(lr=1e-2),
...                baselines=(), progress=False)
>>> sorted(t.per_query.run.unique())
['model']
>>> {"value", "ci_low", "ci_high", "n"} <= set(t.summary.columns)
True
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import einops
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import comparison as M
from . import stats
from .errors import CompareError
from .gd import FineTuneConfig, is_collapsed
from .hooks import trace
from .models import untrained_copy
from .prefix import trace_shared_prefix
from .scoring import predictions
from .prompts import PromptPair, Spans, build_prompt
from .tasks import Task, load_task

PROTOCOLS = ("shared", "per_query")
BASELINES = ("shuffled_labels", "untrained", "embeddings_only")
POSITIONS = ("pred", "label")
# Similarities and the baselines each is read against (the per-query random ones and SimAM's
# "before" live beside the metric in the same run; the others are runs of their own).
SIMILARITIES = ("SimAOU_norm", "SimAOU", "SimAM_after", "SimAM_delta", "Kendall",
                "Kendall_example", "weight_cos", "Rec2FTP")
IN_RUN_BASELINES = {
    "SimAOU_norm": ("random_update", "uniform_random"),
    "SimAOU": ("random_update", "uniform_random"),
    "SimAM_after": ("SimAM_before",),
    "SimAM_delta": ("random_update",),
    "Kendall": ("uniform_random",),
    "Kendall_example": ("uniform_random",),
    "weight_cos": ("random_update",),
}
# per-layer intervals (for the figures) of these metrics of the model's own run
LAYER_CI_METRICS = ("SimAOU_norm", "SimAOU", "SimAM_delta", "Kendall", "weight_cos")
ICL_WHAT = ("scores", "attn_out")
ZS_BATCH = 32  # zero-shot prompts are short: larger batches cost little memory
ZS_WHAT = ("q", "k", "v", "scores", "attn_out")


def _as_configs(gd: Any) -> list[FineTuneConfig]:
    if gd is None:
        return [FineTuneConfig()]
    if isinstance(gd, FineTuneConfig):
        return [gd]
    if isinstance(gd, dict):
        try:
            return [FineTuneConfig(**gd)]
        except TypeError as e:
            fields = [f.name for f in dataclasses.fields(FineTuneConfig)]
            raise CompareError(f"gd={gd!r}: {e}; FineTuneConfig takes {fields}") from None
    if isinstance(gd, (list, tuple)):
        return [c for g in gd for c in _as_configs(g)]
    raise CompareError(f"gd={gd!r}: expected a FineTuneConfig, a dict of its fields, or a list")


@dataclass
class Tables:
    """The comparison's tidy tables.

    ``summary``: task, method, lr, selected, run, metric, baseline, layer (-1 = mean over
    layers), value, ci_low, ci_high, n; a row with ``baseline`` set is the paired difference
    ours − baseline, with ``verdict``. ``table``: the compact per-task view (rows = metrics).
    ``per_query``: every query's three runs (correctness, FT status, output similarity), with
    its ``seed`` and ``demos`` (the demonstrations' item indices in prompt order; ``query``
    and ``demos`` index the same task items);
    ``per_layer`` and ``per_head``: layer- and head-wise metrics; ``sweep``: one row per
    (method, lr, seed) with dev and test accuracy, the fixes FT makes and divergence."""

    summary: pd.DataFrame
    table: pd.DataFrame
    per_query: pd.DataFrame
    per_layer: pd.DataFrame
    per_head: pd.DataFrame
    sweep: pd.DataFrame
    finetunes: int = 0


# ------------------------------------------------------------------------------ prompts


def resolve_queries(task: Task, queries: Any, split: str) -> list[int]:
    """``None``: every item of ``split``; an int n: its first n items; else item indices."""
    pool = list(task.split(split))
    if queries is None:
        return pool
    if isinstance(queries, (int, np.integer)) and not isinstance(queries, bool):
        if queries < 1:
            raise CompareError(f"queries={queries}: expected at least 1")
        if queries > len(pool):
            raise CompareError(f"queries={queries}: task {task.name!r} has {len(pool)} items in "
                               f"its {split} split; ask for at most that many")
        return pool[:queries]
    out = [int(q) for q in queries]
    bad = [q for q in out if not 0 <= q < len(task)]
    if bad or not out:
        raise CompareError(f"queries={out[:5]}...: item indices must lie in 0..{len(task) - 1}")
    return out


def demonstrations(task: Task, k: int, seed: int, *, balanced: bool = False,
                   exclude: Iterable[int] = ()) -> list[int]:
    """The shared protocol's demonstration set: the first ``k`` items of the task's train
    split shuffled with ``seed`` (Dai et al.); ``balanced`` takes the same number per label.
    Items in ``exclude`` (the queries) are never drawn."""
    ex = set(exclude)
    pool = [i for i in task.split("train") if i not in ex]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if k > len(pool):
        raise CompareError(f"k={k}: task {task.name!r} has {len(pool)} demonstration items in "
                           "its train split; use a smaller k")
    if not balanced or not task.is_classification:
        return pool[:k]
    per, extra = divmod(k, len(task.labels))
    want = {lab: per + (i < extra) for i, lab in enumerate(task.labels)}
    out = []
    for i in pool:
        if want[task.items[i].y] > 0:
            want[task.items[i].y] -= 1
            out.append(i)
    return out


def _at_label(pair: PromptPair) -> PromptPair:
    """``pair`` with the first candidate label's first token appended to both prompts: Dai's
    reading point, one position after the prediction position."""
    tok = pair.label_ids[:1]

    def grow(spans: Spans, n: int) -> Spans:
        return dataclasses.replace(spans, pred=n)

    return dataclasses.replace(
        pair, icl_ids=torch.cat([pair.icl_ids, tok]), zs_ids=torch.cat([pair.zs_ids, tok]),
        spans=grow(pair.spans, len(pair.icl_ids)), zs_spans=grow(pair.zs_spans, len(pair.zs_ids)),
        meta={**pair.meta, "position": "label"})


def _kendall_positions(pair: PromptPair, loss_tokens: str) -> tuple[torch.Tensor, list[int]]:
    """ICL positions of the demonstration tokens the FT examples hold (input and label; the
    separator too with ``loss_tokens="demo+sep"``), and each demonstration's count."""
    pos, lens = [], []
    for d in pair.spans.demos:
        stop = d.sep.stop if loss_tokens == "demo+sep" else d.label.stop
        pos.append(torch.arange(d.input.start, stop))
        lens.append(stop - d.input.start)
    return torch.cat(pos), lens


# ------------------------------------------------------------------------------ runs


@dataclass
class _Refs:
    """The ZS and ICL runs of one (model variant, prompt set): shared by every rate/method."""

    pairs: list[PromptPair]
    zs: Any
    icl: Any
    dM_icl: list[torch.Tensor]       # per prompt: layer kv_head d_head d_head
    pred_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    predicted: dict[str, torch.Tensor] = field(default_factory=dict)  # candidate index per run


def _kv_operator(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """M = Σ_j v_j ⊗ k_j over the given positions (layer key_pos kv_head d_head each)."""
    return einops.einsum(v.double(), k.double(), "layer key_pos kv_head d_v, "
                         "layer key_pos kv_head d_k -> layer kv_head d_v d_k")


def _reference_runs(model: Any, pairs: list[PromptPair], protocol: str, position: str) -> _Refs:
    run_pairs = [_at_label(p) for p in pairs] if position == "label" else pairs
    zs = trace(model, run_pairs, kind="zs", what=ZS_WHAT, batch_size=ZS_BATCH)
    if protocol == "shared":
        icl = trace_shared_prefix(model, run_pairs, what=ICL_WHAT)
        demo_pos = pairs[0].spans.demo_indices()
        pre = trace(model, [pairs[0].icl_ids[: int(demo_pos[-1]) + 1]], what=("k", "v"),
                    positions="pred")
        dM = _kv_operator(pre.data["k"][:, 0, demo_pos], pre.data["v"][:, 0, demo_pos])
        dM_icl = [dM] * len(pairs)
    else:
        icl = trace(model, run_pairs, what=ICL_WHAT + ("k", "v"))
        dM_icl = []
        for b, p in enumerate(pairs):
            d = p.spans.demo_indices()
            dM_icl.append(_kv_operator(icl.data["k"][:, b, d], icl.data["v"][:, b, d]))
    refs = _Refs(run_pairs, zs, icl, dM_icl)
    if position == "label":  # correctness is still read at the prediction position
        refs.pred_logits["zs"] = _logits(model, pairs, "zs")
        refs.pred_logits["icl"] = _logits(model, pairs, "icl")
    else:
        refs.pred_logits["zs"], refs.pred_logits["icl"] = zs.logits, icl.logits
    for kind in ("zs", "icl"):  # by each prompt's scoring (first token, or the whole answer)
        refs.predicted[kind] = predictions(model, pairs, kind, refs.pred_logits[kind])
    return refs


def _logits(model: Any, pairs: list[PromptPair], kind: str) -> torch.Tensor:
    if kind == "icl" and len(pairs) > 1:
        return trace_shared_prefix(model, pairs, what=("attn_out",), layers=[0]).logits
    return trace(model, pairs, kind=kind, what=("attn_out",), layers=[0],
                 batch_size=ZS_BATCH).logits


def _scale(rec: Any, li: int) -> float:
    """The factor the model multiplies q·k by in the record's ``li``-th layer."""
    s = rec.__dict__.get("scale")
    if s is None:
        return rec.d_head ** -0.5
    s = torch.as_tensor(s).flatten()
    return float(s[li] if s.numel() > 1 else s[0])


def _evaluate(model: Any, refs: _Refs, fts: list[Any], cfg: FineTuneConfig, *, gen: torch.Generator,
              keys: dict, position: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Every per-query, per-layer and per-head metric of one FT setting against the shared
    ZS/ICL runs. ``fts``: one fine-tune (shared protocol) or one per query."""
    pairs = refs.pairs
    if len(fts) == 1:
        ftr = trace(fts[0].model, pairs, kind="zs", what=ZS_WHAT, batch_size=ZS_BATCH)
        ft_of = [(fts[0], ftr, b) for b in range(len(pairs))]
    else:
        ft_of = []
        for b, ft in enumerate(fts):
            ft_of.append((ft, trace(ft.model, [pairs[b]], kind="zs", what=ZS_WHAT), 0))
    zs, icl = refs.zs, refs.icl
    icl_s, zs_s = icl.at_pred("scores"), zs.at_pred("scores")
    icl_h, zs_h = icl.at_pred("attn_out"), zs.at_pred("attn_out")
    rows_q, rows_l, rows_h = [], [], []
    # the FT runs' logits at the prediction position, and the candidate each predicts
    base_pairs = pairs if position == "pred" else [_strip_label(p) for p in pairs]
    if position == "pred":
        ft_logits_all = torch.stack([ftr.logits[i] for _, ftr, i in ft_of])
    else:
        ft_logits_all = torch.stack([_logits(ft.model, [p], "zs")[0]
                                     for (ft, _, _), p in zip(ft_of, base_pairs)])
    if len(fts) == 1:
        ft_pred = predictions(fts[0].model, base_pairs, "zs", ft_logits_all)
    else:
        ft_pred = torch.cat([predictions(ft.model, [p], "zs", ft_logits_all[b: b + 1])
                             for b, ((ft, _, _), p) in enumerate(zip(ft_of, base_pairs))])
    for b, pair in enumerate(pairs):
        ft, ftr, i = ft_of[b]
        ft_logits = ft_logits_all[b]
        correct, probs = {}, {}
        for name, logits, pick in (("zs", refs.pred_logits["zs"][b], refs.predicted["zs"][b]),
                                   ("icl", refs.pred_logits["icl"][b], refs.predicted["icl"][b]),
                                   ("ft", ft_logits, ft_pred[b])):
            logits = logits.double()
            probs[name] = torch.softmax(logits, -1)
            correct[name] = int(pick) == pair.target
            correct[name + "_vocab"] = int(logits.argmax()) == pair.target_id
        collapsed = is_collapsed(ft_logits)
        gold_lp = float(torch.log_softmax(ft_logits.double(), -1)[pair.target_id])
        rows_q.append({**keys, "query": pair.query,
                       "demos": " ".join(map(str, pair.demos)),  # item indices, prompt order
                       "scoring": pair.scoring,
                       "zs_correct": correct["zs"], "icl_correct": correct["icl"],
                       "ft_correct": correct["ft"], "zs_vocab_correct": correct["zs_vocab"],
                       "icl_vocab_correct": correct["icl_vocab"],
                       "ft_vocab_correct": correct["ft_vocab"], "ft_gold_logprob": gold_lp,
                       "ft_collapsed": collapsed, "ft_diverged": ft.diverged or collapsed,
                       "divergence": ft.divergence or ("collapsed output" if collapsed else ""),
                       "ft_final_loss": ft.losses[-1] if ft.losses else float("nan"),
                       "top10_overlap": M.top_overlap(probs["icl"], probs["ft"]),
                       "overlap_cosine": M.overlap_cosine(probs["icl"], probs["ft"]),
                       "kl_icl_ft": M.kl(probs["icl"], probs["ft"])})
        # per layer: SimAOU, SimAM, Kendall, weight-space cosine, with in-run baselines
        h_zs, h_icl = zs_h[:, b].double(), icl_h[:, b].double()
        h_ft = ftr.at_pred("attn_out")[:, i].double()
        aou = {n: M.simaou(h_zs, h_icl, h_ft, normalize=n) for n in (True, False)}
        rand_dir = torch.randn(h_ft.shape, generator=gen, dtype=torch.float64)
        r_uniform = torch.rand(h_ft.shape, generator=gen, dtype=torch.float64)
        aou_rand = {n: M._cos(_update(h_zs, h_icl, n), rand_dir) for n in (True, False)}
        aou_unif = {n: M.simaou_uniform_random(h_zs, h_icl, r_uniform, normalize=n)
                    for n in (True, False)}
        q_icl = pair.spans.query.indices()  # the query's tokens (no BOS), in both prompts
        q_zs = pair.zs_spans.query.indices()
        m_icl = icl_s[:, b][..., q_icl].double()  # layer head query_tok
        m_zs = zs_s[:, b][..., q_zs].double()
        m_ft = ftr.at_pred("scores")[:, i][..., q_zs].double()
        sam = M.simam(m_zs, m_icl, m_ft)
        sam_rand = M._cos(m_icl - m_zs, torch.randn(m_ft.shape, generator=gen,
                                                    dtype=torch.float64)).mean(-1)
        zs_all = torch.arange(len(pair.zs_ids))
        n_zs = len(pair.zs_ids)
        dM_gd = (_kv_operator(ftr.data["k"][:, i, :n_zs], ftr.data["v"][:, i, :n_zs])
                 - _kv_operator(zs.data["k"][:, b, zs_all], zs.data["v"][:, b, zs_all]))
        dM_icl = refs.dM_icl[b]
        w_cos = M._cos(dM_icl.flatten(-2), dM_gd.flatten(-2))  # layer kv_head
        w_rand = M._cos(dM_icl.flatten(-2), torch.randn(dM_gd.flatten(-2).shape, generator=gen,
                                                        dtype=torch.float64))
        q_ft = ftr.at_pred("q")[:, i]  # layer head d_head
        use_ken = bool(ft.step_queries) and not (ft.diverged or collapsed)
        if use_ken:
            ken_pos, demo_lens = _kendall_positions(pair, cfg.loss_tokens)
            off = 1 if pair.spans.bos is not None else 0
        for li, l in enumerate(icl.layers):
            ken = ken_ex = ken_rand = ken_ex_rand = float("nan")
            if use_ken:
                q_steps = torch.cat([qs[li, off:] for qs in ft.step_queries[: pair.k]])
                s_demo = icl_s[li, b][:, ken_pos]
                sc = _scale(icl, li)
                ken = M.kendall_icl_ft(s_demo, q_steps, q_ft[li], scale=sc)
                ken_ex = M.kendall_icl_ft(s_demo, q_steps, q_ft[li], scale=sc, level="example",
                                          demo_lengths=demo_lens)
                icl_w = torch.softmax(s_demo.double().sum(0), -1)
                ken_rand = M.kendall_tau(icl_w, torch.rand(icl_w.shape, generator=gen,
                                                           dtype=torch.float64))
                ex_w = torch.stack([w.sum() for w in icl_w.split(demo_lens)])
                ken_ex_rand = M.kendall_tau(ex_w, torch.rand(ex_w.shape, generator=gen,
                                                             dtype=torch.float64))
            rows_l.append({**keys, "query": pair.query, "layer": l,
                           "SimAOU_norm": float(aou[True][li]), "SimAOU": float(aou[False][li]),
                           "SimAOU_norm|random_update": float(aou_rand[True][li]),
                           "SimAOU|random_update": float(aou_rand[False][li]),
                           "SimAOU_norm|uniform_random": float(aou_unif[True][li]),
                           "SimAOU|uniform_random": float(aou_unif[False][li]),
                           "SimAM_before": float(sam["before"][li]),
                           "SimAM_after": float(sam["after"][li]),
                           "SimAM_after|SimAM_before": float(sam["before"][li]),
                           "SimAM_delta": float(sam["delta"][li]),
                           "SimAM_delta|random_update": float(sam_rand[li]),
                           "Kendall": ken, "Kendall|uniform_random": ken_rand,
                           "Kendall_example": ken_ex, "Kendall_example|uniform_random": ken_ex_rand,
                           "weight_cos": float(w_cos[li].mean()),
                           "weight_cos|random_update": float(w_rand[li].mean()),
                           "ft_diverged": ft.diverged or collapsed})
            for h, g in enumerate(icl.kv_head_of.tolist()):
                rows_h.append({**keys, "query": pair.query, "layer": l, "head": h, "kv_head": g,
                               "weight_cos": float(w_cos[li, g]),
                               "weight_cos|random_update": float(w_rand[li, g]),
                               "ft_diverged": ft.diverged or collapsed})
    return rows_q, rows_l, rows_h


def _update(h_zs: torch.Tensor, h_icl: torch.Tensor, normalize: bool) -> torch.Tensor:
    if normalize:
        h_zs, h_icl = (h / h.norm(dim=-1, keepdim=True) for h in (h_zs, h_icl))
    return h_icl - h_zs


def _strip_label(pair: PromptPair) -> PromptPair:
    return dataclasses.replace(pair, icl_ids=pair.icl_ids[:-1], zs_ids=pair.zs_ids[:-1])


# ------------------------------------------------------------------------------ driver


class Comparison:
    """The pieces of :func:`compare`, for callers (the experiment runner) that schedule the
    settings themselves. ZS/ICL runs and demonstration sets are computed once per (variant,
    seed, split) and reused by every method and rate; ``finetunes`` counts fine-tunes."""

    def __init__(self, model: Any, task: Any, *, k: int = 32, queries: Any = None,
                 dev_queries: Any = None, protocol: str = "shared", position: str = "pred",
                 balanced: bool = False, baseline_models: dict[str, Any] | None = None,
                 model_seed: int = 0, progress: bool | None = None):
        if protocol not in PROTOCOLS:
            raise CompareError(f"protocol={protocol!r}: expected one of {PROTOCOLS}")
        if position not in POSITIONS:
            raise CompareError(f"position={position!r}: expected one of {POSITIONS}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CompareError(f"k={k!r}: expected an integer >= 1 demonstrations")
        self.model, self.task, self.k = model, load_task(task), k
        self.protocol, self.position, self.balanced = protocol, position, balanced
        self.queries = resolve_queries(self.task, queries, "test")
        self.dev_queries = resolve_queries(self.task, dev_queries, "dev")
        # not copied: a caller may share one dict (and the models built into it) across tasks
        self.models = baseline_models if baseline_models is not None else {}
        self.model_seed, self.progress = model_seed, progress
        self._refs: dict[tuple, _Refs] = {}
        self._pairs: dict[tuple, list[PromptPair]] = {}
        self.finetunes = 0

    # -- variants and prompts
    def variant_model(self, run: str) -> Any:
        if run in ("model", "shuffled_labels"):
            return self.model
        if run not in self.models:
            if run not in ("untrained", "embeddings_only"):
                raise CompareError(f"baseline {run!r}: expected one of {BASELINES} or a name "
                                   "given in baseline_models")
            keep = "none" if run == "untrained" else "embeddings"
            self.models[run] = untrained_copy(self.model, keep, seed=self.model_seed)
        return self.models[run]

    def pairs(self, run: str, seed: int, split: str) -> list[PromptPair]:
        key = (run, seed, split)
        if key not in self._pairs:
            model = self.variant_model(run)
            queries = self.queries if split == "test" else self.dev_queries
            shuffle = run == "shuffled_labels"
            if self.protocol == "shared":
                # one set for the seed, whatever the split: test and dev queries both excluded
                demos = demonstrations(self.task, self.k, seed, balanced=self.balanced,
                                       exclude=self.queries + self.dev_queries)
                # with explicit demonstrations build_prompt's label permutation depends on the
                # seed alone: every query of the seed gets the same one (the prefix stays shared)
                out = [build_prompt(model, self.task, q, demos=demos, seed=seed,
                                    shuffle_labels=shuffle) for q in queries]
            else:
                out = [build_prompt(model, self.task, q, self.k, seed + q, balanced=self.balanced,
                                    shuffle_labels=shuffle, pool=self.task.split("train"))
                       for q in queries]
            self._pairs[key] = out
        return self._pairs[key]

    def refs(self, run: str, seed: int, split: str) -> _Refs:
        key = (run, seed, split)
        if key not in self._refs:
            self._refs[key] = _reference_runs(self.variant_model(run), self.pairs(run, seed, split),
                                              self.protocol, self.position)
        return self._refs[key]

    # -- one setting
    def run(self, cfg: FineTuneConfig, seed: int, run: str = "model",
            splits: Sequence[str] = ("test",)) -> dict[str, pd.DataFrame]:
        """Fine-tune once (shared protocol) or once per query, and evaluate ``splits``: every
        metric on the test queries; FT accuracy and the gold answer's log-probability on the
        dev queries (what the learning-rate choice needs). Returns the per_query, per_layer
        and per_head tables and ``finetune`` (one row per fine-tune)."""
        from .gd import finetune

        model = self.variant_model(run)
        out: dict[str, list] = {"per_query": [], "per_layer": [], "per_head": [], "finetune": []}
        gen = torch.Generator().manual_seed(seed)
        shared = None
        for split in splits:
            pairs = self.pairs(run, seed, split)
            keys = {"task": self.task.name, "method": cfg.name, "lr": cfg.lr, "seed": seed,
                    "run": run, "split": split}
            if self.protocol == "shared":
                # the same demonstrations serve every split: one fine-tune
                if shared is None:
                    shared = finetune(model, pairs[0], **cfg.kwargs(), seed=seed)
                    self.finetunes += 1
                    out["finetune"].append(_ft_row(keys, shared))
                fts = [shared]
            else:
                fts = []
                for p in tqdm(pairs, desc=f"fine-tune {cfg.name}", unit="query",
                              disable=not self.progress):
                    fts.append(finetune(model, p, **cfg.kwargs(), seed=seed))
                    self.finetunes += 1
                    out["finetune"].append(_ft_row(keys, fts[-1]))
            if split == "test":
                q, l, h = _evaluate(model, self.refs(run, seed, split), fts, cfg, gen=gen,
                                    keys=keys, position=self.position)
                out["per_layer"] += l
                out["per_head"] += h
            else:
                q = _dev_rows(pairs, fts, keys)
            out["per_query"] += q
        return {k: pd.DataFrame(v) for k, v in out.items()}


def _ft_row(keys: dict, ft: Any) -> dict:
    return {**keys, "steps": len(ft.losses),
            "first_loss": ft.losses[0] if ft.losses else np.nan,
            "final_loss": ft.losses[-1] if ft.losses else np.nan,
            "diverged": ft.diverged, "divergence": ft.divergence or ""}


def _dev_rows(pairs: list[PromptPair], fts: list[Any], keys: dict) -> list[dict]:
    """FT correctness and gold log-probability of held-out queries (ZS prompts)."""
    if len(fts) == 1:
        logits = _logits(fts[0].model, pairs, "zs")
        per = [(fts[0], logits[b]) for b in range(len(pairs))]
        picks = predictions(fts[0].model, pairs, "zs", logits)
    else:
        per = [(ft, _logits(ft.model, [p], "zs")[0]) for ft, p in zip(fts, pairs)]
        picks = torch.cat([predictions(ft.model, [p], "zs", lg[None]) for (ft, lg), p in
                           zip(per, pairs)])
    rows = []
    for pair, (ft, lg), pick in zip(pairs, per, picks):
        lg = lg.double()
        collapsed = is_collapsed(lg)
        rows.append({**keys, "query": pair.query, "demos": " ".join(map(str, pair.demos)),
                     "scoring": pair.scoring, "ft_correct": int(pick) == pair.target,
                     "ft_gold_logprob": float(torch.log_softmax(lg, -1)[pair.target_id]),
                     "ft_collapsed": collapsed, "ft_diverged": ft.diverged or collapsed,
                     "divergence": ft.divergence or ("collapsed output" if collapsed else "")})
    return rows


def select_lr(sweep: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per (task, method), the rate with the best mean dev-split FT accuracy over seeds (ties:
    the higher mean gold-answer log-probability); diverged rates are never chosen."""
    out = {}
    for key, d in sweep.groupby(["task", "method"]):
        ok = d[~d.diverged]
        if ok.empty:
            continue
        g = ok.groupby("lr").agg(acc=("dev_ft_acc", "mean"), lp=("dev_gold_logprob", "mean"))
        g = g.sort_values(["acc", "lp"], ascending=False)
        out[key] = float(g.index[0])
    return out


def sweep_rows(per_query: pd.DataFrame, finetunes: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, lr, seed): dev/test accuracies, FT's fixes, divergence."""
    rows = []
    pq = per_query[per_query.run == "model"].copy()
    for c in ("zs_correct", "icl_correct", "ft_correct", "ft_diverged"):
        if c in pq:  # dev rows leave the ZS/ICL columns empty: back to booleans
            pq[c] = pq[c].fillna(False).astype(bool)
    for (task, method, lr, seed), d in pq.groupby(["task", "method", "lr", "seed"]):
        dev, test = d[d.split == "dev"], d[d.split == "test"]
        f = finetunes[(finetunes.method == method) & (finetunes.lr == lr)
                      & (finetunes.seed == seed) & (finetunes.run == "model")]
        div = bool(f.diverged.any()) or bool(d.ft_diverged.any())
        reason = "; ".join(sorted({x for x in list(f.divergence) + list(d.divergence)
                                   if isinstance(x, str) and x}))
        rows.append({"task": task, "method": method, "lr": lr, "seed": seed,
                     "dev_ft_acc": dev.ft_correct.mean() if len(dev) else np.nan,
                     "dev_gold_logprob": dev.ft_gold_logprob.mean() if len(dev) else np.nan,
                     "test_zs_acc": test.zs_correct.mean(), "test_icl_acc": test.icl_correct.mean(),
                     "test_ft_acc": test.ft_correct.mean(),
                     "ft_fixes": int((test.ft_correct & ~test.zs_correct).sum()),
                     "ft_changed": int((test.ft_correct != test.zs_correct).sum()),
                     "diverged": div, "divergence": reason})
    out = pd.DataFrame(rows)
    if len(out):
        chosen = select_lr(out)
        out["selected"] = [chosen.get((t, m)) == lr for t, m, lr in
                           zip(out.task, out.method, out.lr)]
        out["flag"] = np.where(out.diverged, "diverged",
                               np.where(out.ft_fixes == 0, "FT fixes no zero-shot error", ""))
    return out


# ------------------------------------------------------------------------------ summary


def summarise(per_query: pd.DataFrame, per_layer: pd.DataFrame, *, seed: int = 0
              ) -> pd.DataFrame:
    """Tidy summary with intervals: for each (task, method, lr, run) the accuracies,
    Rec2FTP and every layer-averaged metric (each over queries, pooled over seeds), and for
    the ``model`` run the paired difference to each baseline with its verdict. Diverged
    fine-tunes are left out and counted (``ft_diverged``)."""
    rows = []
    pq = per_query[per_query.split == "test"] if "split" in per_query else per_query
    group_keys = ["task", "method", "lr", "run"]
    metric_cols = [c for c in per_layer.columns if c not in group_keys + [
        "seed", "query", "layer", "split", "ft_diverged"]
        and pd.api.types.is_numeric_dtype(per_layer[c])]
    layer_means = (per_layer[~per_layer.ft_diverged.astype(bool)]
                   [group_keys + ["seed", "query"] + metric_cols]
                   .groupby(group_keys + ["seed", "query"]).mean().reset_index()
                   if len(per_layer) else pd.DataFrame(columns=group_keys + ["seed", "query"]))
    for key, d in pq.groupby(group_keys):
        base = dict(zip(group_keys, key))
        ok = d[~d.ft_diverged]
        for col, metric in (("zs_correct", "acc_ZS"), ("icl_correct", "acc_ICL"),
                            ("ft_correct", "acc_FT"), ("zs_vocab_correct", "vocab_acc_ZS"),
                            ("icl_vocab_correct", "vocab_acc_ICL"),
                            ("ft_vocab_correct", "vocab_acc_FT")):
            src = d if metric.endswith("ZS") or metric.endswith("ICL") else ok
            x = src[col].to_numpy(float)
            rows.append({**base, "metric": metric, "baseline": "", "layer": -1,
                         "value": x.mean() if len(x) else np.nan,
                         **_ci(x, seed), "n": len(x)})
        rows.append({**base, "metric": "ft_diverged", "baseline": "", "layer": -1,
                     "value": float(d.ft_diverged.mean()), "ci_low": np.nan, "ci_high": np.nan,
                     "n": len(d)})
        zs, icl, ft = (ok[c].to_numpy(bool) for c in _RUNS)
        v, lo, hi = stats.rec2ftp_interval((zs, icl, ft), seed=seed)
        rows.append({**base, "metric": "Rec2FTP", "baseline": "", "layer": -1, "value": v,
                     "ci_low": lo, "ci_high": hi, "n": len(ok),
                     "n_ft_fixes": int((ft & ~zs).sum())})
        for m in ("top10_overlap", "overlap_cosine", "kl_icl_ft"):
            x = ok[m].to_numpy(float)
            rows.append({**base, "metric": m, "baseline": "", "layer": -1,
                         "value": np.nanmean(x) if np.isfinite(x).any() else np.nan,
                         **_ci(x, seed), "n": int(np.isfinite(x).sum())})
        lm = layer_means
        if len(lm):
            lm = lm[(lm.task == key[0]) & (lm.method == key[1]) & (lm.lr == key[2])
                    & (lm.run == key[3])]
        for col in [c for c in lm.columns if c not in group_keys + ["seed", "query", "split"]]:
            metric, _, b = col.partition("|")
            x = lm[col].to_numpy(float)
            rows.append({**base, "metric": metric, "baseline": b, "layer": -1,
                         "value": np.nanmean(x) if np.isfinite(x).any() else np.nan,
                         **_ci(x, seed), "n": int(np.isfinite(x).sum()),
                         "kind": "baseline value" if b else ""})
        pl = per_layer[(per_layer.task == key[0]) & (per_layer.method == key[1])
                       & (per_layer.lr == key[2]) & (per_layer.run == key[3])
                       & ~per_layer.ft_diverged] if len(per_layer) else per_layer
        for col in metric_cols:
            metric, _, b = col.partition("|")
            with_ci = key[3] == "model" and not b and metric in LAYER_CI_METRICS
            for layer, x in pl.groupby("layer")[col]:
                x = x.to_numpy(float)
                lo, hi = (stats.bootstrap_ci(x, seed=seed, method="percentile")
                          if with_ci and np.isfinite(x).sum() > 1 else (np.nan, np.nan))
                rows.append({**base, "metric": metric, "baseline": b, "layer": int(layer),
                             "value": np.nanmean(x) if np.isfinite(x).any() else np.nan,
                             "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(x).sum()),
                             "kind": "baseline value" if b else ""})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["kind"] = out.get("kind", pd.Series("", index=out.index)).fillna("")
    return pd.concat([out, _differences(pq, layer_means, seed)], ignore_index=True)


_RUNS = ("zs_correct", "icl_correct", "ft_correct")


def _ci(x: np.ndarray, seed: int) -> dict:
    lo, hi = stats.bootstrap_ci(x, seed=seed)
    return {"ci_low": lo, "ci_high": hi}


def _differences(pq: pd.DataFrame, lm: pd.DataFrame, seed: int) -> pd.DataFrame:
    """ours − baseline, paired by (seed, query), for every similarity and baseline."""
    rows = []
    keys = ["seed", "query"]
    model_q = pq[pq.run == "model"]
    for (task, method, lr), d in model_q.groupby(["task", "method", "lr"]):
        base = {"task": task, "method": method, "lr": lr, "run": "model", "layer": -1,
                "kind": "difference"}
        ours_l = lm[(lm.task == task) & (lm.method == method) & (lm.lr == lr) & (lm.run == "model")]
        for metric in SIMILARITIES:
            if metric == "Rec2FTP":
                continue
            if metric not in ours_l:
                continue
            for b in IN_RUN_BASELINES.get(metric, ()):
                col = f"{metric}|{b}"
                if col in ours_l:
                    m, lo, hi = stats.paired_difference(ours_l[metric], ours_l[col], seed=seed)
                    rows.append({**base, "metric": metric, "baseline": b, "value": m,
                                 "ci_low": lo, "ci_high": hi, "n": len(ours_l),
                                 "verdict": stats.verdict(lo, hi)})
            for b in sorted(set(lm.run) - {"model"}):
                theirs = lm[(lm.task == task) & (lm.method == method) & (lm.lr == lr)
                            & (lm.run == b)]
                if theirs.empty:
                    continue
                j = ours_l.merge(theirs, on=keys, suffixes=("", "_b"))
                m, lo, hi = stats.paired_difference(j[metric], j[metric + "_b"], seed=seed)
                rows.append({**base, "metric": metric, "baseline": b, "value": m, "ci_low": lo,
                             "ci_high": hi, "n": len(j), "verdict": stats.verdict(lo, hi)})
        # Rec2FTP against each baseline run (paired by query; percentile bootstrap)
        ours = d[~d.ft_diverged]
        for b in sorted(set(pq.run) - {"model"}):
            theirs = pq[(pq.task == task) & (pq.method == method) & (pq.lr == lr)
                        & (pq.run == b) & ~pq.ft_diverged]
            j = ours.merge(theirs, on=keys, suffixes=("", "_b"))
            if j.empty:
                continue
            m, lo, hi = stats.rec2ftp_interval(
                tuple(j[c].to_numpy(bool) for c in _RUNS),
                tuple(j[c + "_b"].to_numpy(bool) for c in _RUNS), seed=seed)
            rows.append({**base, "metric": "Rec2FTP", "baseline": b, "value": m, "ci_low": lo,
                         "ci_high": hi, "n": len(j), "verdict": stats.verdict(lo, hi)})
    return pd.DataFrame(rows)


# Table rows: the metric, and the baselines whose columns the compact table shows.
TABLE_METRICS = ("acc_ZS", "acc_ICL", "acc_FT", "Rec2FTP", "SimAOU_norm", "SimAOU", "SimAM_before",
                 "SimAM_after", "SimAM_delta", "Kendall", "Kendall_example", "weight_cos")


def compact_table(summary: pd.DataFrame, anchors: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (task, method) at its selected rate: rows = metrics; columns = ours ± interval,
    each baseline (its value ± interval, and the verdict of ours − baseline), and the
    anchors' published values (blank where an anchor has none)."""
    s = summary[(summary.layer == -1)]
    if "selected" in s:
        s = s[s.selected.fillna(True).astype(bool)]
    rows = []
    fmt = _fmt
    for (task, method), d in s.groupby(["task", "method"]):
        lr = d.lr.iloc[0]
        for metric in TABLE_METRICS:
            ours = d[(d.metric == metric) & (d.run == "model") & (d.baseline == "")]
            if ours.empty:
                continue
            r = {"task": task, "method": method, "lr": lr, "metric": metric,
                 "ours": fmt(ours.iloc[0])}
            diffs = d[(d.metric == metric) & (d.kind == "difference")]
            for _, row in diffs.iterrows():
                b = row.baseline
                if b in BASELINES or b in set(d.run):
                    val = d[(d.metric == metric) & (d.run == b) & (d.baseline == "")]
                else:
                    val = d[(d.metric == metric) & (d.run == "model") & (d.baseline == b)
                            & (d.kind == "baseline value")]
                r[b] = (fmt(val.iloc[0]) if len(val) else "") + f" ({row.verdict})"
            if anchors is not None:
                for _, a in anchors[anchors.metric == metric].iterrows():
                    # Deutch et al. report GD and LCGD apart: show the one this method matches
                    if ("(LCGD)" in a.source) != method.startswith("lcgd"):
                        if "(GD)" in a.source or "(LCGD)" in a.source:
                            continue
                    r[anchor_column(a)] = f"{a.value:g}"
            rows.append(r)
    out = pd.DataFrame(rows).fillna("")
    front = ["task", "method", "lr", "metric", "ours"]
    runs = [b for b in BASELINES if b in out] + sorted(
        c for c in out if c not in front and c not in BASELINES and c not in _IN_RUN_NAMES
        and not _is_anchor(c, anchors))
    in_run = [b for b in _IN_RUN_NAMES if b in out]
    anchor_cols = [c for c in out if _is_anchor(c, anchors)]
    return out[front + runs + in_run + anchor_cols] if len(out) else out


_IN_RUN_NAMES = ("random_update", "uniform_random", "SimAM_before")


def anchor_column(anchor: Any) -> str:
    """The compact table's column for one row of ``anchors.csv``: its source, and the
    baseline it reports where it is a baseline's value (``Dai et al. GPT 1.3B, uniform_random``)."""
    return anchor.source + (f", {anchor.baseline}" if anchor.baseline else "")


def _is_anchor(col: str, anchors: pd.DataFrame | None) -> bool:
    return anchors is not None and col in {anchor_column(a) for a in anchors.itertuples()}


def _fmt(row: Any) -> str:
    v, lo, hi = row["value"], row.get("ci_low", np.nan), row.get("ci_high", np.nan)
    if not np.isfinite(v):
        return "undefined"
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{v:.3g} [{lo:.3g}, {hi:.3g}]"
    return f"{v:.3g}"


def lr_grid(lrs: Any, methods: Sequence[str]) -> dict[str, list[float]]:
    """The rates each method sweeps: ``None`` (each config's own rate), one list for every
    method, or a dict ``{method name: [rates]}`` (LCGD sums 30 logit-lens losses, so its
    useful range sits lower than Dai-FT's)."""
    if lrs is None:
        return {}
    if isinstance(lrs, dict):
        unknown = set(lrs) - set(methods)
        missing = set(methods) - set(lrs)
        if unknown or missing:
            raise CompareError(f"lrs={lrs}: give rates for exactly the methods {list(methods)} "
                               f"(unknown {sorted(unknown)}, missing {sorted(missing)})")
        out = {m: [float(x) for x in v] for m, v in lrs.items()}
    else:
        out = {m: [float(x) for x in lrs] for m in methods}
    for m, v in out.items():
        if not v or any(not (0 < x < float("inf")) for x in v):
            raise CompareError(f"lrs for {m}: {v}: expected positive finite rates")
    return out


def compare(model: Any, task: Any, *, k: int = 32, queries: Any = None,
            seeds: Sequence[int] = (0,), gd: Any = None, lrs: Any = None,
            dev_queries: Any = None, protocol: str = "shared",
            baselines: Sequence[str] = BASELINES, baseline_models: dict[str, Any] | None = None,
            position: str = "pred", balanced: bool = False, progress: bool | None = None,
            anchors: pd.DataFrame | None = None) -> Tables:
    """ZS, ICL and FT runs of ``task`` and every comparison metric, beside its baselines,
    with intervals (see the module docstring for the protocol).

    ``k``: demonstrations (Dai: 32); ``queries``: ``None`` (the test split), an int (its
    first n) or item indices; ``seeds``: one demonstration set and fine-tune each; ``gd``: a
    :class:`FineTuneConfig` or a list (one per method); ``lrs``: a learning-rate sweep (each
    method fine-tuned at every rate; the dev split's queries pick one, the baselines run at
    it; a dict gives each method its own rates, see :func:`lr_grid`); ``dev_queries``: as
    ``queries``, for the dev split; ``baselines``: baseline runs
    (:data:`BASELINES`, or names of ``baseline_models``); ``position``: ``"pred"`` (the
    prediction position) or ``"label"`` (Dai's reading point, one token later)."""
    configs = _as_configs(gd)
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if not seeds:
        raise CompareError("seeds=[]: give at least one seed")
    grid = lr_grid(lrs, [c.name for c in configs])
    unknown = [b for b in baselines if b not in BASELINES and b not in (baseline_models or {})]
    if unknown:
        raise CompareError(f"baselines={list(baselines)}: unknown {unknown}; expected some of "
                           f"{BASELINES} or names given in baseline_models")
    c = Comparison(model, task, k=k, queries=queries, dev_queries=dev_queries, protocol=protocol,
                   position=position, balanced=balanced,
                   baseline_models=dict(baseline_models or {}),
                   model_seed=seeds[0], progress=progress)
    tables: dict[str, list[pd.DataFrame]] = {"per_query": [], "per_layer": [], "per_head": [],
                                             "finetune": []}

    def add(t: dict[str, pd.DataFrame]) -> None:
        for name, df in t.items():
            tables[name].append(df)

    sweep_settings = [(dataclasses.replace(cfg, lr=lr), s) for cfg in configs
                      for lr in grid.get(cfg.name, [cfg.lr]) for s in seeds]
    bar = tqdm(total=len(sweep_settings) + len(configs) * len(seeds) * len(baselines),
               desc=f"compare {c.task.name}", unit="fine-tune",
               disable=not (progress or progress is None and len(sweep_settings) > 2))
    splits = ("test", "dev") if any(len(v) > 1 for v in grid.values()) else ("test",)
    for cfg, s in sweep_settings:
        add(c.run(cfg, s, "model", splits))
        bar.update()
    per_query = pd.concat(tables["per_query"], ignore_index=True)
    ft_rows = pd.concat(tables["finetune"], ignore_index=True)
    sweep = sweep_rows(per_query, ft_rows)
    chosen = {m: lr for (_, m), lr in select_lr(sweep).items()} if splits == ("test", "dev") \
        else {cfg.name: cfg.lr for cfg in configs}
    for cfg in configs:
        if cfg.name not in chosen:
            continue  # every rate diverged: reported in the sweep, no baselines
        at = dataclasses.replace(cfg, lr=chosen[cfg.name])
        for run in baselines:
            for s in seeds:
                add(c.run(at, s, run))
                bar.update()
    bar.close()
    per_query = pd.concat(tables["per_query"], ignore_index=True)
    per_layer = pd.concat(tables["per_layer"], ignore_index=True)
    per_head = pd.concat(tables["per_head"], ignore_index=True)
    summary = summarise(per_query, per_layer)
    summary["selected"] = [chosen.get(m) == lr for m, lr in zip(summary.method, summary.lr)]
    return Tables(summary=summary, table=compact_table(summary, anchors), per_query=per_query,
                  per_layer=per_layer, per_head=per_head, sweep=sweep, finetunes=c.finetunes)

"""Every per-query, per-layer and per-head metric of one fine-tune setting against the shared
zero-shot and ICL runs, with the in-run baselines beside each."""

from __future__ import annotations

from typing import Any

import torch

from ..gd import FineTuneConfig, is_collapsed
from ..hooks import predictions, trace
from ..prompts import PromptPair
from . import metrics as M
from .queries import _strip_label
from .references import _kv_operator, _logits, _Refs
from .vocabulary import EVAL_CHUNK, ZS_BATCH, ZS_WHAT, baseline_column


def _kendall_positions(pair: PromptPair, loss_tokens: str) -> tuple[torch.Tensor, list[int]]:
    """ICL positions of the demonstration tokens the FT examples hold (input and label; the
    separator too with ``loss_tokens="demo+sep"``), and each demonstration's count."""
    pos, lens = [], []
    for d in pair.spans.demos:
        stop = d.sep.stop if loss_tokens == "demo+sep" else d.label.stop
        pos.append(torch.arange(d.input.start, stop))
        lens.append(stop - d.input.start)
    return torch.cat(pos), lens


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
    ZS/ICL runs. ``fts``: one fine-tune (shared protocol) or one per query. The random
    baselines are drawn from ``gen`` in a fixed order (query by query: output, attention and
    weight directions, then Kendall's per layer), so a run is reproducible. Streamed over
    chunks of :data:`EVAL_CHUNK` queries: a chunk's traces (the fine-tuned model's zero-shot
    record, and the base model's zero-shot k and v where the reference set no longer holds
    them) are dropped before the next chunk's are made."""
    pairs = refs.pairs
    rows_q, rows_l, rows_h = [], [], []
    steps: dict = {}  # each fine-tune's scaled step queries, shared by its queries' Kendall
    for lo in range(0, len(pairs), EVAL_CHUNK):
        idx = range(lo, min(lo + EVAL_CHUNK, len(pairs)))
        chunk = [pairs[b] for b in idx]
        fts_c = fts if len(fts) == 1 else fts[lo: lo + len(chunk)]
        if refs.zs_kv is not None:  # the base model's zero-shot k and v: the set's own
            zs_kv = [(refs.zs_kv, b) for b in idx]
        else:  # or traced again, for this chunk
            rec = trace(model, chunk, kind="zs", what=("k", "v"), batch_size=ZS_BATCH,
                        weights=False)
            zs_kv = [(rec, j) for j in range(len(chunk))]
        ft_of = _ft_runs(chunk, fts_c)
        ft_logits, ft_pred = _ft_predictions(chunk, fts_c, ft_of, position)
        at = _AtPred()  # the chunk's records at p, each gathered once
        for j, b in enumerate(idx):
            q, l, h = _query_rows(refs, b, zs_kv[j], ft_of[j], ft_logits[j], ft_pred[j], cfg,
                                  gen, keys, steps, at)
            rows_q.append(q)
            rows_l += l
            rows_h += h
        del zs_kv, ft_of, at
    return rows_q, rows_l, rows_h


class _AtPred:
    """Records' quantities at the prediction position (:meth:`AttentionRecord.at_pred`, which
    gathers the whole batch), each gathered once and shared by every query of a chunk. It
    holds the records it has seen, so that an id is never reused while it lives."""

    def __init__(self) -> None:
        self._got: dict[tuple[int, str], tuple[Any, torch.Tensor]] = {}

    def __call__(self, rec: Any, name: str) -> torch.Tensor:
        key = (id(rec), name)
        if key not in self._got:
            self._got[key] = (rec, rec.at_pred(name))
        return self._got[key][1]


def _query_rows(refs: _Refs, b: int, zs_kv: tuple[Any, int], ft_run: tuple[Any, Any, int],
                ft_logits: torch.Tensor, ft_pick: Any, cfg: FineTuneConfig,
                gen: torch.Generator, keys: dict, steps: dict, at: _AtPred
                ) -> tuple[dict, list[dict], list[dict]]:
    """Query ``b``'s per-query row, per-layer rows and per-head rows (``zs_kv``: the base
    model's zero-shot k/v record and this query's row in it; ``ft_run``: its fine-tune, the
    fine-tuned model's zero-shot record and its row in it; ``steps``: Kendall's scaled step
    queries per fine-tune, filled on first use)."""
    pair, icl = refs.pairs[b], refs.icl
    ft, ftr, i = ft_run
    row = _query_row(keys, refs, b, ft, ft_logits, ft_pick)
    collapsed = row["ft_collapsed"]
    per_layer = _layer_similarities(refs, zs_kv, b, ftr, i, gen, at)
    ken = _kendall_rows(refs, b, ft, ftr, i, cfg, gen, collapsed, steps, at)
    rows_l, rows_h = [], []
    for li, l in enumerate(icl.layers):
        rows_l.append({**keys, "query": pair.query, "layer": l,
                       **{name: float(x[li]) for name, x in per_layer["scalars"].items()},
                       **ken[li], "weight_cos": float(per_layer["w_cos"][li].mean()),
                       baseline_column("weight_cos", "random_update"):
                           float(per_layer["w_rand"][li].mean()),
                       "ft_diverged": ft.diverged or collapsed})
        for h, g in enumerate(icl.kv_head_of.tolist()):
            rows_h.append({**keys, "query": pair.query, "layer": l, "head": h, "kv_head": g,
                           "weight_cos": float(per_layer["w_cos"][li, g]),
                           baseline_column("weight_cos", "random_update"):
                               float(per_layer["w_rand"][li, g]),
                           "ft_diverged": ft.diverged or collapsed})
    return row, rows_l, rows_h


def _ft_runs(pairs: list[PromptPair], fts: list[Any]) -> list[tuple[Any, Any, int]]:
    """Per query: its fine-tune, the trace of the fine-tuned model on its ZS prompt, and its
    row in that trace."""
    if len(fts) == 1:
        ftr = trace(fts[0].model, pairs, kind="zs", what=ZS_WHAT, batch_size=ZS_BATCH,
                    weights=False)
        return [(fts[0], ftr, b) for b in range(len(pairs))]
    return [(ft, trace(ft.model, [pairs[b]], kind="zs", what=ZS_WHAT, weights=False), 0)
            for b, ft in enumerate(fts)]


def _ft_predictions(pairs: list[PromptPair], fts: list[Any], ft_of: list,
                    position: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The FT runs' logits at the prediction position, and the candidate each predicts."""
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
    return ft_logits_all, ft_pred


def _ft_fields(pair: PromptPair, ft: Any, logits: torch.Tensor, pick: Any) -> dict:
    """A query's fine-tuned run, as every per-query row reports it (test and dev queries)."""
    lg = logits.double()
    collapsed = is_collapsed(lg)
    return {"ft_correct": int(pick) == pair.target,
            "ft_gold_logprob": float(torch.log_softmax(lg, -1)[pair.target_id]),
            "ft_collapsed": collapsed, "ft_diverged": ft.diverged or collapsed,
            "divergence": ft.divergence or ("collapsed output" if collapsed else "")}


def _query_row(keys: dict, refs: _Refs, b: int, ft: Any, ft_logits: torch.Tensor,
               ft_pick: Any) -> dict:
    """One test query: ZS/ICL/FT correctness (by the prompt's scoring, and by the vocabulary's
    argmax), and the output-distribution metrics of ICL against FT."""
    pair = refs.pairs[b]
    correct, probs = {}, {}
    for name, logits, pick in (("zs", refs.pred_logits["zs"][b], refs.predicted["zs"][b]),
                               ("icl", refs.pred_logits["icl"][b], refs.predicted["icl"][b]),
                               ("ft", ft_logits, ft_pick)):
        logits = logits.double()
        probs[name] = torch.softmax(logits, -1)
        correct[name] = int(pick) == pair.target
        correct[name + "_vocab"] = int(logits.argmax()) == pair.target_id
    return {**keys, "query": pair.query,
            "demos": " ".join(map(str, pair.demos)),  # item indices, prompt order
            "scoring": pair.scoring,
            "zs_correct": correct["zs"], "icl_correct": correct["icl"],
            "ft_correct": None, "zs_vocab_correct": correct["zs_vocab"],
            "icl_vocab_correct": correct["icl_vocab"],
            "ft_vocab_correct": correct["ft_vocab"], **_ft_fields(pair, ft, ft_logits, ft_pick),
            "ft_final_loss": ft.losses[-1] if ft.losses else float("nan"),
            "top10_overlap": M.top_overlap(probs["icl"], probs["ft"]),
            "overlap_cosine": M.overlap_cosine(probs["icl"], probs["ft"]),
            "kl_icl_ft": M.kl(probs["icl"], probs["ft"])}


def _layer_similarities(refs: _Refs, zs_kv: tuple[Any, int], b: int, ftr: Any, i: int,
                        gen: torch.Generator, at: _AtPred) -> dict[str, Any]:
    """Per layer for query ``b``: SimAOU (normalised or not) and SimAM with their in-run
    baselines, and the weight-space cosine per kv head with its random baseline (``zs_kv``:
    the base model's zero-shot k and v, and the query's row in them)."""
    zs_kv, j = zs_kv
    pair, zs, icl = refs.pairs[b], refs.zs, refs.icl
    h_zs, h_icl = at(zs, "attn_out")[:, b].double(), at(icl, "attn_out")[:, b].double()
    h_ft = at(ftr, "attn_out")[:, i].double()
    aou = {n: M.simaou(h_zs, h_icl, h_ft, normalize=n) for n in (True, False)}
    rand_dir = _draw(torch.randn, h_ft, gen)
    r_uniform = _draw(torch.rand, h_ft, gen)
    aou_rand = {n: M._cos(_update(h_zs, h_icl, n), rand_dir) for n in (True, False)}
    aou_unif = {n: M.simaou_uniform_random(h_zs, h_icl, r_uniform, normalize=n)
                for n in (True, False)}
    q_icl = pair.spans.query.indices()  # the query's tokens (no BOS), in both prompts
    q_zs = pair.zs_spans.query.indices()
    m_icl = at(icl, "scores")[:, b][..., q_icl].double()  # layer head query_tok
    m_zs = at(zs, "scores")[:, b][..., q_zs].double()
    m_ft = at(ftr, "scores")[:, i][..., q_zs].double()
    sam = M.simam(m_zs, m_icl, m_ft)
    sam_rand = M._cos(m_icl - m_zs, _draw(torch.randn, m_ft, gen)).mean(-1)
    zs_all = torch.arange(len(pair.zs_ids))
    n_zs = len(pair.zs_ids)
    dM_gd = (_kv_operator(ftr.data["k"][:, i, :n_zs], ftr.data["v"][:, i, :n_zs])
             - _kv_operator(zs_kv.data["k"][:, j, zs_all], zs_kv.data["v"][:, j, zs_all]))
    dM_icl = refs.dM_icl[b]
    w_cos = M._cos(dM_icl.flatten(-2), dM_gd.flatten(-2))  # layer kv_head
    w_rand = M._cos(dM_icl.flatten(-2), _draw(torch.randn, dM_gd.flatten(-2), gen))
    scalars = {"SimAOU_norm": aou[True], "SimAOU": aou[False],
               baseline_column("SimAOU_norm", "random_update"): aou_rand[True],
               baseline_column("SimAOU", "random_update"): aou_rand[False],
               baseline_column("SimAOU_norm", "uniform_random"): aou_unif[True],
               baseline_column("SimAOU", "uniform_random"): aou_unif[False],
               "SimAM_before": sam["before"], "SimAM_after": sam["after"],
               baseline_column("SimAM_after", "SimAM_before"): sam["before"],
               "SimAM_delta": sam["delta"],
               baseline_column("SimAM_delta", "random_update"): sam_rand}
    return {"scalars": scalars, "w_cos": w_cos, "w_rand": w_rand}


def _kendall_rows(refs: _Refs, b: int, ft: Any, ftr: Any, i: int, cfg: FineTuneConfig,
                  gen: torch.Generator, collapsed: bool, steps: dict, at: _AtPred
                  ) -> list[dict[str, float]]:
    """Per layer: Kendall's tau between ICL's attention to the demonstration tokens and the
    fine-tune's (token and example level) with their uniform-random baselines; NaN where the
    fine-tune recorded no queries or diverged. Every layer is ranked at once; the baselines
    are drawn layer by layer (token level, then example level). ``steps``: the fine-tunes'
    step queries, scaled, by (fine-tune, k, BOS offset): the queries of one shared fine-tune
    are concatenated and scaled once, not once per query."""
    pair, icl = refs.pairs[b], refs.icl
    L = len(icl.layers)
    names = ("Kendall", baseline_column("Kendall", "uniform_random"), "Kendall_example",
             baseline_column("Kendall_example", "uniform_random"))
    if not ft.step_queries or ft.diverged or collapsed:
        return [dict.fromkeys(names, float("nan")) for _ in range(L)]
    ken_pos, demo_lens = _kendall_positions(pair, cfg.loss_tokens)
    off = 1 if pair.spans.bos is not None else 0
    scale = torch.tensor([_scale(icl, li) for li in range(L)], dtype=torch.float64)
    key = (id(ft), pair.k, off)
    if key not in steps:  # layer tok head d_head; one fine-tune's at a time (per_query: many)
        steps.clear()
        steps[key] = M.scale_queries(
            torch.cat([qs[:, off:] for qs in ft.step_queries[: pair.k]], 1), scale)
    s_demo = at(icl, "scores")[:, b][..., ken_pos]  # layer head demo_tok
    q_ft = M.scale_queries(at(ftr, "q")[:, i], scale)  # layer head d_head
    tok = M.kendall_weights(s_demo, steps[key], q_ft, scale=None)
    ex = tuple(M.per_demonstration(w, demo_lens) for w in tok)  # = level="example"
    icl_w, ex_w = tok[0], ex[0]  # ICL's token and example weights, as the metric ranks them
    draws = [(_draw(torch.rand, icl_w[li], gen), _draw(torch.rand, ex_w[li], gen))
             for li in range(L)]
    # each test shares its ICL side's pair signs with its random baseline
    token = M.kendall_tau_against(icl_w, [tok[1], torch.stack([d[0] for d in draws])])
    example = M.kendall_tau_against(ex_w, [ex[1], torch.stack([d[1] for d in draws])])
    return [dict(zip(names, vals)) for vals in zip(*token, *example)]


def _draw(sample: Any, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A float64 baseline draw of ``like``'s shape from ``gen`` (a CPU generator: the same
    draws on every device), placed on ``like``'s device."""
    return sample(like.shape, generator=gen, dtype=torch.float64).to(like.device)


def _update(h_zs: torch.Tensor, h_icl: torch.Tensor, normalize: bool) -> torch.Tensor:
    if normalize:
        h_zs, h_icl = (h / h.norm(dim=-1, keepdim=True) for h in (h_zs, h_icl))
    return h_icl - h_zs


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
    return [{**keys, "query": pair.query, "demos": " ".join(map(str, pair.demos)),
             "scoring": pair.scoring, **_ft_fields(pair, ft, lg, pick)}
            for pair, (ft, lg), pick in zip(pairs, per, picks)]

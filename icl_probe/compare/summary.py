"""From per-query and per-layer rows to what a reader sees: the learning rate each method
selects, the summary with 95 % intervals and verdicts against every baseline, and the compact
table beside the anchors' numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import CompareError, FineTuneError
from ..gd import learning_rate
from . import stats
from .vocabulary import (BASELINES, IN_RUN_BASELINES, LAYER_CI_METRICS, SIMILARITIES,
                         baseline_column, split_column)

ANCHORS_FILE = Path(__file__).resolve().parent.parent / "data" / "anchors.csv"
ANCHORS = pd.read_csv(ANCHORS_FILE, keep_default_na=False)


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
            metric, b = split_column(col)
            x = lm[col].to_numpy(float)
            rows.append({**base, "metric": metric, "baseline": b, "layer": -1,
                         "value": np.nanmean(x) if np.isfinite(x).any() else np.nan,
                         **_ci(x, seed), "n": int(np.isfinite(x).sum()),
                         "kind": "baseline value" if b else ""})
        pl = per_layer[(per_layer.task == key[0]) & (per_layer.method == key[1])
                       & (per_layer.lr == key[2]) & (per_layer.run == key[3])
                       & ~per_layer.ft_diverged] if len(per_layer) else per_layer
        for col in metric_cols:
            metric, b = split_column(col)
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
                col = baseline_column(metric, b)
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
        given = {m: list(v) for m, v in lrs.items()}
    else:
        given = {m: list(lrs) for m in methods}
    out = {}
    for m, v in given.items():
        try:
            if not v:
                raise FineTuneError("no rate")
            out[m] = [learning_rate(x, f"lrs for {m}") for x in v]  # the one rule for a rate
        except FineTuneError:
            raise CompareError(f"lrs for {m}: {v}: expected positive finite rates") from None
    return out

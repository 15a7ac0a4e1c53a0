"""The figures of the ``shen`` section, laid out as Shen et al.'s: Fig. 2 (sparsity against
the threshold beside the construction's requirement), Fig. 3 (ICL accuracy and weight change
across checkpoints), Fig. 4 (order sensitivity over epochs), Fig. 5 (a grid of metrics by GD
variant over epochs, ICL and ICL-reordered as lines) and Table 1 drawn against the number of
demonstrations GD trains on."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...compare import ANCHORS, SHEN_METRICS

_DASH = {"icl": "solid", "icl_reordered": "dash"}
_COLORS = px.colors.qualitative.Plotly  # one color per curve, the same in every panel


def _anchor(metric: str) -> float:
    """Shen et al.'s published value of ``metric`` (icl_probe/data/anchors.csv)."""
    return float(ANCHORS[ANCHORS.metric == metric].value.iloc[0])


def figures(tabs: dict[str, pd.DataFrame]) -> list[Any]:
    figs = []
    if "sparsity" in tabs:
        figs.append(_sparsity(tabs["sparsity"]))
    if "order" in tabs:
        figs += [_order(d, task) for task, d in tabs["order"].groupby("task", sort=False)]
    if "checkpoints" in tabs:
        figs += [_checkpoints(d, task) for task, d in tabs["checkpoints"].groupby("task",
                                                                                  sort=False)]
    if "curves" in tabs:
        figs += [_curves(d, task, n) for (task, n), d in
                 tabs["curves"].groupby(["task", "n_demos"], sort=False)]
    if "many_demos" in tabs:
        figs += [_many_demos(d, task) for task, d in tabs["many_demos"].groupby("task",
                                                                                sort=False)]
    return figs


def _sparsity(s: pd.DataFrame) -> Any:
    """Fig. 2: the fraction of entries below the threshold, mean over layers and heads, per
    matrix; absolute (|w| < t) and relative (|w| < t·max|w|) side by side; dotted: what the
    construction needs."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["absolute: |w| < t",
                                                        "relative: |w| < t·max|w|"],
                        shared_yaxes=True)
    for j, mode in enumerate(("absolute", "relative"), 1):
        d = s[s["mode"] == mode].groupby(["matrix", "threshold"], as_index=False).agg(
            frac=("frac_below", "mean"), need=("construction_zeros", "first"))
        for k, (matrix, g) in enumerate(d.groupby("matrix")):
            color = _COLORS[k % len(_COLORS)]  # a matrix and its need share a color
            fig.add_trace(go.Scatter(x=g.threshold, y=g.frac, mode="lines+markers",
                                     name=matrix, legendgroup=matrix, showlegend=j == 1,
                                     line=dict(color=color)), row=1, col=j)
            fig.add_trace(go.Scatter(x=g.threshold, y=g.need, mode="lines",
                                     line=dict(dash="dot", width=1, color=color),
                                     name=f"{matrix} needed",
                                     legendgroup=matrix, showlegend=j == 1), row=1, col=j)
    fig.update_xaxes(type="log", title_text="threshold t")
    fig.update_yaxes(title_text="fraction below t", range=[0, 1.02], row=1, col=1)
    fig.update_layout(title="Fig. 2: sparsity of W_Q/W_K/W_V (mean over layers, heads) vs the "
                            "construction's need. Shen et al.: below "
                            f"{_anchor('shen_sparsity_below'):.0%}",
                      height=420)
    return fig


def _order(d: pd.DataFrame, task: str) -> Any:
    """Fig. 4: order sensitivity against the epoch, one curve per (method, lr) with its
    interval; ICL as a horizontal line."""
    fig = go.Figure()
    icl = d[d.method == "icl"]
    for (method, lr), g in d[d.method != "icl"].groupby(["method", "lr"], sort=False):
        g = g.sort_values("epoch")
        fig.add_trace(go.Scatter(x=g.epoch, y=g.value, mode="lines+markers",
                                 name=f"{method} (lr {lr:g})",
                                 error_y=dict(type="data", symmetric=False,
                                              array=g.ci_high - g.value,
                                              arrayminus=g.value - g.ci_low)))
    if len(icl):
        fig.add_hline(y=float(icl.value.iloc[0]), line=dict(color="black", width=2),
                      annotation_text="ICL")
    fig.update_layout(title=f"Fig. 4 ({task}, N = {int(d.n_demos.iloc[0])}): order "
                            "sensitivity over epochs (mean over queries, 95 % interval). Shen "
                            "et al., LLaMA-7B: ICL "
                            f"{_anchor('shen_order_sensitivity_icl_low'):g}-"
                            f"{_anchor('shen_order_sensitivity_icl_high'):g}, GD "
                            f"{_anchor('shen_order_sensitivity_gd_low'):g}-"
                            f"{_anchor('shen_order_sensitivity_gd_high'):g}",
                      xaxis_title="epoch", yaxis_title="order sensitivity", height=420)
    return fig


def _curves(d: pd.DataFrame, task: str, n_demos: int) -> Any:
    """Fig. 5: rows accuracy / token overlap / overlap cosine, one column per GD variant, x =
    epoch, one curve per rate with its interval; ICL and ICL-reordered as horizontal lines."""
    methods = [m for m in dict.fromkeys(d.method) if m not in _DASH]
    fig = make_subplots(rows=len(SHEN_METRICS), cols=max(1, len(methods)),
                        subplot_titles=[f"{m}: {metric}" for metric in SHEN_METRICS
                                        for m in methods], shared_xaxes=True)
    refs = d[d.method.isin(list(_DASH))]
    for i, metric in enumerate(SHEN_METRICS, 1):
        for j, method in enumerate(methods, 1):
            g = d[(d.method == method) & (d.metric == metric)]
            for lr, h in g.groupby("lr"):
                h = h.sort_values("epoch")
                fig.add_trace(go.Scatter(
                    x=h.epoch, y=h.value, mode="lines+markers", name=f"lr {lr:g}",
                    legendgroup=f"lr {lr:g}", showlegend=i == 1 and j == 1,
                    error_y=dict(type="data", symmetric=False, array=h.ci_high - h.value,
                                 arrayminus=h.value - h.ci_low)), row=i, col=j)
            for ref, r in refs[refs.metric == metric].groupby("method"):
                fig.add_hline(y=float(r.value.iloc[0]), line=dict(dash=_DASH[ref], width=1.5),
                              annotation_text=ref, row=i, col=j)
    fig.update_xaxes(title_text="epoch", row=len(SHEN_METRICS))
    fig.update_layout(title=f"Fig. 5 ({task}, N = {n_demos}): ICL against GD over epochs; "
                            "lines: ICL (accuracy) and ICL with the demonstrations reordered "
                            "(the reference a GD curve is read against)",
                      height=260 * len(SHEN_METRICS) + 120)
    return fig


def _checkpoints(d: pd.DataFrame, task: str) -> Any:
    """Fig. 3: ICL accuracy (left axis, 95 % interval) and the average weight change against
    the first checkpoint (right axis) across checkpoints, in the order listed."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    acc = d[d.metric == "icl_accuracy"].sort_values("step")
    change = d[d.metric == "weight_change"].sort_values("step")
    fig.add_trace(go.Scatter(x=acc.step, y=acc.value, mode="lines+markers", name="ICL accuracy",
                             error_y=dict(type="data", symmetric=False,
                                          array=acc.ci_high - acc.value,
                                          arrayminus=acc.value - acc.ci_low)),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=change.step, y=change.value, mode="lines+markers",
                             name="mean |θ − θ_first|", line=dict(dash="dash")),
                  secondary_y=True)
    fig.update_xaxes(title_text="checkpoint (in the order listed)", tickvals=list(acc.step))
    fig.update_yaxes(title_text="ICL accuracy", range=[0, 1.02], secondary_y=False)
    fig.update_yaxes(title_text="average weight change", secondary_y=True)
    fig.update_layout(title=f"Fig. 3 ({task}): ICL accuracy and average weight change across "
                            "checkpoints", height=420)
    return fig


def _many_demos(d: pd.DataFrame, task: str) -> Any:
    """Table 1: GD's accuracy and its agreement with ICL against the number of demonstrations
    it trains on (log scale), one curve per (method, lr) with its interval; ICL's accuracy
    with its own few demonstrations as a line."""
    metrics = [m for m in SHEN_METRICS if m in set(d.metric)]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[
        "accuracy" if m == "accuracy" else f"{m} with ICL" for m in metrics])
    icl = d[(d.method == "icl") & (d.metric == "accuracy")]
    for j, metric in enumerate(metrics, 1):
        g = d[(d.method != "icl") & (d.metric == metric)]
        for k, ((method, lr), h) in enumerate(g.groupby(["method", "lr"], sort=False)):
            h = h.sort_values("n_train")
            fig.add_trace(go.Scatter(
                x=h.n_train, y=h.value, mode="lines+markers", name=f"{method} (lr {lr:g})",
                line=dict(color=_COLORS[k % len(_COLORS)]),
                legendgroup=f"{method} {lr}", showlegend=j == 1,
                error_y=dict(type="data", symmetric=False, array=h.ci_high - h.value,
                             arrayminus=h.value - h.ci_low)), row=1, col=j)
        if metric == "accuracy" and len(icl):
            fig.add_hline(y=float(icl.value.iloc[0]), line=dict(color="black", width=2),
                          annotation_text=f"ICL, {int(icl.n_train.iloc[0])} demos", row=1, col=j)
    fig.update_xaxes(type="log", title_text="demonstrations GD trains on")
    fig.update_yaxes(range=[0, 1.02])
    key = str(task).lower().replace("-", "").replace("_", "")
    pub = ANCHORS[ANCHORS.metric.isin([f"shen_table1_{key}_first", f"shen_table1_{key}_second"])]
    shen = (f"Shen et al., LLaMA-7B: {pub.value.iloc[0]:.2f} and {pub.value.iloc[1]:.2f} "
            "(which column is which is unclear)" if len(pub) == 2
            else "no published value for this dataset")
    fig.update_layout(title=f"Table 1 ({task}): GD with many demonstrations against ICL "
                            f"(mean over queries, 95 % interval). {shen}", height=420)
    return fig

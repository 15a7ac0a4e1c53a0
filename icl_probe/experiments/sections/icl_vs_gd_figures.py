"""The figures of the ``icl_vs_gd`` section: the learning-rate sweep, and each similarity per
layer at the selected rate, ours with its 95 % band beside every baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .base import model_order


def figures(tabs: dict[str, pd.DataFrame]) -> list:
    figs = []
    sw = tabs.get("sweep")
    many = "model" in tabs["summary"] and tabs["summary"].model.nunique() > 1
    if sw is not None and len(sw):
        keys = ["model", "task", "method", "lr"] if many else ["task", "method", "lr"]
        d = sw.groupby(keys, as_index=False).agg(
            dev_ft_acc=("dev_ft_acc", "mean"), test_ft_acc=("test_ft_acc", "mean"),
            test_zs_acc=("test_zs_acc", "mean"), selected=("selected", "any"),
            diverged=("diverged", "any"), fixes=("ft_fixes", "sum"))
        d = d.melt(id_vars=keys + ["selected", "diverged", "fixes"],
                   value_vars=["dev_ft_acc", "test_ft_acc", "test_zs_acc"], var_name="accuracy")
        rows = model_order(d.model) if many else [None]
        fig = px.line(d, x="lr", y="value", color="accuracy", line_dash="method",
                      facet_col="task", facet_row="model" if many else None,
                      category_orders={"model": rows} if many else None,
                      markers=True, log_x=True, height=300 * len(rows) + 150,
                      title="Learning-rate sweep: FT accuracy (dev picks the rate), ZS for scale; "
                            "★ selected, ✕ diverged, ○ FT fixes no ZS error")
        for _, r in d[d.accuracy == "dev_ft_acc"].iterrows():
            mark = "★" if r.selected else ("✕" if r.diverged else ("○" if r.fixes == 0 else ""))
            if mark:
                col = sorted(d.task.unique()).index(r.task) + 1 if d.task.nunique() > 1 else 1
                # plotly numbers facet rows from the bottom
                row = len(rows) - rows.index(r.model) if many else 1
                fig.add_annotation(x=np.log10(r.lr), y=r.value, text=mark, showarrow=False,
                                   yshift=12, row=row, col=col)
        figs.append(fig)
    s = tabs["summary"]
    s = s[(s.layer >= 0) & s.selected.astype(bool) & (s.kind != "difference")]
    for metric in ("SimAOU_norm", "SimAOU", "SimAM_delta", "Kendall", "weight_cos"):
        # ours, each baseline run, and the in-run baselines (random update, uniform vector)
        # of ours only: a baseline run's own in-run baselines are not drawn
        d = s[(s.metric == metric) & ((s.baseline == "") | (s.run == "model"))]
        if d.empty:
            continue
        figs.append(_per_layer_figure(metric, d.assign(
            line=np.where(d.baseline != "", d.baseline, d.run),
            row=[f"{m}: {t}" for m, t in zip(d.model, d.task)] if many else d.task)))
    return figs


# one colour per line kind, the same in every panel; ours is drawn thick, with its interval
_LINE_COLOURS = {"model": "#1a1a1a", "shuffled_labels": "#e8710a", "untrained": "#1a73e8",
                 "embeddings_only": "#12b5cb", "random_update": "#9aa0a6",
                 "uniform_random": "#c5221f", "SimAM_before": "#9334e6"}


def _per_layer_figure(metric: str, d: pd.DataFrame) -> Any:
    """One panel per (row, method), a row being a task (or a model's task): ours with its 95 %
    band beside every baseline."""
    tasks, methods = list(dict.fromkeys(sorted(d.row.unique()))), sorted(d.method.unique())
    titles = [f"{t}, {m} (lr {d[(d.row == t) & (d.method == m)].lr.iloc[0]:g})"
              if len(d[(d.row == t) & (d.method == m)]) else f"{t}, {m}"
              for t in tasks for m in methods]
    fig = make_subplots(rows=len(tasks), cols=len(methods), subplot_titles=titles,
                        shared_xaxes=d.row.nunique() == d.task.nunique(), shared_yaxes=True,
                        vertical_spacing=min(0.08, 0.3 / max(1, len(tasks))))
    shown = set()
    for i, t in enumerate(tasks, 1):
        for j, m in enumerate(methods, 1):
            g = d[(d.row == t) & (d.method == m)]
            # ours last, so that it is drawn on top of the baselines it is compared with
            for line, h in sorted(g.groupby("line"), key=lambda x: x[0] == "model"):
                h = h.sort_values("layer")
                colour = _LINE_COLOURS.get(line, "#5f6368")
                name = "ours" if line == "model" else line
                if line == "model" and h.ci_low.notna().any():
                    fig.add_trace(go.Scatter(
                        x=list(h.layer) + list(h.layer)[::-1],
                        y=list(h.ci_high) + list(h.ci_low)[::-1], fill="toself", mode="lines",
                        fillcolor="rgba(26,26,26,0.15)", line=dict(width=0), hoverinfo="skip",
                        showlegend=False), row=i, col=j)
                width = 3 if line == "model" else 1.2
                fig.add_trace(go.Scatter(x=h.layer, y=h.value, mode="lines", name=name,
                                         legendgroup=name, showlegend=name not in shown,
                                         line=dict(color=colour, width=width)), row=i, col=j)
                shown.add(name)
    fig.update_layout(title=f"{metric} per layer at the selected rate: ours (95 % band) beside "
                            "its baselines", height=320 * len(tasks) + 80)
    fig.update_xaxes(title_text="layer", row=len(tasks))
    return fig

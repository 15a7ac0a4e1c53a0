"""plotly figures for probes and experiments: layer x head heatmaps and per-layer curves.

>>> import icl_probe as ip
>>> from icl_probe.probes import plots
>>> model = ip.tiny_model()
>>> up = ip.implied_updates(model, [ip.build_prompt(model, "capital", query=0, k=2)])
>>> fig = plots.probe_heatmap(up, "lambda")
>>> fig.data[0].z.shape          # layer x head
(3, 4)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..errors import PlotError

_TITLES = {
    "dW_icl_norm": "‖ΔW_ICL‖_F (dual form, head space)",
    "lambda": "λ: attention mass on demonstrations at p",
    "fidelity_err": "dual-form fidelity error min_c ‖h − c·h_lin‖/‖h‖",
    "W_zs_norm": "‖W_ZS‖_F",
}


def layer_head_heatmap(values: Any, layers: Sequence[int], title: str, colorbar: str,
                       zmin: float | None = None, zmax: float | None = None,
                       colorscale: str = "Viridis") -> go.Figure:
    """A (layer, head) matrix as a heatmap, layer 0 at the top."""
    z = np.asarray(values, dtype=float)
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"H{h}" for h in range(z.shape[1])], y=[f"L{l}" for l in layers],
        colorscale=colorscale, zmin=zmin, zmax=zmax, colorbar={"title": colorbar},
        hovertemplate="%{y} %{x}: %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed", height=max(400, 22 * z.shape[0]))
    return fig


def probe_heatmap(updates: Any, quantity: str = "dW_icl_norm", prompt: int | None = None,
                  log: bool | None = None) -> go.Figure:
    """Layer x head heatmap of a per-head probe quantity of :class:`ImpliedUpdates`
    (``dW_icl_norm``, ``W_zs_norm``, ``lambda``, ``fidelity_err``), averaged over prompts
    unless ``prompt`` is given. Norms are shown on a log10 scale by default."""
    df = updates.table(ranks=False)
    df = df[(df.quantity == quantity) & (df["head"] >= 0)]
    if df.empty:
        raise PlotError(f"no per-head quantity {quantity!r}; try one of {sorted(_TITLES)}")
    if prompt is not None:
        df = df[df.prompt == prompt]
    m = df.groupby(["layer", "head"]).value.mean().unstack("head").sort_index()
    log = quantity.endswith("norm") if log is None else log
    z = np.log10(m.values) if log else m.values
    bounded = quantity in ("lambda", "fidelity_err")
    where = f"prompt {prompt}" if prompt is not None else f"mean over {df.prompt.nunique()} prompts"
    return layer_head_heatmap(z, list(m.index), f"{_TITLES.get(quantity, quantity)} — {where}",
                              ("log10 " if log else "") + quantity,
                              zmin=0 if bounded else None, zmax=1 if bounded else None)


def mlp_update_curve(trajectory: pd.DataFrame, name: str = "gate") -> go.Figure:
    """Per layer, ‖ΔW_MLP‖ and the step ‖ΔW(n) − ΔW(n−1)‖ against the number of
    demonstrations ``n`` (from :func:`icl_probe.probes.update_trajectory`)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"‖ΔW_{name}‖_F (rank-1 MLP update)", "step ‖ΔW(n) − ΔW(n−1)‖_F"))
    layers = sorted(trajectory.layer.unique())
    for col, q in ((1, f"mlp_dW_{name}_norm"), (2, f"mlp_dW_{name}_step")):
        d = trajectory[trajectory.quantity == q]
        for l in layers:
            s = d[d.layer == l].groupby("n_demos").value.mean()
            shade = int(40 + 180 * l / max(1, max(layers)))
            fig.add_trace(go.Scatter(x=s.index, y=s.values, mode="lines+markers", name=f"L{l}",
                                     legendgroup=f"L{l}", showlegend=col == 1,
                                     line={"color": f"rgb({shade},{80},{255 - shade})"}),
                          row=1, col=col)
    fig.update_xaxes(title_text="demonstrations n")
    fig.update_yaxes(type="log")
    fig.update_layout(title="Implicit MLP update (Dherin et al. 2025) as demonstrations are added",
                      height=500)
    return fig

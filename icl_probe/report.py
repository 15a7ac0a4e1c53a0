"""The HTML report and the summary table of an experiment, rebuilt from its finished units.

:func:`write_report` reads every finished unit under ``OUT/units`` (whatever process wrote
it) and writes ``OUT/report.html`` and, for ``icl_vs_gd``, ``OUT/summary.csv``; it can run at
any time (``icl-probe report OUT``), and a report built while units are missing says so.
With several models, the ``icl_vs_gd`` tables put the models side by side (one column group
per model, each at its own selected rate), and the other sections show one block per model.
"""

from __future__ import annotations

import html
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import Config, settings
from .protocol import anchor_column, compact_table, summarise, sweep_rows
from .store import read_results, write_csv, write_text

__all__ = ["ANCHORS", "icl_vs_gd_summary", "write_report"]

# The anchors' published numbers (docs/protocol.md, "Reference numbers"): one data file, read
# here and quoted in the docs.
ANCHORS_FILE = Path(__file__).resolve().parent / "data" / "anchors.csv"
ANCHORS = pd.read_csv(ANCHORS_FILE, keep_default_na=False)


def esc(text: Any) -> str:
    """The one escaping helper for every piece of text that reaches the report's HTML (task
    names, labels, items, model keys, paths, config values): ``str(text)`` with ``& < > " '``
    escaped. Tables go through it cell by cell; plotly escapes its own JSON."""
    return html.escape(str(text), quote=True)


def _versions() -> dict:
    import transformer_lens
    import transformers

    from . import __version__

    return {"icl-probe": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformer-lens": getattr(transformer_lens, "__version__", "?"),
            "python": platform.python_version(), "machine": platform.machine()}


def _figures(section: str, tabs: dict[str, pd.DataFrame]) -> list:
    import plotly.express as px

    figs = []
    if section == "icl_vs_gd" and "summary" in tabs:
        figs += _icl_vs_gd_figures(tabs)
    if section == "implied_updates":
        p = tabs.get("probes")
        if p is not None:
            for q in ("lambda", "fidelity_err"):
                d = p[(p.quantity == q) & (p["head"] >= 0)]
                m = d.groupby(["layer", "head"]).value.mean().unstack("head")
                figs.append(px.imshow(m, aspect="auto", origin="upper", zmin=0, zmax=1,
                                      title=f"{q} (layer x head, mean over prompts)"))
        t = tabs.get("trajectory")
        if t is not None:
            d = t[t.quantity.isin(["mlp_dW_gate_norm", "mlp_dW_gate_step"])]
            d = d.groupby(["n_demos", "quantity"], as_index=False).value.mean()
            figs.append(px.line(d, x="n_demos", y="value", color="quantity", markers=True,
                                log_y=True, title="Rank-1 MLP update vs demonstrations (mean "
                                "over layers)"))
    if section == "order_sensitivity" and "order_sensitivity" in tabs:
        d = tabs["order_sensitivity"].groupby(["n_demos", "run"],
                                              as_index=False).order_sensitivity.mean()
        figs.append(px.line(d, x="n_demos", y="order_sensitivity", color="run", markers=True,
                            title="Order sensitivity (std of p(output) across orderings)"))
    if section == "linear_attention":
        from . import dual
        if "training" in tabs:
            figs.append(dual.plot_lsa_training(tabs["training"]))
            figs.append(dual.plot_gd_alignment(tabs["training"]))
        if "ood" in tabs:
            figs.append(dual.plot_ood(tabs["ood"]))
    if section == "real_heads" and "sparsity" in tabs:
        from . import dual
        figs.append(dual.plot_head_sparsity(tabs["sparsity"]))
    return figs


def _tables(section: str, tabs: dict[str, pd.DataFrame]) -> list[tuple[str, pd.DataFrame]]:
    out = []
    if section == "icl_vs_gd":
        out += _icl_vs_gd_tables(tabs)
    elif section == "implied_updates":
        out.append(("Identities: worst relative error", tabs["identities"].groupby("identity")
                    .max_rel_err.max().to_frame()))
        p = tabs["probes"]
        out.append(("Probe quantities (median over prompts, layers, heads)",
                    p.groupby("quantity").value.describe()[["50%", "min", "max"]]))
    else:
        for name, df in tabs.items():
            out.append((name, df.head(60)))
    return out


SUMMARY_COLUMNS = ["task", "method", "lr", "selected", "run", "metric", "baseline", "kind",
                   "layer", "value", "ci_low", "ci_high", "n", "verdict"]


def icl_vs_gd_summary(tabs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The summary with intervals, the compact table and the sweep, from the units' tables;
    each model (the ``model`` column of its units) is summarised on its own, with its own rate
    selection, and the tables carry the model as their first column."""
    pq = tabs["per_query"]
    if "model" not in pq:  # units written before models were keyed
        return _summary_one(tabs)
    parts: dict[str, list[pd.DataFrame]] = {}
    for m in _model_order(pq.model):
        one = {k: (v[v.model == m] if "model" in v else v) for k, v in tabs.items()}
        for k, v in _summary_one(one).items():
            parts.setdefault(k, []).append(v.assign(model=m))
    out = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    return {k: v[["model"] + [c for c in v.columns if c != "model"]] for k, v in out.items()}


def _model_order(models: pd.Series) -> list[str]:
    """Models in the order they first appear (the config's order: units are listed by it)."""
    return list(dict.fromkeys(models.dropna().astype(str)))


def _summary_one(tabs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:

    pq, ft = tabs["per_query"], tabs.get("finetune", pd.DataFrame())
    if "lr" in ft:
        ft = ft[ft.lr.notna()]
    sweep = sweep_rows(pq, ft)
    summary = summarise(pq, tabs.get("per_layer", pd.DataFrame()))
    sel = {(t, m): lr for t, m, lr in zip(sweep.task, sweep.method, sweep.lr)
           if sweep.selected[(sweep.task == t) & (sweep.method == m) & (sweep.lr == lr)].any()}
    summary["selected"] = [sel.get((t, m)) == lr for t, m, lr in
                           zip(summary.task, summary.method, summary.lr)]
    summary = summary.reindex(columns=SUMMARY_COLUMNS + [c for c in summary.columns
                                                         if c not in SUMMARY_COLUMNS])
    return {"summary": summary, "table": compact_table(summary, ANCHORS), "sweep": sweep}


def _icl_vs_gd_intro(s: dict, tabs: dict[str, pd.DataFrame]) -> str:
    c = settings("icl_vs_gd", s)
    sw = tabs["sweep"]
    flagged = sw[sw.flag != ""]
    items = [f"protocol <b>{esc(c.protocol)}</b>: one demonstration set of k = {esc(c.k)} per "
             f"seed (train split), one fine-tune per (seed, method, rate), {esc(c.queries)} "
             f"test queries per seed, seeds {esc(c.seeds)}, read at the <b>{esc(c.position)}</b> "
             "position",
             f"learning rates {esc(c.lrs)}: the rate with the best FT accuracy on "
             f"{esc(c.dev_queries)} dev queries is selected (ties: gold log-probability); "
             "baselines run at it",
             "every value: mean over queries (pooled over seeds) with a 95 % bootstrap interval; "
             "a baseline cell shows the baseline's value and the verdict on ours − baseline "
             "(paired by query): <span class=beats>beats baseline</span> only when that "
             "difference's interval lies above 0",
             f"{len(flagged)} of {len(sw)} sweep settings flagged (diverged, or FT fixes no "
             "zero-shot error: Rec2FTP undefined); diverged fine-tunes are excluded from every "
             "metric",
             "predictions scored by " + "; ".join(
                 f"{esc(task)}: {esc(', '.join(sorted(set(d['scoring'].dropna()))))}"
                 if "scoring" in d
                 else f"{esc(task)}: not recorded by these units (older than the scoring column)"
                 for task, d in
                 tabs["per_query"].groupby("task")) + " (first_token: argmax over the "
             "candidates' first tokens, the anchors' label accuracy; full_answer: each "
             "answer's whole log-probability, where answers share a first token)"]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _verdict_html(cell: str) -> str:
    cell = esc(str(cell))
    for word, cls in (("(beats baseline)", "beats"), ("(below baseline)", "below"),
                      ("(not distinguishable)", "nd")):
        cell = cell.replace(esc(word), f"<span class={cls}>{esc(word)}</span>")
    return cell


def _icl_vs_gd_tables(tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
    out = []
    table = tabs["table"]
    anchors = {anchor_column(a) for a in ANCHORS.itertuples()}
    for (task, method), d in table.groupby(["task", "method"], sort=False):
        groups, anchor_part = [], None
        models = _model_order(d.model) if "model" in d else [None]
        for m in models:
            g = (d[d.model == m] if m is not None else d).drop(
                columns=["task", "method"] + (["model"] if m is not None else []))
            lr = g.pop("lr").iloc[0]
            g = g.set_index("metric")
            keep = [c for c in g.columns if (g[c] != "").any()]
            own = [c for c in keep if c not in anchors]
            groups.append((f"{m}, lr = {lr:g}" if len(models) > 1 else None, g[own]))
            anchor_part = g[[c for c in keep if c in anchors]]
        if len(models) == 1:
            title = f"{task}: ICL vs {method} (selected lr = {lr:g})"
            out.append((title, _HtmlTable(pd.concat([groups[0][1], anchor_part], axis=1))))
            continue
        if anchor_part is not None and anchor_part.shape[1]:
            groups.append(("anchors (published)", anchor_part))
        out.append((f"{task}: ICL vs {method}, models side by side (each at its selected lr)",
                    _HtmlTable(pd.concat([g for _, g in groups], axis=1),
                               groups=[(name, g.shape[1]) for name, g in groups])))
    sw = tabs["sweep"].copy()
    sw["selected"] = np.where(sw.selected, "selected", "")
    out.append(("Learning-rate sweep (per seed)", sw.round(3)))
    return out


class _HtmlTable:
    """A table whose cells carry the verdict colours; ``groups`` (name, number of columns)
    adds a header row spanning each group's columns (one group per model)."""

    def __init__(self, df: pd.DataFrame, groups: list[tuple[str, int]] | None = None):
        self.df = df
        self.groups = groups

    def to_html(self, border: int = 0, na_rep: str = "") -> str:
        top, starts = "", set()
        if self.groups:
            top = "<tr><th></th>" + "".join(
                f"<th colspan={n} class='group gstart'>{esc(name)}</th>"
                for name, n in self.groups) + "</tr>"
            starts = set(np.cumsum([0] + [n for _, n in self.groups])[:-1].tolist())

        def cls(j: int) -> str:
            return " class=gstart" if j in starts else ""

        head = "<tr><th></th>" + "".join(f"<th{cls(j)}>{esc(str(c))}</th>"
                                         for j, c in enumerate(self.df.columns)) + "</tr>"
        body = "".join("<tr><td class=metric>" + esc(str(i)) + "</td>" +
                       "".join(f"<td{cls(j)}>{_verdict_html('' if pd.isna(v) else v)}</td>"
                               for j, v in enumerate(row)) + "</tr>"
                       for i, row in zip(self.df.index, self.df.itertuples(index=False)))
        return f"<div class=wide><table>{top}{head}{body}</table></div>"


def _icl_vs_gd_figures(tabs: dict[str, pd.DataFrame]) -> list:
    import plotly.express as px

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
        rows = _model_order(d.model) if many else [None]
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
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

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


def _provenances(out: Path) -> dict[str, dict]:
    """Each model's provenance record (``OUT/provenance/MODEL.json``), by model key."""
    d = out / "provenance"
    return {f.stem: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))} \
        if d.is_dir() else {}


def _by_model(tabs: dict[str, pd.DataFrame]) -> list[tuple[str | None, dict[str, pd.DataFrame]]]:
    """A section's tables split per model (one block per model in the report); tables of
    units that run without a model, or of one model, stay whole."""
    models = _model_order(pd.concat([t.model for t in tabs.values() if "model" in t]
                                    or [pd.Series(dtype=str)]))
    if len(models) <= 1:
        return [(None, tabs)]
    return [(m, {k: v[v.model == m] if "model" in v else v for k, v in tabs.items()})
            for m in models]


def _escape_figure(fig: Any) -> Any:
    """Plotly renders a subset of HTML in titles, annotations (facet and subplot titles) and
    legend entries, which carry task names and model keys: each goes through :func:`esc`."""
    if fig.layout.title.text:
        fig.layout.title.text = esc(fig.layout.title.text)
    fig.for_each_annotation(lambda a: a.update(text=esc(a.text)) if a.text else None)
    fig.for_each_trace(lambda t: t.update(name=esc(t.name)) if t.name else None)
    return fig


def _stack_html(key: str, prov: dict) -> str:
    """One line per model: the versions its results were computed with, the doctor's verdict
    on that stack, and whether the fast paths ran (results recorded before versions were say
    so)."""
    stack, doctor = prov.get("stack"), prov.get("doctor") or {}
    if not stack:
        return (f"<p class=stack><b>{esc(key)}</b>: versions not recorded (results "
                "from before icl-probe recorded them)</p>")
    verdict = str(doctor.get("verdict", "not recorded"))
    cls = "beats" if verdict.startswith("passed") else "below"
    when = f" on {doctor['date']}" if doctor.get("date") else ""
    versions = ", ".join(f"{k} {v}" for k, v in stack.items())
    return (f"<p class=stack><b>{esc(key)}</b> computed with {esc(versions)}; "
            f"<code>icl-probe doctor</code> on this stack: <span class={cls}>"
            f"{esc(verdict)}</span>{esc(when)}; fast paths "
            f"{esc(str(prov.get('fast_paths', 'not recorded')))}</p>")


def write_report(config: Config, out: Path, *, missing: int = 0) -> Path:
    """One self-contained HTML report from every finished unit under ``out`` (and, with an
    ``icl_vs_gd`` section, ``OUT/summary.csv``). ``missing``: units not finished yet, said at
    the top so a partial report is never taken for a whole one."""
    out = Path(out)
    results = read_results(out)
    models = _provenances(out)
    listing = "; ".join(
        f"<b>{esc(k)}</b> = {esc(str(p['model'].get('label')))} "
        f"({esc(str(p['model'].get('source')))}, {esc(str(p.get('dtype')))} on "
        f"{esc(str(p.get('device')))}, weights digest {esc(p['model'].get('digest'))})"
        for k, p in models.items()) or "none recorded"
    parts = [f"<h1>icl-probe: {esc(config.name)}</h1>",
             f"<p>models: {listing}; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    parts += [_stack_html(k, p) for k, p in models.items()]
    if missing:
        parts.append(f"<p class=partial>partial report: {missing} unit(s) of this config are "
                     "not finished yet; run the experiment again (or wait for its jobs) and "
                     f"rebuild with <code>icl-probe report {esc(str(out))}</code></p>")
    first = True
    for section in config.sections:
        parts.append(f"<h2>{esc(section)}</h2>")
        tabs = results.get(section)
        if not tabs:
            parts.append("<p>no finished unit yet</p>")
            continue
        if section == "icl_vs_gd":
            tabs.update(icl_vs_gd_summary(tabs))
            write_csv(out / "summary.csv", tabs["summary"])
            parts.append(_icl_vs_gd_intro(config.section(section), tabs))
            blocks = [(None, tabs)]
        else:
            blocks = _by_model(tabs)
        for model, block in blocks:
            if model is not None:
                parts.append(f"<h3 class=model>model {esc(model)}</h3>")
            for title, df in _tables(section, block):
                parts.append(f"<h3>{esc(title)}</h3>" + df.to_html(border=0, na_rep=""))
            for fig in _figures(section, block):
                if model is not None:
                    fig.update_layout(title=f"{model}: {fig.layout.title.text or ''}")
                parts.append(_escape_figure(fig).to_html(full_html=False,
                                                         include_plotlyjs=first))
                first = False
    parts.append("<h2>config</h2><pre>" + esc(json.dumps(config.body, indent=2)) +
                 "</pre>")
    parts.append("<h2>versions</h2><pre>" + esc(json.dumps(_versions(), indent=2)) +
                 "</pre>")
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}"
             "th.group{text-align:center;border-bottom:2px solid #555}"
             ".gstart{border-left:2px solid #555}div.wide{overflow-x:auto}"
             ".beats{color:#0a7a28;font-weight:600}.below{color:#b3261e}.nd{color:#777}"
             ".partial{background:#fff4e5;padding:6px;border-left:4px solid #e8710a}"
             "h3.model{border-top:2px solid #555;padding-top:8px}"
             "td.metric{text-align:left;font-weight:600}</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>" + \
        "\n".join(parts) + "</body></html>"
    path = out / "report.html"
    write_text(path, page)
    return path

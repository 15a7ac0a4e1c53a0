"""The HTML report of an experiment, rebuilt from its finished units: one self-contained page
with each section's tables and figures, the models and the stack their results came from,
and the config. Every piece of user text goes through :func:`icl_probe.html.esc`."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformer_lens
import transformers

from ..experiments import (SECTIONS, Config, missing_units, model_specs, read_results,
                           stamped_config, write_csv, write_text)
from ..experiments.sections import VerdictTable, model_order
from ..html import esc
from ..version import __version__


def _versions() -> dict:
    return {"icl-probe": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformer-lens": getattr(transformer_lens, "__version__", "?"),
            "python": platform.python_version(), "machine": platform.machine()}


def _verdict_html(cell: str) -> str:
    cell = esc(str(cell))
    for word, cls in (("(beats baseline)", "beats"), ("(below baseline)", "below"),
                      ("(not distinguishable)", "nd")):
        cell = cell.replace(esc(word), f"<span class={cls}>{esc(word)}</span>")
    return cell


def _table_html(df: pd.DataFrame, groups: list[tuple[str, int]] | None = None) -> str:
    """A table whose cells carry the verdict colours; ``groups`` (name, number of columns)
    adds a header row spanning each group's columns (one group per model)."""
    top, starts = "", set()
    if groups:
        top = "<tr><th></th>" + "".join(
            f"<th colspan={n} class='group gstart'>{esc(name)}</th>"
            for name, n in groups) + "</tr>"
        starts = set(np.cumsum([0] + [n for _, n in groups])[:-1].tolist())

    def cls(j: int) -> str:
        return " class=gstart" if j in starts else ""

    head = "<tr><th></th>" + "".join(f"<th{cls(j)}>{esc(str(c))}</th>"
                                     for j, c in enumerate(df.columns)) + "</tr>"
    body = "".join("<tr><td class=metric>" + esc(str(i)) + "</td>" +
                   "".join(f"<td{cls(j)}>{_verdict_html('' if pd.isna(v) else v)}</td>"
                           for j, v in enumerate(row)) + "</tr>"
                   for i, row in zip(df.index, df.itertuples(index=False)))
    return f"<div class=wide><table>{top}{head}{body}</table></div>"


def _provenances(out: Path) -> dict[str, dict]:
    """Each model's provenance record (``OUT/provenance/MODEL.json``), by model key."""
    d = out / "provenance"
    return {f.stem: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))} \
        if d.is_dir() else {}


def _by_model(tabs: dict[str, pd.DataFrame]) -> list[tuple[str | None, dict[str, pd.DataFrame]]]:
    """A section's tables split per model (one block per model in the report); tables of
    units that run without a model, or of one model, stay whole."""
    models = model_order(pd.concat([t.model for t in tabs.values() if "model" in t]
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



STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
         "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;"
         "border-bottom:1px solid #ddd;text-align:right}"
         "th.group{text-align:center;border-bottom:2px solid #555}"
         ".gstart{border-left:2px solid #555}div.wide{overflow-x:auto}"
         ".beats{color:#0a7a28;font-weight:600}.below{color:#b3261e}.nd{color:#777}"
         ".partial{background:#fff4e5;padding:6px;border-left:4px solid #e8710a}"
         "h3.model{border-top:2px solid #555;padding-top:8px}"
         "td.metric{text-align:left;font-weight:600}</style>")


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
    plotly_js = [True]  # plotly's script goes with the first figure only
    for name in config.sections:
        parts.append(f"<h2>{esc(name)}</h2>")
        tabs = results.get(name)
        if not tabs:
            parts.append("<p>no finished unit yet</p>")
            continue
        parts += _section_html(config, out, name, tabs, plotly_js)
    parts.append("<h2>config</h2><pre>" + esc(json.dumps(config.body, indent=2)) +
                 "</pre>")
    parts.append("<h2>versions</h2><pre>" + esc(json.dumps(_versions(), indent=2)) +
                 "</pre>")
    page = f"<!doctype html><html><head><meta charset='utf-8'>{STYLE}</head><body>" + \
        "\n".join(parts) + "</body></html>"
    path = out / "report.html"
    write_text(path, page)
    return path


def _section_html(config: Config, out: Path, name: str, tabs: dict[str, pd.DataFrame],
                  plotly_js: list[bool]) -> list[str]:
    """One section's part of the page: its summary (written to ``OUT/summary.csv`` where the
    section has one), its intro, then its tables and figures, per model where it says so."""
    section = SECTIONS[name]
    tabs.update(section.summarise(tabs))
    for table, file in section.output_files.items():
        if table in tabs:
            write_csv(out / file, tabs[table])
    parts = [section.intro(config.section(name), tabs)]
    blocks = _by_model(tabs) if section.per_model else [(None, tabs)]
    for model, block in blocks:
        if model is not None:
            parts.append(f"<h3 class=model>model {esc(model)}</h3>")
        for title, table in section.tables(block):
            html = _table_html(table.df, table.groups) if isinstance(table, VerdictTable) \
                else table.to_html(border=0, na_rep="")
            parts.append(f"<h3>{esc(title)}</h3>" + html)
        for fig in section.figures(block):
            if model is not None:
                fig.update_layout(title=f"{model}: {fig.layout.title.text or ''}")
            parts.append(_escape_figure(fig).to_html(full_html=False,
                                                     include_plotlyjs=plotly_js[0]))
            plotly_js[0] = False
    return [p for p in parts if p]


def rebuild_report(out: str | Path) -> Path:
    """Rebuild ``report.html`` and ``summary.csv`` of an output directory from its finished
    units (any time: while shards still run, the report says how many units are missing)."""
    out = Path(out)
    config = stamped_config(out)
    ran = [p.stem for p in sorted((out / "provenance").glob("*.json"))]
    listed = list(model_specs(config))
    # the config's models, and any other a run was given (--model); a directory written only
    # by runs with another model does not count the config's own as missing
    models = listed + [k for k in ran if k not in listed] if set(ran) & set(listed) or not ran \
        else ran
    missing = missing_units(out, config, models)
    return write_report(config, out, missing=len(missing))

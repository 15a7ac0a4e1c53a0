"""Experiments: small TOML configs driving the library, resumable, with an HTML report.

A config names the sections to run and their sizes::

    [experiment]
    name = "default"
    sections = ["icl_vs_gd", "implied_updates"]

    [icl_vs_gd]
    tasks = ["sentiment"]
    k = 4
    queries = 8
    seeds = [0]
    lrs = [1e-3]
    methods = ["dai", "lcgd"]

Each section expands into *units* (task x seed x learning rate x ...). A finished unit's
tables are written atomically (a temporary directory renamed into place) under
``OUT/units/``; re-running skips finished units, an interrupt loses at most the unit in
flight, and the output directory is keyed by a hash of the config, so a changed config never
mixes with old results. ``report.html`` is rebuilt from every finished unit at the end.

>>> cfg = load_config(EXPERIMENTS_DIR / "default.toml")       # doctest: +SKIP
>>> run_experiment(cfg, out="runs/default")                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import EXPERIMENTS_DIR, Config, load_config
from .errors import ConfigError, ExperimentError

__all__ = ["ANCHORS", "EXPERIMENTS_DIR", "SECTIONS", "Config", "ConfigError", "ExperimentError",
           "finished_units", "icl_vs_gd_summary", "load_config", "output_dir", "provenance",
           "read_results", "run_experiment", "unit_finished", "write_report"]


# The anchors' published numbers (docs/protocol.md, "Reference numbers"): one data file, read
# here and quoted in the docs.
ANCHORS_FILE = Path(__file__).resolve().parent / "data" / "anchors.csv"
ANCHORS = pd.read_csv(ANCHORS_FILE, keep_default_na=False)


# ------------------------------------------------------------------------------ sections
# Each section: units(config) -> list of unit dicts; run(model, unit) -> {table: DataFrame}.


def _icl_vs_gd_settings(s: dict) -> dict:
    """The section's values, with the config schema's defaults for any key it lacks."""
    from .config import schema

    return {k: s.get(k, default) for k, (_, default) in schema()["icl_vs_gd"].items()}


def _icl_vs_gd_units(s: dict) -> list[dict]:
    """Stage 1: every (task, seed, method, lr) on the model itself, dev and test queries.
    Stage 2: every baseline run at the rate stage 1 selected (read from the finished stage-1
    units when the unit runs)."""
    from .protocol import lr_grid

    c = _icl_vs_gd_settings(s)
    grid = lr_grid(c["lrs"], c["methods"])
    sweep = [dict(stage="sweep", task=t, seed=seed, method=m, lr=lr) for t in c["tasks"]
             for m in c["methods"] for lr in grid[m] for seed in c["seeds"]]
    base = [dict(stage="baseline", task=t, seed=seed, method=m, run=b) for t in c["tasks"]
            for m in c["methods"] for b in c["baselines"] for seed in c["seeds"]]
    return sweep + base


def _comparison(model: Any, c: dict, task: str, ctx: dict) -> Any:
    """One Comparison per task and process, so that ZS/ICL runs are shared across units."""
    from .protocol import Comparison

    cache = ctx.setdefault("comparisons", {})
    if task not in cache:
        # the random-weight baseline models are built once and shared by every task
        cache[task] = Comparison(model, task, k=c["k"], queries=c["queries"],
                                 dev_queries=c["dev_queries"], protocol=c["protocol"],
                                 position=c["position"], balanced=c["balanced"],
                                 baseline_models=ctx.setdefault("baseline_models", {}),
                                 progress=False)
    return cache[task]


def _icl_vs_gd_run(model: Any, u: dict, s: dict, ctx: dict) -> dict[str, pd.DataFrame]:
    from .protocol import FineTuneConfig, lr_grid, select_lr, sweep_rows

    c = _icl_vs_gd_settings(s)
    comp = _comparison(model, c, u["task"], ctx)
    if u["stage"] == "sweep":
        cfg = FineTuneConfig(method=u["method"], params=c["params"], lr=u["lr"],
                             loss_tokens=c["loss_tokens"])
        splits = ("test", "dev") if len(lr_grid(c["lrs"], c["methods"])[u["method"]]) > 1 \
            else ("test",)
        return comp.run(cfg, u["seed"], "model", splits)
    done = read_results(ctx["out"]).get("icl_vs_gd", {})
    name = FineTuneConfig(method=u["method"], params=c["params"]).name
    chosen = select_lr(sweep_rows(done["per_query"], done["finetune"])) if done else {}
    if (u["task"], name) not in chosen:
        # every rate diverged: nothing to compare the baseline with
        return {"finetune": pd.DataFrame([{"task": u["task"], "method": name, "run": u["run"],
                                           "seed": u["seed"], "skipped": "every rate diverged"}])}
    cfg = FineTuneConfig(method=u["method"], params=c["params"], lr=chosen[(u["task"], name)],
                         loss_tokens=c["loss_tokens"])
    return comp.run(cfg, u["seed"], u["run"], ("test",))


def _implied_units(s: dict) -> list[dict]:
    return [dict(task=t, seed=seed) for t in s.get("tasks", ["capital"])
            for seed in s.get("seeds", [0])]


def _implied_run(model: Any, u: dict, s: dict, ctx: dict) -> dict[str, pd.DataFrame]:
    from .probes import implied_updates, update_trajectory, verify_identities
    from .prompts import build_prompts

    pairs = build_prompts(model, u["task"], range(s.get("prompts", 8)), k=s.get("k", 8),
                          seed=u["seed"])
    up = implied_updates(model, pairs)
    traj = update_trajectory(model, u["task"], query=s.get("trajectory_query", 0),
                             k=s.get("k", 8), seed=u["seed"])
    ident = verify_identities(model, pairs[: s.get("verify_prompts", 2)])
    return {"probes": up.table(), "trajectory": traj, "identities": ident}


def _order_units(s: dict) -> list[dict]:
    return [dict(task=t, n_demos=n, lr=lr) for t in s.get("tasks", ["sentiment"])
            for n in s.get("n_demos", [1, 2, 4, 8]) for lr in s.get("lrs", [1e-3])]


def _order_run(model: Any, u: dict, s: dict, ctx: dict) -> dict[str, pd.DataFrame]:
    from .comparison import order_sensitivity_table
    from .prompts import build_prompt

    methods = [dict(method=m) if ":" not in m else dict(method="dai", params=m)
               for m in s.get("methods", ["dai", "batch", "adam"])]
    rows = []
    for q in range(s.get("queries", 4)):
        if u["n_demos"] < 2:
            break  # one demonstration has a single ordering
        pair = build_prompt(model, u["task"], q, u["n_demos"], seed=q)
        t = order_sensitivity_table(model, pair, orderings=s.get("orderings", 10),
                                    methods=methods, lr=u["lr"], seed=q)
        t.insert(0, "query", q)
        rows.append(t)
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["query", "run", "orderings", "order_sensitivity"])
    return {"order_sensitivity": df}


def _lsa_units(s: dict) -> list[dict]:
    return [dict(seed=seed) for seed in s.get("seeds", [0])]


def _lsa_run(model: Any, u: dict, s: dict, ctx: dict) -> dict[str, pd.DataFrame]:
    from . import dual

    lr, loss = dual.best_one_step_lr(n_tasks=s.get("line_search_tasks", 10_000), seed=u["seed"])
    eig = dual.eigenvalue_table(n_tasks=s.get("eigen_tasks", 10_000), seed=u["seed"])
    cfg = dual.LSATrainConfig(steps=s.get("steps", 1000), batch_size=s.get("batch_size", 2048),
                              eval_every=s.get("eval_every", 100), seed=u["seed"], gd_lr=lr)
    res = dual.train_lsa(cfg, progress=False)
    ood = dual.ood_curves(res.model, lr, seed=u["seed"])
    anchor = pd.DataFrame([{"quantity": "best one-step lr", "ours": lr, "anchor": 6.05},
                           {"quantity": "loss at best lr", "ours": loss, "anchor": 0.206}])
    return {"line_search": anchor, "eigenvalues": eig, "training": res.history, "ood": ood}


def _heads_units(s: dict) -> list[dict]:
    return [dict(task=t) for t in s.get("tasks", ["capital"])]


def _heads_run(model: Any, u: dict, s: dict, ctx: dict) -> dict[str, pd.DataFrame]:
    from . import dual
    from .prompts import build_prompts

    pairs = build_prompts(model, u["task"], range(s.get("prompts", 4)), k=s.get("k", 8))
    return dual.real_head_claims(model, pairs)


SECTIONS: dict[str, tuple[Callable, Callable]] = {
    "icl_vs_gd": (_icl_vs_gd_units, _icl_vs_gd_run),
    "implied_updates": (_implied_units, _implied_run),
    "order_sensitivity": (_order_units, _order_run),
    "linear_attention": (_lsa_units, _lsa_run),
    "real_heads": (_heads_units, _heads_run),
}


# ------------------------------------------------------------------------------ running


def _unit_id(section: str, unit: dict) -> str:
    parts = [section] + [f"{k}={v}" for k, v in sorted(unit.items())]
    return "__".join(p.replace("/", "_").replace(" ", "") for p in parts)


COMPLETE = "COMPLETE"  # a unit's completion marker, written last: the digest of its files


def _files_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name != COMPLETE:
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def unit_finished(d: Path) -> bool:
    """A unit directory counts as finished only when its completion marker, written last,
    matches the digest of the files beside it (an empty or partial directory does not)."""
    marker = d / COMPLETE
    try:
        return marker.is_file() and marker.read_text().strip() == _files_digest(d)
    except OSError:
        return False


def _write_unit(root: Path, uid: str, tables: dict[str, pd.DataFrame], meta: dict) -> None:
    """All of a unit's tables appear at once or not at all: written into a temporary
    directory, sealed with the completion marker, then renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{uid}.", dir=root))
    try:
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        (tmp / "unit.json").write_text(json.dumps(meta, indent=2, default=str))
        (tmp / COMPLETE).write_text(_files_digest(tmp))
        final = root / uid
        if final.exists():  # an unfinished leftover of an earlier run
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finished_units(out: str | Path) -> list[Path]:
    units = Path(out) / "units"
    return [d for d in sorted(units.iterdir()) if not d.name.startswith(".")
            and d.is_dir() and unit_finished(d)] if units.is_dir() else []


def read_results(out: str | Path) -> dict[str, dict[str, pd.DataFrame]]:
    """Every finished unit's tables, concatenated per section and table."""
    res: dict[str, dict[str, list[pd.DataFrame]]] = {}
    for d in finished_units(out):
        meta = json.loads((d / "unit.json").read_text())
        for f in sorted(d.glob("*.csv")):
            try:
                df = pd.read_csv(f)
            except pd.errors.EmptyDataError:
                continue
            for k, v in meta["unit"].items():
                if k not in df.columns and k != "stage":
                    df.insert(0, k, v)
            res.setdefault(meta["section"], {}).setdefault(f.stem, []).append(df)
    return {s: {t: pd.concat(v, ignore_index=True) for t, v in tabs.items()} for s, tabs in res.items()}


# ------------------------------------------------------------------------------ provenance


def model_identity(model: Any) -> dict:
    """Where the model came from and a digest of its configuration and weights (float64 sums
    of every parameter: a different checkpoint, or the same one in another dtype, differs)."""
    info = getattr(model, "icl_probe_info", None)
    hf = getattr(model, "original_model", model)
    h = hashlib.sha256()
    cfg = getattr(hf, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in sorted(hf.named_parameters()):
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            x = p.detach().double()
            h.update(np.array([float(x.sum()), float((x * x).sum())]).tobytes())
    return {"source": getattr(info, "source", "memory"), "label": getattr(info, "label", "model"),
            "path": getattr(info, "path", None), "digest": h.hexdigest()[:16]}


def provenance(model: Any, config: Config) -> dict:
    """Everything that must match for two units' results to be comparable."""
    from . import __version__

    p = next(model.parameters())
    return {"model": model_identity(model), "dtype": str(p.dtype).replace("torch.", ""),
            "device": p.device.type, "icl_probe": __version__, "config": config.digest}


def _provenance_mismatch(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in ("model", "dtype", "device", "icl_probe", "config"):
        a, b = old.get(key), new.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            if a.get("digest") != b.get("digest"):
                diffs.append(f"model: {a.get('label')} ({a.get('digest')}) before, "
                             f"{b.get('label')} ({b.get('digest')}) now")
        elif a != b:
            diffs.append(f"{key}: {a} before, {b} now")
    return diffs


# ------------------------------------------------------------------------------ running


def output_dir(config: Config, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path("runs") / f"{config.name}-{config.digest}"


class _Lock:
    """``OUT/.lock`` while a run writes to OUT: a second run on the same directory stops with
    a clear message instead of computing the same units. A lock whose process is gone (a
    killed run) is taken over."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self) -> "_Lock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pid = -1
                if pid > 0 and _alive(pid) and pid != os.getpid():
                    raise ExperimentError(
                        f"{self.path.parent} is in use by another icl-probe run (pid {pid}). "
                        "Wait for it to finish, or give this run another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {platform.node()}\n")
            return self
        raise ExperimentError(f"could not take the lock {self.path}; remove it if no run is active")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out: Path) -> int:
    """Remove temporary unit directories of interrupted runs and unit directories without a
    valid completion marker; returns how many were removed."""
    units = out / "units"
    n = 0
    for d in units.iterdir() if units.is_dir() else []:
        if d.is_dir() and (d.name.startswith(".") or not unit_finished(d)):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def run_experiment(config: Config, *, model: Any = None, model_name: str | None = None,
                   out: str | Path | None = None, device: str | None = None,
                   dtype: str | None = None, progress: bool | None = None,
                   unit_hook: Callable[[str], None] | None = None) -> Path:
    """Run every unfinished unit of ``config`` and write ``report.html``; returns the output
    directory. ``model`` (a loaded model) or ``model_name`` override the config's model.

    The directory is locked while the run writes to it; its stamp (``config.json``) records
    the config digest and the provenance of the results (model identity, dtype, device kind,
    package version), and a run whose provenance differs is refused before any unit runs."""
    from .models import load_model

    exp = config.section("experiment")
    name = model_name if model_name is not None else exp.get("model")
    out = output_dir(config, out)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        stamp = out / "config.json"
        old = json.loads(stamp.read_text()) if stamp.is_file() else None
        if old is not None and old.get("digest") != config.digest:
            raise ExperimentError(
                f"{out} holds results of a different config (digest {old.get('digest')}, this "
                f"one {config.digest}); use another --out, or delete {out}")
        cleaned = _clean_leftovers(out)
        units = [(sec, u) for sec in config.sections for u in SECTIONS[sec][0](config.section(sec))]
        done = {d.name for d in finished_units(out)}
        todo = [(sec, u) for sec, u in units if _unit_id(sec, u) not in done]
        print(f"experiment {config.name}: {len(units)} units, {len(units) - len(todo)} already "
              f"done{f', {cleaned} unfinished leftovers removed' if cleaned else ''}; results in "
              f"{out}")
        if todo or model is not None:
            if model is None:
                model = load_model(name, device=device or exp.get("device"),
                                   dtype=dtype or exp.get("dtype"))
            prov = provenance(model, config)
            if old is not None and old.get("provenance"):
                diffs = _provenance_mismatch(old["provenance"], prov)
                if diffs:
                    raise ExperimentError(
                        f"{out} holds results of another setting ({'; '.join(diffs)}): mixing "
                        f"them would give a report of neither. Use another --out, or delete "
                        f"{out} to start afresh")
            tmp = stamp.with_suffix(".tmp")
            tmp.write_text(json.dumps({"digest": config.digest, "config": config.body,
                                       "path": config.path, "provenance": prov}, indent=2))
            os.replace(tmp, stamp)
        ctx: dict = {"out": out}
        bar = tqdm(todo, desc=config.name, unit="unit", disable=progress is False)
        for sec, u in bar:
            uid = _unit_id(sec, u)
            bar.set_postfix_str(uid[:60])
            if unit_hook is not None:
                unit_hook(uid)
            t0 = time.perf_counter()
            tables = SECTIONS[sec][1](model, u, config.section(sec), ctx)
            _write_unit(out / "units", uid, tables, {"section": sec, "unit": u,
                                                     "seconds": time.perf_counter() - t0,
                                                     "provenance": prov})
        path = write_report(config, out, model_label=getattr(
            getattr(model, "icl_probe_info", None), "label", name or "embedded"))
    print(f"report: {path.resolve()}")
    return out


# ------------------------------------------------------------------------------ report


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
            figs.append(px.line(d, x="n_demos", y="value", color="quantity", markers=True, log_y=True,
                                title="Rank-1 MLP update vs demonstrations (mean over layers)"))
    if section == "order_sensitivity" and "order_sensitivity" in tabs:
        d = tabs["order_sensitivity"].groupby(["n_demos", "run"], as_index=False).order_sensitivity.mean()
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
    """The summary with intervals, the compact table and the sweep, from the units' tables."""
    from .protocol import compact_table, summarise, sweep_rows

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


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_suffix(".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _icl_vs_gd_intro(s: dict, tabs: dict[str, pd.DataFrame]) -> str:
    c = _icl_vs_gd_settings(s)
    sw = tabs["sweep"]
    flagged = sw[sw.flag != ""]
    items = [f"protocol <b>{c['protocol']}</b>: one demonstration set of k = {c['k']} per seed "
             f"(train split), one fine-tune per (seed, method, rate), {c['queries']} test "
             f"queries per seed, seeds {c['seeds']}, read at the <b>{c['position']}</b> position",
             f"learning rates {c['lrs']}: the rate with the best FT accuracy on {c['dev_queries']} "
             "dev queries is selected (ties: gold log-probability); baselines run at it",
             "every value: mean over queries (pooled over seeds) with a 95 % bootstrap interval; "
             "a baseline cell shows the baseline's value and the verdict on ours − baseline "
             "(paired by query): <span class=beats>beats baseline</span> only when that "
             "difference's interval lies above 0",
             f"{len(flagged)} of {len(sw)} sweep settings flagged (diverged, or FT fixes no "
             "zero-shot error: Rec2FTP undefined); diverged fine-tunes are excluded from every "
             "metric",
             "predictions scored by " + "; ".join(
                 f"{task}: {', '.join(sorted(set(d['scoring'].dropna())))}"
                 if "scoring" in d
                 else f"{task}: not recorded by these units (older than the scoring column)"
                 for task, d in
                 tabs["per_query"].groupby("task")) + " (first_token: argmax over the "
             "candidates' first tokens, the anchors' label accuracy; full_answer: each "
             "answer's whole log-probability, where answers share a first token)"]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _verdict_html(cell: str) -> str:
    cell = html.escape(str(cell))
    for word, cls in (("(beats baseline)", "beats"), ("(below baseline)", "below"),
                      ("(not distinguishable)", "nd")):
        cell = cell.replace(html.escape(word), f"<span class={cls}>{html.escape(word)}</span>")
    return cell


def _icl_vs_gd_tables(tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
    out = []
    table = tabs["table"]
    for (task, method), d in table.groupby(["task", "method"], sort=False):
        d = d.drop(columns=["task", "method"]).copy()
        lr = d.pop("lr").iloc[0]
        d = d.set_index("metric")
        keep = [c for c in d.columns if (d[c] != "").any()]
        out.append((f"{task}: ICL vs {method} (selected lr = {lr:g})", _HtmlTable(d[keep])))
    sw = tabs["sweep"].copy()
    sw["selected"] = np.where(sw.selected, "selected", "")
    out.append(("Learning-rate sweep (per seed)", sw.round(3)))
    return out


class _HtmlTable:
    """A table whose cells carry the verdict colours."""

    def __init__(self, df: pd.DataFrame):
        self.df = df

    def to_html(self, border: int = 0, na_rep: str = "") -> str:
        head = "<tr><th></th>" + "".join(f"<th>{html.escape(str(c))}</th>"
                                         for c in self.df.columns) + "</tr>"
        body = "".join("<tr><td class=metric>" + html.escape(str(i)) + "</td>" +
                       "".join(f"<td>{_verdict_html(v)}</td>" for v in row) + "</tr>"
                       for i, row in zip(self.df.index, self.df.itertuples(index=False)))
        return f"<table>{head}{body}</table>"


def _icl_vs_gd_figures(tabs: dict[str, pd.DataFrame]) -> list:
    import plotly.express as px

    figs = []
    sw = tabs.get("sweep")
    if sw is not None and len(sw):
        d = sw.groupby(["task", "method", "lr"], as_index=False).agg(
            dev_ft_acc=("dev_ft_acc", "mean"), test_ft_acc=("test_ft_acc", "mean"),
            test_zs_acc=("test_zs_acc", "mean"), selected=("selected", "any"),
            diverged=("diverged", "any"), fixes=("ft_fixes", "sum"))
        d = d.melt(id_vars=["task", "method", "lr", "selected", "diverged", "fixes"],
                   value_vars=["dev_ft_acc", "test_ft_acc", "test_zs_acc"], var_name="accuracy")
        fig = px.line(d, x="lr", y="value", color="accuracy", line_dash="method",
                      facet_col="task", markers=True, log_x=True,
                      title="Learning-rate sweep: FT accuracy (dev picks the rate), ZS for scale; "
                            "★ selected, ✕ diverged, ○ FT fixes no ZS error")
        for _, r in d[d.accuracy == "dev_ft_acc"].iterrows():
            mark = "★" if r.selected else ("✕" if r.diverged else ("○" if r.fixes == 0 else ""))
            if mark:
                col = sorted(d.task.unique()).index(r.task) + 1 if d.task.nunique() > 1 else 1
                fig.add_annotation(x=np.log10(r.lr), y=r.value, text=mark, showarrow=False,
                                   yshift=12, row=1, col=col)
        figs.append(fig)
    s = tabs["summary"]
    s = s[(s.layer >= 0) & s.selected.astype(bool) & (s.kind != "difference")]
    for metric in ("SimAOU_norm", "SimAOU", "SimAM_delta", "Kendall", "weight_cos"):
        d = s[s.metric == metric]
        if d.empty:
            continue
        figs.append(_per_layer_figure(metric, d.assign(
            line=np.where(d.baseline != "", d.baseline, d.run))))
    return figs


# one colour per line kind, the same in every panel; ours is drawn thick, with its interval
_LINE_COLOURS = {"model": "#1a1a1a", "shuffled_labels": "#e8710a", "untrained": "#1a73e8",
                 "embeddings_only": "#12b5cb", "random_update": "#9aa0a6",
                 "uniform_random": "#c5221f", "SimAM_before": "#9334e6"}


def _per_layer_figure(metric: str, d: pd.DataFrame) -> Any:
    """One panel per (task, method): ours with its 95 % band beside every baseline."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks, methods = sorted(d.task.unique()), sorted(d.method.unique())
    titles = [f"{t}, {m} (lr {d[(d.task == t) & (d.method == m)].lr.iloc[0]:g})"
              if len(d[(d.task == t) & (d.method == m)]) else f"{t}, {m}"
              for t in tasks for m in methods]
    fig = make_subplots(rows=len(tasks), cols=len(methods), subplot_titles=titles,
                        shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.08)
    shown = set()
    for i, t in enumerate(tasks, 1):
        for j, m in enumerate(methods, 1):
            g = d[(d.task == t) & (d.method == m)]
            for line, h in g.groupby("line"):
                h = h.sort_values("layer")
                colour = _LINE_COLOURS.get(line, "#5f6368")
                name = "ours" if line == "model" else line
                if line == "model" and h.ci_low.notna().any():
                    fig.add_trace(go.Scatter(
                        x=list(h.layer) + list(h.layer)[::-1],
                        y=list(h.ci_high) + list(h.ci_low)[::-1], fill="toself",
                        fillcolor="rgba(26,26,26,0.15)", line=dict(width=0), hoverinfo="skip",
                        showlegend=False), row=i, col=j)
                fig.add_trace(go.Scatter(x=h.layer, y=h.value, mode="lines", name=name,
                                         legendgroup=name, showlegend=name not in shown,
                                         line=dict(color=colour, width=3 if line == "model" else 1.2)),
                              row=i, col=j)
                shown.add(name)
    fig.update_layout(title=f"{metric} per layer at the selected rate: ours (95 % band) beside "
                            "its baselines", height=320 * len(tasks) + 80)
    fig.update_xaxes(title_text="layer", row=len(tasks))
    return fig


def write_report(config: Config, out: Path, model_label: str = "") -> Path:
    """One self-contained HTML report from every finished unit under ``out``."""
    results = read_results(out)
    parts = [f"<h1>icl-probe: {html.escape(config.name)}</h1>",
             f"<p>model: {html.escape(str(model_label))}; written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    first = True
    for section in config.sections:
        parts.append(f"<h2>{html.escape(section)}</h2>")
        tabs = results.get(section)
        if not tabs:
            parts.append("<p>no finished unit yet</p>")
            continue
        if section == "icl_vs_gd":
            tabs.update(icl_vs_gd_summary(tabs))
            _write_csv(out / "summary.csv", tabs["summary"])
            parts.append(_icl_vs_gd_intro(config.section(section), tabs))
        for title, df in _tables(section, tabs):
            parts.append(f"<h3>{html.escape(title)}</h3>" + df.to_html(border=0, na_rep=""))
        for fig in _figures(section, tabs):
            parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
            first = False
    parts.append("<h2>config</h2><pre>" + html.escape(json.dumps(config.body, indent=2)) + "</pre>")
    parts.append("<h2>versions</h2><pre>" + html.escape(json.dumps(_versions(), indent=2)) + "</pre>")
    style = ("<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}"
             ".beats{color:#0a7a28;font-weight:600}.below{color:#b3261e}.nd{color:#777}"
             "td.metric{text-align:left;font-weight:600}</style>")
    page = f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>" + \
        "\n".join(parts) + "</body></html>"
    path = out / "report.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path

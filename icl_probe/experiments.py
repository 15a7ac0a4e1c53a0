"""Experiments: small TOML configs driving the library, resumable, shardable, with an HTML
report.

A config names the models and the sections to run, and their sizes::

    [experiment]
    name = "default"
    sections = ["icl_vs_gd", "implied_updates"]
    models = ["path/to/a.gguf", "EleutherAI/pythia-160m"]   # default: the embedded model

    [icl_vs_gd]
    tasks = ["sentiment"]
    k = 4
    queries = 8
    seeds = [0]
    lrs = [1e-3]
    methods = ["dai", "lcgd"]

Each section expands into *units* (model x task x seed x learning rate x ...). A finished
unit's tables are written atomically under ``OUT/units/`` (see :mod:`icl_probe.store`);
re-running skips finished units, an interrupt or a kill loses at most the unit in flight, and
the output directory is keyed by a hash of the config, so a changed config never mixes with
old results. ``report.html`` is rebuilt from every finished unit at the end
(:mod:`icl_probe.report`).

The units can be cut into shards (:func:`shard_units`): deterministic, disjoint, covering
all, and each holding whole dependency groups (an ``icl_vs_gd`` baseline unit runs at the
rate its (model, task, method) sweep selected, so those units travel together). A shard is
what one process, job-array task or ``--shard I/N`` runs (:mod:`icl_probe.launch`).

>>> cfg = load_config(EXPERIMENTS_DIR / "default.toml")       # doctest: +SKIP
>>> run_experiment(cfg, out="runs/default")                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import (EXPERIMENTS_DIR, Config, IclVsGdSection, ImpliedUpdatesSection,
                     LinearAttentionSection, OrderSensitivitySection, RealHeadsSection,
                     load_config)
from .doctor import last_verdict
from .errors import ConfigError, ExperimentError
from .gd import PARAM_SETS
from .plan import model_layers
from .report import ANCHORS, icl_vs_gd_summary, write_report
from .selfcheck import FAST_ENV, fast_enabled, stack_versions
from .store import (Lock, clean_leftovers, finished_units, read_results, unit_finished, unit_id,
                    write_text, write_unit)
from .tasks import Task, load_task

__all__ = ["ANCHORS", "EXPERIMENTS_DIR", "SECTIONS", "Config", "ConfigError", "ExperimentError",
           "experiment_units", "finished_units", "icl_vs_gd_summary", "load_config",
           "model_key", "model_specs", "output_dir", "provenance", "read_results",
           "rebuild_report", "run_experiment", "shard_units", "stamp_output", "unit_finished", "write_report"]


# ------------------------------------------------------------------------------ sections
# Each section: units(settings) -> list of unit dicts; run(model, unit, settings, ctx) ->
# {table: DataFrame}; settings is the section's frozen dataclass (icl_probe.config).




def _icl_vs_gd_units(c: IclVsGdSection) -> list[dict]:
    """Stage 1: every (task, seed, method, lr) on the model itself, dev and test queries.
    Stage 2: every baseline run at the rate stage 1 selected (read from the finished stage-1
    units when the unit runs)."""
    from .protocol import lr_grid

    grid = lr_grid(c.lrs, c.methods)
    sweep = [dict(stage="sweep", task=t, seed=seed, method=m, lr=lr) for t in c.tasks
             for m in c.methods for lr in grid[m] for seed in c.seeds]
    base = [dict(stage="baseline", task=t, seed=seed, method=m, run=b) for t in c.tasks
            for m in c.methods for b in c.baselines for seed in c.seeds]
    return sweep + base


def task_labels(tasks: Iterable[str]) -> dict[str, str]:
    """The name each of a section's tasks carries in tables and the report: its header name,
    or, where two sources share a header name, ``name (source)``. A task's identity is its
    source (the shipped name or the file's path, as the config gives it), never its header,
    so two files that both call themselves ``sentiment`` are never pooled."""
    names = {t: load_task(t).name for t in tasks}
    count: dict[str, int] = {}
    for n in names.values():
        count[n] = count.get(n, 0) + 1
    return {t: n if count[n] == 1 else f"{n} ({t})" for t, n in names.items()}


def labeled_task(spec: str, tasks: Iterable[str]) -> Task:
    """The task of ``spec``, named by :func:`task_labels` among ``tasks``."""
    return dataclasses.replace(load_task(spec), name=task_labels(tasks)[spec])


def task_file(spec: str) -> Path:
    """The file a task spec reads (a shipped task's own file, or the path given)."""
    task = load_task(spec)
    return Path(task.path) if task.path else Path(spec)


def input_digests(config: Config) -> dict[str, str]:
    """``{task spec: sha256 of its file}`` for every task the config reads: the results of a
    task depend on its contents, not just its path."""
    specs = sorted({t for sec in config.sections
                    for t in getattr(config.settings(sec), "tasks", []) or []})
    return {t: hashlib.sha256(task_file(t).read_bytes()).hexdigest()[:16] for t in specs}


# ------------------------------------------------------------------------------ inputs


def _need(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


def _check_params(params: str, n_layers: int, where: str, model: str) -> None:
    """A parameter set (``kv``, ``qkvo``, ``mlp``, ``all``, ``v:L``) against a model's layers."""
    m = re.fullmatch(r"v:(\d+)", params)
    if m is None:
        _need(params in PARAM_SETS, where, f"{params!r} is not a parameter set; expected one "
              f"of {list(PARAM_SETS)} or 'v:L' (layer L's W_V)")
        return
    _need(int(m.group(1)) < n_layers, where, f"{params!r}: model {model!r} has layers "
          f"0..{n_layers - 1}")


def _check_task_sizes(sec: str, s: Any, where: str) -> None:
    """The sizes a section asks of each of its tasks, against the task (and its splits)."""
    for spec in s.tasks:
        task = load_task(spec)
        n = len(task)
        w = f"{where} [{sec}] tasks: {spec!r}"
        _need(n >= 2, w, f"has {n} item; a prompt needs at least one demonstration and a query")
        if sec == "icl_vs_gd":
            sizes = {name: len(task.split(name)) for name in ("train", "dev", "test")}
            for key, split in (("k", "train"), ("queries", "test"), ("dev_queries", "dev")):
                _need(getattr(s, key) <= sizes[split], f"{where} [{sec}] {key}",
                      f"{getattr(s, key)}, but task {spec!r} has {sizes[split]} items in its "
                      f"{split} split (docs/protocol.md, Splits); use {key} <= {sizes[split]}")
            continue
        k = max(s.n_demos) if sec == "order_sensitivity" else s.k
        key = "n_demos" if sec == "order_sensitivity" else "k"
        _need(k < n, f"{where} [{sec}] {key}", f"{k} demonstrations, but task {spec!r} has "
              f"{n} items (the query is never its own demonstration); use at most {n - 1}")
        queries = s.queries if sec == "order_sensitivity" else s.prompts
        qkey = "queries" if sec == "order_sensitivity" else "prompts"
        _need(queries <= n, f"{where} [{sec}] {qkey}", f"{queries}, but task {spec!r} has {n} "
              f"items; use at most {n}")


def check_inputs(config: Config, specs: dict[str, Any]) -> None:
    """Everything a run would otherwise find out only after a model loads (minutes on a 7B
    model), checked before any weight is read: each task's size and splits against ``k``,
    ``queries``, ``dev_queries``, ``n_demos`` and ``prompts``; parameter sets and ``v:L``
    methods against each model's layers (read from its config on the meta device)."""
    where = f"config {config.path or config.name!r}"
    layer_sets = []
    for sec in config.sections:
        s = config.settings(sec)
        if hasattr(s, "tasks"):
            _check_task_sizes(sec, s, where)
        if sec == "icl_vs_gd":
            layer_sets.append((f"{where} [icl_vs_gd] params", s.params))
        if sec == "order_sensitivity":
            layer_sets += [(f"{where} [order_sensitivity] methods", m) for m in s.methods
                           if m.startswith("v:")]
        if sec == "implied_updates":
            _need(s.verify_prompts <= s.prompts, f"{where} [implied_updates] verify_prompts",
                  f"{s.verify_prompts} > prompts = {s.prompts}; verify at most the prompts run")
    if not layer_sets:
        return
    for key, spec in specs.items():
        n_layers = spec.cfg.n_layers if hasattr(spec, "cfg") else model_layers(spec)
        for w, params in layer_sets:
            _check_params(params, n_layers, w, key)


def _comparison(model: Any, c: IclVsGdSection, task: str, ctx: dict) -> Any:
    """One Comparison per task and process, so that ZS/ICL runs are shared across units."""
    from .protocol import Comparison

    cache = ctx.setdefault("comparisons", {})
    if task not in cache:
        # the random-weight baseline models are built once and shared by every task
        cache[task] = Comparison(model, labeled_task(task, c.tasks), k=c.k, queries=c.queries,
                                 dev_queries=c.dev_queries, protocol=c.protocol,
                                 position=c.position, balanced=c.balanced,
                                 baseline_models=ctx.setdefault("baseline_models", {}),
                                 progress=False)
    return cache[task]


def _icl_vs_gd_run(model: Any, u: dict, c: IclVsGdSection, ctx: dict
                   ) -> dict[str, pd.DataFrame]:
    from .gd import FineTuneConfig
    from .protocol import lr_grid, select_lr, sweep_rows

    comp = _comparison(model, c, u["task"], ctx)
    if u["stage"] == "sweep":
        cfg = FineTuneConfig(method=u["method"], params=c.params, lr=u["lr"],
                             loss_tokens=c.loss_tokens)
        splits = ("test", "dev") if len(lr_grid(c.lrs, c.methods)[u["method"]]) > 1 \
            else ("test",)
        return comp.run(cfg, u["seed"], "model", splits)
    done = _sweep_results(ctx["out"], u, c)
    name = FineTuneConfig(method=u["method"], params=c.params).name
    label = task_labels(c.tasks)[u["task"]]  # the name the sweep's tables carry
    chosen = select_lr(sweep_rows(done["per_query"], done["finetune"])) if done else {}
    if (label, name) not in chosen:
        # every rate diverged: nothing to compare the baseline with
        return {"finetune": pd.DataFrame([{"task": label, "method": name, "run": u["run"],
                                           "seed": u["seed"], "skipped": "every rate diverged"}])}
    cfg = FineTuneConfig(method=u["method"], params=c.params, lr=chosen[(label, name)],
                         loss_tokens=c.loss_tokens)
    return comp.run(cfg, u["seed"], u["run"], ("test",))


def _sweep_results(out: Path, u: dict, c: IclVsGdSection) -> dict[str, pd.DataFrame]:
    """The finished sweep units of this baseline unit's (model, task, method), all of them:
    the rate is selected over every seed and rate, so a missing one is an error, not a
    smaller sweep."""
    from .protocol import lr_grid

    need = {unit_id("icl_vs_gd", dict(stage="sweep", task=u["task"], seed=seed,
                                      method=u["method"], lr=lr, model=u["model"]))
            for lr in lr_grid(c.lrs, c.methods)[u["method"]] for seed in c.seeds}
    have = {uid for uid in need if unit_finished(out / "units" / uid)}
    if need - have:
        raise ExperimentError(
            f"baseline unit {unit_id('icl_vs_gd', u)} needs the finished sweep units "
            f"{sorted(need - have)[:3]}{' ...' if len(need - have) > 3 else ''} to select its "
            "rate; run them first (they travel in the same shard unless units were picked "
            "by hand)")
    # only the sweep units this selection needs: reading every unit of the directory for each
    # baseline unit grew with the square of the run
    return read_results(out, need).get("icl_vs_gd", {})


def _implied_units(s: ImpliedUpdatesSection) -> list[dict]:
    return [dict(task=t, seed=seed) for t in s.tasks for seed in s.seeds]


def _implied_run(model: Any, u: dict, s: ImpliedUpdatesSection, ctx: dict
                 ) -> dict[str, pd.DataFrame]:
    from .probes import implied_updates, update_trajectory, verify_identities
    from .prompts import build_prompts

    task = labeled_task(u["task"], s.tasks)
    pairs = build_prompts(model, task, range(s.prompts), k=s.k, seed=u["seed"])
    up = implied_updates(model, pairs)
    traj = update_trajectory(model, task, query=s.trajectory_query, k=s.k,
                             seed=u["seed"])
    ident = verify_identities(model, pairs[: s.verify_prompts])
    return {"probes": up.table(), "trajectory": traj, "identities": ident}


def _order_units(s: OrderSensitivitySection) -> list[dict]:
    return [dict(task=t, n_demos=n, lr=lr) for t in s.tasks for n in s.n_demos for lr in s.lrs]


def _order_run(model: Any, u: dict, s: OrderSensitivitySection, ctx: dict
               ) -> dict[str, pd.DataFrame]:
    from .comparison import order_sensitivity_table
    from .prompts import build_prompt

    rows = []
    task = labeled_task(u["task"], s.tasks)
    for q in range(s.queries):
        if u["n_demos"] < 2:
            break  # one demonstration has a single ordering
        pair = build_prompt(model, task, q, u["n_demos"], seed=q)
        t = order_sensitivity_table(model, pair, orderings=s.orderings, methods=s.methods,
                                    lr=u["lr"], seed=q)
        t.insert(0, "query", q)
        rows.append(t)
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["query", "run", "orderings", "order_sensitivity"])
    return {"order_sensitivity": df}


def _lsa_units(s: LinearAttentionSection) -> list[dict]:
    return [dict(seed=seed) for seed in s.seeds]


def _lsa_run(model: Any, u: dict, s: LinearAttentionSection, ctx: dict
             ) -> dict[str, pd.DataFrame]:
    from . import dual

    lr, loss = dual.best_one_step_lr(n_tasks=s.line_search_tasks, seed=u["seed"])
    eig = dual.eigenvalue_table(n_tasks=s.eigen_tasks, seed=u["seed"])
    cfg = dual.LSATrainConfig(steps=s.steps, batch_size=s.batch_size, eval_every=s.eval_every,
                              seed=u["seed"], gd_lr=lr)
    res = dual.train_lsa(cfg, progress=False)
    ood = dual.ood_curves(res.model, lr, seed=u["seed"])
    anchor = pd.DataFrame([{"quantity": "best one-step lr", "ours": lr, "anchor": 6.05},
                           {"quantity": "loss at best lr", "ours": loss, "anchor": 0.206}])
    return {"line_search": anchor, "eigenvalues": eig, "training": res.history, "ood": ood}


def _heads_units(s: RealHeadsSection) -> list[dict]:
    return [dict(task=t) for t in s.tasks]


def _heads_run(model: Any, u: dict, s: RealHeadsSection, ctx: dict) -> dict[str, pd.DataFrame]:
    from . import dual
    from .prompts import build_prompts

    pairs = build_prompts(model, labeled_task(u["task"], s.tasks), range(s.prompts), k=s.k)
    return dual.real_head_claims(model, pairs)


SECTIONS: dict[str, tuple[Callable, Callable]] = {
    "icl_vs_gd": (_icl_vs_gd_units, _icl_vs_gd_run),
    "implied_updates": (_implied_units, _implied_run),
    "order_sensitivity": (_order_units, _order_run),
    "linear_attention": (_lsa_units, _lsa_run),
    "real_heads": (_heads_units, _heads_run),
}


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
            "device": p.device.type, "icl_probe": __version__, "config": config.digest,
            # the versions numbers depend on (refused on a change, as the weights are), the
            # verdict of `icl-probe doctor` on this stack, and whether the fast paths ran
            "stack": stack_versions(), "doctor": last_verdict(),
            "fast_paths": "on (self-checked)" if fast_enabled() else f"off ({FAST_ENV}=0)"}


def _provenance_mismatch(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in ("model", "dtype", "device", "icl_probe", "config", "stack"):
        a, b = old.get(key), new.get(key)
        if key == "stack" and a is None:  # recorded before versions were: not comparable
            continue
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            if a.get("digest") != b.get("digest"):
                diffs.append(f"model: {a.get('label')} ({a.get('digest')}) before, "
                             f"{b.get('label')} ({b.get('digest')}) now")
        elif a != b:
            diffs.append(f"{key}: {a} before, {b} now")
    return diffs




def _check_provenance(out: Path, key: str, prov: dict, *, record: bool = True) -> None:
    """Refuse results of another setting under the same model key; record the first
    (``record=False``: check only)."""
    path = out / "provenance" / f"{key}.json"
    if path.is_file():
        diffs = _provenance_mismatch(json.loads(path.read_text()), prov)
        if diffs:
            raise ExperimentError(
                f"{out} holds results of another setting for model {key!r} ({'; '.join(diffs)})"
                f": mixing them would give a report of neither. Use another --out, or delete "
                f"{out} to start afresh")
        return
    if record:
        path.parent.mkdir(exist_ok=True)
        write_text(path, json.dumps(prov, indent=2))


# ------------------------------------------------------------------------------ units


# sections whose units do not use the language model (they train their own small models)
MODEL_FREE = frozenset({"linear_attention"})


def model_key(spec: Any) -> str:
    """The short name a model's units are keyed by: ``embedded`` for the default, a GGUF
    file's stem, a directory's name, a hub id's last part (``EleutherAI/pythia-70m`` ->
    ``pythia-70m``); a loaded model is named from its ``icl_probe_info``."""
    if spec is None:
        return "embedded"
    if not isinstance(spec, (str, Path)):
        info = getattr(spec, "icl_probe_info", None)
        if info is None:
            return "model"
        return "embedded" if info.source == "embedded" else model_key(str(info.label))
    s = str(spec).rstrip("/")
    return Path(s).stem if s.endswith(".gguf") else Path(s).name


def model_specs(config: Config, override: Any = None) -> dict[str, Any]:
    """``{model key: spec}`` for the models the run covers: the config's ``models`` (or
    ``model``), or ``override`` (a name, a path, a loaded model, or a dict key -> model)."""
    if isinstance(override, dict):
        specs = dict(override)
    else:
        listed = [override] if override is not None else config.models
        specs = {}
        for spec in listed:
            k = model_key(spec)
            if k in specs:
                raise ExperimentError(
                    f"models {listed}: two models are both keyed {k!r} (the name their units "
                    "and report columns carry); give one of them a directory or file of "
                    "another name")
            specs[k] = spec
    bad = [k for k in specs if not k or "__" in k or "/" in k]
    if bad:
        raise ExperimentError(f"model key {bad[0]!r}: keys name unit directories; use letters, "
                              "digits, '-', '.' or single '_'")
    return specs


def experiment_units(config: Config, models: Iterable[str]) -> list[tuple[str, dict]]:
    """Every unit of ``config`` for the model keys ``models``, in a fixed order: by section,
    then model (in the config's order), then the section's own order."""
    models = list(models)
    units = []
    for sec in config.sections:
        base = SECTIONS[sec][0](config.settings(sec))
        if sec in MODEL_FREE:
            units += [(sec, u) for u in base]
        else:
            units += [(sec, dict(model=m, **u)) for m in models for u in base]
    return units


def _group(section: str, unit: dict) -> tuple:
    """Units that must run in one shard: an icl_vs_gd (model, task, method) sweep with the
    baselines that run at the rate it selects; every other unit stands alone."""
    if section == "icl_vs_gd":
        return (section, unit["model"], unit["task"], unit["method"])
    return (section, unit_id(section, unit))


def shard_units(units: list[tuple[str, dict]], index: int, count: int
                ) -> list[tuple[str, dict]]:
    """Shard ``index`` (1-based) of ``count``: whole dependency groups (:func:`_group`),
    assigned largest first to the shard with the fewest units so far (ties: the lower
    shard), each shard keeping the units' order. Deterministic for a given unit list;
    the shards are disjoint and together cover every unit. With fewer groups than shards,
    some shards are empty."""
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
        raise ExperimentError(f"shard {index}/{count}: expected I/N with 1 <= I <= N, e.g. 1/4")
    groups: dict[tuple, int] = {}
    for sec, u in units:
        g = _group(sec, u)
        groups[g] = groups.get(g, 0) + 1
    load = [0] * count
    owner = {}
    for g in sorted(groups, key=lambda g: -groups[g]):  # stable: ties keep the units' order
        i = min(range(count), key=lambda j: (load[j], j))
        owner[g] = i
        load[i] += groups[g]
    return [(sec, u) for sec, u in units if owner[_group(sec, u)] == index - 1]


# ------------------------------------------------------------------------------ running


def output_dir(config: Config, out: str | Path | None) -> Path:
    """``out``, or ``runs/NAME-DIGEST``; refused when it names an existing file, or a place
    this process cannot write (before any work)."""
    path = Path(out) if out is not None else Path("runs") / f"{config.name}-{config.digest}"
    if path.exists() and not path.is_dir():
        raise ExperimentError(f"--out {path}: that is an existing file, not a directory; give "
                              "a new or existing directory for the results")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExperimentError(f"--out {path}: {probe} is not writable by this user; give a "
                              "directory you can write to (or fix its permissions)")
    return path


def check_stamp(out: Path, config: Config, inputs: dict[str, str]) -> bool:
    """Refuse an ``OUT`` that holds another config's results, or results of a task file whose
    contents have changed since (naming the file); True when OUT is stamped already. Writes
    nothing."""
    stamp = out / "config.json"
    if not stamp.is_file():
        return False
    try:
        old = json.loads(stamp.read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{stamp} is unreadable ({e}); delete {out} to start afresh, or "
                              "use another --out") from e
    if old.get("digest") != config.digest:
        raise ExperimentError(
            f"{out} holds results of a different config (digest {old.get('digest')}, this "
            f"one {config.digest}); use another --out, or delete {out}")
    before = old.get("inputs") or {}
    changed = [t for t in inputs if t in before and before[t] != inputs[t]]
    if changed:
        t = changed[0]
        raise ExperimentError(
            f"task file {task_file(t)} has changed since the results in {out} were computed "
            f"(sha256 {before[t]}... then, {inputs[t]}... now): resuming would mix results of "
            f"its old and new items{f' (and {len(changed) - 1} more changed)' if changed[1:] else ''}"
            f". Use another --out, or delete {out} to start afresh")
    return True


def stamp_output(out: Path, config: Config, inputs: dict[str, str] | None = None) -> None:
    """``OUT/config.json``: the validated config and the digests of the task files it read
    (refused when OUT holds another's results; see :func:`check_stamp`). A run writes it only
    with its first finished unit, so a run refused or failed before that leaves nothing."""
    inputs = input_digests(config) if inputs is None else inputs
    if check_stamp(out, config, inputs):
        return
    write_text(out / "config.json",
               json.dumps({"digest": config.digest, "name": config.name, "config": config.body,
                           "path": config.path, "inputs": inputs}, indent=2))


def stamped_config(out: str | Path) -> Config:
    """The config an output directory was written by (from its ``config.json``)."""
    stamp = Path(out) / "config.json"
    if not stamp.is_file():
        raise ExperimentError(f"{out} is not an experiment output directory (no config.json); "
                              "give the --out of an icl-probe run")
    s = json.loads(stamp.read_text())
    body = s["config"]
    return Config(s.get("name") or body["experiment"].get("name") or Path(out).name,
                  tuple(body["experiment"]["sections"]), body, s.get("path"))


def _missing(out: Path, config: Config, models: Iterable[str]) -> list[str]:
    done = {d.name for d in finished_units(out)}
    return [unit_id(sec, u) for sec, u in experiment_units(config, models)
            if unit_id(sec, u) not in done]


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
    missing = _missing(out, config, models)
    return write_report(config, out, missing=len(missing))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_experiment(config: Config, *, model: Any = None, model_name: str | None = None,
                   out: str | Path | None = None, device: str | None = None,
                   dtype: str | None = None, device_map: Any = None,
                   n_devices: int | None = None, shard: tuple[int, int] | None = None,
                   progress: bool | None = None, report: bool = True,
                   unit_hook: Callable[[str], None] | None = None) -> Path:
    """Run every unfinished unit of ``config`` (of shard ``(I, N)`` only, when given) and
    write ``report.html`` once every unit of the config is finished; returns the output
    directory.

    ``model`` (a loaded model, or a dict key -> loaded model) or ``model_name`` (one name or
    path) replace the config's models. Models are loaded one at a time, when their first
    unit runs. The run (or shard) locks the directory against overlapping runs; the stamp
    (``config.json``) records the config, and ``provenance/MODEL.json`` each model's identity,
    dtype, device kind and package version: a run whose provenance differs is refused before
    any of that model's units run."""
    from .models import load_model

    exp = config.settings("experiment")
    specs = model_specs(config, model if model is not None else model_name)
    check_inputs(config, specs)  # before any weight loads
    out = output_dir(config, out)
    units = experiment_units(config, specs)
    mine = shard_units(units, *shard) if shard is not None else units
    inputs = input_digests(config)
    out.mkdir(parents=True, exist_ok=True)
    with Lock(out, shard):
        stamped = check_stamp(out, config, inputs)  # nothing is written before every check
        cleaned = clean_leftovers(out, [unit_id(sec, u) for sec, u in mine])
        done = {d.name for d in finished_units(out)}
        todo = [(sec, u) for sec, u in mine if unit_id(sec, u) not in done]
        where = f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(units)}" if shard else \
            f"{len(units)}"
        print(f"experiment {config.name}: {where} units, {len(mine) - len(todo)} already done"
              f"{f', {cleaned} unfinished leftovers removed' if cleaned else ''}; results in "
              f"{out}")
        loaded: dict[str, Any] = {}  # the one model in memory, by key
        provs: dict[str, dict] = {}
        ctxs: dict[str, dict] = {}

        def model_for(key: str) -> Any:
            if key not in loaded:
                for old in list(loaded):  # one model in memory at a time
                    ctxs.pop(old, None)
                    del loaded[old]
                    _free_memory()
                spec = specs[key]
                if spec is None or isinstance(spec, (str, Path)):
                    spec = load_model(spec, device=device or exp.device,
                                      dtype=dtype or exp.dtype,
                                      device_map=device_map or exp.device_map,
                                      n_devices=n_devices or exp.n_devices)
                loaded[key] = spec
                if key not in provs:  # once per model and run (a digest of every weight)
                    provs[key] = provenance(spec, config)
                    _check_provenance(out, key, provs[key], record=False)
            return loaded[key]

        recorded: set[str | None] = set()

        def record(key: str | None) -> None:
            """The stamp and the model's provenance, written with its first finished unit."""
            nonlocal stamped
            if not stamped:
                stamp_output(out, config, inputs)
                stamped = True
            if key is not None and key not in recorded:
                _check_provenance(out, key, provs[key])
                recorded.add(key)

        if model is not None:  # loaded models given: their provenance is checked up front
            for key in specs:
                model_for(key)
        # model by model (units without one first), each section's order kept within a model,
        # so that each model loads once
        rank = {k: i for i, k in enumerate(specs)}
        todo.sort(key=lambda su: rank.get(su[1].get("model"), -1))
        bar = tqdm(todo, desc=config.name, unit="unit", disable=progress is False)
        for sec, u in bar:
            uid = unit_id(sec, u)
            bar.set_postfix_str(uid[:60])
            key = u.get("model")
            m = model_for(key) if key is not None else None
            if unit_hook is not None:
                unit_hook(uid)
            t0 = time.perf_counter()
            ctx = ctxs.setdefault(key, {"out": out})
            tables = SECTIONS[sec][1](m, u, config.settings(sec), ctx)
            record(key)
            write_unit(out / "units", uid, tables, {"section": sec, "unit": u,
                                                    "seconds": time.perf_counter() - t0,
                                                    "provenance": provs.get(key)})
        missing = _missing(out, config, specs)
        if report and not missing:
            path = write_report(config, out)
            print(f"report: {path.resolve()}")
        elif report:
            print(f"{len(missing)} units of other shards are not finished yet: the report is "
                  f"written by the run that finishes last (or: icl-probe report {out})")
    return out

"""``icl-probe`` command line: ``models``, ``tasks``, ``inspect``, ``run``, ``report``, ``plan``,
``doctor``.

The CLI only parses arguments and prints; the work is done by library functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import doctor, models
from .errors import ExperimentError, IclProbeError, PromptError
from .experiments import (EXPERIMENTS_DIR, check_inputs, finished_units, load_config, model_specs,
                          output_dir)
from .experiments.plan import plan
from .experiments.settings import parse_time
from .models import Placement, load_model
from .models.heap import return_freed_memory
from .probes import inspect_pair, inspect_text, mass_heatmap, text_heatmap
from .prompts import build_prompt
from .report import rebuild_report
from .runs import launch, run_experiment
from .tasks import load_task, shipped_tasks


def _models(args: argparse.Namespace) -> dict:
    try:
        gguf = str(models.embedded_gguf_path())
    except IclProbeError as e:
        gguf = f"not installed ({e})"
    root = models.cache_dir() / "models"
    entries = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        if not d.is_dir() or ".tmp-" in d.name or ".stale-" in d.name:
            continue
        try:
            models.verify_cache(d)
            state = "ok"
        except IclProbeError as e:
            state = f"invalid: {e}"
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        entries.append({"path": str(d), "size_mb": round(size / 2**20, 1), "state": state})
    return {
        "embedded": {"label": models.EMBEDDED_LABEL, "gguf": gguf},
        "cache_dir": str(models.cache_dir()),
        "cache_env": models.CACHE_ENV,
        "cached": entries,
        "sources": [
            "no name: the embedded SmolLM2-135M-Instruct (offline)",
            "a .gguf file path",
            "a local Hugging Face directory (config.json + weights + tokenizer)",
            "a Hugging Face id (needs a local HF cache copy when offline)",
            "a transformers model object + tokenizer (Python API)",
        ],
    }


def _print_models(info: dict) -> None:
    print(f"embedded default: {info['embedded']['label']}\n  file: {info['embedded']['gguf']}")
    print(f"cache: {info['cache_dir']}  (override with ${info['cache_env']})")
    for e in info["cached"] or [{"path": "(empty)", "size_mb": 0, "state": ""}]:
        print(f"  {e['path']}  {e['size_mb']} MB  {e['state']}")
    print("model sources:")
    for s in info["sources"]:
        print(f"  - {s}")


def _tasks(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in shipped_tasks():
        t = load_task(name)
        rows.append({"task": name, "items": len(t), "kind": "classification" if
                     t.is_classification else "open-ended",
                     "labels": list(t.labels) if t.labels else None,
                     "description": t.description})
    return rows


def _inspect(args: argparse.Namespace) -> int:
    if args.prompt is None:  # check the request before the model load it would wait for

        task = load_task(args.task)
        if args.k < 0:
            raise PromptError(f"--k {args.k}: the number of demonstrations must be >= 0")
        if not 0 <= args.query < len(task):
            raise PromptError(f"--query {args.query}: task {task.name!r} has items "
                              f"0..{len(task) - 1}")
        if args.k > len(task) - 1:
            raise PromptError(f"--k {args.k}: task {task.name!r} has only {len(task) - 1} items "
                              "besides the query")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.prompt is not None:
        return _inspect_text(model, args)
    pair = build_prompt(model, args.task, query=args.query, k=args.k, seed=args.seed)
    view = inspect_pair(model, pair)
    if args.html:
        path = Path(args.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        mass_heatmap(view).write_html(str(path), include_plotlyjs=True)
    if args.json:
        out = view.to_dict()
        if args.html:
            out["html"] = str(Path(args.html).resolve())
        print(json.dumps(out, indent=2))
        return 0
    print(pair.text + " ⟨predict⟩\n")
    print(f"task {pair.task}, query {pair.query}, k={pair.k}, {len(pair.icl_ids)} tokens "
          f"(zero-shot: {len(pair.zs_ids)})\n")
    print("attention mass at the prediction position, per layer (mean over heads):")
    for r in view.layers.itertuples():
        bar = "#" * round(40 * r.demo_mass)
        print(f"  L{r.layer:>2}  demos {r.demo_mass:5.3f} (max head {r.demo_mass_max_head:5.3f})"
              f"  query {r.query_mass:5.3f}  {bar}")
    print()
    for r in view.predictions.itertuples():
        print(f"  {r.run.upper():>3}: label {r.label!r} ({'right' if r.label_correct else 'wrong'})"
              f", top token {r.top_token!r} ({'right' if r.vocab_correct else 'wrong'}), "
              f"p(gold {r.gold!r}) = {r.p_gold:.3f}")
    if args.html:
        print(f"\nheatmap: {Path(args.html).resolve()}")
    return 0


def _inspect_text(model, args: argparse.Namespace) -> int:
    view = inspect_text(model, args.prompt.replace("\\n", "\n"))
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        text_heatmap(view).write_html(str(args.html), include_plotlyjs=True)
    if args.json:
        print(json.dumps(view.to_dict(), indent=2))
        return 0
    print(f"{len(view.tokens)} tokens; where the last position attends (top 3 per layer, "
          "mean over heads):")
    for l, row in enumerate(view.attention):
        w, j = row.topk(min(3, len(row)))
        spots = ", ".join(f"{view.tokens[i]!r}@{i} {x:.2f}" for x, i in zip(w.tolist(), j.tolist()))
        print(f"  L{l:>2}  {spots}")
    print("next token: " + ", ".join(f"{r.token!r} {r.p:.3f}" for r in view.top.itertuples()))
    if args.html:
        print(f"heatmap: {Path(args.html).resolve()}")
    return 0


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit() and 1 <= int(i) <= int(n)):
        raise ExperimentError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard "
                              "1/4 (shard 1 of 4)")
    return int(i), int(n)


def _run(args: argparse.Namespace) -> int:
    if args.all and args.config:
        raise ExperimentError(f"run {args.config} --all: give one config or --all (every "
                              "shipped config, about a day of compute on a CPU), not both")
    shard = _shard(args.shard)
    if shard is not None and args.launcher not in (None, "serial"):
        raise ExperimentError(f"--shard {args.shard} with --launcher {args.launcher}: a shard "
                              "runs in this process; the launchers make their own shards "
                              "(--jobs N)")
    if args.all:
        paths = sorted(EXPERIMENTS_DIR.glob("*.toml"))
    else:
        paths = [Path(args.config) if args.config else EXPERIMENTS_DIR / "default.toml"]
    configs = [load_config(p) for p in paths]  # every config validated before any work
    outs = []
    for path, config in zip(paths, configs):
        check_inputs(config, model_specs(config, args.model))  # tasks, splits, layers
        outs.append(output_dir(config, Path(args.out) / path.stem if args.out and args.all
                               else args.out))
    for path, config, out in zip(paths, configs, outs):
        cluster = config.settings("cluster")
        launcher = args.launcher or cluster.launcher
        jobs = args.jobs if args.jobs is not None else cluster.jobs
        if args.jobs is not None and (launcher == "serial" or shard is not None):
            raise ExperimentError(f"--jobs {args.jobs}: jobs are for --launcher local or slurm; "
                                  "this run is serial in this process")
        placement = Placement(args.device, args.dtype, args.device_map, args.n_devices)
        try:
            if shard is not None or launcher == "serial":
                run_experiment(config, out=out, shard=shard, model_name=args.model,
                               **placement.load_kwargs())
            else:
                slurm = {k: getattr(args, k) if getattr(args, k, None) is not None
                         else getattr(cluster, k) for k in ("partition", "gpus_per_task",
                                                            "cpus_per_task", "mem_gb", "time")}
                slurm["sbatch"] = cluster.sbatch
                launch(config, out=out, launcher=launcher, jobs=jobs, slurm=slurm,
                       wait=args.wait, model_name=args.model, placement=placement)
        except KeyboardInterrupt:
            n = len(finished_units(out))
            print(f"\ninterrupted: {n} units kept in {out}, rerun the same command to resume",
                  file=sys.stderr)
            return 130
    return 0


def _report(args: argparse.Namespace) -> int:
    path = rebuild_report(args.out)
    print(f"report: {path.resolve()}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    p = plan(config, model_name=args.model, dtype=args.dtype)
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.text())
    return 0


def _minutes(text: str) -> int:
    try:
        return parse_time(int(text) if text.isdigit() else text, "--time")
    except IclProbeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _doctor(args: argparse.Namespace) -> int:
    """Exit status 0 when every check passes, 1 on any mismatch."""
    print("icl-probe doctor: checking this installation", file=sys.stderr)
    report = doctor.run_doctor(embedded=not args.tiny_only,
                               progress=lambda line: print(line, file=sys.stderr))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=float))
    else:
        print(doctor.format_report(report))
    return 0 if report.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icl-probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="model sources and the cache")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("tasks", help="shipped tasks")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("inspect", help="attention on demonstrations and predictions, one query")
    p.add_argument("--task", default="capital", help="shipped task name or task file")
    p.add_argument("--prompt", default=None,
                   help="free text instead of a task query (\\n for a newline)")
    p.add_argument("--query", type=int, default=0)
    p.add_argument("--k", type=int, default=8, help="number of demonstrations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="name, directory or .gguf (default: embedded)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--html", default=None, help="write a plotly heatmap here")
    p.add_argument("--json", action="store_true")
    _add_run(sub)
    p = sub.add_parser("report", help="rebuild report.html and summary.csv from the units")
    p.add_argument("out", help="an experiment's output directory")
    p = sub.add_parser("plan", help="parameters, memory and units of a config, without "
                                    "loading weights")
    p.add_argument("config", help="an experiments/*.toml file")
    p.add_argument("--model", default=None, help="name, directory or .gguf (default: the "
                                                 "config's)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("doctor", help="versions, model identities and fast-vs-slow checks: "
                                      "does this installation compute the right numbers?")
    p.add_argument("--tiny-only", action="store_true",
                   help="skip the embedded model (tiny models built in memory only)")
    p.add_argument("--json", action="store_true")
    return parser


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run an experiment config (default: experiments/default.toml)")
    p.add_argument("config", nargs="?", default=None, help="an experiments/*.toml file")
    p.add_argument("--all", action="store_true", help="run every experiments/*.toml")
    p.add_argument("--model", default=None, help="name, directory or .gguf (default: the config's)")
    p.add_argument("--out", default=None, help="output directory (default: runs/NAME-HASH)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "sequential"],
                   help="spread a model over this machine's GPUs (accelerate)")
    p.add_argument("--n-devices", type=int, default=None, help="GPUs to spread a model over")
    g = p.add_argument_group("where the units run (default: the config's [cluster], else "
                             "serial)")
    g.add_argument("--launcher", choices=["serial", "local", "slurm"], default=None)
    g.add_argument("--jobs", type=int, default=None,
                   help="local subprocesses, or Slurm array tasks (shards of the units)")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N of the units (for any other scheduler)")
    g.add_argument("--partition", default=None)
    g.add_argument("--gpus-per-task", type=int, default=None)
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--mem-gb", type=int, default=None)
    g.add_argument("--time", type=_minutes, default=None,
                   help="time limit per array task: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--wait", action="store_true",
                   help="slurm: wait for the jobs and write the report here")


def _print_tasks(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        labels = "/".join(r["labels"]) if r["labels"] else "open-ended"
        print(f"{r['task']:<12} {r['items']:>4} items  {labels:<32} {r['description']}")


def main(argv: list[str] | None = None) -> int:
    return_freed_memory()  # before any tensor: a lower peak RSS (icl_probe.models.heap)
    args = _parser().parse_args(argv)
    commands = {"inspect": _inspect, "run": _run, "report": _report, "plan": _plan,
                "doctor": _doctor}
    try:
        if args.command == "models":
            info = _models(args)
            print(json.dumps(info, indent=2)) if args.json else _print_models(info)
        elif args.command == "tasks":
            _print_tasks(_tasks(args), args.json)
        else:
            return commands[args.command](args)
    except IclProbeError as e:
        print(f"icl-probe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

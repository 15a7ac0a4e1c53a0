"""Where an experiment's units run: this process, local subprocesses, or a Slurm job array.

Three launchers share one code path, :func:`run_shard`, which runs shard I of N of the
config's units (:func:`~icl_probe.experiments.units.shard_units`) in the process it is called in:

- ``serial``: this process runs every unit (``icl-probe run CONFIG``);
- ``local``: ``jobs`` subprocesses through submitit's local executor, each running one
  shard, while this process shows the units finishing and writes the report at the end;
- ``slurm``: one job array through submitit's Slurm executor, one array task per shard, with
  the partition, GPUs and CPUs per task, memory and time limit of the command line or the
  config's ``[cluster]`` table; a small report job, queued after the array
  (``afterany``), rebuilds ``report.html`` from whatever units finished.

Any other scheduler runs ``icl-probe run CONFIG --shard I/N`` as its own array.

All of them write units atomically into one shared output directory, so a task that is
killed, preempted or requeued loses at most the unit it was running, and running the same
command again computes only what is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import submitit
import torch
from submitit.slurm.slurm import _get_default_parameters
from tqdm.auto import tqdm

from ..errors import ExperimentError
from ..models import Placement
from .config import LAUNCHERS, Config
from .inputs import check_inputs
from .runner import Reporter, run_units
from .sections import Unit
from .stamp import stamp_output
from .store import finished_units
from .units import experiment_units, model_specs, shard_units

__all__ = ["LAUNCHERS", "launch", "run_shard", "slurm_executor"]

Rebuilder = Callable[[str | Path], Path]


def run_shard(config: Config, out: str, index: int, count: int, *, model_name: str | None,
              placement: Placement, report: Reporter | None = None,
              threads: int | None = None) -> dict:
    """Run shard ``index`` of ``count`` (1-based) of ``config`` into ``out``: what one local
    subprocess or one job-array task does (the last to finish writes the report with
    ``report``). Returns what it ran."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_units(config, model_name=model_name, out=out, placement=placement,
              shard=(index, count), progress=False, report=report)
    return {"shard": f"{index}/{count}", "seconds": round(time.perf_counter() - t0, 1)}


POLL_S = 1.0  # how often the waiting process looks for newly finished units
CANCEL_GRACE_S = 5.0  # how long interrupted local jobs get to stop on SIGINT before a kill


def slurm_executor(folder: Path, name: str, options: dict, n_tasks: int, parallel: int) -> Any:
    """A submitit Slurm executor for a job array of ``n_tasks`` tasks, at most ``parallel``
    at once, each asking for ``options``: ``partition``, ``gpus_per_task``, ``cpus_per_task``,
    ``mem_gb``, ``time`` (minutes) and ``sbatch`` (any other sbatch option, e.g.
    ``{"account": "lab", "qos": "high"}``), the keys of the config's ``[cluster]`` table."""
    known = set(_get_default_parameters())
    ex = submitit.SlurmExecutor(folder=folder)
    params: dict[str, Any] = {"job_name": f"icl-probe-{name}", "time": int(options["time"]),
                              "array_parallelism": max(1, min(parallel, n_tasks)),
                              "ntasks_per_node": 1, "nodes": 1}
    if options.get("partition"):
        params["partition"] = options["partition"]
    if options.get("gpus_per_task") is not None:
        params["gpus_per_node"] = options["gpus_per_task"]  # one task per node
    if options.get("cpus_per_task"):
        params["cpus_per_task"] = options["cpus_per_task"]
    if options.get("mem_gb"):
        params["mem"] = f"{options['mem_gb']}GB"
    extra = {}
    for k, v in (options.get("sbatch") or {}).items():
        (params if k in known else extra)[k] = v
    if extra:
        params["additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def _slurm_or_error(call: Any) -> Any:
    """``call()``, with Slurm's absence or refusal as a clear :class:`ExperimentError`."""
    try:
        return call()
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        where = "this machine has no Slurm (no `sbatch`/`srun` on its PATH)" \
            if shutil.which("sbatch") is None else \
            f"sbatch refused the job array ({str(e).splitlines()[0][:200]})"
        raise ExperimentError(
            f"--launcher slurm: {where}, so nothing was queued. Run on a Slurm login node, or "
            "use --launcher local (subprocesses here), or --shard I/N with any other "
            "scheduler") from e


def _shards_to_run(units: list[Unit], out: Path, count: int) -> list[int]:
    """The shards (1-based) of ``units`` holding at least one unfinished unit."""
    done = {d.name for d in finished_units(out)}
    return [i for i in range(1, count + 1)
            if any(u.id not in done for u in shard_units(units, i, count))]


def _watch(jobs: list, out: Path, total: list[str], desc: str) -> None:
    """Show the units finishing while ``jobs`` run; return when every job has ended."""
    wanted = set(total)
    with tqdm(total=len(wanted), desc=desc, unit="unit") as bar:
        while True:
            n = len(wanted & {d.name for d in finished_units(out)})
            bar.update(n - bar.n)
            if all(j.done() for j in jobs):
                break
            time.sleep(POLL_S)


def _failures(jobs: list, shards: list[int], count: int) -> list[str]:
    out = []
    for j, i in zip(jobs, shards):
        try:
            j.result()
        except Exception as e:  # the job's own exception, re-raised by submitit
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            out.append(f"shard {i}/{count} (job {j.job_id}): {last}; log: {j.paths.stderr}")
    return out



def launch(config: Config, *, out: Path, rebuild: Rebuilder, report: Reporter,
           launcher: str = "serial", jobs: int = 1, model_name: str | None = None,
           placement: Placement = Placement(), slurm: dict | None = None,
           wait: bool | None = None, threads: int | None = None) -> dict:
    """Run ``config``'s unfinished units with ``launcher`` over ``jobs`` shards; returns a
    summary (``launcher``, ``shards``, ``jobs``: job ids, ``report``: its path or job id).

    ``local`` waits for its subprocesses and writes the report; ``slurm`` returns once the
    job array and the report job are queued (``wait=True``: waits for them, as ``local``
    does). ``threads``: torch threads per local job (default: this machine's cores shared
    among the jobs). ``report(config, out)`` writes the report of a finished run and
    ``rebuild(out)`` rebuilds it from an output directory (:mod:`icl_probe.report`)."""
    if launcher not in LAUNCHERS:
        raise ExperimentError(f"--launcher {launcher!r}: expected one of {list(LAUNCHERS)}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ExperimentError(f"--jobs {jobs!r}: expected an integer >= 1")
    out = Path(out)
    kw = dict(model_name=model_name, placement=placement, report=report)
    if launcher == "serial":
        run_units(config, out=out, **kw)
        return {"launcher": "serial", "shards": 1, "jobs": [], "report": str(out / "report.html")}
    specs = model_specs(config, model_name)
    check_inputs(config, specs)  # before anything is queued
    all_units = experiment_units(config, specs)
    units = [u.id for u in all_units]
    if launcher == "slurm":  # before anything is written: is there a Slurm to queue on?
        with tempfile.TemporaryDirectory() as probe:
            _slurm_or_error(lambda: slurm_executor(Path(probe), config.name,
                                                   {"time": 1}, 1, 1))
    # the directory is stamped (and a different config refused) before anything is queued
    out.mkdir(parents=True, exist_ok=True)
    stamp_output(out, config)
    shards = _shards_to_run(all_units, out, jobs)
    if not shards:
        path = rebuild(out)
        print(f"experiment {config.name}: all {len(units)} units already done; report: {path}")
        return {"launcher": launcher, "shards": 0, "jobs": [], "report": str(path)}
    args = [(config, str(out), i, jobs) for i in shards]
    if launcher == "local":
        submitted = _submit_local(config, out, args, kw, slurm, threads, len(units), jobs)
    else:
        submitted, report_job = _submit_slurm(config, out, args, kw, slurm, rebuild,
                                              len(units), jobs)
        if not wait:
            return {"launcher": "slurm", "shards": len(shards),
                    "jobs": [j.job_id for j in submitted], "report": report_job.job_id}
    return _wait(config, out, submitted, shards, units, jobs, launcher, rebuild)


def _submit_local(config: Config, out: Path, args: list, kw: dict, slurm: dict | None,
                  threads: int | None, n_units: int, jobs: int) -> list:
    """One submitit local subprocess per shard with unfinished units."""
    ex = submitit.LocalExecutor(folder=out / "jobs" / "%j")
    device = kw["placement"].device
    ex.update_parameters(timeout_min=int((slurm or {}).get("time") or 24 * 60),
                         gpus_per_node=0 if device in (None, "cpu") else 1)
    threads = threads or max(1, (os.cpu_count() or 1) // len(args))
    with ex.batch():
        submitted = [ex.submit(run_shard, *a, threads=threads, **kw) for a in args]
    print(f"experiment {config.name}: {n_units} units in {jobs} shards, {len(args)} "
          f"local jobs with unfinished units ({threads} threads each); logs in "
          f"{out / 'jobs'}")
    return submitted


def _submit_slurm(config: Config, out: Path, args: list, kw: dict, slurm: dict | None,
                  rebuild: Rebuilder, n_units: int, jobs: int) -> tuple[list, Any]:
    """One Slurm job array (a task per shard with unfinished units), then a report job queued
    after it (``afterany``)."""
    options = dict(slurm or {})
    options.setdefault("time", 240)
    ex = slurm_executor(out / "jobs" / "%j", config.name, options, len(args), jobs)

    def submit() -> list:
        with ex.batch():
            return [ex.submit(run_shard, *a, **kw) for a in args]

    submitted = _slurm_or_error(submit)
    array = submitted[0].job_id.split("_")[0]
    rep = slurm_executor(out / "jobs" / "%j", f"{config.name}-report",
                         {"time": 30, "partition": options.get("partition"),
                          "sbatch": {**(options.get("sbatch") or {}),
                                     "dependency": f"afterany:{array}"},
                          "cpus_per_task": 1, "mem_gb": 8, "gpus_per_task": 0}, 1, 1)
    report_job = rep.submit(rebuild, str(out))
    print(f"experiment {config.name}: {n_units} units in {jobs} shards; job array "
          f"{array} ({len(args)} tasks), then report job {report_job.job_id} "
          f"(afterany:{array}); logs in {out / 'jobs'}\n"
          f"  follow: squeue -j {array},{report_job.job_id}\n"
          f"  rebuild the report at any time: icl-probe report {out}")
    return submitted, report_job


def _cancel(jobs: list, *, local: bool) -> None:
    """Cancel every job. A local job is a subprocess that submitit stops with SIGINT, which it
    never sees where SIGINT is ignored (processes started in the background inherit that) or
    when the signal arrives while it is still starting: local jobs still running after
    :data:`CANCEL_GRACE_S` are killed. A killed unit leaves no finished unit behind (units
    are written atomically)."""
    for j in jobs:
        j.cancel(check=False)
    if not local:
        return
    # where this process ignores SIGINT, its subprocesses inherited that: no grace
    grace = 0.0 if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else CANCEL_GRACE_S
    deadline = time.time() + grace
    while time.time() < deadline and not all(j.done() for j in jobs):
        time.sleep(POLL_S / 4)
    for j in jobs:
        process = getattr(j, "_process", None)  # submitit's LocalJob keeps its Popen here
        if not j.done() and process is not None:
            process.kill()
            process.wait()


def _wait(config: Config, out: Path, submitted: list, shards: list[int], units: list[str],
          jobs: int, launcher: str, rebuild: Rebuilder) -> dict:
    """Follow the jobs to their end (cancelled on an interrupt), rebuild the report, and
    raise on any failed job (the finished units are kept)."""
    try:
        _watch(submitted, out, units, config.name)
    except KeyboardInterrupt:
        _cancel(submitted, local=launcher == "local")
        raise
    failed = _failures(submitted, shards, jobs)
    path = rebuild(out)
    missing = len(set(units) - {d.name for d in finished_units(out)})
    if failed:
        raise ExperimentError(f"{len(failed)} of {len(shards)} jobs failed ({missing} units not "
                              "finished; the finished ones are kept, run the same command to "
                              "redo the rest):\n  " + "\n  ".join(failed))
    print(f"report: {path.resolve()}")
    return {"launcher": launcher, "shards": len(shards), "jobs": [j.job_id for j in submitted],
            "report": str(path)}

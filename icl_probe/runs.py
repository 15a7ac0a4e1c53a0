"""An experiment end to end: its units (:mod:`icl_probe.experiments`), then its report
(:mod:`icl_probe.report`). The one place the two meet, so that neither imports the other's
layer upwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .experiments import Config, run_units
from .experiments.launch import launch as launch_units
from .models import Placement
from .report import rebuild_report, write_report


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
    path) replace the config's models. ``device``, ``dtype``, ``device_map`` and ``n_devices``
    say where models load (unset: the config's ``[experiment]``). Models are loaded one at a
    time, when their first unit runs. See :func:`icl_probe.experiments.run_units`."""
    return run_units(config, model=model, model_name=model_name, out=out,
                     placement=Placement(device, dtype, device_map, n_devices), shard=shard,
                     progress=progress, report=write_report if report else None,
                     unit_hook=unit_hook)


def launch(config: Config, *, out: Path, launcher: str = "serial", jobs: int = 1,
           model_name: str | None = None, placement: Placement = Placement(),
           slurm: dict | None = None, wait: bool | None = None,
           threads: int | None = None) -> dict:
    """Run ``config``'s unfinished units with ``launcher`` (``serial``, ``local``, ``slurm``)
    over ``jobs`` shards and write the report (:func:`icl_probe.experiments.launch`)."""
    return launch_units(config, out=out, rebuild=rebuild_report, report=write_report,
                        launcher=launcher, jobs=jobs, model_name=model_name,
                        placement=placement, slurm=slurm, wait=wait, threads=threads)

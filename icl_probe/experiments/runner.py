"""Running an experiment's units: resumable, shardable, one model in memory at a time.

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
unit's tables are written atomically under ``OUT/units/`` (:mod:`~icl_probe.experiments.store`);
re-running skips finished units, an interrupt or a kill loses at most the unit in flight, and
the output directory is keyed by a hash of the config, so a changed config never mixes with
old results. The report is written by the caller's ``report`` callable once every unit of the
config is finished (:func:`icl_probe.run_experiment` passes :func:`icl_probe.report.write_report`).

The units can be cut into shards (:func:`~icl_probe.experiments.units.shard_units`):
deterministic, disjoint, covering all, and each holding whole dependency groups. A shard is
what one process, job-array task or ``--shard I/N`` runs (:mod:`~icl_probe.experiments.launch`).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..models import Placement, load_model
from .config import Config
from .inputs import check_inputs, input_digests
from .provenance import check_provenance, provenance
from .sections import SECTIONS, Unit
from .stamp import check_stamp, output_dir, stamp_output
from .store import Lock, clean_leftovers, finished_units, write_unit
from .units import experiment_units, model_specs, shard_units

Reporter = Callable[[Config, Path], Path]


def missing_units(out: Path, config: Config, models: Iterable[str]) -> list[str]:
    done = {d.name for d in finished_units(out)}
    return [u.id for u in experiment_units(config, models) if u.id not in done]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()



def run_units(config: Config, *, model: Any = None, model_name: str | None = None,
              out: str | Path | None = None, placement: Placement = Placement(),
              shard: tuple[int, int] | None = None, progress: bool | None = None,
              report: Reporter | None = None,
              unit_hook: Callable[[str], None] | None = None) -> Path:
    """Run every unfinished unit of ``config`` (of shard ``(I, N)`` only, when given) and,
    with ``report``, call ``report(config, out)`` once every unit of the config is finished;
    returns the output directory.

    ``model`` (a loaded model, or a dict key -> loaded model) or ``model_name`` (one name or
    path) replace the config's models. Models are loaded one at a time, when their first
    unit runs, where ``placement`` says (unset fields: the config's ``[experiment]``). The run
    (or shard) locks the directory against overlapping runs; the stamp (``config.json``)
    records the config, and ``provenance/MODEL.json`` each model's identity, dtype, device
    kind and package version: a run whose provenance differs is refused before any of that
    model's units run."""
    exp = config.settings("experiment")
    placement = placement.over(Placement(exp.device, exp.dtype, exp.device_map, exp.n_devices))
    specs = model_specs(config, model if model is not None else model_name)
    check_inputs(config, specs)  # before any weight loads
    out = output_dir(config, out)
    units = experiment_units(config, specs)
    mine = shard_units(units, *shard) if shard is not None else units
    inputs = input_digests(config)
    out.mkdir(parents=True, exist_ok=True)
    with Lock(out, shard):
        stamped = check_stamp(out, config, inputs)  # nothing is written before every check
        cleaned = clean_leftovers(out, [u.id for u in mine])
        done = {d.name for d in finished_units(out)}
        todo = [u for u in mine if u.id not in done]
        where = f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(units)}" if shard else \
            f"{len(units)}"
        print(f"experiment {config.name}: {where} units, {len(mine) - len(todo)} already done"
              f"{f', {cleaned} unfinished leftovers removed' if cleaned else ''}; results in "
              f"{out}")
        run = _Run(config, out, specs, placement, inputs, stamped)
        if model is not None:  # loaded models given: their provenance is checked up front
            for key in specs:
                run.model_for(key)
        # model by model (units without one first), each section's order kept within a model,
        # so that each model loads once
        rank = {k: i for i, k in enumerate(specs)}
        todo.sort(key=lambda u: rank.get(u.model, -1))
        bar = tqdm(todo, desc=config.name, unit="unit", disable=progress is False)
        for u in bar:
            bar.set_postfix_str(u.id[:60])
            run.unit(u, unit_hook)
        # the model, its baseline models and the records kept for reuse go before the report
        # is built, which reads only the tables on disk (measured: 0.27 GB of its own)
        del run
        _free_memory()
        missing = missing_units(out, config, specs)
        if report is not None and not missing:
            print(f"report: {report(config, out).resolve()}")
        elif report is not None:
            print(f"{len(missing)} units of other shards are not finished yet: the report is "
                  f"written by the run that finishes last (or: icl-probe report {out})")
    return out


class _Run:
    """The state of one run (or shard) in one process: the one model in memory, each model's
    provenance, and what the units of one section of a model share (``ctx``)."""

    def __init__(self, config: Config, out: Path, specs: dict[str, Any], placement: Placement,
                 inputs: dict[str, str], stamped: bool):
        self.config, self.out, self.specs, self.placement = config, out, specs, placement
        self.inputs, self.stamped = inputs, stamped
        self.loaded: dict[str, Any] = {}  # the one model in memory, by key
        self.provs: dict[str, dict] = {}
        self.ctxs: dict[tuple[str | None, str], dict] = {}  # by (model, section)
        self.recorded: set[str | None] = set()

    def model_for(self, key: str) -> Any:
        """The model keyed ``key``, loaded on first use (the one before it freed)."""
        if key not in self.loaded:
            for old in list(self.loaded):  # one model in memory at a time
                self._drop_ctxs(old)
                del self.loaded[old]
                _free_memory()
            spec = self.specs[key]
            if spec is None or isinstance(spec, (str, Path)):
                spec = load_model(spec, **self.placement.load_kwargs())
            self.loaded[key] = spec
            if key not in self.provs:  # once per model and run (a digest of every weight)
                self.provs[key] = provenance(spec, self.config)
                check_provenance(self.out, key, self.provs[key], record=False)
        return self.loaded[key]

    def _drop_ctxs(self, model: str | None) -> bool:
        """Forget what every section of ``model`` shares; whether there was any."""
        stale = [k for k in self.ctxs if k[0] == model]
        for k in stale:
            del self.ctxs[k]
        return bool(stale)

    def record(self, key: str | None) -> None:
        """The stamp and the model's provenance, written with its first finished unit."""
        if not self.stamped:
            stamp_output(self.out, self.config, self.inputs)
            self.stamped = True
        if key is not None and key not in self.recorded:
            check_provenance(self.out, key, self.provs[key])
            self.recorded.add(key)

    def unit(self, u: Unit, hook: Callable[[str], None] | None = None) -> None:
        """Run one unit (``hook(unit id)`` first, once its model is loaded) and write its
        tables atomically."""
        m = self.model_for(u.model) if u.model is not None else None
        if hook is not None:
            hook(u.id)
        t0 = time.perf_counter()
        key = (u.model, u.section)
        if key not in self.ctxs:
            # what a section's units share (icl_vs_gd: its comparisons, the random-weight
            # baseline models) serves that section alone: it goes before another section of
            # the model starts (measured: default.toml's implied-update unit ran beside
            # icl_vs_gd's last baseline model and references, its peak 2.57 GB)
            if self._drop_ctxs(u.model):
                _free_memory()
            self.ctxs[key] = {"out": self.out}
        ctx = self.ctxs[key]
        tables = SECTIONS[u.section].run(m, u, self.config.settings(u.section), ctx)
        self.record(u.model)
        write_unit(self.out / "units", u.id, tables, {
            "section": u.section, "unit": u.key(), "seconds": time.perf_counter() - t0,
            "provenance": self.provs.get(u.model)})

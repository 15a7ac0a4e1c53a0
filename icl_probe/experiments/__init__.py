"""Experiments: small TOML configs driving the library, run as resumable, shardable units on
one machine, local subprocesses or a Slurm array (docs/cluster.md).

- :mod:`~.config` reads and validates a config; :mod:`~.settings` holds the checks its keys
  are made of;
- :mod:`~.sections`: one :class:`~.sections.base.Section` per experiment kind, owning its
  settings, units, run, tables, figures and memory;
- :mod:`~.units` lists and shards a config's units; :mod:`~.runner` runs them;
  :mod:`~.store` writes them atomically; :mod:`~.stamp` keeps
  other configs' results out of a directory; :mod:`~.provenance` keeps results of different
  models, dtypes or stacks apart; :mod:`~.inputs` checks what would fail late;
- :mod:`~.plan` sizes a run before it starts; :mod:`~.launch` runs it on local subprocesses
  or Slurm. (The functions ``plan``, ``launch``, ``provenance`` and ``settings`` are imported
  from their modules, whose names they share.)

Above :mod:`icl_probe.compare`; below :mod:`icl_probe.report`, which it never imports: the
runner and the launchers take the report writer as an argument (docs/architecture.md).

>>> cfg = load_config(EXPERIMENTS_DIR / "default.toml")       # doctest: +SKIP
>>> icl_probe.run_experiment(cfg, out="runs/default")         # doctest: +SKIP
"""

from .config import EXPERIMENTS_DIR, LAUNCHERS, TABLES, Config, load_config
from .inputs import check_inputs, input_digests
from .labels import labeled_task, task_file, task_labels
from .launch import run_shard, slurm_executor
from .plan import Plan
from .provenance import model_identity, provenance_mismatch
from .runner import missing_units, run_units
from .stamp import check_stamp, output_dir, stamp_output, stamped_config
from .sections import SECTIONS, Section, Unit, icl_vs_gd_summary
from .sizing import record_bytes
from .store import finished_units, read_results, unit_finished, unit_id, write_csv, write_text
from .units import experiment_units, model_specs, shard_units

__all__ = [
    "Config", "EXPERIMENTS_DIR", "LAUNCHERS", "Plan", "SECTIONS", "Section", "TABLES", "Unit",
    "check_inputs", "check_stamp", "experiment_units", "finished_units", "icl_vs_gd_summary",
    "input_digests", "labeled_task", "load_config", "missing_units", "model_identity",
    "model_specs", "output_dir", "provenance_mismatch", "read_results", "record_bytes",
    "run_shard", "run_units", "shard_units", "slurm_executor",
    "stamp_output", "stamped_config", "task_file", "task_labels", "unit_finished", "unit_id",
    "write_csv", "write_text",
]

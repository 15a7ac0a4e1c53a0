"""Experiment configs: read, validated as a whole before anything is loaded.

A config is a TOML file with an ``[experiment]`` table, an optional ``[cluster]`` table and one
table per section it runs. Each table is a frozen dataclass (:data:`TABLES`) whose fields carry
their check and default, the one place a key is defined. :func:`load_config` checks every table
and key (unknown tables and keys, wrong types, values out of range, tasks that do not exist),
names the file, the key and the nearest valid name, and fills in the defaults, so a section
reads exactly the values the run will use (``config.settings("icl_vs_gd").k``). Nothing is
loaded and no directory is touched before the whole file passes.

>>> import tomllib
>>> body = tomllib.loads('[experiment]\\nsections = ["real_heads"]\\n[real_heads]\\nprompts = 2')
>>> validate(body, "x.toml")["real_heads"]["k"]          # defaults filled in
8
>>> validate(tomllib.loads('[experiment]\\nsections = ["real_heads"]\\n[real_heads]\\nprompt = 2'),
...          "x.toml")
Traceback (most recent call last):
...
icl_probe.errors.ConfigError: x.toml: [real_heads] has no key 'prompt' (did you mean 'prompts'?); valid keys: k, prompts, tasks
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .sections import SECTIONS
from .settings import (choice, device_map, integer, list_of, model_spec, parse_time, sbatch_options,
                       setting, text)

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent.parent / "experiments"
SECTION_NAMES = tuple(SECTIONS)


def _sections(v: Any, where: str) -> list[str]:
    return list_of(choice(*SECTION_NAMES))(v, where)


LAUNCHERS = ("serial", "local", "slurm")


@dataclass(frozen=True)
class ExperimentTable:
    """``[experiment]``: what runs, and on which models."""

    name: str | None = setting(text)
    sections: list[str] | None = setting(_sections)
    model: str | None = setting(model_spec)
    models: list[str] | None = setting(list_of(model_spec))
    device: str | None = setting(text)
    dtype: str | None = setting(text)
    device_map: str | None = setting(device_map)
    n_devices: int | None = setting(integer(1))


@dataclass(frozen=True)
class ClusterTable:
    """``[cluster]``: where the units run (``icl-probe run --launcher ...``; docs/cluster.md).
    Not part of the results, so left out of the config digest."""

    launcher: str = setting(choice(*LAUNCHERS), "serial")
    jobs: int = setting(integer(1), 1)
    partition: str | None = setting(text)
    gpus_per_task: int | None = setting(integer(0))
    cpus_per_task: int | None = setting(integer(1))
    mem_gb: int | None = setting(integer(1))
    time: int = setting(parse_time, 240)
    sbatch: dict = setting(sbatch_options, {})



TABLES: dict[str, type] = {"experiment": ExperimentTable, "cluster": ClusterTable,
                           **{name: s.Settings for name, s in SECTIONS.items()}}


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def schema() -> dict[str, dict[str, tuple[Callable, Any]]]:
    """Every table a config may hold: key -> (check, default), from :data:`TABLES`."""
    return {t: {f.name: (f.metadata["check"], _default(f)) for f in fields(cls)}
            for t, cls in TABLES.items()}


def settings(table: str, values: dict) -> Any:
    """``values`` of ``[table]`` as that table's frozen dataclass (defaults filled in)."""
    return TABLES[table](**with_defaults(table, values))


def with_defaults(table: str, values: dict) -> dict:
    """``values`` of ``[table]`` with the schema's default for every key it lacks (results
    written by an older version may lack a key added since)."""
    return {k: values.get(k, default) for k, (_, default) in schema()[table].items()}


def validate(body: dict, where: str) -> dict:
    """The config with every table and key checked and every default filled in."""
    sch = schema()
    unknown = [t for t in body if t not in sch]
    if unknown:
        t = unknown[0]
        near = difflib.get_close_matches(t, list(sch), n=1)
        raise ConfigError(f"{where}: unknown table [{t}]"
                          + (f" (did you mean [{near[0]}]?)" if near else "")
                          + f"; valid tables: {', '.join(sch)}")
    exp = body.get("experiment")
    if not isinstance(exp, dict) or "sections" not in exp:
        raise ConfigError(f"{where}: needs an [experiment] table with sections = [...], some of "
                          f"{list(SECTION_NAMES)}")
    out: dict = {}
    for table, keys in sch.items():
        if table != "experiment" and table not in body:
            continue
        given = body[table]
        if not isinstance(given, dict):
            raise ConfigError(f"{where}: {table} must be a table ([{table}]), got {given!r}")
        vals = {}
        for key, v in given.items():
            if key not in keys:
                near = difflib.get_close_matches(key, list(keys), n=1)
                raise ConfigError(
                    f"{where}: [{table}] has no key {key!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + f"; valid keys: {', '.join(sorted(keys))}")
            if v is None and keys[key][1] is None:  # unset (a validated body, re-read)
                vals[key] = None
                continue
            vals[key] = keys[key][0](v, f"{where}: [{table}] {key}")
        for key, (_, default) in keys.items():
            vals.setdefault(key, default)
        out[table] = vals
    sections = out["experiment"]["sections"]
    if out["experiment"]["model"] is not None and out["experiment"]["models"] is not None:
        raise ConfigError(f"{where}: [experiment] gives both model and models; use models = "
                          "[...] alone (it may hold one model)")
    for s in sections:
        out.setdefault(s, {k: d for k, (_, d) in sch[s].items()})
    out.setdefault("cluster", {k: d for k, (_, d) in sch["cluster"].items()})
    stray = [t for t in out if t not in ("experiment", "cluster") and t not in sections]
    if stray:
        raise ConfigError(f"{where}: table [{stray[0]}] is not in [experiment] sections "
                          f"{sections}; add it there or remove the table")
    for s in sections:  # checks across a section's keys
        SECTIONS[s].validate(out[s], where)
    return out


@dataclass(frozen=True)
class Config:
    """A validated experiment config: ``body`` holds every table with defaults filled in."""

    name: str
    sections: tuple[str, ...]
    body: dict
    path: str | None = None

    @property
    def digest(self) -> str:
        """A hash of everything that shapes the results ([cluster], where they run, is left
        out: a serial run and a cluster run of one config share an output directory)."""
        body = {t: v for t, v in self.body.items() if t != "cluster"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def models(self) -> list[str | None]:
        """The models the config runs: ``models``, else ``[model]`` (None: the embedded
        default)."""
        exp = self.body["experiment"]
        return list(exp["models"]) if exp.get("models") else [exp.get("model")]

    def section(self, name: str) -> dict:
        """``[name]`` as a dict (defaults filled in)."""
        return dict(self.body.get(name, {}))

    def settings(self, name: str) -> Any:
        """``[name]`` as its frozen dataclass (:data:`TABLES`)."""
        return settings(name, self.body.get(name, {}))

    @classmethod
    def from_dict(cls, body: dict, name: str = "experiment", path: str | None = None) -> "Config":
        """Validate ``body`` (a parsed TOML) into a Config."""
        where = path or f"config {name!r}"
        full = validate(body, where)
        return cls(full["experiment"]["name"] or name, tuple(full["experiment"]["sections"]),
                   full, path)


def load_config(path: str | Path) -> Config:
    """Read and validate an experiment TOML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist; shipped configs: "
                          f"{', '.join(p.name for p in sorted(EXPERIMENTS_DIR.glob('*.toml')))}")
    try:
        body = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    return Config.from_dict(body, path.stem, str(path))

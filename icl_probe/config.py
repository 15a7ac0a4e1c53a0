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
import math
import copy
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, IclProbeError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


# ------------------------------------------------------------------------------ value checks
# Each check takes (value, where) and returns the value or raises ConfigError.


def _int(lo: int = 0) -> Callable:
    def check(v: Any, where: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{where} = {v!r}: expected an integer >= {lo}")
        return v
    check.doc = f"integer >= {lo}"
    return check


def _rate(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
        raise ConfigError(f"{where} = {v!r}: expected a positive finite number")
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} = {v!r}: expected true or false")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where} = {v!r}: expected a non-empty string")
    return v


def _model(v: Any, where: str) -> str:
    """A model the run can load without a network: a path that exists (a .gguf file or a
    Hugging Face directory), or a hub id present in the local Hugging Face cache."""
    _str(v, where)
    path = Path(v).expanduser()
    looks_local = v.endswith(".gguf") or v.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.exists():
            raise ConfigError(f"{where} = {v!r}: no such file or directory")
        return v
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(v, "config.json")
    except Exception:  # not a valid repo id
        found = None
    if not isinstance(found, str):
        raise ConfigError(f"{where} = {v!r}: not a local path and not in the local Hugging Face "
                          "cache; download it first (huggingface-cli download ...) or give the "
                          "path of a local copy")
    return v


def _choice(*options: str) -> Callable:
    def check(v: Any, where: str) -> str:
        if v not in options:
            near = difflib.get_close_matches(str(v), options, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where} = {v!r}: expected one of {list(options)}{hint}")
        return v
    return check


def _list(item: Callable, *, nonempty: bool = True) -> Callable:
    def check(v: Any, where: str) -> list:
        if not isinstance(v, list):
            raise ConfigError(f"{where} = {v!r}: expected a list, e.g. [{_example(item)}] "
                              "(a single value still needs the brackets)")
        if nonempty and not v:
            raise ConfigError(f"{where} = []: expected at least one value")
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def _example(item: Callable) -> str:
    return {"_task": '"sentiment"', "_rate": "1e-3"}.get(getattr(item, "__name__", ""), "...")


def _task(v: Any, where: str) -> str:
    from .tasks import load_task

    _str(v, where)
    try:
        load_task(v)
    except IclProbeError as e:
        raise ConfigError(f"{where}: {e}") from None
    return v


def _ft_method(v: Any, where: str) -> str:
    from .gd import METHODS

    if isinstance(v, str) and v.startswith("v:") and v[2:].isdigit():
        return v
    return _choice(*METHODS)(v, where)


def _lrs_by_method(v: Any, where: str) -> Any:
    if isinstance(v, dict):
        return {m: _list(_rate)(x, f"{where}.{m}") for m, x in v.items()}
    return _list(_rate)(v, where)


def _device_map(v: Any, where: str) -> str:
    if v not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ConfigError(f"{where} = {v!r}: expected one of 'auto', 'balanced', "
                          "'balanced_low_0', 'sequential' (accelerate's device-map strategies)")
    return v


def parse_time(v: Any, where: str) -> int:
    """Minutes, as an integer or "HH:MM:SS" / "D-HH:MM:SS" (Slurm's forms)."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str):
        days, _, rest = v.rpartition("-")
        parts = rest.split(":")
        if (not days or days.isdigit()) and 1 <= len(parts) <= 3 and all(
                p.isdigit() for p in parts):
            h, m, s = ([0] * (3 - len(parts)) + [int(p) for p in parts])
            minutes = int(days or 0) * 1440 + h * 60 + m + (s > 0)
            if minutes > 0:
                return minutes
    raise ConfigError(f"{where} = {v!r}: expected minutes (an integer > 0) or \"HH:MM:SS\" / "
                      "\"D-HH:MM:SS\"")


def _extra(v: Any, where: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(x, (str, int)) for x in v.values()):
        raise ConfigError(f"{where} = {v!r}: expected a table of sbatch options, e.g. "
                          "{ account = \"lab\", qos = \"high\" }")
    return v


def _sections(v: Any, where: str) -> list[str]:
    return _list(_choice(*SECTION_NAMES))(v, where)


LAUNCHERS = ("serial", "local", "slurm")
SECTION_NAMES = ("icl_vs_gd", "implied_updates", "order_sensitivity", "linear_attention",
                 "real_heads")


def _setting(check: Callable, default: Any = None, factory: Callable | None = None) -> Any:
    """A config key: its check (value, where) -> value, and its default."""
    if factory is None and isinstance(default, (list, dict)):
        factory = (lambda d: lambda: copy.deepcopy(d))(default)
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _methods(v: Any, where: str) -> list[str]:
    from .gd import METHODS

    return _list(_choice(*METHODS))(v, where)


def _loss_tokens(v: Any, where: str) -> str:
    from .gd import LOSS_TOKENS

    return _choice(*LOSS_TOKENS)(v, where)


def _baselines(v: Any, where: str) -> list[str]:
    from .protocol import BASELINES

    return _list(_choice(*BASELINES), nonempty=False)(v, where)


def _all_baselines() -> list[str]:
    from .protocol import BASELINES

    return list(BASELINES)


def _protocol(v: Any, where: str) -> str:
    from .protocol import PROTOCOLS

    return _choice(*PROTOCOLS)(v, where)


def _position(v: Any, where: str) -> str:
    from .protocol import POSITIONS

    return _choice(*POSITIONS)(v, where)


@dataclass(frozen=True)
class ExperimentTable:
    """``[experiment]``: what runs, and on which models."""

    name: str | None = _setting(_str)
    sections: list[str] | None = _setting(_sections)
    model: str | None = _setting(_model)
    models: list[str] | None = _setting(_list(_model))
    device: str | None = _setting(_str)
    dtype: str | None = _setting(_str)
    device_map: str | None = _setting(_device_map)
    n_devices: int | None = _setting(_int(1))


@dataclass(frozen=True)
class ClusterTable:
    """``[cluster]``: where the units run (``icl-probe run --launcher ...``; docs/cluster.md).
    Not part of the results, so left out of the config digest."""

    launcher: str = _setting(_choice(*LAUNCHERS), "serial")
    jobs: int = _setting(_int(1), 1)
    partition: str | None = _setting(_str)
    gpus_per_task: int | None = _setting(_int(0))
    cpus_per_task: int | None = _setting(_int(1))
    mem_gb: int | None = _setting(_int(1))
    time: int = _setting(parse_time, 240)
    sbatch: dict = _setting(_extra, {})


@dataclass(frozen=True)
class IclVsGdSection:
    """``[icl_vs_gd]``: ICL against fine-tuning under the anchors' protocol
    (docs/protocol.md)."""

    tasks: list[str] = _setting(_list(_task), ["sentiment"])
    k: int = _setting(_int(1), 32)
    queries: int = _setting(_int(1), 32)
    dev_queries: int = _setting(_int(1), 16)
    seeds: list[int] = _setting(_list(_int(0)), [0])
    lrs: Any = _setting(_lrs_by_method, [1e-3])
    methods: list[str] = _setting(_methods, ["dai"])
    params: str = _setting(_str, "kv")
    loss_tokens: str = _setting(_loss_tokens, "demo")
    baselines: list[str] = _setting(_baselines, factory=_all_baselines)
    protocol: str = _setting(_protocol, "shared")
    position: str = _setting(_position, "pred")
    balanced: bool = _setting(_bool, False)


@dataclass(frozen=True)
class ImpliedUpdatesSection:
    """``[implied_updates]``: the probes on every layer and head, with their identities."""

    tasks: list[str] = _setting(_list(_task), ["capital"])
    k: int = _setting(_int(1), 8)
    prompts: int = _setting(_int(1), 8)
    verify_prompts: int = _setting(_int(1), 2)
    trajectory_query: int = _setting(_int(0), 0)
    seeds: list[int] = _setting(_list(_int(0)), [0])


@dataclass(frozen=True)
class OrderSensitivitySection:
    """``[order_sensitivity]``: Shen et al.'s orderings, ICL against GD variants."""

    tasks: list[str] = _setting(_list(_task), ["sentiment"])
    n_demos: list[int] = _setting(_list(_int(1)), [1, 2, 4, 8])
    lrs: list[float] = _setting(_list(_rate), [1e-3])
    orderings: int = _setting(_int(2), 10)
    queries: int = _setting(_int(1), 4)
    methods: list[str] = _setting(_list(_ft_method), ["dai", "batch", "adam"])


@dataclass(frozen=True)
class LinearAttentionSection:
    """``[linear_attention]``: von Oswald et al. on synthetic regression (no language
    model)."""

    seeds: list[int] = _setting(_list(_int(0)), [0])
    line_search_tasks: int = _setting(_int(1), 10_000)
    eigen_tasks: int = _setting(_int(1), 10_000)
    steps: int = _setting(_int(1), 1000)
    batch_size: int = _setting(_int(1), 2048)
    eval_every: int = _setting(_int(1), 100)


@dataclass(frozen=True)
class RealHeadsSection:
    """``[real_heads]``: the dual form's requirements checked on the model's heads."""

    tasks: list[str] = _setting(_list(_task), ["capital"])
    prompts: int = _setting(_int(1), 4)
    k: int = _setting(_int(1), 8)


TABLES: dict[str, type] = {
    "experiment": ExperimentTable, "cluster": ClusterTable, "icl_vs_gd": IclVsGdSection,
    "implied_updates": ImpliedUpdatesSection, "order_sensitivity": OrderSensitivitySection,
    "linear_attention": LinearAttentionSection, "real_heads": RealHeadsSection}


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
    ivg = out.get("icl_vs_gd")
    if ivg is not None and isinstance(ivg["lrs"], dict):
        from .errors import CompareError
        from .protocol import lr_grid

        try:
            lr_grid(ivg["lrs"], ivg["methods"])
        except CompareError as e:
            raise ConfigError(f"{where}: [icl_vs_gd] {e}") from None
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
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist; shipped configs: "
                          f"{', '.join(p.name for p in sorted(EXPERIMENTS_DIR.glob('*.toml')))}")
    try:
        body = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    return Config.from_dict(body, path.stem, str(path))

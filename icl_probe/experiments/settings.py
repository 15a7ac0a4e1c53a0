"""The checks every config key is made of: each takes ``(value, where)`` and returns the value
or raises :class:`~icl_probe.errors.ConfigError` naming the file, the key and the fix; and
:func:`setting`, which attaches a check and a default to a field of a section's settings."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import try_to_load_from_cache

from ..compare import BASELINES, POSITIONS, PROTOCOLS
from ..errors import ConfigError, FineTuneError, IclProbeError
from ..gd import LOSS_TOKENS, METHODS, learning_rate
from ..tasks import load_task


def integer(lo: int = 0) -> Callable:
    def check(v: Any, where: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{where} = {v!r}: expected an integer >= {lo}")
        return v
    check.doc = f"integer >= {lo}"
    return check


def rate(v: Any, where: str) -> float:
    """A learning rate, by the one rule every caller uses (:func:`icl_probe.gd.learning_rate`)."""
    try:
        return learning_rate(v, where)
    except FineTuneError:
        raise ConfigError(f"{where} = {v!r}: expected a positive finite number") from None


def boolean(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} = {v!r}: expected true or false")
    return v


def text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where} = {v!r}: expected a non-empty string")
    return v


def model_spec(v: Any, where: str) -> str:
    """A model the run can load without a network: a path that exists (a .gguf file or a
    Hugging Face directory), or a hub id present in the local Hugging Face cache."""
    text(v, where)
    path = Path(v).expanduser()
    looks_local = v.endswith(".gguf") or v.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.exists():
            raise ConfigError(f"{where} = {v!r}: no such file or directory")
        return v
    try:
        found = try_to_load_from_cache(v, "config.json")
    except Exception:  # not a valid repo id
        found = None
    if not isinstance(found, str):
        raise ConfigError(f"{where} = {v!r}: not a local path and not in the local Hugging Face "
                          "cache; download it first (huggingface-cli download ...) or give the "
                          "path of a local copy")
    return v


def choice(*options: str) -> Callable:
    def check(v: Any, where: str) -> str:
        if v not in options:
            near = difflib.get_close_matches(str(v), options, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where} = {v!r}: expected one of {list(options)}{hint}")
        return v
    return check


def list_of(item: Callable, *, nonempty: bool = True) -> Callable:
    def check(v: Any, where: str) -> list:
        if not isinstance(v, list):
            raise ConfigError(f"{where} = {v!r}: expected a list, e.g. [{example(item)}] "
                              "(a single value still needs the brackets)")
        if nonempty and not v:
            raise ConfigError(f"{where} = []: expected at least one value")
        return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return check


def tables_of(cls: type, *, nonempty: bool = True) -> Callable:
    """A list of TOML tables (``[[section.key]]``), each checked as the frozen dataclass
    ``cls`` whose fields are made with :func:`setting`: unknown keys are named with the nearest
    valid one, each value goes through its field's check, and defaults are filled in. The
    value is the list of checked dicts (``cls(**d)`` builds each)."""
    fields_ = {f.name: f for f in dataclasses.fields(cls)}

    def check(v: Any, where: str) -> list[dict]:
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            raise ConfigError(f"{where} = {v!r}: expected a list of tables, written "
                              f"[[...]] in TOML, with keys {', '.join(fields_)}")
        if nonempty and not v:
            raise ConfigError(f"{where}: expected at least one table")
        out = []
        for i, table in enumerate(v):
            w = f"{where}[{i}]"
            for key in table:
                if key not in fields_:
                    near = difflib.get_close_matches(key, list(fields_), n=1)
                    raise ConfigError(f"{w} has no key {key!r}"
                                      + (f" (did you mean {near[0]!r}?)" if near else "")
                                      + f"; valid keys: {', '.join(fields_)}")
            checked = {}
            for name, f in fields_.items():
                default = f.default_factory() if f.default_factory is not MISSING else f.default
                if name in table:
                    checked[name] = f.metadata["check"](table[name], f"{w} {name}")
                elif default is MISSING:
                    raise ConfigError(f"{w}: needs a key {name!r}")
                else:
                    checked[name] = default
            out.append(checked)
        return out
    return check


def example(item: Callable) -> str:
    return {"task_spec": '"sentiment"', "rate": "1e-3"}.get(getattr(item, "__name__", ""), "...")


def task_spec(v: Any, where: str) -> str:
    text(v, where)
    try:
        load_task(v)
    except IclProbeError as e:
        raise ConfigError(f"{where}: {e}") from None
    return v


def ft_method(v: Any, where: str) -> str:
    if isinstance(v, str) and v.startswith("v:") and v[2:].isdigit():
        return v
    return choice(*METHODS)(v, where)


def lrs_by_method(v: Any, where: str) -> Any:
    if isinstance(v, dict):
        return {m: list_of(rate)(x, f"{where}.{m}") for m, x in v.items()}
    return list_of(rate)(v, where)


def device_map(v: Any, where: str) -> str:
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


def sbatch_options(v: Any, where: str) -> dict:
    if not isinstance(v, dict) or not all(isinstance(x, (str, int)) for x in v.values()):
        raise ConfigError(f"{where} = {v!r}: expected a table of sbatch options, e.g. "
                          "{ account = \"lab\", qos = \"high\" }")
    return v


def setting(check: Callable, default: Any = None, factory: Callable | None = None, *,
            required: bool = False) -> Any:
    """A config key: its check (value, where) -> value, and its default (``required``: none;
    only for the fields of tables checked by :func:`tables_of`)."""
    if required:
        return field(metadata={"check": check})
    if factory is None and isinstance(default, (list, dict)):
        factory = (lambda d: lambda: copy.deepcopy(d))(default)
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def methods(v: Any, where: str) -> list[str]:
    return list_of(choice(*METHODS))(v, where)


def loss_tokens(v: Any, where: str) -> str:
    return choice(*LOSS_TOKENS)(v, where)


def baselines(v: Any, where: str) -> list[str]:
    return list_of(choice(*BASELINES), nonempty=False)(v, where)


def all_baselines() -> list[str]:
    return list(BASELINES)


def protocol(v: Any, where: str) -> str:
    return choice(*PROTOCOLS)(v, where)


def position(v: Any, where: str) -> str:
    return choice(*POSITIONS)(v, where)

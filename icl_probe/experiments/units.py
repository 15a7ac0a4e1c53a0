"""The units of a run: the models it covers keyed by name, every unit of a config on them in a
fixed order, and deterministic shards of whole dependency groups."""

from __future__ import annotations

from typing import Any, Iterable

from ..errors import ExperimentError
from ..models import model_key
from .config import Config
from .sections import SECTIONS, Unit


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
    # a key names OUT/provenance/KEY.json and is a field of every unit id (ids squeeze and hash
    # values that are not plain, so '__' or spaces are safe; a path separator is not)
    bad = [k for k in specs if not isinstance(k, str) or k in ("", ".", "..") or "/" in k
           or "\\" in k or "\0" in k]
    if bad:
        raise ExperimentError(f"model key {bad[0]!r}: keys name files of the output directory; "
                              "give a name without '/' or '\\'")
    return specs



def experiment_units(config: Config, models: Iterable[str]) -> list[Unit]:
    """Every unit of ``config`` for the model keys ``models``, in a fixed order: by section,
    then model (in the config's order), then the section's own order."""
    models = list(models)
    units: list[Unit] = []
    for name in config.sections:
        section = SECTIONS[name]
        base = section.units(config.settings(name))
        if section.uses_model:
            units += [u.on(m) for m in models for u in base]
        else:
            units += base
    return units


def shard_units(units: list[Unit], index: int, count: int) -> list[Unit]:
    """Shard ``index`` (1-based) of ``count``: whole dependency groups (each section's
    :meth:`~icl_probe.experiments.sections.base.Section.group`), assigned largest first to the
    shard with the fewest units so far (ties: the lower shard), each shard keeping the units'
    order. Deterministic for a given unit list; the shards are disjoint and together cover
    every unit. With fewer groups than shards, some shards are empty."""
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
        raise ExperimentError(f"shard {index}/{count}: expected I/N with 1 <= I <= N, e.g. 1/4")
    groups: dict[tuple, int] = {}
    for u in units:
        g = SECTIONS[u.section].group(u)
        groups[g] = groups.get(g, 0) + 1
    load = [0] * count
    owner = {}
    for g in sorted(groups, key=lambda g: -groups[g]):  # stable: ties keep the units' order
        i = min(range(count), key=lambda j: (load[j], j))
        owner[g] = i
        load[i] += groups[g]
    return [u for u in units if owner[SECTIONS[u.section].group(u)] == index - 1]

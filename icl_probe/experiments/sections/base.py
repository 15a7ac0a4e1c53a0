"""What an experiment kind is: a :class:`Section` owns its typed settings (its TOML table), the
units it expands into, how one unit runs, the tables and figures the report shows, and its
share of a run's memory. A unit is a frozen dataclass (:class:`Unit`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from ...models import ModelShape
from ..store import unit_id


@dataclass(frozen=True)
class Unit:
    """One unit of work: the model it runs on (``None`` for sections that train their own
    small models) and its section's fields. Its identity is :meth:`key`: the fields that are
    set, model first; the unit's directory name is :attr:`id`."""

    section: ClassVar[str] = ""
    model: str | None = None

    def key(self) -> dict[str, Any]:
        """The fields that are set, in declaration order (``model`` first): what names the
        unit's directory, what ``unit.json`` records and the columns its rows carry."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @property
    def id(self) -> str:
        """The unit's directory name under ``OUT/units``
        (:func:`~icl_probe.experiments.store.unit_id`)."""
        return unit_id(self.section, self.key())

    def on(self, model: str) -> "Unit":
        """This unit on the model keyed ``model``."""
        return dataclasses.replace(self, model=model)


@dataclass(frozen=True)
class VerdictTable:
    """A table whose cells carry verdicts (``... (beats baseline)``), which the report colours;
    ``groups`` (name, number of columns) adds a header row spanning each group's columns."""

    df: pd.DataFrame
    groups: list[tuple[str, int]] | None = None


@dataclass(frozen=True)
class Memory:
    """A section's share of one process's memory for one model (:mod:`~icl_probe.experiments.plan`):
    one fine-tune, what one unit traces, what a process running every unit of the model holds
    at its peak beyond the weights, the random-weight baseline models held beside the model,
    and how prompt lengths were measured."""

    finetune: int = 0
    finetune_note: str = ""
    traces: int = 0
    traces_note: str = ""
    held: int = 0
    extra_models: int = 0
    how: str = ""


class Section:
    """One experiment kind. A subclass sets :attr:`name`, :attr:`Settings` (a frozen
    dataclass whose fields are made with :func:`~icl_probe.experiments.settings.setting`) and
    :attr:`Unit`, and implements :meth:`units` and :meth:`run`; the rest has defaults. Register
    an instance in :data:`icl_probe.experiments.sections.SECTIONS` (docs/architecture.md)."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    Unit: ClassVar[type[Unit]]
    uses_model: ClassVar[bool] = True  # False: trains its own small models, no language model
    # tables written beside the report, as OUT/<file>: {table name: file name}
    output_files: ClassVar[dict[str, str]] = {}
    per_model: ClassVar[bool] = True  # the report shows one block per model

    def units(self, s: Any) -> list[Unit]:
        """Every unit of the settings ``s``, without a model (the runner puts each on every
        model of the run)."""
        raise NotImplementedError

    def run(self, model: Any, unit: Any, s: Any, ctx: dict) -> dict[str, pd.DataFrame]:
        """Run one unit; ``ctx`` is shared by the units of one model in one process (``out``:
        the output directory) and holds what they reuse. Returns its tables by name."""
        raise NotImplementedError

    def validate(self, values: dict, where: str) -> None:
        """Checks across the keys of the validated table ``values`` (each key is checked on its
        own by its field's check before)."""

    def check_inputs(self, s: Any, where: str) -> list[tuple[str, str]]:
        """Check ``s`` against the tasks it reads, before any model loads; return the
        ``(where, parameter set)`` pairs that must be checked against each model's layers."""
        return []

    def data_files(self, s: Any) -> dict[str, str]:
        """Files beyond its ``tasks`` that the section's results depend on, ``{name: path}``:
        their digests join the run's stamp, so a changed file is never mixed with results
        computed from the old one."""
        return {}

    def group(self, unit: Any) -> tuple:
        """Units that must run in one shard share a group; by default each stands alone."""
        return (self.name, unit.id)

    def memory(self, shape: ModelShape, s: Any, dtype_bytes: int) -> Memory:
        """This section's share of one process's memory on the model ``shape``."""
        return Memory()

    # ---------------------------------------------------------------- the report
    def summarise(self, tabs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Tables derived from the units' tables (all models together), added to them."""
        return {}

    def intro(self, values: dict, tabs: dict[str, pd.DataFrame]) -> str:
        """HTML said once above the section's tables (every piece of text escaped)."""
        return ""

    def tables(self, tabs: dict[str, pd.DataFrame]) -> list[tuple[str, Any]]:
        """``(title, DataFrame or VerdictTable)`` for the report; by default the head of each
        table."""
        return [(name, df.head(60)) for name, df in tabs.items()]

    def figures(self, tabs: dict[str, pd.DataFrame]) -> list[Any]:
        """plotly figures for the report."""
        return []


def model_order(models: pd.Series) -> list[str]:
    """Models in the order they first appear (the config's order: units are listed by it)."""
    return list(dict.fromkeys(models.dropna().astype(str)))

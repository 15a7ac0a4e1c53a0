"""Sizing a run before it starts: parameters and memory of each model, read from its config
on PyTorch's meta device (no weight is loaded), and the units an experiment holds.

:func:`plan` answers what a cluster request needs: per model, the parameter count, the
memory of the weights in the run's dtype, of one fine-tune (the trained copy, its gradients,
the optimizer state and the activations its backward keeps), and of the traces a unit holds;
and the number of units (``icl-probe plan CONFIG``). The weights' part is the same
estimate :func:`icl_probe.models.check_memory` makes before any model loads; each section
gives its own share (:meth:`~icl_probe.experiments.sections.base.Section.memory`).

What is exact and what is an estimate:

- the parameter count is exact (the model class instantiated on the meta device, shared
  tensors counted once), and so is the memory of the weights;
- trace memory follows the record layout exactly (:func:`record_bytes`, checked against real
  records in the tests); the prompt lengths come from the model's tokenizer on a sample of
  the config's prompts, or, without a tokenizer, from characters / 3 (said in the output);
- fine-tuning activations are an upper-bound formula (every demonstration in one sequence,
  eager attention, the tensors autograd keeps per layer), not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..models import model_shape
from ..models.sizing import GB, _dtype_bytes, _resolve
from .config import Config
from .sections import SECTIONS, Memory
from .units import experiment_units, model_specs

__all__ = ["Plan", "plan"]


@dataclass
class Plan:
    """The plan of one config: one row per model (see :func:`plan`), and the units."""

    config: str
    dtype: str
    models: list[dict]
    units: dict[str, int]
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = [f"plan of {self.config} (dtype {self.dtype}); units: "
                 + ", ".join(f"{k} {v}" for k, v in self.units.items())]
        for m in self.models:
            lines += [
                f"\nmodel {m['key']}: {m['n_params'] / 1e9:.3f} B parameters "
                f"({m['n_params']:,}), {m['n_layers']} layers, {m['n_heads']} heads over "
                f"{m['n_kv_heads']} kv heads, d_model {m['d_model']}",
                f"  read from {m['source']}",
                f"  weights            {m['weights_gb']:8.2f} GB  (with the random-weight "
                "baseline model held beside it, one at a time)",
                f"  fine-tune / unit   {m['finetune_gb']:8.2f} GB  ({m['finetune_note']})",
                f"  traces / unit      {m['traces_gb']:8.2f} GB  ({m['traces_note']})",
                f"  one process, peak  {m['process_gb']:8.2f} GB  (weights + a fine-tune + the "
                "records it keeps for reuse, running every unit of this model)",
            ]
        lines += ["", *[f"note: {n}" for n in self.notes]]
        return "\n".join(lines)



def plan(config: Config, *, model_name: str | None = None, dtype: str | None = None) -> Plan:
    """Parameters and memory per model, and units, of ``config`` without loading weights.

    Per model: ``weights_gb`` (the model, plus the one random-weight baseline model held at
    a time, if the config runs any), ``finetune_gb`` (one fine-tune), ``traces_gb`` (what one
    unit traces) and ``process_gb``: what a process running every unit of the model holds at
    its peak. An ``icl_vs_gd`` process keeps the zero-shot and ICL records of every (task, seed,
    variant) it has run, so that later units reuse them; a shard holding fewer tasks holds
    proportionally less."""
    dtype = dtype or config.settings("experiment").dtype or "float32"
    b = _dtype_bytes(dtype)
    specs = model_specs(config, model_name)
    units = experiment_units(config, specs)
    counts: dict[str, int] = {}
    for u in units:
        counts[u.section] = counts.get(u.section, 0) + 1
    counts["total"] = len(units)
    rows, notes = [], []
    if not any(SECTIONS[name].uses_model for name in config.sections):
        notes.append("no section of this config uses the language model (it is not loaded)")
        specs = {}
    for key, spec in specs.items():
        shape = model_shape(spec, key, tokenizer=True)
        mem = _combined([SECTIONS[name].memory(shape, config.settings(name), b)
                         for name in SECTIONS if name in config.sections])
        weights = shape.n_params * b * (1 + mem.extra_models)
        if mem.how:
            notes.append(f"{key}: prompt lengths {mem.how}")
        rows.append({**{k: v for k, v in asdict(shape).items() if k != "tokenizer"},
                     "weights_gb": weights / GB, "finetune_gb": mem.finetune / GB,
                     "traces_gb": mem.traces / GB,
                     "process_gb": (weights + mem.finetune + mem.held) / GB,
                     "finetune_note": mem.finetune_note or "no fine-tuning section",
                     "traces_note": mem.traces_note or "no traced section"})
    notes.append("parameter counts are exact (meta device); fine-tuning activations are an "
                 "upper bound; add about 1.5 GB per process for Python, torch and "
                 "transformers themselves; run one shard and read its peak memory before a "
                 "large request")
    return Plan(config.name, str(_resolve(dtype)).replace("torch.", ""), rows, counts, notes)


def _combined(parts: list[Memory]) -> Memory:
    """The sections' shares of one process: the largest fine-tune, trace and held set (the
    units run one after another), with the note of the section each comes from."""
    out = Memory()
    for m in parts:
        if m.finetune > out.finetune:
            out = replace(out, finetune=m.finetune, finetune_note=m.finetune_note)
        if m.traces > out.traces:
            out = replace(out, traces=m.traces, traces_note=m.traces_note)
        out = replace(out, held=max(out.held, m.held),
                      extra_models=max(out.extra_models, m.extra_models), how=m.how or out.how)
    return out

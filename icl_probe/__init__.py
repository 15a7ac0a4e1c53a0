"""icl-probe: is in-context learning gradient descent? Probe real transformers to find out.

The verbs, in the order a probing script uses them (``import icl_probe as ip``)::

    model = ip.load_model()                                   # embedded SmolLM2-135M-Instruct
    task = ip.load_task("capital")                            # a shipped task, or a task file
    pair = ip.build_prompt(model, task, query=0, k=8, seed=0) # ICL prompt + its zero-shot twin
    record = ip.trace(model, [pair])                          # every attention layer, at p
    updates = ip.implied_updates(model, [pair])               # the implied weight updates
    ft = ip.finetune(model, pair, ip.FineTuneConfig("dai", lr=1e-2))  # GD on the demos
    tables = ip.compare(model, "sentiment", k=32)             # ICL vs GD, the anchors' protocol
    ip.run_experiment(ip.load_config("experiments/default.toml"))  # a config, with its report

The result types (:class:`AttentionRecord`, :class:`PromptPair`, :class:`ImpliedUpdates`,
:class:`FineTune`, :class:`Tables`, ...) and every exception (:class:`IclProbeError` and its
subclasses, all in :mod:`icl_probe.errors`) are exported here; plumbing (``expand_kv``, the
model cache, the output directory, launchers) stays in its submodule.

Glossary of axis names, used in every docstring and shape comment:

=========  ==============================================================
batch      prompts traced together
pos        captured query positions (always including the prediction p)
key_pos    key positions attended to
layer      transformer block index (only the traced layers)
head       query head
kv_head    key/value head (grouped-query attention: fewer than heads)
d_model    residual stream width
d_head     width of one head
d_vocab    vocabulary size
demo       demonstration index within a prompt
d_mlp      hidden width of an MLP (its gate/in projections' output)
=========  ==============================================================

Where one contraction has two axes of one kind, the names say which: ``d_v`` / ``d_k`` (the
value and key sides of an outer product ``v ⊗ k``, both ``d_head`` wide), ``d_out`` /
``d_in`` (the two sides of a d_model x d_model map), ``key_i`` / ``key_j``;
``model_space_layer`` indexes the layers an update was mapped into model space for, and
``head_in_group`` a query head within its key/value group.

Conventions follow TransformerLens: hook names ``blocks.{l}.attn.hook_pattern``, weights
``W_Q`` (layer head d_model d_head) with ``q = x @ W_Q``. The math in ``docs/science.md``
(Notation) writes ``q = W_Q r``; docstrings say where the transpose matters.
"""

from .causal import ReplayResult, VectorResult, function_vector, replay, task_vector, transfer
from .compare import Tables, compare
from .errors import (CacheError, CausalError, CompareError, ConfigError, DualError, ExperimentError,
                     FastPathError, FineTuneError, IclProbeError, ModelLoadError, PlotError,
                     ProbeError, PromptError, TaskFileError, TraceError)
from .experiments import Config, load_config
from .gd import FineTune, FineTuneConfig, FineTunedModel, finetune
from .hooks import AttentionRecord, Patch, load_record, patching, trace
from .models import load_model, tiny_model
from .probes import ImpliedUpdates, demo_mass, implied_updates, update_trajectory, verify_identities
from .prompts import PromptPair, build_prompt, build_prompts
from .runs import run_experiment
from .tasks import Task, load_anchor_dataset, load_task, shipped_tasks
from .version import __version__

__all__ = [
    # verbs
    "load_model", "tiny_model", "load_task", "load_anchor_dataset", "shipped_tasks",
    "build_prompt", "build_prompts", "trace", "load_record", "patching", "task_vector",
    "function_vector", "replay", "transfer", "demo_mass", "implied_updates",
    "verify_identities", "update_trajectory", "finetune", "compare", "load_config",
    "run_experiment",
    # result and configuration types
    "AttentionRecord", "Patch", "PromptPair", "Task", "ImpliedUpdates", "FineTune",
    "FineTunedModel", "FineTuneConfig", "Tables", "Config", "VectorResult", "ReplayResult",
    # errors
    "IclProbeError", "CacheError", "CausalError", "CompareError", "ConfigError", "DualError",
    "ExperimentError", "FastPathError", "FineTuneError", "ModelLoadError", "PlotError", "ProbeError",
    "PromptError", "TaskFileError", "TraceError",
    "__version__",
]

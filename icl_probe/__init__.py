"""icl-probe: is in-context learning gradient descent? Probe real transformers to find out.

Five verbs carry the work::

    import icl_probe as ip
    model = ip.load_model()                                   # embedded SmolLM2-135M-Instruct
    task = ip.load_task("capital")                            # a shipped task, or a task file
    pair = ip.build_prompt(model, task, query=0, k=8, seed=0) # ICL prompt + its zero-shot twin
    record = ip.trace(model, [pair])                          # every attention layer, at p

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
=========  ==============================================================

Conventions follow TransformerLens: hook names ``blocks.{l}.attn.hook_pattern``, weights
``W_Q`` (layer head d_model d_head) with ``q = x @ W_Q``. The math in ``docs/science.md``
(Notation) writes ``q = W_Q r``; docstrings say where the transpose matters.
"""

from .protocol import CompareError, FineTuneConfig, Tables, compare
from .errors import (CacheError, ConfigError, ExperimentError, IclProbeError, ModelLoadError,
                     PromptError, TaskFileError, TraceError)
from .gd import FineTune, FineTuneError, FineTunedModel, finetune
from .hooks import QUANTITIES, AttentionRecord, expand_kv, trace
from .models import cache_dir, embedded_gguf_path, load_model, tiny_model
from .probes import (ImpliedUpdates, ProbeError, implied_updates, update_trajectory,
                     verify_identities)
from .prompts import PromptPair, Spans, build_prompt, build_prompts
from .tasks import Task, load_anchor_dataset, load_task, shipped_tasks

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord", "CacheError", "CompareError", "ConfigError", "ExperimentError", "FineTuneConfig", "Tables", "compare", "FineTune", "FineTuneError", "FineTunedModel", "finetune", "ImpliedUpdates", "ProbeError", "implied_updates",
    "verify_identities", "IclProbeError", "ModelLoadError", "PromptError",
    "PromptPair", "QUANTITIES", "Spans", "Task", "TaskFileError", "TraceError", "build_prompt",
    "build_prompts", "cache_dir", "embedded_gguf_path", "expand_kv", "load_anchor_dataset",
    "load_model", "load_task", "shipped_tasks", "tiny_model", "trace", "update_trajectory",
]

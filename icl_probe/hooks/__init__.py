"""Hooks: the attention-access layer. One uniform record of every attention layer at the
positions asked for (:func:`trace`), the shared-prefix shortcut and candidate-answer scoring
that check themselves against the slow exact path, and grouped-query attention resolved in
one place.

Above :mod:`icl_probe.models` and :mod:`icl_probe.prompts`; below the probes and gradient
descent (docs/architecture.md). The quantities and their hooks: :mod:`icl_probe.hooks.tracing`.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> rec = ip.trace(model, [pair], what=("pattern", "z"))
>>> rec["blocks.1.attn.hook_z"].shape   # one layer, TransformerLens name
torch.Size([1, 1, 4, 12])
"""

from .capture import (hook_names, logits_to_keep, plain_attentions, plain_query_capture,
                      query_capture_hooks)
from .gqa import expand_kv, group_mapping, grouped_einsum, n_kv_heads
from .patching import PATCH_MODES, Patch, patching
from .prefix import shared_prefix_length, trace_shared_prefix
from .quantities import DERIVED, EXTRA, HOOKS, QUANTITIES, REGISTRY, Quantity, fired_hooks
from .record import (RECORD_FORMAT, AttentionRecord, check_batch_size, compact, in_order,
                     load_record, model_record, pad_stack, pad_to, resolve_layers)
from .scoring import answer_logprobs, predictions
from .selfcheck import FAST_ENV, check, fast_enabled, stack_versions
from .tracing import PositionSpec, trace
from .weights import attention_weights, clear_weight_cache

__all__ = [
    "AttentionRecord", "DERIVED", "EXTRA", "FAST_ENV", "HOOKS", "PATCH_MODES", "Patch",
    "PositionSpec", "QUANTITIES", "Quantity", "RECORD_FORMAT", "REGISTRY", "fired_hooks",
    "answer_logprobs", "attention_weights", "check", "check_batch_size", "clear_weight_cache",
    "compact", "expand_kv", "fast_enabled", "group_mapping", "grouped_einsum", "hook_names",
    "in_order", "load_record", "logits_to_keep", "model_record", "n_kv_heads", "pad_stack",
    "pad_to", "patching", "plain_attentions", "plain_query_capture", "predictions",
    "query_capture_hooks", "resolve_layers",
    "shared_prefix_length", "stack_versions", "trace", "trace_shared_prefix",
]

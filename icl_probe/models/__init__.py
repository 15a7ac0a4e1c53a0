"""Models: loading any model TransformerLens can wrap (the embedded default, GGUF files, Hugging
Face directories and cached hub ids, models in memory), the on-disk cache, where a model runs,
its size before it loads, tiny models for tests and random-weight baselines.

The lowest layer of the package above :mod:`icl_probe.tasks`: it imports nothing else of
icl-probe (docs/architecture.md).
"""

from .architectures import (AttentionSpec, allowed_keys, attention_pattern, attention_scores,
                            attention_spec, check_layer, live_hooks, supported_architectures)
from .baselines import untrained_copy
from .bridge import ModelInfo, model_info, unwrapped
from .cache import (CACHE_ENV, EMBEDDED_DIST, EMBEDDED_LABEL, GGUF_READ_ERRORS, cache_dir,
                    cached_gguf_dir, embedded_gguf_path, gguf_cache_path, unreadable_gguf,
                    verify_cache)
from .devices import Placement, available_devices, default_device, resolve_dtype
from .hub import hub_snapshot, refuse_remote_code, remote_code
from .load import load_model
from .sizing import ModelShape, available_memory, check_memory, model_key, model_layers, model_shape
from .tiny import byte_tokenizer, tiny_hf_model, tiny_model

__all__ = [
    "AttentionSpec", "CACHE_ENV", "EMBEDDED_DIST", "EMBEDDED_LABEL", "GGUF_READ_ERRORS",
    "ModelInfo", "ModelShape", "Placement", "allowed_keys", "attention_pattern",
    "attention_scores", "attention_spec", "available_devices", "available_memory",
    "byte_tokenizer", "cache_dir", "cached_gguf_dir", "check_layer", "check_memory",
    "default_device", "embedded_gguf_path", "gguf_cache_path", "hub_snapshot", "live_hooks",
    "load_model", "model_info", "model_key", "model_layers", "model_shape", "unwrapped",
    "refuse_remote_code", "remote_code", "resolve_dtype", "supported_architectures",
    "tiny_hf_model", "tiny_model", "unreadable_gguf", "untrained_copy", "verify_cache",
]

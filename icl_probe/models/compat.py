"""Adapters between the tested releases of transformers and TransformerLens.

transformers 5.24 renamed the key/value cache argument every model, decoder layer and
attention module takes from ``past_key_values`` to ``cache``. TransformerLens 4.3's attention
bridges still read ``past_key_values`` (or ``layer_past``), so under 5.24 a cache handed to
the model is never updated nor read: a prefix run through the cache leaves it empty, and a
suffix run on it attends only to itself, without an error (the shared-prefix trace was 74 %
off the full-prompt forward). :func:`adapt_bridge` hands the cache to the attention bridges
under the name they read, on every release.

transformers 5.24 also moved GPT-J's rotary table (``embed_positions``) from each attention
module to one ``rotary_emb`` module of the model; :func:`gptj_rotary_table` finds it on either.

Every path these adapters serve is checked against the slow exact path on each call
(:mod:`icl_probe.selfcheck`), so a later release that breaks them fails loudly.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

# the names transformers has given the key/value cache argument, newest first
CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")


def _hand_cache_over(module: torch.nn.Module, args: tuple, kwargs: dict
                     ) -> tuple[tuple, dict] | None:
    """Forward pre-hook: an attention bridge called with ``cache=`` (transformers >= 5.24)
    also gets it as ``past_key_values``, the name TransformerLens reads."""
    cache = kwargs.get("cache")
    if cache is None or kwargs.get("past_key_values") is not None:
        return None
    return args, {**kwargs, "past_key_values": cache}


def adapt_bridge(bridge: Any) -> int:
    """Install the cache hand-over on every attention bridge of ``bridge`` that updates a
    key/value cache itself; returns how many. Idempotent."""
    if bridge.__dict__.get("_icl_probe_adapted"):
        return bridge.__dict__["_icl_probe_adapted"]
    n = 0
    for module in bridge.modules():
        if hasattr(module, "_update_kv_cache"):
            module.register_forward_pre_hook(_hand_cache_over, with_kwargs=True)
            n += 1
    bridge.__dict__["_icl_probe_adapted"] = n
    return n


@contextlib.contextmanager
def quiet_cache_rename() -> Iterator[None]:
    """Silence transformers' FutureWarning that ``past_key_values`` is now ``cache``: the
    bridge's forward takes only the old name, and :func:`adapt_bridge` handles the new one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*past_key_values.* is deprecated",
                                category=FutureWarning)
        yield


def gptj_rotary_table(hf_model: Any, hf_attention: Any) -> torch.Tensor | None:
    """GPT-J's sinusoidal table (max_positions, rotary_dim: [sin | cos]): on the attention
    module up to transformers 5.23, on the model's ``rotary_emb`` from 5.24; None when
    neither holds one (not GPT-J)."""
    table = getattr(hf_attention, "embed_positions", None)
    if isinstance(table, torch.Tensor):
        return table
    base = getattr(hf_model, "transformer", None) or getattr(hf_model, "model", None)
    table = getattr(getattr(base, "rotary_emb", None), "embed_positions", None)
    if isinstance(table, torch.Tensor) and type(hf_model).__name__.startswith("GPTJ"):
        return table
    return None


__all__ = ["CACHE_ARGUMENTS", "adapt_bridge", "gptj_rotary_table", "quiet_cache_rename"]

"""Wrapping a ``transformers`` causal LM in a TransformerLens ``TransformerBridge``, and the
:class:`ModelInfo` every wrapped model carries."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from ..errors import ModelLoadError
from .architectures import check_bridgeable, fill_architectures
from .compat import adapt_bridge


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from; attached to the bridge as ``model.icl_probe_info``.

    ``prepend_bos``: prompts start with the BOS token whenever the tokenizer defines one, as
    TransformerLens does by default, even where the tokenizer itself does not add it
    (SmolLM2). The first token of a prompt is an attention sink (on the embedded model it
    takes up to 84 % of the prediction position's attention in deep layers); with BOS first
    the sink is a token of its own, counted with the query (docs/science.md, Notation),
    instead of the first demonstration token.
    """

    source: str  # "embedded", "gguf", "hf", "directory", "memory"
    label: str
    path: str | None
    prepend_bos: bool


def _uses_bos(tokenizer: Any) -> bool:
    return tokenizer.bos_token_id is not None


def _bridge(hf_model: Any, tokenizer: Any, *, info: ModelInfo, device: torch.device,
            dtype: torch.dtype, dispatched: bool = False) -> Any:
    # The bridge picks its adapter from config.architectures; models built in memory from a
    # config (and GGUF files) have none, so it is filled from the model's own class.
    fill_architectures(hf_model.config, type(hf_model).__name__)
    check_bridgeable(hf_model)
    # The bridge reimplements attention eagerly (that is where hook_attn_scores and
    # hook_pattern fire); the HF model is set to eager so that both paths agree.
    hf_model.config._attn_implementation = "eager"
    if not dispatched:  # a device map placed the weights already (accelerate)
        hf_model = hf_model.to(device=device, dtype=dtype)
    # TransformerLens re-creates the tokenizer from init_kwargs["name_or_path"] unless it
    # already adds BOS; a tokenizer built in memory has no such path, so say it does.
    tokenizer.init_kwargs.setdefault("name_or_path", info.label)
    # with a device map, the bridge reads each module's device from hf_device_map
    bridge = TransformerBridge.boot_transformers(
        info.label, hf_model=hf_model, tokenizer=tokenizer,
        device=None if dispatched else device, dtype=dtype,
    )
    bridge.eval()
    bridge.icl_probe_info = info
    adapt_bridge(bridge)  # the cache argument under the name the bridge reads
    return bridge


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a model loaded by :func:`load_model` (a plain bridge gets
    one inferred from its tokenizer)."""
    info = getattr(model, "icl_probe_info", None)
    if info is None:
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ModelLoadError(
                f"expected a TransformerBridge with a tokenizer, got {type(model).__name__}; "
                "load it with icl_probe.load_model(...)"
            )
        info = ModelInfo("memory", type(model).__name__, None, _uses_bos(tok))
    return info


@contextlib.contextmanager
def unwrapped(model: Any) -> Iterator[torch.nn.Module]:
    """The Hugging Face model under a bridge, run as plain ``transformers``: every bridge
    component in its module tree is swapped for the module it wraps, and put back on exit
    (also on error). The parameters are the same tensors, so training it trains the bridge.
    A forward gives the bridge's outputs bit for bit (the bridge runs the wrapped modules'
    own forwards, with eager attention) without its hook points' per-module cost; callers
    that rely on that check it (:func:`icl_probe.gd.finetune`). No bridge hook fires inside."""
    root = model.original_model
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        stack = [root]
        while stack:
            parent = stack.pop()
            for name, child in list(parent._modules.items()):
                inner = getattr(child, "original_component", None) \
                    if isinstance(child, GeneralizedComponent) else None
                if isinstance(inner, torch.nn.Module):
                    swapped.append((parent, name, child))
                    parent._modules[name] = inner
                    child = inner
                if child is not None:
                    stack.append(child)
        yield root
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child

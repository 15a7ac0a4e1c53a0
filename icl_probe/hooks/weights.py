"""The attention weights of a model stacked over layers (``W_Q``, ``W_K``, ... in
TransformerLens's layout), cached on the model until its weights change."""

from __future__ import annotations

from typing import Any, Sequence

import torch

HALF = (torch.float16, torch.bfloat16)


def _weights_fingerprint(model: Any) -> tuple:
    # A parameter replaced, re-allocated or modified in place (autograd's version counter)
    # changes the fingerprint. Edits through ``.data`` bypass the counter: call
    # ``clear_weight_cache(model)`` after those.
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def clear_weight_cache(model: Any) -> None:
    """Forget the stacked attention weights cached on ``model``."""
    model.__dict__.pop("_icl_probe_weights", None)


def attention_weights(model: Any, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """``W_Q`` (layer head d_model d_head), ``W_K``/``W_V`` (layer kv_head d_model d_head),
    ``W_O`` (layer head d_head d_model), and the biases the model has, for ``layers``.
    TransformerLens convention: ``q = attn_in @ W_Q + b_Q`` (the papers write ``W_Q r``;
    docs/science.md, Notation).

    The stack is in the model's dtype: half-precision weights are widened to float32 where a
    record hands them out (``record.W_Q``), one access at a time, not here, so a bf16 stack
    costs half a float32 one (4.3 GB instead of 8.6 at LLaMA-7B size); widening is exact, so
    every number is the same. Stacking copies every attention matrix, so the result is cached
    on the model until its parameters change: every record of one model shares one stack."""
    key = (tuple(layers), _weights_fingerprint(model))
    cached = model.__dict__.get("_icl_probe_weights")
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    out = _stack_weights(model, layers)
    model.__dict__["_icl_probe_weights"] = (key, out)
    return dict(out)


def _stack_weights(model: Any, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    idx = list(layers)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            try:
                w = getattr(model, name)
            except (AttributeError, ValueError, RuntimeError):
                continue  # e.g. bias-free projections have no b_*
            if w is not None:
                out[name] = w[idx].detach()
    return out

"""The first linear maps of each layer's MLP (gate and up, or W_in), and the MLP run on given
inputs with its first-layer weights patched: what the rank-1 MLP update is read off and
checked with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from transformers.pytorch_utils import Conv1D

from ..errors import ProbeError

_MlpDelta = Float[torch.Tensor, "d_mlp d_model"]


_MlpInputs = Float[torch.Tensor, "... d_model"]


@dataclass(frozen=True)
class _MlpInput:
    name: str  # "gate" or "in" (TransformerLens names; "in" is Llama's up_proj)
    param: str  # parameter name inside the layer's MLP module
    transposed: bool  # True for GPT-2's Conv1D, whose weight is (d_model, d_mlp)


def mlp_first_layers(model: Any, layer: int) -> list[_MlpInput]:
    """The linear maps that read the MLP input ``u`` in ``layer`` (gate and up, or W_in)."""
    mlp = model.blocks[layer].mlp
    params = {id(p): n for n, p in mlp.named_parameters()}
    out = []
    for name in ("gate", "in"):
        sub = mlp._modules.get(name)
        inner = getattr(sub, "original_component", None)
        if inner is None:
            continue
        if not isinstance(inner, (torch.nn.Linear, Conv1D)) or id(inner.weight) not in params:
            raise ProbeError(
                f"layer {layer}: the MLP's {name!r} input map is a {type(inner).__name__}, not a "
                "linear layer, so the rank-1 update (Dherin et al.) does not apply"
            )
        out.append(_MlpInput(name, params[id(inner.weight)], isinstance(inner, Conv1D)))
    if not out:
        raise ProbeError(
            f"layer {layer}: the MLP ({type(mlp).__name__}) has no linear first layer "
            "('in'/'gate'), so the rank-1 update (Dherin et al.) does not apply"
        )
    return out


def _mlp_weight(model: Any, layer: int, inp: _MlpInput) -> torch.Tensor:
    """The first-layer matrix in column orientation: (d_mlp, d_model), ``pre = W u``."""
    w = dict(model.blocks[layer].mlp.named_parameters())[inp.param].detach()
    return w.T if inp.transposed else w


def run_mlp(model: Any, layer: int, u: _MlpInputs,
            deltas: dict[str, torch.Tensor] | None = None) -> _MlpInputs:
    """The real MLP module of ``layer`` on inputs ``u`` (..., d_model), optionally with its
    first-layer matrices replaced by ``W + deltas[name]`` (column orientation)."""
    mlp = model.blocks[layer].mlp
    params = dict(mlp.named_parameters())
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    # torch.func.functional_call is not used here: on a TransformerBridge, whose MLP weights
    # are registered under two aliases, it left the patched weight in place after returning
    # (seen with transformer-lens 4.3.0). Swapping .data and restoring it in `finally` is
    # explicit and exception-safe.
    try:
        with torch.inference_mode():
            for inp in mlp_first_layers(model, layer):
                if deltas is not None and inp.name in deltas:
                    p = params[inp.param]
                    w = _mlp_weight(model, layer, inp) + deltas[inp.name].to(p.dtype)
                    saved.append((p, p.data))
                    p.data = (w.T if inp.transposed else w).contiguous()
            return mlp(u)
    finally:
        for p, data in saved:
            p.data = data

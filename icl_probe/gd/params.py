"""Which parameters a fine-tune trains (``kv``, ``qkvo``, ``mlp``, ``all``, ``v:L``), by their
Hugging Face names, and each attention projection read per head on every family."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import FineTuneError
from ..hooks import n_kv_heads
from .settings import PARAM_SETS


def canonical_name(bridge_name: str) -> str:
    """The Hugging Face parameter name behind a bridge parameter name."""
    return bridge_name.replace("._original_component", "")


def named_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Every distinct parameter of a bridged model, keyed by its Hugging Face name (the first
    of the bridge's aliases)."""
    named: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named[canonical_name(n)] = p
    return named


PROJECTIONS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Projection:
    """One logical attention projection (``q``, ``k``, ``v`` or ``o``) of one layer: the
    parameters its forward reads, by name, and their layout.

    On fused-QKV models (GPT-2's Conv1D ``c_attn``, GPT-NeoX's ``query_key_value``, interleaved
    per head) the bridge splits the fused matrix when it loads the model into separate q/k/v
    linear maps (views into ``c_attn`` on GPT-2, de-interleaved copies on NeoX), and the forward
    runs through those: they are the parameters a fine-tune trains, so a projection that is not
    selected is never touched (its delta is exactly 0) and nothing needs a gradient mask.
    Their names are the split maps' (``transformer.h.0.attn.k.weight``)."""

    layer: int
    name: str
    weight: str
    bias: str | None
    conv1d: bool  # weight stored (d_in, d_out) as GPT-2's Conv1D, else (d_out, d_in)


def attention_projections(model: Any, layer: int,
                          named: dict[str, torch.nn.Parameter] | None = None
                          ) -> dict[str, Projection]:
    """The q, k, v and o :class:`Projection` s of ``layer``, read off the bridge's attention
    (its ``q``/``k``/``v``/``o`` linear bridges)."""
    named = named_parameters(model) if named is None else named
    by_id = {id(p): n for n, p in named.items()}
    attn = model.blocks[layer].attn
    out: dict[str, Projection] = {}
    for proj in PROJECTIONS:
        inner = getattr(attn._modules.get(proj), "original_component", None)
        weight = getattr(inner, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or id(weight) not in by_id:
            raise FineTuneError(
                f"layer {layer}: the attention of this model ({type(attn).__name__}) has no "
                f"linear {proj!r} projection the bridge exposes, so parameter sets built from "
                "q/k/v/o ('kv', 'qkvo', 'v:L') do not apply; use 'mlp' or 'all'")
        bias = getattr(inner, "bias", None)
        out[proj] = Projection(layer, proj, by_id[id(weight)],
                               by_id.get(id(bias)) if isinstance(bias, torch.Tensor) else None,
                               isinstance(inner, Conv1D))
    return out


def parameter_layers(model: Any) -> dict[str, int]:
    """The block index of every parameter inside a block, by Hugging Face name."""
    by_id = {id(p): n for n, p in named_parameters(model).items()}
    return {by_id[id(p)]: l for l, block in enumerate(model.blocks) for p in block.parameters()
            if id(p) in by_id}


def trainable_parameters(model: Any, params: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a parameter set selects, keyed by Hugging Face name.

    ``"kv"`` / ``"qkvo"``: the k and v (q, k, v and o) projections of every layer, weights and
    biases; ``"v:L"``: layer L's v projection; ``"mlp"``: every parameter of every block's MLP;
    ``"all"``: everything. Projections are found through the bridge's attention structure
    (:func:`attention_projections`), so fused-QKV models (GPT-2, GPT-NeoX) select exactly the
    rows of the chosen projections."""
    named = named_parameters(model)
    if params == "all":
        return named
    n_layers = model.cfg.n_layers
    if params in ("kv", "qkvo"):
        chosen = [(l, p) for l in range(n_layers) for p in (("k", "v") if params == "kv"
                                                             else PROJECTIONS)]
    elif m := re.fullmatch(r"v:(\d+)", params):
        layer = int(m.group(1))
        if not 0 <= layer < n_layers:
            raise FineTuneError(f"params={params!r}: the model has layers 0..{n_layers - 1}")
        chosen = [(layer, "v")]
    elif params == "mlp":
        by_id = {id(p): n for n, p in named.items()}
        out = {by_id[id(p)]: p for block in model.blocks for p in block.mlp.parameters()
               if id(p) in by_id}
        if not out:
            raise FineTuneError("params='mlp' selects no parameter: this model's blocks have "
                                "no MLP parameters")
        return out
    else:
        raise FineTuneError(
            f"params={params!r}: expected one of {PARAM_SETS} or 'v:L' (layer L's W_V)")
    out = {}
    projections = {l: attention_projections(model, l, named) for l in {l for l, _ in chosen}}
    for l, p in chosen:
        proj = projections[l][p]
        for name in (proj.weight, proj.bias):
            if name is not None:
                out[name] = named[name]
    return out


def _to_heads(x: torch.Tensor, proj: Projection, n_heads: int, bias: bool) -> torch.Tensor:
    """A projection's weight (or bias) in TransformerLens's per-head layout: W_Q/W_K/W_V
    (head d_model d_head), W_O (head d_head d_model), b_Q/b_K/b_V (head d_head), b_O (d_model)."""
    if bias:
        return x if proj.name == "o" else x.reshape(n_heads, -1)
    if proj.name == "o":  # Linear (d_model, head·d_head); Conv1D (head·d_head, d_model)
        w = x if proj.conv1d else x.T
        return w.reshape(n_heads, -1, w.shape[-1])
    w = x.T if proj.conv1d else x  # (head·d_head, d_model)
    return w.reshape(n_heads, -1, w.shape[-1]).transpose(1, 2)


def split_projections(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors (deltas) regrouped per logical projection in TransformerLens's
    layout, keyed ``blocks.{l}.attn.W_Q`` ... ``b_O``: every projection of every layer any of
    them touches, the untouched ones as exact zeros."""
    cfg = model.cfg
    n_kv = n_kv_heads(cfg)
    named = named_parameters(model)
    layer_of = parameter_layers(model)
    out: dict[str, torch.Tensor] = {}
    for l in sorted({layer_of[n] for n in tensors if n in layer_of}):
        projections = attention_projections(model, l, named)
        if not any(n in tensors for pr in projections.values() for n in (pr.weight, pr.bias)):
            continue
        for proj in projections.values():
            heads = n_kv if proj.name in ("k", "v") else cfg.n_heads
            for name, is_bias in ((proj.weight, False), (proj.bias, True)):
                if name is None:
                    continue
                x = tensors.get(name)
                if x is None:
                    x = torch.zeros_like(named[name].detach())
                key = f"blocks.{l}.attn.{'b' if is_bias else 'W'}_{proj.name.upper()}"
                out[key] = _to_heads(x, proj, heads, is_bias)
    return out


@contextlib.contextmanager
def training(model: Any, train: dict[str, torch.nn.Parameter]
             ) -> Iterator[dict[str, torch.Tensor]]:
    """Only ``train`` requires gradients, and dropout is off (a run is deterministic); yields
    copies of the trained parameters' original values. On exit, also on error, the parameters
    are restored exactly from those copies (float deltas cannot give them back bit for bit),
    their gradients dropped (a finished run's gradients would stay on the model, as large as
    the trained parameters) and every parameter's gradient flag is put back."""
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved = {n: p.detach().clone() for n, p in train.items()}
    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in train.values():
            p.requires_grad_(True)
        _eval(model)
        yield saved
    finally:
        with torch.no_grad():
            for n, p in train.items():
                p.copy_(saved[n])
                p.grad = None
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
        _eval(model)


def _eval(model: Any) -> None:
    """``model.eval()`` where some module is in training mode (dropout off). Skipped where none
    is: the switch walks the bridge's and the wrapped model's trees (4,000 modules on the
    embedded model, 25 ms a switch), the check only reads their flags."""
    original = getattr(model, "original_model", None)
    trees = [model] + ([original] if isinstance(original, torch.nn.Module) else [])
    if any(m.training for tree in trees for m in tree.modules()):
        model.eval()

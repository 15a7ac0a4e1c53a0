"""The zero-shot and ICL runs of one (model variant, prompt set), traced once and shared by
every method and learning rate, with the ICL's implied key-value operator."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import einops
import torch

from ..hooks import compact, predictions, trace, trace_shared_prefix
from ..hooks.weights import HALF
from ..prompts import PromptPair
from .queries import _at_label
from .vocabulary import ICL_WHAT, ZS_BATCH, ZS_HELD


@dataclass
class _Refs:
    """The ZS and ICL runs of one (model variant, prompt set): shared by every rate/method."""

    pairs: list[PromptPair]
    zs: Any
    icl: Any
    dM_icl: list[torch.Tensor]       # per prompt: layer kv_head d_head d_head
    pred_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    predicted: dict[str, torch.Tensor] = field(default_factory=dict)  # candidate index per run
    # the base model's zero-shot k and v, captured by the zero-shot trace; a Comparison keeps
    # them for its most recent set only (the evaluation traces them again for any other)
    zs_kv: Any = None


def _kv_operator(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """M = Σ_j v_j ⊗ k_j over the given positions (layer key_pos kv_head d_head each)."""
    return einops.einsum(v.double(), k.double(), "layer key_pos kv_head d_v, "
                         "layer key_pos kv_head d_k -> layer kv_head d_v d_k")


def _reference_runs(model: Any, pairs: list[PromptPair], protocol: str, position: str) -> _Refs:
    run_pairs = [_at_label(p) for p in pairs] if position == "label" else pairs
    # the comparison reads activations only: no record keeps a stack of weights alive
    zs = trace(model, run_pairs, kind="zs", what=ZS_HELD + ("k", "v"), batch_size=ZS_BATCH,
               weights=False)
    zs_kv = dataclasses.replace(zs, data={q: zs.data.pop(q) for q in ("k", "v")}, logits=None)
    dtype = next(model.parameters()).dtype
    # ΔM_ICL is summed in float64 and kept in float32 for a half-precision model, whose k and v
    # carry 8 bits of mantissa: half the memory, no digit the inputs had lost
    held = torch.float32 if dtype in HALF else torch.float64
    if protocol == "shared":
        icl = trace_shared_prefix(model, run_pairs, what=ICL_WHAT, weights=False,
                                  prefix_what=("k", "v"))
        dM = _shared_operator(model, pairs[0], icl.meta.pop("prefix", None)).to(held)
        dM_icl = [dM] * len(pairs)
    else:
        icl = trace(model, run_pairs, what=ICL_WHAT + ("k", "v"), weights=False)
        dM_icl = []
        for b, p in enumerate(pairs):
            d = p.spans.demo_indices()
            dM_icl.append(_kv_operator(icl.data["k"][:, b, d], icl.data["v"][:, b, d]).to(held))
        del icl.data["k"], icl.data["v"]  # no full-length k and v kept for reuse
    # kept for reuse: a half-precision model's activations in its own dtype, read back exactly
    refs = _Refs(run_pairs, compact(zs, dtype), compact(icl, dtype), dM_icl,
                 zs_kv=compact(zs_kv, dtype))
    if position == "label":  # correctness is still read at the prediction position
        refs.pred_logits["zs"] = _logits(model, pairs, "zs")
        refs.pred_logits["icl"] = _logits(model, pairs, "icl")
    else:
        refs.pred_logits["zs"], refs.pred_logits["icl"] = zs.logits, icl.logits
    for kind in ("zs", "icl"):  # by each prompt's scoring (first token, or the whole answer)
        refs.predicted[kind] = predictions(model, pairs, kind, refs.pred_logits[kind])
    return refs


def _shared_operator(model: Any, pair: PromptPair, prefix: dict | None) -> torch.Tensor:
    """ΔM_ICL of the demonstrations every prompt shares: from the prefix's k and v that
    :func:`trace_shared_prefix` captured in the pass building its cache, or, where it ran the
    full prompts or the prefix stops short of the last demonstration, from one forward of the
    demonstrations."""
    demo_pos = pair.spans.demo_indices()
    if prefix is None or prefix["k"].shape[1] <= int(demo_pos[-1]):
        pre = trace(model, [pair.icl_ids[: int(demo_pos[-1]) + 1]], what=("k", "v"),
                    positions="pred", weights=False)
        prefix = {q: pre.data[q][:, 0] for q in ("k", "v")}
    k, v = (prefix[q][:, demo_pos.to(prefix[q].device)] for q in ("k", "v"))
    return _kv_operator(k, v)


def _logits(model: Any, pairs: list[PromptPair], kind: str) -> torch.Tensor:
    if kind == "icl" and len(pairs) > 1:
        return trace_shared_prefix(model, pairs, what=("attn_out",), layers=[0]).logits
    return trace(model, pairs, kind=kind, what=("attn_out",), layers=[0],
                 batch_size=ZS_BATCH).logits

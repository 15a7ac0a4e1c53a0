"""The zero-shot and ICL runs of one (model variant, prompt set), traced once and shared by
every method and learning rate, with the ICL's implied key-value operator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import einops
import torch

from ..hooks import predictions, trace, trace_shared_prefix
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


def _kv_operator(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """M = Σ_j v_j ⊗ k_j over the given positions (layer key_pos kv_head d_head each)."""
    return einops.einsum(v.double(), k.double(), "layer key_pos kv_head d_v, "
                         "layer key_pos kv_head d_k -> layer kv_head d_v d_k")


def _reference_runs(model: Any, pairs: list[PromptPair], protocol: str, position: str) -> _Refs:
    run_pairs = [_at_label(p) for p in pairs] if position == "label" else pairs
    # the comparison reads activations only: no record keeps a stack of weights alive
    zs = trace(model, run_pairs, kind="zs", what=ZS_HELD, batch_size=ZS_BATCH, weights=False)
    if protocol == "shared":
        icl = trace_shared_prefix(model, run_pairs, what=ICL_WHAT, weights=False)
        demo_pos = pairs[0].spans.demo_indices()
        pre = trace(model, [pairs[0].icl_ids[: int(demo_pos[-1]) + 1]], what=("k", "v"),
                    positions="pred", weights=False)
        dM = _kv_operator(pre.data["k"][:, 0, demo_pos], pre.data["v"][:, 0, demo_pos])
        dM_icl = [dM] * len(pairs)
    else:
        icl = trace(model, run_pairs, what=ICL_WHAT + ("k", "v"), weights=False)
        dM_icl = []
        for b, p in enumerate(pairs):
            d = p.spans.demo_indices()
            dM_icl.append(_kv_operator(icl.data["k"][:, b, d], icl.data["v"][:, b, d]))
    refs = _Refs(run_pairs, zs, icl, dM_icl)
    if position == "label":  # correctness is still read at the prediction position
        refs.pred_logits["zs"] = _logits(model, pairs, "zs")
        refs.pred_logits["icl"] = _logits(model, pairs, "icl")
    else:
        refs.pred_logits["zs"], refs.pred_logits["icl"] = zs.logits, icl.logits
    for kind in ("zs", "icl"):  # by each prompt's scoring (first token, or the whole answer)
        refs.predicted[kind] = predictions(model, pairs, kind, refs.pred_logits[kind])
    return refs


def _logits(model: Any, pairs: list[PromptPair], kind: str) -> torch.Tensor:
    if kind == "icl" and len(pairs) > 1:
        return trace_shared_prefix(model, pairs, what=("attn_out",), layers=[0]).logits
    return trace(model, pairs, kind=kind, what=("attn_out",), layers=[0],
                 batch_size=ZS_BATCH).logits

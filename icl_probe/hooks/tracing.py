"""Tracing: one forward of a batch of prompts, keeping every attention layer's quantities at the
positions asked for.

:func:`trace` runs a batch of prompts through a hooked model once and keeps, per layer, only
what was asked for and only at the positions asked for (always including the prediction
position), so memory grows with the request rather than with a full activation cache.

Quantities (TransformerLens hook names in brackets; ``pos`` = captured query positions,
``key_pos`` = key positions; notation of docs/science.md, Notation):

==============  =========================================  ===============================
name            hook                                       shape per layer
==============  =========================================  ===============================
resid_pre       ``blocks.{l}.hook_resid_pre``              batch pos d_model
attn_in         ``blocks.{l}.attn.hook_in`` (r_j)          batch pos d_model
q               ``blocks.{l}.attn.hook_rot_q`` (*)         batch pos head d_head
k               ``blocks.{l}.attn.hook_rot_k`` (*)         batch key_pos kv_head d_head
v               ``blocks.{l}.attn.hook_v``                 batch key_pos kv_head d_head
scores          ``blocks.{l}.attn.hook_attn_scores`` (*)   batch pos head key_pos
pattern         ``blocks.{l}.attn.hook_pattern``           batch pos head key_pos
z               ``blocks.{l}.attn.hook_z``                 batch pos head d_head
head_out        ``blocks.{l}.attn.hook_result`` (W_O z)    batch pos head d_model
attn_out        ``blocks.{l}.attn.hook_out`` (h^l)         batch pos d_model
resid_mid       ``blocks.{l}.hook_resid_mid``              batch pos d_model
mlp_in          ``blocks.{l}.mlp.hook_in`` (u)             batch pos d_model
mlp_out         ``blocks.{l}.mlp.hook_out``                batch pos d_model
==============  =========================================  ===============================

(*) q and k are always what the model multiplies: after QK-norm and rotary. Where the
bridge's post-rotary hooks do not fire (GPT-NeoX/Pythia, GPT-J) the captured ``hook_q`` /
``hook_k`` are rotated here with the model's own phases (:mod:`icl_probe.architectures`);
``record.meta["sources"]`` says how each quantity was obtained. Where the bridge has no genuine
pre-softmax hook (GPT-J fires ``hook_attn_scores`` with the pattern), ``scores`` are recomputed
from q and k exactly as the model computes them. ``attn_out`` and ``mlp_out`` are the attention
and MLP modules' own outputs (before Gemma's post-norms; elsewhere identical to
``hook_attn_out`` / ``hook_mlp_out``).

Also available on request (not in the default set): ``q_pre`` (``hook_q``: ``r W_Q + b_Q``
before QK-norm and rotary), ``q_normed`` (``hook_q_normed``, after QK-norm, before rotary),
``rot_cos`` / ``rot_sin`` (the layer's rotary phases at the captured positions).

Every quantity is stacked over the traced layers (a leading ``layer`` axis). Grouped-query
attention is resolved in one place, :func:`expand_kv` (:func:`grouped_einsum` fuses it into a
contraction): ``record.k``, ``record.v``, ``record.W_K`` and ``record.W_V`` are per *query*
head (``kv_head_of[h]`` is query head ``h``'s key/value group); ``record.data["k"]`` keeps the
``kv_head`` layout.
``record.scale`` holds each traced layer's factor multiplying ``q·k``; ``record.softcap`` and
``record.window`` its soft-capping and sliding window (None where the model has none).

Batches are right-padded, with no padding mask: the causal mask alone keeps every real
token off the padding, and positions (hence rotary phases) are unchanged, so each prompt's
record equals its unbatched one up to float rounding. Models in bfloat16/float16 keep their
records in float32, so that analyses downstream do not accumulate half-precision rounding.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> rec = ip.trace(model, [pair], what=("pattern", "z"))
>>> rec.pattern.shape[:3]          # layer batch pos (the prediction position only)
torch.Size([3, 1, 1])
>>> rec["blocks.1.attn.hook_z"].shape   # one layer, TransformerLens name
torch.Size([1, 1, 4, 12])
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import einops
import torch
from tqdm.auto import tqdm

from ..errors import TraceError
from ..models import attention_spec
from ..prompts import PromptPair
from .capture import _Capture, _plan, _q_normed_transform, hook_names, logits_to_keep
from .quantities import DERIVED, EXTRA, HOOKS, QUANTITIES, fired_hooks
from .record import (AttentionRecord, check_batch_size, in_order, model_record, pad_stack, pad_to,
                     resolve_layers)
from .weights import HALF, attention_weights

PositionSpec = str | Sequence[Any] | Callable[[PromptPair], Any]


def _spans(prompt: Any, kind: str):
    return prompt.spans_of(kind) if isinstance(prompt, PromptPair) else None


def _resolve_positions(spec: PositionSpec, prompt: Any, i: int, ids: torch.Tensor, kind: str,
                       what: str) -> torch.Tensor:
    n = len(ids)
    if isinstance(spec, str):
        if spec == "pred":
            return torch.tensor([n - 1])
        if spec == "all":
            return torch.arange(n)
        spans = _spans(prompt, kind)
        if spans is None:
            raise TraceError(f"trace({what}={spec!r}) needs PromptPairs with spans, got token ids")
        if spec == "demos":
            return spans.demo_indices()
        if spec == "query":
            return spans.query_indices()
        if spec == "labels":
            return torch.cat([d.label.indices() for d in spans.demos]) if spans.demos else \
                torch.zeros(0, dtype=torch.long)
        raise TraceError(
            f"trace({what}={spec!r}): expected 'pred', 'all', 'demos', 'query', 'labels', a "
            "callable(prompt) -> positions, or one index list per prompt"
        )
    pos = spec(prompt) if callable(spec) else spec[i]
    pos = torch.as_tensor(pos, dtype=torch.long).flatten()
    if pos.numel() and (pos.min() < 0 or pos.max() >= n):
        raise TraceError(
            f"trace({what}=...): prompt {i} has {n} tokens but positions "
            f"{pos.min().item()}..{pos.max().item()} were asked for"
        )
    return pos



def trace(
    model: Any,
    prompts: Sequence[PromptPair] | Sequence[torch.Tensor],
    *,
    kind: str = "icl",
    what: Iterable[str] | None = None,
    layers: Iterable[int] | None = None,
    positions: PositionSpec = "pred",
    key_positions: PositionSpec = "all",
    batch_size: int = 8,
    store_device: str | torch.device | None = None,
    progress: bool | None = None,
    weights: bool = True,
) -> AttentionRecord:
    """Run ``prompts`` (``PromptPair`` s, whose ``kind`` = ``"icl"`` or ``"zs"`` ids are used,
    or 1-D token id tensors) and record every attention layer.

    ``what``: quantities (default: all of :data:`QUANTITIES` this model has; the extras of
    the module docstring on request); ``layers``: default all; ``positions``: query positions to
    keep, ``"pred"`` (default), ``"all"``, ``"demos"``, ``"query"``, ``"labels"``, one index list
    per prompt, or ``callable(prompt)``; the prediction position is always added.
    ``key_positions``: positions of ``k`` and ``v`` (default ``"all"``). Batches of
    ``batch_size`` prompts of similar length are right-padded. ``weights=False`` leaves the
    model's stacked attention weights out of the record (``record.W_Q`` ... then raise): a
    caller that reads only activations (compare) keeps no stack alive.
    """
    if not prompts:
        raise TraceError("trace(): no prompts given")
    wanted = tuple(QUANTITIES) if what is None else tuple(dict.fromkeys(what))
    layer_list = resolve_layers(layers, model.cfg.n_layers, "trace")
    check_batch_size(batch_size, "trace")
    plan, captured = _capture_plan(model, wanted, what is None, layer_list)
    id_list = _prompt_ids(model, prompts, kind)
    rows = _position_rows(prompts, id_list, kind, positions, key_positions)
    store = torch.device(store_device) if store_device is not None else None
    cap = _Capture(model, attention_spec(model), plan, captured, layer_list, store)
    order, logits_parts = _run_batches(model, id_list, rows, cap, _capture_hooks(
        model, plan, cap, layer_list), batch_size, store, progress)
    data = _assemble(cap, captured, layer_list, order, rows)
    stack = attention_weights(model, layer_list) if weights or "head_out" in wanted else {}
    if store is not None:
        stack = {k: w.to(store) for k, w in stack.items()}
    if "head_out" in wanted:
        W_O = stack["W_O"].to(data["z"].device, data["z"].dtype)  # half: widened
        data["head_out"] = einops.einsum(data["z"], W_O, "layer batch pos head d_head, "
                                         "layer head d_head d_model -> "
                                         "layer batch pos head d_model")
        if "z" not in wanted:
            del data["z"]
    if "scores" in data:
        data["scores"] = _masked_scores(data["scores"], rows["lengths"], rows["positions"])
    names, _ = hook_names(model)
    names.update({q: t for q, (t, _) in EXTRA.items()})
    return model_record(
        model, layer_list, lengths=rows["lengths"], pred=rows["lengths"] - 1,
        positions=rows["positions"], pos_mask=rows["pos_mask"],
        pred_slot=torch.tensor(rows["pred_slot"]), key_positions=rows["key_positions"],
        key_mask=rows["key_mask"], data=data, weights=stack if weights else {},
        logits=in_order(logits_parts, order), hook_names={q: names[q] for q in data},
        kind=kind, q_rotated=True,
        meta={"sources": {q: plan.sources.get(q, DERIVED.get(q, "")) for q in data},
              "family": attention_spec(model).family})


def _capture_plan(model: Any, wanted: tuple[str, ...], default: bool, layer_list: list[int]
                  ) -> tuple[Any, list[str]]:
    """How each wanted quantity is captured, and the quantities captured (the default request
    leaves out what this model does not have; an explicit one is refused)."""
    known = tuple(QUANTITIES) + tuple(EXTRA)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise TraceError(f"trace(what={list(wanted)}): unknown {unknown}; known: {list(known)}")
    spec = attention_spec(model)
    captured = [w for w in wanted if w not in DERIVED]
    if "head_out" in wanted and "z" not in captured:
        captured.append("z")
    if default and spec.rotary_from == "unknown":  # default request: what exists
        captured = [w for w in captured if w not in ("q", "k") and
                    (w != "scores" or spec.scores_hooked)]
    plan, missing = _plan(model, spec, captured, fired_hooks(model))
    if missing and not default:
        names, _ = hook_names(model)
        template = {**names, **{q: t for q, (t, _) in EXTRA.items()}}[missing[0]]
        raise TraceError(
            f"trace(what={list(wanted)}): this model ({spec.family}) has no live hook "
            f"{template.format(l=layer_list[0])!r} (needed for {missing[0]!r}); e.g. parallel "
            "attention/MLP blocks have no resid_mid, and only QK-norm models have q_normed"
        )
    return plan, [q for q in captured if q not in missing]


def _prompt_ids(model: Any, prompts: Sequence[Any], kind: str) -> list[torch.Tensor]:
    """Each prompt's token ids, checked against the model's context."""
    id_list = [p.ids(kind) if isinstance(p, PromptPair) else torch.as_tensor(p) for p in prompts]
    for i, ids in enumerate(id_list):
        if ids.dim() != 1 or len(ids) == 0:
            raise TraceError(f"trace(): prompt {i} must be a non-empty 1-D id tensor, got "
                             f"{tuple(ids.shape)}")
        if len(ids) > model.cfg.n_ctx:
            raise TraceError(f"trace(): prompt {i} has {len(ids)} tokens; the context holds "
                             f"{model.cfg.n_ctx}")
    return id_list


def _position_rows(prompts: Sequence[Any], id_list: list[torch.Tensor], kind: str,
                   positions: PositionSpec, key_positions: PositionSpec) -> dict[str, Any]:
    """Per prompt: its length, the query positions captured (the prediction position always
    among them) and the slot it takes, and the key positions; also padded and stacked."""
    lengths = torch.tensor([len(x) for x in id_list])
    pos_rows, pred_slot = [], []
    for i, (p, ids) in enumerate(zip(prompts, id_list)):
        pos = _resolve_positions(positions, p, i, ids, kind, "positions")
        pos = torch.unique(torch.cat([pos, torch.tensor([len(ids) - 1])]))  # sorted
        pos_rows.append(pos)
        pred_slot.append(int((pos == len(ids) - 1).nonzero()[0, 0]))
    all_keys = isinstance(key_positions, str) and key_positions == "all"
    key_rows = [torch.arange(len(ids)) if all_keys else
                _resolve_positions(key_positions, p, i, ids, kind, "key_positions")
                for i, (p, ids) in enumerate(zip(prompts, id_list))]
    positions_t, pos_mask = pad_stack(pos_rows)
    key_t, key_mask = pad_stack(key_rows)
    return {"lengths": lengths, "pos_rows": pos_rows, "pred_slot": pred_slot,
            "all_keys": all_keys, "key_rows": key_rows, "positions": positions_t,
            "pos_mask": pos_mask, "key_positions": key_t, "key_mask": key_mask}


def _capture_hooks(model: Any, plan: Any, cap: _Capture, layer_list: list[int]
                   ) -> list[tuple[str, Callable]]:
    """The forward hooks of one trace: each quantity read straight off its hook, and the q, k
    (and rotary phases) kept to complete q/k or scores after the forward."""
    spec = attention_spec(model)
    q_normed = _q_normed_transform(model, spec)
    fwd_hooks = []
    for slot, l in enumerate(layer_list):
        for q, (template, layout) in plan.direct.items():
            name = template.format(l=l)
            fwd_hooks.append((name, cap.direct(q, slot, layout, name,
                                               q_normed if q == "q_normed" else None)))
        q_t, k_t = (t.format(l=l) for t in plan.qk_hooks)
        if plan.stash_q:
            fwd_hooks.append((q_t, cap.keep("q", slot, "query", q_t)))
        if plan.stash_k:
            fwd_hooks.append((k_t, cap.keep("k", slot, "key", k_t)))
        if plan.stash_k_all:
            fwd_hooks.append((k_t, cap.keep("k_all", slot, "all", k_t)))
        if spec.rotary_from == "phases" and (plan.stash_q or plan.stash_k or plan.stash_k_all):
            for key in ("cos", "sin"):
                name = f"blocks.{l}.attn.hook_{key}"
                fwd_hooks.append((name, cap.keep(key, slot, "all", name)))
    return fwd_hooks


def _run_batches(model: Any, id_list: list[torch.Tensor], rows: dict[str, Any], cap: _Capture,
                 fwd_hooks: list, batch_size: int, store: torch.device | None,
                 progress: bool | None) -> tuple[list[int], list[torch.Tensor]]:
    """The forwards, in batches of prompts of similar length, right-padded; returns the order
    the prompts ran in and each batch's logits at the prediction positions."""
    lengths = rows["lengths"]
    device = next(model.parameters()).device
    tok = getattr(model, "tokenizer", None)
    pad_id = (getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
    order = sorted(range(len(id_list)), key=lambda i: len(id_list[i]))
    chunks = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    logits_parts = []
    bar = tqdm(chunks, desc="trace", unit="batch", disable=not (progress or
               (progress is None and len(chunks) > 4)))
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
        for chunk in bar:
            L = int(lengths[chunk].max())
            ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : lengths[i]] = id_list[i]
            idx, _ = pad_stack([rows["pos_rows"][i] for i in chunk])
            kidx = None if rows["all_keys"] else pad_stack([rows["key_rows"][i] for i in chunk])[0]
            cap.set_batch(idx, kidx, lengths[chunk])
            # No padding mask: with right padding the causal mask already keeps every real
            # token off the padding. A padding mask would leave the padding's own rows fully
            # masked under a sliding window (Mistral, Gemma), and their NaNs reach real rows of
            # the next layer through 0 * NaN.
            last = lengths[chunk] - 1
            keep, kwargs = logits_to_keep(model, last)
            logits = model(ids.to(device), **kwargs)
            cap.finish()
            part = logits[torch.arange(len(chunk), device=logits.device), keep.to(logits.device)]
            part = part.float() if part.dtype in HALF else part
            logits_parts.append(part.to(store) if store is not None else part)
    return order, logits_parts


def _assemble(cap: _Capture, captured: list[str], layer_list: list[int], order: list[int],
              rows: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The captured batches in the caller's order, chunk-local axes padded to the global
    widths, stacked over layers; slots past a prompt's positions zeroed."""
    pos_mask = rows["pos_mask"]
    P, K = rows["positions"].shape[1], rows["key_positions"].shape[1]
    T = int(rows["lengths"].max())
    data: dict[str, torch.Tensor] = {}
    for q in captured:
        layout = (HOOKS.get(q) or EXTRA[q])[1]
        per_layer = []
        for slot in range(len(layer_list)):
            parts = [pad_to(x, 1, K if layout == "key" else P) for x in cap.out[q][slot]]
            if layout == "row":
                parts = [pad_to(x, 3, T) for x in parts]
            per_layer.append(in_order(parts, order))
        data[q] = torch.stack(per_layer)
        if layout == "query" or layout == "row":
            m = pos_mask.to(data[q].device).view(1, *pos_mask.shape, *([1] * (data[q].dim() - 3)))
            data[q] = data[q] * m
    return data


def _masked_scores(x: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor
                   ) -> torch.Tensor:
    """Scores with every key the model masked at -inf: keys the model masked hold the dtype's
    minimum (added by the bridge's mask: padding, the causal triangle, a sliding window)."""
    T = x.shape[-1]
    valid = torch.arange(T)[None, :] < lengths[:, None]
    causal = torch.arange(T)[None, None, :] <= positions[:, :, None]
    ok = (valid[:, None, :] & causal).to(x.device)[None, :, :, None, :]
    return x.masked_fill(~ok | (x <= torch.finfo(x.dtype).min / 2), float("-inf"))

"""ICL prompts that share their demonstrations: run the shared prefix once.

Under the anchors' protocol one demonstration set serves every query of a (task, seed), so
the ICL prompts ``[BOS] demo_1 … demo_k query_q`` share everything before the query. A causal
model's keys, values and every activation over that prefix are the same for every query, so
:func:`trace_shared_prefix` runs the prefix once, keeps the model's own key/value cache, and
runs only each query's tokens on top of it (batched, right-padded, the cache repeated over the
batch). An ICL query then costs about what a zero-shot query costs.

The record it returns is the one :func:`icl_probe.trace` returns for the same prompts at the
prediction position (``positions="pred"``): the logits, q, scores, pattern, z, attn_out ... at
``p`` and, where asked for, ``k``/``v`` over every key position (the prefix's shared part
repeated per prompt). ``tests/test_protocol.py`` checks it against full-prompt forwards, and
every call checks itself: the shortest prompt runs whole in the forward that builds the
prefix's cache (cut back to the prefix afterwards), and its logits at ``p`` and last-layer
scores over every key must match the shortcut's (:mod:`icl_probe.selfcheck`; a mismatch
raises :class:`~icl_probe.errors.FastPathError`; ``fast=False`` or ``ICL_PROBE_FAST=0`` takes
the full prompts instead).

Where the shortcut does not apply (fewer than two prompts, no shared prefix, a model whose
rotary q/k are reconstructed after the forward rather than hooked, a cache the model does not
return) it falls back to :func:`icl_probe.trace` on the full prompts: same record, full cost.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> task = ip.load_task("capital")
>>> pairs = [ip.build_prompt(model, task, q, demos=[5, 6, 7]) for q in (0, 1, 2)]
>>> shared_prefix_length(pairs) >= pairs[0].spans.query.start   # the demonstrations, at least
True
>>> rec = trace_shared_prefix(model, pairs, what=("scores", "attn_out"))
>>> rec.meta["shared_prefix"] == shared_prefix_length(pairs)
True
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch

from ..errors import TraceError
from ..models import attention_spec, check_layer
from ..models.compat import quiet_cache_rename
from ..prompts import PromptPair
from . import selfcheck
from .capture import hook_names, logits_to_keep
from .quantities import HOOKS, QUANTITIES, fired_hooks
from .record import (AttentionRecord, check_batch_size, in_order, model_record, pad_stack, pad_to,
                     resolve_layers)
from .selfcheck import fast_enabled
from .tracing import trace
from .weights import attention_weights


def shared_prefix_length(pairs: Sequence[PromptPair], kind: str = "icl") -> int:
    """Number of leading tokens every prompt's ``kind`` ids share (at most each prompt's
    length minus one, so every prompt keeps its prediction position in the suffix)."""
    ids = [p.ids(kind) for p in pairs]
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for x in ids[1:]:
        neq = (x[:n] != first[:n]).nonzero()
        if len(neq):
            n = int(neq[0, 0])
    return max(n, 0)


def trace_shared_prefix(model: Any, pairs: Sequence[PromptPair], *,
                        what: Iterable[str] | None = None, layers: Iterable[int] | None = None,
                        batch_size: int = 16, min_prefix: int = 8,
                        fast: bool | None = None, weights: bool = True,
                        prefix_what: Iterable[str] = ()) -> AttentionRecord:
    """:func:`icl_probe.trace` of the pairs' ICL prompts at the prediction position, with the
    prefix every prompt shares run once (see the module docstring). ``fast=False`` (or
    ``ICL_PROBE_FAST=0``) runs every full prompt instead; the shortcut checks itself against
    one full prompt on every call (:mod:`icl_probe.hooks.selfcheck`). ``weights``: as for
    :func:`icl_probe.trace`. ``prefix_what``: key-side quantities (``"k"``, ``"v"``) of the
    shared prefix itself, captured in the pass that builds its cache, left in
    ``record.meta["prefix"]`` as ``{name: (layer, prefix_pos, kv_head, d_head)}`` (absent
    where the call took the full prompts: the caller then has no prefix to read)."""
    layer_list = resolve_layers(layers, model.cfg.n_layers, "trace_shared_prefix")
    check_batch_size(batch_size, "trace_shared_prefix")
    what = tuple(QUANTITIES) if what is None else tuple(dict.fromkeys(what))
    prefix_what = tuple(dict.fromkeys(prefix_what))
    bad = [q for q in prefix_what if q not in HOOKS or HOOKS[q][1] != "key"]
    if bad:
        raise TraceError(f"trace_shared_prefix(prefix_what={list(prefix_what)}): {bad} are not "
                         "key-side quantities; the prefix keeps only 'k' and 'v'")
    P = shared_prefix_length(pairs) if len(pairs) > 1 else 0
    names, direct = hook_names(model)

    def whole() -> AttentionRecord:
        return trace(model, pairs, kind="icl", what=what, layers=layers, batch_size=batch_size,
                     weights=weights)

    # the shortcut reads every quantity straight off its hook: models whose q/k or scores
    # trace() completes after the forward, or whose sliding window masks keys, go through trace()
    if (P < min_prefix or not direct or "head_out" in what or any(attention_spec(model).window)
            or not fast_enabled(fast)):
        return whole()
    _check_request(model, what + prefix_what, names)
    ids = [p.icl_ids for p in pairs]
    lengths = torch.tensor([len(x) for x in ids])
    if int(lengths.max()) > model.cfg.n_ctx:
        raise TraceError(f"trace_shared_prefix: a prompt has {int(lengths.max())} tokens; the "
                         f"context holds {model.cfg.n_ctx}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    prefix = _prefix_pass(model, ids, lengths, order, P, what, layer_list, names, prefix_what)
    if prefix is None:  # this release's cache cannot be cut back or repeated
        return whole()
    store, logits_parts, fast_scores = _suffix_pass(model, ids, lengths, order, P, what,
                                                    layer_list, names, prefix, batch_size)
    checks = {"logits at p": (logits_parts[0][0], prefix["slow_logits"])}
    if prefix["slow_scores"]:
        checks[f"scores of layer {check_layer(model)}"] = (fast_scores[0],
                                                          prefix["slow_scores"][0])
    selfcheck.check("trace_shared_prefix", checks, next(model.parameters()).dtype)
    data = _assemble(store, prefix["kv"], what, layer_list, order, lengths)
    meta: dict[str, Any] = {"shared_prefix": P}
    if prefix_what:
        meta["prefix"] = {q: torch.stack(prefix["kv"][q])[:, 0] for q in prefix_what}
    pred = lengths - 1
    positions, pos_mask = pad_stack([p[None] for p in pred])
    key_t, key_mask = pad_stack([torch.arange(int(n)) for n in lengths])
    return model_record(
        model, layer_list, lengths=lengths, pred=pred, positions=positions, pos_mask=pos_mask,
        pred_slot=torch.zeros(len(ids), dtype=torch.long), key_positions=key_t,
        key_mask=key_mask, data=data,
        weights=attention_weights(model, layer_list) if weights else {},
        logits=in_order(logits_parts, order), hook_names={q: names[q] for q in data},
        kind="icl", q_rotated=True, meta=meta)


def _check_request(model: Any, what: tuple[str, ...], names: dict[str, str]) -> None:
    """The shortcut traces only quantities read straight off a live hook."""
    unknown = [w for w in what if w not in HOOKS]
    if unknown:
        raise TraceError(f"trace_shared_prefix(what={list(what)}): unknown {unknown}; "
                         f"known: {list(HOOKS)}")
    live = fired_hooks(model)
    missing = [q for q in what if names[q] not in live]
    if missing:
        raise TraceError(f"trace_shared_prefix: this model has no live hook for {missing}")


def _prefix_pass(model: Any, ids: list[torch.Tensor], lengths: torch.Tensor, order: list[int],
                 P: int, what: tuple[str, ...], layer_list: list[int], names: dict[str, str],
                 prefix_what: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The prefix, once: its cache, and its keys/values where asked for (None where the cache
    cannot be cut back). The self-check rides on it: the shortest prompt runs whole (the slow,
    exact path) in the forward that builds the prefix's cache, which is then cut back to the
    prefix; its logits at p and the check layer's scores over every key are kept to compare
    with the fast path's."""
    device = next(model.parameters()).device
    key_q = list(dict.fromkeys([q for q in what if HOOKS[q][1] == "key"] + list(prefix_what)))
    c, n_c = order[0], int(lengths[order[0]])
    score_hook = names["scores"].format(l=check_layer(model))  # not windowed: see the caller
    slow_scores: list[torch.Tensor] = []
    prefix_kv: dict[str, list[torch.Tensor]] = {q: [] for q in key_q}
    hooks = [(names[q].format(l=l), lambda x, hook=None, q=q: prefix_kv[q].append(x[:, :P]))
             for q in key_q for l in layer_list]
    if names["scores"] in fired_hooks(model):
        hooks.append((score_hook, lambda x, hook=None: slow_scores.append(x[0, :, n_c - 1])))
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        keep1, kw1 = logits_to_keep(model, torch.tensor([n_c - 1]))  # logits: one position
        out = model(ids[c][None].to(device), return_type="logits_and_cache", **kw1)
    cache = out[1] if isinstance(out, tuple) else None
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    try:
        cache.crop(P - n_c)  # a negative count removes tokens, on every release
    except (AttributeError, RuntimeError, ValueError, NotImplementedError):
        return None
    return {"cache": cache, "kv": prefix_kv, "slow_logits": out[0][0, keep1[0]],
            "slow_scores": slow_scores, "n_c": n_c, "score_hook": score_hook}


def _suffix_pass(model: Any, ids: list[torch.Tensor], lengths: torch.Tensor, order: list[int],
                 P: int, what: tuple[str, ...], layer_list: list[int], names: dict[str, str],
                 prefix: dict[str, Any], batch_size: int
                 ) -> tuple[dict[str, list[list[torch.Tensor]]], list[torch.Tensor],
                            list[torch.Tensor]]:
    """The suffixes, batched on top of the repeated prefix cache: each quantity at the
    prediction slot (keys/values of the whole suffix), the logits at p, and the fast path's
    scores of the shortest prompt for the self-check."""
    device = next(model.parameters()).device
    store: dict[str, list[list[torch.Tensor]]] = {q: [[] for _ in layer_list] for q in what}
    chunks = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    tok = getattr(model, "tokenizer", None)
    pad_id = (getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
    logits_parts: list[torch.Tensor] = []
    fast_scores: list[torch.Tensor] = []
    cur: dict[str, torch.Tensor] = {}
    n_c = prefix["n_c"]

    def grab_check(x: torch.Tensor, hook: Any = None) -> None:
        if not fast_scores:  # the first chunk holds the shortest prompt, in row 0
            fast_scores.append(x[0, :, int(cur["rows"][0]), :n_c])

    def grab(q: str, slot: int):
        layout = HOOKS[q][1]

        def fn(x: torch.Tensor, hook: Any = None) -> None:
            rows = cur["rows"].to(x.device)  # prediction slot of each prompt in the suffix
            b = torch.arange(x.shape[0], device=x.device)
            if layout == "row":  # batch head q_pos k_pos -> batch 1 head k_pos
                y = x[b, :, rows][:, None]
            elif layout == "query":  # batch q_pos ... -> batch 1 ...
                y = x[b, rows][:, None]
            else:  # keys/values of the suffix; the prefix's are prepended below
                y = x.detach().clone()
            store[q][slot].append(y)

        return fn

    fwd = [(names[q].format(l=l), grab(q, s)) for q in what for s, l in enumerate(layer_list)]
    if prefix["slow_scores"]:
        fwd.append((prefix["score_hook"], grab_check))
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd), quiet_cache_rename():
        for chunk in chunks:
            L = int(lengths[chunk].max()) - P
            suffix = torch.full((len(chunk), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), P + L), dtype=torch.long)
            for r, i in enumerate(chunk):
                suffix[r, : lengths[i] - P] = ids[i][P:]
                mask[r, : lengths[i]] = 1
            cur["rows"] = lengths[chunk] - 1 - P
            c = copy.deepcopy(prefix["cache"])
            c.batch_repeat_interleave(len(chunk))
            keep, kw = logits_to_keep(model, cur["rows"])
            logits = model(suffix.to(device), past_key_values=c, attention_mask=mask.to(device),
                           **kw)
            logits_parts.append(logits[torch.arange(len(chunk), device=logits.device),
                                       keep.to(logits.device)])
    return store, logits_parts, fast_scores


def _assemble(store: dict[str, list[list[torch.Tensor]]], prefix_kv: dict[str, list],
              what: tuple[str, ...], layer_list: list[int], order: list[int],
              lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """The captured batches in the caller's order, as trace() lays them out: the prefix's keys
    and values prepended to each suffix's, key axes padded to the longest prompt; scores of
    keys past each prompt's end are padding, -inf as trace() has them."""
    T = int(lengths.max())
    data: dict[str, torch.Tensor] = {}
    for q in what:
        layout = HOOKS[q][1]
        per_layer = []
        for slot in range(len(layer_list)):
            parts = store[q][slot]
            if layout == "key":
                pre = prefix_kv[q][slot]
                parts = [torch.cat([pre.expand(x.shape[0], *pre.shape[1:]), x], 1) for x in parts]
                parts = [pad_to(x, 1, T) for x in parts]
            elif layout == "row":
                parts = [pad_to(x, 3, T) for x in parts]
            per_layer.append(in_order(parts, order))
        data[q] = torch.stack(per_layer)
    if "scores" in data:
        valid = (torch.arange(T)[None, :] < lengths[:, None]).to(data["scores"].device)
        data["scores"] = data["scores"].masked_fill(~valid[None, :, None, None, :], float("-inf"))
    return data

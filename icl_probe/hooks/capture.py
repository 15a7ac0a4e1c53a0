"""The forward hooks that keep each traced quantity at the positions asked for, and where
models need it, q, k and scores completed after the forward (the quantities themselves:
:mod:`icl_probe.hooks.quantities`)."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import einops
import torch

from ..errors import TraceError
from ..models import AttentionSpec, allowed_keys, attention_scores, attention_spec
from ..models.architectures import gptj_phases, require_rotary_support, rotate_like_model
from .gqa import expand_kv, group_mapping
from .quantities import DERIVED, EXTRA, HOOKS
from .weights import HALF


def hook_names(model: Any) -> tuple[dict[str, str], bool]:
    """The TransformerLens hook name (template) of each quantity, and whether every quantity
    is read straight off that hook. False where this module rotates q and k itself or
    recomputes the scores after the forward (GPT-NeoX, GPT-J): callers that register the hooks
    themselves must then go through :func:`trace`."""
    names = {q: t for q, (t, _) in HOOKS.items()}
    names.update(DERIVED)
    spec = attention_spec(model)
    if spec.rotary_from == "none":
        names["q"], names["k"] = "blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k"
    direct = spec.rotary_from in ("hooks", "none") and spec.scores_hooked
    return names, direct


def _q_normed_transform(model: Any, spec: AttentionSpec) -> Callable | None:
    """``hook_q_normed`` fires on (batch, head, pos, d_head) after a post-reshape QK-norm
    (Gemma 3, Qwen3) and on (batch, pos, head·d_head) before the reshape (OLMo 2)."""
    n_heads = model.cfg.n_heads
    if spec.qk_norm == "post_reshape":
        return lambda x: einops.rearrange(x, "batch head pos d_head -> batch pos head d_head")
    if spec.qk_norm == "pre_reshape":
        return lambda x: einops.rearrange(x, "batch pos (head d_head) -> batch pos head d_head",
                                          head=n_heads)
    return None


@dataclass(frozen=True)
class _Plan:
    """What to capture for one trace: direct hooks, and what ``_Capture.finish`` completes."""

    direct: dict[str, tuple[str, str]]  # quantity -> (hook template, layout)
    rotate: bool  # q/k come from hook_q/hook_k and are rotated after the forward
    qk_hooks: tuple[str, str]  # templates q and k are read from when they are stashed
    stash_q: bool
    stash_k: bool  # k at the key positions (the record's k)
    stash_k_all: bool  # k at every position (recomputed scores)
    derive: tuple[str, ...]  # "q", "k", "scores", "rot_cos", "rot_sin" completed in finish
    sources: dict[str, str]


def _plan(model: Any, spec: AttentionSpec, captured: Sequence[str], live: frozenset[str]
          ) -> tuple[_Plan, list[str]]:
    """The capture plan for ``captured`` quantities, and the ones this model cannot supply."""
    direct: dict[str, tuple[str, str]] = {}
    derive: list[str] = []
    sources: dict[str, str] = {}
    missing: list[str] = []
    needs_qk = [w for w in captured if w in ("q", "k")]
    derive_scores = "scores" in captured and not spec.scores_hooked
    if (needs_qk or derive_scores) and spec.rotary_from == "unknown":
        require_rotary_support(model, f"trace(what={list(captured)})")
    rotate = spec.rotary_from in ("phases", "buffer")
    q_t, k_t = (("blocks.{l}.attn.hook_rot_q", "blocks.{l}.attn.hook_rot_k")
                if spec.rotary_from == "hooks" else
                ("blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k"))
    phase_hooks = ("blocks.{l}.attn.hook_cos", "blocks.{l}.attn.hook_sin") \
        if spec.rotary_from == "phases" else ()
    how = {"hooks": "hook_rot_{x}", "none": "hook_{x}",
           "phases": "hook_{x} rotated with the layer's hook_cos/hook_sin",
           "buffer": "hook_{x} rotated with GPT-J's embed_positions phases",
           }.get(spec.rotary_from, "")

    def available(templates: Sequence[str]) -> bool:
        return all(t in live for t in templates)

    for w in captured:
        if w in ("q", "k"):
            need = ((q_t if w == "q" else k_t),) + phase_hooks
            if not available(need):
                missing.append(w)
            elif rotate:
                derive.append(w)
                sources[w] = how.format(x=w)
            else:
                direct[w] = (need[0], "query" if w == "q" else "key")
                sources[w] = how.format(x=w)
        elif w == "scores" and derive_scores:
            if not available((q_t, k_t) + phase_hooks) or \
                    "blocks.{l}.attn.hook_pattern" not in live:
                missing.append(w)
            else:
                derive.append(w)
                sources[w] = ("recomputed from q and k as the model computes them (this bridge "
                              "fires hook_attn_scores with the pattern)")
        elif w in ("rot_cos", "rot_sin"):
            if spec.rotary_from == "buffer":
                derive.append(w)
                sources[w] = "GPT-J's embed_positions table"
            elif spec.rotary_from in ("hooks", "phases") and available((EXTRA[w][0],)):
                direct[w] = EXTRA[w]
                sources[w] = EXTRA[w][0].split("{l}.", 1)[1]
            else:
                missing.append(w)
        else:
            template, layout = HOOKS[w] if w in HOOKS else EXTRA[w]
            if template not in live:
                missing.append(w)
            else:
                direct[w] = (template, layout)
                sources[w] = template.split("{l}.", 1)[1]
    stash_q = any(w in derive for w in ("q", "scores"))
    plan = _Plan(direct=direct, rotate=rotate, qk_hooks=(q_t, k_t), stash_q=stash_q,
                 stash_k="k" in derive, stash_k_all="scores" in derive, derive=tuple(derive),
                 sources=sources)
    return plan, missing


class _Capture:
    """Hook functions for one trace. ``set_batch`` points them at the current chunk;
    ``finish`` completes, after the chunk's forward, what needs more than one hook: q and k
    rotated with phases that fire after them, scores recomputed from q and k."""

    def __init__(self, model: Any, spec: AttentionSpec, plan: _Plan, outputs: Sequence[str],
                 layers: Sequence[int], store: torch.device | None):
        self.model, self.spec, self.plan, self.layers, self.store = model, spec, plan, layers, store
        self.out: dict[str, list[list[torch.Tensor]]] = {q: [[] for _ in layers] for q in outputs}
        self.stash: dict[tuple[str, int], torch.Tensor] = {}

    def set_batch(self, idx: torch.Tensor, key_idx: torch.Tensor | None,
                  lengths: torch.Tensor) -> None:
        self.idx, self.key_idx, self.lengths = idx, key_idx, lengths
        self.stash.clear()

    def _gather(self, x: torch.Tensor, layout: str, name: str) -> torch.Tensor:
        B = self.idx.shape[0]
        if x.shape[0] != B and x.shape[0] == 1:  # rotary phases are shared over the batch
            x = x.expand(B, *x.shape[1:])
        idx = self.idx.to(x.device)
        if layout == "row":  # rows of (batch, head, query token, key_pos) at the captured pos
            if x.dim() != 4:
                raise TraceError(f"{name}: expected (batch, head, q_pos, k_pos), got "
                                 f"{tuple(x.shape)}")
            _, H, _, T = x.shape
            rows = x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], T))
            return einops.rearrange(rows, "batch head pos key_pos -> batch pos head key_pos")
        if layout == "all" or (layout == "key" and self.key_idx is None):
            return x.clone()
        sel = idx if layout == "query" else self.key_idx.to(x.device)
        view = sel.view(*sel.shape, *([1] * (x.dim() - 2)))
        return x.gather(1, view.expand(*sel.shape, *x.shape[2:]))

    def _put(self, quantity: str, slot: int, y: torch.Tensor) -> None:
        if quantity not in self.out:
            return
        if y.dtype in HALF:  # records of half-precision models are kept in float32
            y = y.float()
        if self.store is not None:
            y = y.to(self.store)
        self.out[quantity][slot].append(y)

    def direct(self, quantity: str, slot: int, layout: str, name: str,
               transform: Callable | None = None) -> Callable:
        def fn(x: torch.Tensor, hook: Any = None) -> None:
            if transform is not None:
                x = transform(x)
            self._put(quantity, slot, self._gather(x, layout, name))

        return fn

    def keep(self, key: str, slot: int, layout: str, name: str) -> Callable:
        def fn(x: torch.Tensor, hook: Any = None) -> None:
            self.stash[(key, slot)] = self._gather(x, layout, name).detach()

        return fn

    def _phases(self, slot: int, layout: str, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's rotary (cos, sin) at the query / key / every position: batch pos r."""
        B = self.idx.shape[0]
        if layout == "query":
            pos = self.idx
        elif layout == "key" and self.key_idx is not None:
            pos = self.key_idx
        else:
            pos = torch.arange(like.shape[1])[None].expand(B, -1)
        if self.spec.rotary_from == "buffer":
            return gptj_phases(self.model, self.layers[slot], pos.to(like.device), like.dtype)
        cos, sin = self.stash[("cos", slot)], self.stash[("sin", slot)]  # batch T r

        def at(x: torch.Tensor) -> torch.Tensor:
            x = x.expand(B, *x.shape[1:]) if x.shape[0] != B else x
            p = pos.to(x.device)
            return x.gather(1, p[..., None].expand(*p.shape, x.shape[-1]))

        return at(cos), at(sin)

    def _rotated(self, key: str, slot: int, layout: str) -> torch.Tensor:
        x = self.stash[(key, slot)]  # batch pos head d_head
        if not self.plan.rotate:
            return x
        cos, sin = self._phases(slot, layout, x)
        return rotate_like_model(self.spec, x, cos[:, :, None, :], sin[:, :, None, :])

    def finish(self) -> None:
        plan, spec = self.plan, self.spec
        for slot, layer in enumerate(self.layers):
            q = self._rotated("q", slot, "query") if plan.stash_q else None
            if "q" in plan.derive:
                self._put("q", slot, q)
            if "k" in plan.derive:
                self._put("k", slot, self._rotated("k", slot, "key"))
            if "scores" in plan.derive:
                k_all = self._rotated("k_all", slot, "all")  # batch T kv_head d_head
                kv_head_of = group_mapping(q.shape[2], k_all.shape[2])
                T = k_all.shape[1]
                allowed = allowed_keys(spec, layer, self.idx.to(q.device), T, self.lengths)
                self._put("scores", slot, attention_scores(
                    spec, layer, q, expand_kv(k_all, kv_head_of, dim=2), allowed))
            for name in ("rot_cos", "rot_sin"):
                if name in plan.derive:
                    dtype = next(self.model.parameters()).dtype  # GPT-J casts to the key's
                    cos, sin = gptj_phases(self.model, layer, self.idx, dtype)
                    self._put(name, slot, cos if name == "rot_cos" else sin)
        self.stash.clear()


def query_capture_hooks(model: Any, store: list[torch.Tensor]) -> list[tuple[str, Callable]]:
    """Forward hooks that append, for every layer in order, the first prompt's query vectors
    as the model uses them (after QK-norm and rotary; pos head d_head, detached) to ``store``.
    For code that runs its own forwards (the fine-tuning loop records the queries of each step
    for Kendall's τ); on GPT-NeoX and GPT-J the captured ``hook_q`` is rotated here with the
    layer's own phases, exactly as :func:`trace` does."""
    spec = require_rotary_support(model, "query_capture_hooks()")
    hooks: list[tuple[str, Callable]] = []
    for l in range(model.cfg.n_layers):
        if spec.rotary_from in ("hooks", "none"):
            name = f"blocks.{l}.attn.hook_{'rot_q' if spec.rotary_from == 'hooks' else 'q'}"
            hooks.append((name, lambda x, hook=None: store.append(x[0].detach().clone())))
        elif spec.rotary_from == "buffer":
            def gptj(x: torch.Tensor, hook: Any = None, l: int = l) -> None:
                pos = torch.arange(x.shape[1], device=x.device)
                cos, sin = gptj_phases(model, l, pos, x.dtype)  # pos r/2
                store.append(rotate_like_model(spec, x[0].detach(), cos[:, None], sin[:, None]))
            hooks.append((f"blocks.{l}.attn.hook_q", gptj))
        else:  # "phases": hook_q fires before the layer's hook_cos / hook_sin
            pending: dict[str, torch.Tensor] = {}

            def keep(x: torch.Tensor, hook: Any = None, key: str = "", pending=pending) -> None:
                pending[key] = x[0].detach()

            def done(x: torch.Tensor, hook: Any = None, pending=pending) -> None:
                cos, sin = pending.pop("cos"), x[0].detach()  # pos r
                store.append(rotate_like_model(spec, pending.pop("q"), cos[:, None], sin[:, None]))
            hooks += [(f"blocks.{l}.attn.hook_q", lambda x, hook=None, k=keep: k(x, key="q")),
                      (f"blocks.{l}.attn.hook_cos", lambda x, hook=None, k=keep: k(x, key="cos")),
                      (f"blocks.{l}.attn.hook_sin", done)]
    return hooks


def plain_attentions(model: Any) -> list[torch.nn.Module] | None:
    """Each layer's Hugging Face attention module, where :func:`plain_query_capture` can
    record its queries without the bridge (rotate-half rotary over the whole head, no QK-norm,
    a ``q_proj`` linear map and the rotary phases passed to the attention as
    ``position_embeddings``: Llama, Mistral, Qwen2 and their kin); None elsewhere."""
    spec = attention_spec(model)
    if (spec.qk_norm is not None or spec.rotary_from not in ("hooks", "phases")
            or spec.convention != "rotate_half" or spec.rotary_pct != 1.0):
        return None
    attns = [getattr(model.blocks[l].attn, "original_component", None)
             for l in range(model.cfg.n_layers)]
    for a in attns:
        q = getattr(a, "q_proj", None)
        if not isinstance(getattr(q, "original_component", q), torch.nn.Linear) or \
                "position_embeddings" not in inspect.signature(a.forward).parameters:
            return None
    return attns


@contextlib.contextmanager
def plain_query_capture(model: Any, store: list[torch.Tensor],
                        attns: list[torch.nn.Module]) -> Iterator[None]:
    """:func:`query_capture_hooks` for a forward of the unwrapped model
    (:func:`icl_probe.models.bridge.unwrapped`, which no bridge hook sees): plain PyTorch
    hooks append each layer's first-prompt queries after rotary (pos head d_head, detached),
    the projection's output rotated with the phases the layer received. Only where
    :func:`plain_attentions` finds the layers; its caller checks the result against the
    bridge's. ``attns``: :func:`plain_attentions`, found before the model was unwrapped."""
    spec, d_head = attention_spec(model), model.cfg.d_head
    phases: list = []

    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        got = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if got is None:
            raise TraceError("plain_query_capture(): the attention received no rotary phases")
        phases[:] = [got]

    def rotated(module: Any, args: tuple, out: torch.Tensor) -> None:
        cos, sin = phases[0]
        q = out[0].detach().reshape(out.shape[1], -1, d_head)  # pos head d_head
        store.append(rotate_like_model(spec, q, cos[0][:, None], sin[0][:, None]))

    handles = []
    try:
        for a in attns:
            handles.append(a.register_forward_pre_hook(keep, with_kwargs=True))
            q_proj = getattr(a.q_proj, "original_component", a.q_proj)  # wrapped or not
            handles.append(q_proj.register_forward_hook(rotated))
        yield
    finally:
        for h in handles:
            h.remove()


def logits_to_keep(model: Any, last: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Only the prediction positions need logits: where the model's forward takes
    ``logits_to_keep`` (transformers' causal LMs), unembed just those positions (the
    unembedding of every position is most of a short prompt's forward on a 49k vocabulary).
    Returns, per row, the index into the returned logits' position axis, and the kwargs."""
    hf = getattr(model, "original_model", None)
    accepts = model.__dict__.get("_icl_probe_keeps_logits")
    if accepts is None:
        try:
            accepts = "logits_to_keep" in inspect.signature(hf.forward).parameters
        except (TypeError, ValueError, AttributeError):
            accepts = False
        model.__dict__["_icl_probe_keeps_logits"] = accepts
    if not accepts:
        return last, {}
    uniq, inverse = torch.unique(last, return_inverse=True)
    return inverse, {"logits_to_keep": uniq}

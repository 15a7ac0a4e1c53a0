"""Function vectors (Todd et al. 2024, ICLR; code ericwtodd/function_vectors): the task carried
by a few attention heads' mean outputs, added to the residual stream of zero-shot forwards.

1. **Mean head outputs.** ``prompts`` ICL prompts (``k`` demonstrations each; queries and
   demonstrations from the train split) run once; each head's output ``z`` at the prediction
   position ``p`` is averaged over them.
2. **Causal indirect effect.** The same prompts with their demonstrations' labels shuffled
   (the "corrupted" prompts) run once as they are, then once per head with that head's ``z``
   at ``p`` replaced by its mean from step 1. A head's effect is the mean rise, over prompts,
   of the probability of the correct answer's first token.
3. **The vector.** The ``heads`` heads of largest effect; the function vector is the sum of
   their mean outputs written into the residual stream, ``Σ W_O^h z̄^h``.
4. **Patch.** It is added to the hidden state leaving block ``L`` at ``p`` of each zero-shot
   prompt; ``L`` is chosen on dev queries and its test accuracy reported beside zero-shot and
   ICL (every query with its own ``k`` demonstrations), with 95 % intervals.

As in the authors' code, the heads are ranked per task and the patch is an addition at the
last position; the authors take 10 heads on GPT-J's 448, the default here. The bias of the
attention output (none in Llama-family models) is not part of a head's output.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import CausalError, TraceError
from ..hooks import Patch, attention_weights, logits_to_keep, patching, resolve_layers
from ..prompts import PromptPair, build_prompt
from ..tasks import load_task
from .patches import at_pred
from .vectors import (HIDDEN, VectorResult, _check_counts, chosen_layer, patched_hits,
                      patched_logits)

Z = "blocks.{l}.attn.hook_z"


def function_vector(model: Any, task: Any, *, k: int = 5, prompts: int = 16, heads: int = 10,
                    queries: int = 32, dev_queries: int = 16,
                    layers: Sequence[int] | None = None, seed: int = 0,
                    progress: bool | None = None) -> VectorResult:
    """Todd et al.'s function vector of ``task`` (see the module docstring): mean head outputs
    and indirect effects from ``prompts`` train prompts of ``k`` demonstrations, the top
    ``heads`` heads, added after each block in ``layers`` (default all); ``dev_queries`` choose
    the block, ``queries`` test queries report it. ``result.heads``: every head's effect."""
    task = load_task(task)
    _check_counts(k=k, prompts=prompts, heads=heads, queries=queries, dev_queries=dev_queries)
    layer_list = resolve_layers(layers, model.cfg.n_layers, "function_vector", CausalError)
    n_heads = model.cfg.n_heads
    if heads > model.cfg.n_layers * n_heads:
        raise CausalError(f"function_vector: heads={heads} > the model's "
                          f"{model.cfg.n_layers * n_heads} heads")
    train = task.split("train")
    if len(train) < k + 1:
        raise CausalError(f"function_vector: task {task.name!r} has {len(train)} train items; "
                          f"k={k} demonstrations and a query need more")
    clean = [build_prompt(model, task, q, k, seed=seed + q, pool=train)
             for q in train[-prompts:]]
    corrupted = [build_prompt(model, task, p.query, demos=list(p.demos), seed=seed + p.query,
                              shuffle_labels=True) for p in clean]
    every = tuple(range(model.cfg.n_layers))
    mean_z = at_pred(model, clean, every, Z, "icl").mean(1)  # layer head d_head
    effects = indirect_effects(model, corrupted, mean_z, progress)
    order = np.argsort(-effects.flatten(), kind="stable")[:heads]
    chosen = [(int(i // n_heads), int(i % n_heads)) for i in order]
    fv = head_sum(model, mean_z, chosen)
    table = pd.DataFrame([{"layer": l, "head": h, "effect": float(effects[l, h]),
                           "chosen": (l, h) in chosen} for l in every for h in range(n_heads)])
    rows, hits = [], {}
    for split, qs in (("dev", task.split("dev")[:dev_queries]),
                      ("test", task.split("test")[:queries])):
        pairs = [build_prompt(model, task, q, k, seed=seed + q, pool=train) for q in qs]
        vec = fv[None].expand(len(pairs), -1)
        for l in layer_list:
            hits[(split, l)] = patched_hits(model, pairs, (HIDDEN.format(l=l), vec),
                                            mode="add")
            rows.append({"split": split, "layer": l, "accuracy": hits[(split, l)].mean(),
                         "n": len(pairs)})
        hits[(split, "zero_shot")] = patched_hits(model, pairs, None)
        hits[(split, "icl")] = patched_hits(model, pairs, None, kind="icl")
    per_layer, best, summary = chosen_layer("function_vector", task.name, rows, hits, seed)
    return VectorResult("function_vector", layer_list, per_layer, best, summary,
                        fv[None].float().cpu(), heads=table)


def indirect_effects(model: Any, corrupted: Sequence[PromptPair], mean_z: torch.Tensor,
                     progress: bool | None = None) -> np.ndarray:
    """(layer, head): the mean rise in the correct answer's first-token probability when the
    head's output at ``p`` of each corrupted prompt is replaced by ``mean_z[layer, head]``.

    The patch changes only the last position, so each prompt runs whole once (the slow, exact
    path, which also builds its key/value cache) and then only its last token, on copies of
    that cache, one batch row per head of a layer. The fast path checks itself: its unpatched
    logits against the whole prompt's, per prompt, and the top head's effect against whole
    patched prompts; a mismatch raises. Where the cache cannot be cut back, every head runs
    the whole prompts."""
    n_layers, n_heads = mean_z.shape[:2]
    out = np.zeros((n_layers, n_heads))
    bar = tqdm(total=len(corrupted) * n_layers, desc="function vector heads", unit="layer",
               disable=not (progress or progress is None and n_layers * n_heads > 64))
    for p in corrupted:
        cached = _last_token_effects(model, p, mean_z, bar)
        if cached is None:
            bar.close()
            return _whole_prompt_effects(model, corrupted, mean_z, range(n_layers), range(n_heads))
        out += cached
    bar.close()
    out /= len(corrupted)
    l, h = (int(i) for i in np.unravel_index(int(np.argmax(out)), out.shape))
    slow = _whole_prompt_effects(model, corrupted, mean_z, [l], [h])[l, h]
    if not abs(slow - out[l, h]) <= 1e-6 + 1e-3 * abs(slow):
        raise TraceError(f"function_vector: head {l}.{h}'s effect on the cached last token "
                         f"({out[l, h]:.6g}) differs from whole prompts ({slow:.6g}); this "
                         "transformers release's cache is not what the fast path assumes")
    return out


def _last_token_effects(model: Any, p: PromptPair, mean_z: torch.Tensor, bar: Any
                        ) -> np.ndarray | None:
    """One corrupted prompt: every head's rise, on its cache (None: no usable cache)."""
    n_layers, n_heads = mean_z.shape[:2]
    device = next(model.parameters()).device
    ids, gold = p.icl_ids, int(p.label_ids[p.target])
    with torch.inference_mode():
        keep, kw = logits_to_keep(model, torch.tensor([len(ids) - 1]))
        out = model(ids[None].to(device), return_type="logits_and_cache", **kw)
    cache = out[1] if isinstance(out, tuple) else None
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    try:
        cache.crop(-1)  # the cache of every token but the last
    except (AttributeError, RuntimeError, ValueError, NotImplementedError):
        return None
    slow = out[0][0, keep[0]].double()
    last = ids[-1:].to(device)
    base = float(slow.softmax(-1)[gold])
    rise = np.zeros((n_layers, n_heads))
    for l in range(n_layers):
        rows = n_heads + (l == 0)  # layer 0's batch has one unpatched row: the self-check
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(rows)
        patch = [Patch(mean_z[l, h], rows=[h], positions=[0], heads=[h]) for h in range(n_heads)]
        with torch.inference_mode(), patching(model, {Z.format(l=l): patch}):
            logits = model(last[None].expand(rows, 1), past_key_values=c)[:, -1].double()
        if l == 0:
            err = float((logits[-1] - slow).abs().max() / slow.abs().max())
            if not err < 1e-4:
                raise TraceError(f"function_vector: the last token on its repeated cache gives "
                                 f"logits {err:.1e} (relative) away from the whole prompt's; "
                                 "this transformers release's cache is not what the fast path "
                                 "assumes")
        rise[l] = logits[:n_heads].softmax(-1)[:, gold].cpu().numpy() - base
        bar.update()
    return rise


def _whole_prompt_effects(model: Any, corrupted: Sequence[PromptPair], mean_z: torch.Tensor,
                          layers: Sequence[int], heads: Sequence[int]) -> np.ndarray:
    """The slow path: the whole corrupted prompts, once as they are and once per head."""
    base = _p_correct(corrupted, patched_logits(model, corrupted, None, "icl"))
    out = np.zeros(mean_z.shape[:2])
    last = [len(p.icl_ids) - 1 for p in corrupted]
    for l in layers:
        for h in heads:
            patch = [Patch(mean_z[l, h], rows=[r], positions=[p], heads=[h])
                     for r, p in enumerate(last)]
            with patching(model, {Z.format(l=l): patch}):
                logits = patched_logits(model, corrupted, None, "icl")
            out[l, h] = float((_p_correct(corrupted, logits) - base).mean())
    return out


def head_sum(model: Any, mean_z: torch.Tensor, chosen: Sequence[tuple[int, int]]
             ) -> torch.Tensor:
    """``Σ W_O^h z̄^h`` over the ``(layer, head)`` pairs in ``chosen`` (d_model)."""
    W_O = attention_weights(model, range(model.cfg.n_layers))["W_O"]  # layer head d_head d_model
    fv = torch.zeros(W_O.shape[-1], dtype=mean_z.dtype, device=mean_z.device)
    for l, h in chosen:
        fv = fv + mean_z[l, h] @ W_O[l, h].to(mean_z)
    return fv


def _p_correct(pairs: Sequence[PromptPair], logits: torch.Tensor) -> np.ndarray:
    """The probability of each prompt's correct answer's first token at ``p``."""
    probs = logits.double().softmax(-1)
    ids = [int(p.label_ids[p.target]) for p in pairs]
    return probs[torch.arange(len(pairs)), ids].numpy()

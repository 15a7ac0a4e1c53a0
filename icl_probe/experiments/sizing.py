"""Memory of what a unit holds, from a model's shape: attention records
(:func:`record_bytes`, checked against real records in the tests), fine-tunes (an upper-bound
formula: every demonstration in one sequence, eager attention, the tensors autograd keeps per
layer), and the prompt lengths they are computed for."""

from __future__ import annotations

import math
import types
from typing import Iterable

from ..errors import TraceError
from ..hooks.quantities import REGISTRY, Sizes
from ..models import ModelShape
from ..prompts import build_prompt, split_template
from ..tasks import load_task


def record_bytes(shape: ModelShape, what: Iterable[str], n_prompts: int, tokens: int, *,
                 positions: int = 1, logits: bool = True, weights: bool = True,
                 weight_bytes: int = 4, data_bytes: int = 4) -> int:
    """Bytes of an :class:`~icl_probe.hooks.AttentionRecord` of ``n_prompts`` prompts padded
    to ``tokens``, holding ``what`` at ``positions`` captured positions of every layer, with
    (``logits``) the logits at the prediction position and (``weights``) the stacked
    attention weights in the model's dtype, ``weight_bytes`` per number (biases, a few
    thousand numbers, left out). Records are float32 (half-precision models' records are
    widened), ``data_bytes`` per captured number where a record is kept narrower
    (:func:`icl_probe.hooks.compact`); all records of one model share one stack of weights
    (cached on the model)."""
    what = tuple(what)
    unknown = set(what) - set(REGISTRY)
    if unknown:
        raise TraceError(f"record_bytes(what=...): unknown quantities {sorted(unknown)}")
    sizes = Sizes(shape.d_model, shape.n_heads, shape.n_kv_heads, shape.d_head, tokens)
    per = {w: REGISTRY[w].width(sizes) * (tokens if REGISTRY[w].layout == "key" else positions)
           for w in what}
    L, B = shape.n_layers, n_prompts
    n = data_bytes * L * B * sum(per[w] for w in what)
    n += 4 * B * shape.d_vocab if logits else 0
    return n + (weight_bytes * attention_weight_count(shape) if weights else 0)


def attention_weight_count(shape: ModelShape) -> int:
    """Numbers in the stacked attention weights of every layer: W_Q and W_O per head, W_K and
    W_V per kv head."""
    L, H, G, D, d = shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_model
    return L * (2 * H * d * D + 2 * G * d * D)


def finetune_bytes(shape: ModelShape, trainable: int, tokens: int, dtype_bytes: int,
                   optimizer_states: int) -> int:
    """One fine-tune: the trained copy of the selected parameters, their gradients and
    ``optimizer_states`` per parameter (SGD 0, Adam 2), plus an upper bound of the activations
    autograd keeps for a backward over a sequence of ``tokens`` tokens (per layer: the residual and norm
    inputs, q/k/v before and after rotary, scores and pattern, the head outputs, the MLP's
    hidden activations; then the logits and their gradient)."""
    L, H, G, D, d, f = (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head,
                        shape.d_model, shape.d_mlp)
    T = tokens
    per_layer = T * (4 * d + 2 * (H + 2 * G) * D + H * D + d + 4 * f) + 2 * H * T * T
    acts = (L * per_layer + 2 * T * shape.d_vocab) * dtype_bytes
    return trainable * dtype_bytes * (2 + optimizer_states) + acts


def trainable_count(shape: ModelShape, params: str) -> int:
    """Parameters a parameter set trains (:func:`icl_probe.gd.trainable_parameters`), from the
    sizes: ``kv`` (k and v projections), ``qkvo``, ``v:L`` (one layer's v), ``mlp``, ``all``
    (biases left out: at most a few thousand)."""
    L, H, G, D, d, f = (shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head,
                        shape.d_model, shape.d_mlp)
    if params == "kv":
        return L * 2 * d * G * D
    if params == "qkvo":
        return L * (2 * d * H * D + 2 * d * G * D)
    if params.startswith("v:"):
        return d * G * D
    if params == "mlp":
        return L * 3 * d * f
    return shape.n_params


def prompt_tokens(shape: ModelShape, tasks: Iterable[str], k: int, n: int = 16
                   ) -> tuple[int, int, int, int, str]:
    """(longest ICL prompt, longest zero-shot prompt, longest demonstration block, longest
    single demonstration) in tokens over ``n`` sampled prompts per task, and how they were
    measured."""
    tok = shape.tokenizer
    if tok is None:
        return _byte_estimate(tasks, k)
    stub = types.SimpleNamespace(tokenizer=tok, icl_probe_info=types.SimpleNamespace(
        prepend_bos=tok.bos_token_id is not None))
    icl = zs = demos = one = 0
    for name in tasks:
        task = load_task(name)
        for q in range(min(n, len(task))):
            pair = build_prompt(stub, task, q, min(k, len(task) - 1), seed=q)
            icl, zs = max(icl, len(pair.icl_ids)), max(zs, len(pair.zs_ids))
            demos = max(demos, len(pair.icl_ids) - len(pair.zs_ids))
            one = max(one, *(len(d.whole) for d in pair.spans.demos))
    return icl, zs, demos, one, ("tokenized with the model's tokenizer, longest of the "
                                 "sampled prompts")


BYTES_PER_TOKEN = 3  # BPE tokenizers average 3.5-4.5 bytes per token on English: generous


def _byte_estimate(tasks: Iterable[str], k: int) -> tuple[int, int, int, int, str]:
    """Without a tokenizer: the k longest demonstrations and the longest query, in bytes /
    :data:`BYTES_PER_TOKEN`, plus a BOS token."""
    icl = zs = demos = one = 0
    for name in tasks:
        task = load_task(name)
        head, label_prefix, sep = split_template(task.template)
        per_demo = sorted((len((head.format(x=it.x) + label_prefix + it.y + sep).encode())
                           for it in task.items), reverse=True)
        query = max(len(head.format(x=it.x).encode()) for it in task.items)
        d = math.ceil(sum(per_demo[:k]) / BYTES_PER_TOKEN)
        q = math.ceil(query / BYTES_PER_TOKEN) + 1
        icl, zs, demos = max(icl, d + q), max(zs, q), max(demos, d)
        one = max(one, math.ceil(per_demo[0] / BYTES_PER_TOKEN))
    return icl, zs, demos, one, (f"no tokenizer found: bytes / {BYTES_PER_TOKEN} of the longest "
                            "items, a generous estimate")

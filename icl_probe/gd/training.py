"""Real gradient descent on exactly the demonstrations of an ICL prompt (docs/science.md,
Gradient-descent comparators).

:func:`finetune` trains the selected parameters in place, records the real deltas
``θ_FT − θ_0`` and restores ``θ_0`` exactly (from the saved originals), so the base model is
unchanged afterwards. Memory while training: the model, a copy of the trained parameters'
original values (needed for the exact restore: float deltas cannot give θ_0 back bit for bit),
their gradients and the optimiser's state; afterwards: the model and the deltas. The returned
:class:`FineTune` carries the deltas and ``ft.model``, a view of the base model with the
deltas applied during each forward (and to the weights it reports), usable with :func:`icl_probe.trace` and :func:`icl_probe.implied_updates`.

Methods (one training example = ``[BOS] + one demonstration's tokens``; loss = causal-LM
cross-entropy averaged over the demonstration's input and label tokens, as in Dai et al.'s
code where the separator between demonstrations is stripped; ``loss_tokens`` keeps the
separator or scores the label tokens only):

- ``"dai"``: SGD, batch size 1, one epoch, one step per demonstration in prompt order
  (Dai et al. 2023's code); parameters ``k_proj`` and ``v_proj`` of every layer by default.
- ``"batch"``: full-batch GD, ``steps`` steps on the mean loss over all demonstrations. The
  per-demonstration losses are summed in a canonical order (by item index), so the result is
  exactly independent of the prompt's order.
- ``"adam"``: Adam (β = 0.9, 0.999), batch size 1 in prompt order, ``epochs`` epochs.
- ``"lcgd"``: layer-causal GD (Deutch et al. 2024): every block's input is detached, every
  block's output is decoded through the frozen final norm and unembedding (logit lens), the
  loss is the sum over layers of those cross-entropies; SGD, batch size 1, prompt order.

Parameter sets: ``"kv"``, ``"qkvo"``, ``"mlp"``, ``"all"``, or ``"v:L"`` (layer L's W_V only,
Shen et al.'s sub-model GD). Deltas are keyed by the Hugging Face parameter name
(``model.layers.3.self_attn.k_proj.weight``); on fused-QKV models (GPT-2, GPT-NeoX) by the
bridge's split q/k/v maps (``transformer.h.0.attn.k.weight``), which its forward runs through.
``ft.projection_deltas()`` gives them per logical projection (q, k, v, o) on every family.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> ft = ip.finetune(model, pair, method="dai", params="kv", lr=1e-2)
>>> sorted(ft.deltas)[:2]
['model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight']
>>> ft.diverged, len(ft.losses)
(False, 2)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import FineTuneError
from ..hooks import (check, fast_enabled, logits_to_keep, plain_attentions, plain_query_capture,
                     query_capture_hooks)
from ..models import unwrapped
from ..prompts import PromptPair
from .losses import _ce, _example_loss, _examples
from .params import trainable_parameters, training
from .result import FineTune, FineTunedModel
from .settings import (COLLAPSE_STD, DIVERGENCE_FACTOR, METHODS, RISE_FACTOR, FineTuneConfig,
                       learning_rate)


def finetune(
    model: Any,
    pair: PromptPair,
    method: str | FineTuneConfig = "dai",
    params: str = "kv",
    lr: float = 1e-3,
    *,
    steps: int = 1,
    epochs: int = 1,
    loss_tokens: str = "demo",
    record_queries: bool = True,
    seed: int = 0,
    fast: bool | None = None,
) -> FineTune:
    """Fine-tune on exactly ``pair``'s demonstrations; return the real deltas and a
    fine-tuned view of the model (see the module docstring for methods and parameter sets).
    The base model's parameters are restored exactly before returning. ``method`` may be a
    :class:`FineTuneConfig`, which then gives every setting (the keyword arguments it has must
    be left at their defaults). ``fast``: the steps run on the unwrapped Hugging Face model where
    its queries can be recorded without the bridge (:func:`icl_probe.hooks.plain_attentions`),
    its first forward checked against the bridge's (see :func:`_loss_function`); ``False``
    (or ``ICL_PROBE_FAST=0``) runs every step through the bridge."""
    if isinstance(method, FineTuneConfig):
        cfg, default = method, FineTuneConfig()
        given = dict(params=params, lr=lr, steps=steps, epochs=epochs, loss_tokens=loss_tokens)
        clash = [k for k, v in given.items() if v != getattr(default, k)]
        if clash:
            raise FineTuneError(f"finetune(config, {clash[0]}=...): give {clash[0]} in the "
                                "FineTuneConfig, not beside it")
        return finetune(model, pair, cfg.method, cfg.params, cfg.lr, steps=cfg.steps,
                        epochs=cfg.epochs, loss_tokens=cfg.loss_tokens,
                        record_queries=record_queries, seed=seed, fast=fast)
    if method not in METHODS:
        raise FineTuneError(f"method={method!r}: expected one of {METHODS}")
    if not pair.spans.demos:
        raise FineTuneError("finetune(): the prompt has no demonstrations to train on")
    lr = learning_rate(lr, "finetune(lr=...)")
    torch.manual_seed(seed)
    train = trainable_parameters(model, params)
    if not isinstance(steps, int) or steps < 1 or not isinstance(epochs, int) or epochs < 1:
        raise FineTuneError(f"steps={steps!r}, epochs={epochs!r}: both must be integers >= 1 "
                            "(a fine-tune that trains nothing is almost always a mistake)")
    examples = _examples(pair, loss_tokens)
    run = _train(model, pair, train, examples, method, lr, steps, epochs, record_queries, fast)
    view = FineTunedModel(model, run["deltas"])
    reason = _divergence(view, pair, examples, method, run)
    ft = FineTune(deltas=run["deltas"], losses=run["losses"], diverged=reason is not None,
                  method=method, params=params, lr=float(lr), step_queries=run["queries"],
                  step_demos=run["demo_of_step"], divergence=reason)
    ft.model = view
    return ft


def _train(model: Any, pair: PromptPair, train: dict[str, torch.nn.Parameter],
           examples: list, method: str, lr: float, steps: int, epochs: int,
           record_queries: bool, fast: bool | None = None) -> dict[str, Any]:
    """The training loop: the trained parameters' deltas, the loss of each step, the queries
    each step saw, whether it stopped on a non-finite loss or parameter, and the example the
    rising-loss rule watches with its loss before any step. The base model's parameters are
    restored exactly (from saved originals) however the loop ends."""
    run: dict[str, Any] = {"losses": [], "queries": [], "demo_of_step": [], "diverged": False,
                           "watched": 0, "first_before": None}
    q_store: list[torch.Tensor] = []
    # the queries as the model uses them (after QK-norm and rotary); full-batch GD records none
    record_queries = record_queries and method != "batch"
    canonical = sorted(range(len(examples)), key=lambda i: pair.demos[i])
    first = examples[canonical[0] if method == "batch" else 0]  # the first forward's example
    with training(model, train) as saved, _loss_function(model, method, q_store, record_queries,
                                                         fast, first) as (example_loss, final):
        plist = list(train.values())
        opt = torch.optim.Adam(plist, lr=lr) if method == "adam" else torch.optim.SGD(plist, lr=lr)

        def step(loss: torch.Tensor) -> bool:
            """One optimiser step; True when the run has diverged (and must stop)."""
            run["losses"].append(loss.item())
            if not math.isfinite(run["losses"][-1]):
                return True
            loss.backward()
            opt.step()
            return not all_finite(plist)

        if method == "batch":
            run["watched"] = canonical[0]  # the rising-loss rule's example
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                parts = [example_loss(*examples[i]) for i in canonical]
                if run["first_before"] is None:
                    run["first_before"] = float(parts[0].detach())
                if diverged := step(sum(parts) / len(examples)):
                    break
        else:
            diverged = False
            for _ in range(epochs if method == "adam" else 1):
                for i, (ids, mask) in enumerate(examples):
                    opt.zero_grad(set_to_none=True)
                    q_store.clear()
                    loss = example_loss(ids, mask)
                    if record_queries:
                        run["queries"].append(torch.stack(q_store))  # layer pos head d_head
                        run["demo_of_step"].append(i)
                    if diverged := step(loss):
                        break
                if diverged:
                    break
        run["diverged"] = diverged
        opt.zero_grad(set_to_none=True)  # the last step's gradients: not beside the deltas
        if final is not None and not diverged:  # the divergence rules' inputs, trained weights
            run["final"] = final(*examples[run["watched"]], pair.zs_ids)
        run["deltas"] = {n: (p.detach() - saved[n]) for n, p in train.items()}
    return run


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite. One sum per tensor decides it where their
    total is finite (NaN and +-inf propagate through a sum, so a finite total has no
    non-finite term); only a non-finite total, which finite values can also give by
    overflowing, pays the elementwise test. On the embedded model's kv parameters: 1 ms
    against 9 ms, at every step of a fine-tune."""
    with torch.no_grad():
        if math.isfinite(sum(float(t.sum()) for t in tensors)):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)


@contextlib.contextmanager
def _loss_function(model: Any, method: str, q_store: list, record_queries: bool,
                   fast: bool | None, first: tuple[torch.Tensor, torch.Tensor]
                   ) -> Iterator[tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                       Callable | None]]:
    """The loss of one example, as ``method`` trains it, appending each layer's queries to
    ``q_store`` when ``record_queries``; and, on the fast path, :func:`_final_pass` of the
    unwrapped model (None on the bridge's, where :func:`_divergence` runs the fine-tuned view).

    The fast path (not LCGD, whose loss reads the bridge's residual hooks; only where
    :func:`plain_attentions` finds the layers) runs the unwrapped Hugging Face model
    (:func:`icl_probe.models.unwrapped`): the same modules without the bridge's hook points,
    which cost about a fifth of a short example's forward on the embedded model (99 ms against
    77 ms for 20 tokens). It checks itself on
    every run: ``first``, the example its first forward sees, also runs through the bridge
    (without gradients) before training, and the first forward's logits and queries must
    match (:func:`icl_probe.hooks.check`)."""
    qhooks = query_capture_hooks(model, q_store) if record_queries else []
    attns = plain_attentions(model) if method != "lcgd" and fast_enabled(fast) else None
    if attns is None:
        yield (lambda ids, mask: _example_loss(model, ids, mask, method, qhooks)), None
        return
    device = next(model.parameters()).device
    with torch.no_grad(), model.hooks(fwd_hooks=qhooks):
        reference = {"logits": model(first[0][None].to(device))[0]}
    if record_queries:
        reference["queries"] = torch.stack(q_store)
        q_store.clear()
    pending = [reference]

    def loss(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.to(device), mask.to(device)
        logits = hf(input_ids=ids[None], use_cache=False).logits[0]
        if pending:
            ref = pending.pop()
            if not torch.equal(ids, first[0].to(device)):
                raise FineTuneError("internal: the fast fine-tune's check saw another example")
            got = {"logits": logits.detach()}
            if record_queries:
                got["queries"] = torch.stack(q_store)
            check("fine-tune on the unwrapped model", {k: (got[k], ref[k]) for k in ref},
                  logits.dtype)
        return _ce(logits, ids, mask)

    capture = (plain_query_capture(model, q_store, attns) if record_queries
               else contextlib.nullcontext())
    with unwrapped(model) as hf, capture:
        yield loss, lambda ids, mask, zs_ids: _final_pass(hf, ids, mask, zs_ids, q_store)


def _final_pass(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                zs_ids: torch.Tensor, q_store: list) -> tuple[float, torch.Tensor]:
    """The watched example's loss and the zero-shot prompt's logits at its prediction position,
    with the weights the model holds (the trained ones, before the restore): one no-grad forward
    of the unwrapped model on both, right-padded. Right padding is exact by construction for a
    causal model: a real position attends only to earlier positions, all real, and keeps its
    position index, so only float32 kernel rounding separates it from a forward of the row
    alone (the forward itself is the one the fast path checked before training). The
    divergence rules read them (:func:`_divergence`); on the bridge's
    path they are two forwards of the fine-tuned view, :func:`_final_loss` and
    :func:`_zero_shot_logits`, which the fast-path tests hold this to."""
    device = next(hf.parameters()).device
    seqs = [ids, zs_ids]
    batch = torch.zeros(2, max(len(x) for x in seqs), dtype=torch.long)
    attn = torch.zeros_like(batch)
    for r, x in enumerate(seqs):
        batch[r, : len(x)], attn[r, : len(x)] = x, 1
    with torch.inference_mode():
        logits = hf(input_ids=batch.to(device), attention_mask=attn.to(device),
                    use_cache=False).logits
    q_store.clear()  # what the query hooks recorded of this forward: no step's
    return float(_ce(logits[0, : len(ids)], ids.to(device), mask.to(device))), \
        logits[1, len(zs_ids) - 1]


def _divergence(view: FineTunedModel, pair: PromptPair, examples: list, method: str,
                run: dict[str, Any]) -> str | None:
    """Why a finished run counts as diverged, or None: a non-finite loss or parameter, a
    collapsed output, a final loss above 3x the first, or a trained example whose loss rose
    above 2x (docs/protocol.md)."""
    losses = run["losses"]
    if run["diverged"]:
        return "non-finite loss or parameter"
    final = run.get("final")  # the fast path's one forward of both (see _final_pass)
    if is_collapsed(final[1] if final else _zero_shot_logits(view, pair)):
        return (f"collapsed output: the fine-tuned logits at p on the zero-shot prompt vary "
                f"by less than {COLLAPSE_STD:g} (std over the vocabulary)")
    if len(losses) > 1 and losses[-1] > DIVERGENCE_FACTOR * losses[0]:
        return (f"final loss {losses[-1]:.3g} > {DIVERGENCE_FACTOR:g} x the first "
                f"({losses[0]:.3g})")
    # LCGD's loss decodes every layer over the vocabulary (8 % of a k = 8 fine-tune on the
    # embedded model): its runs of 3+ steps are left to the 3x rule above
    if method == "lcgd" and len(losses) >= 3:
        return None
    before = losses[0] if run["first_before"] is None else run["first_before"]
    watched = run["watched"]
    after = final[0] if final else _final_loss(view, *examples[watched], method)
    if not after <= RISE_FACTOR * before:
        return (f"loss rose on a trained example: demonstration {watched}'s loss is "
                f"{after:.3g} after training, {before:.3g} before (> {RISE_FACTOR:g}x)")
    return None


def is_collapsed(logits: torch.Tensor) -> bool:
    """Whether logits over the vocabulary (d_vocab) have collapsed to a constant: their
    standard deviation is below :data:`COLLAPSE_STD` (non-finite logits count as collapsed)."""
    std = float(logits.double().std())
    return not std >= COLLAPSE_STD


def _final_loss(view: FineTunedModel, ids: torch.Tensor, mask: torch.Tensor,
                method: str) -> float:
    """One example's loss, as ``method`` trains it, with the fine-tuned weights (LCGD decodes
    every layer through the final norm and unembedding outside the forward, so its weights are
    patched for the whole computation)."""
    with torch.inference_mode():
        if method != "lcgd":
            return float(_example_loss(view, ids, mask, method, []))
        with view.applied():
            return float(_example_loss(view._base, ids, mask, method, []))


def _zero_shot_logits(view: FineTunedModel, pair: PromptPair) -> torch.Tensor:
    """The fine-tuned view's logits at the prediction position of ``pair``'s zero-shot prompt
    (one short forward)."""
    ids = pair.zs_ids
    device = next(view.parameters()).device
    keep, kw = logits_to_keep(view, torch.tensor([len(ids) - 1]))
    with torch.inference_mode():
        logits = view(ids[None].to(device), **kw)
    return logits[0, keep[0]]


def finetune_sweep(model: Any, pair: PromptPair, lrs: Sequence[float], **kwargs: Any
                   ) -> list[FineTune]:
    """:func:`finetune` at each learning rate; diverged runs are kept (``ft.diverged``)."""
    return [finetune(model, pair, lr=lr, **kwargs) for lr in lrs]

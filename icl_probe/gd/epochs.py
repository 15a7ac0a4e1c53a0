"""Fine-tuning over many epochs, as Shen et al. (2024) ran it: SGD or Adam on mini-batches of
the demonstrations, with the metrics read at checkpoints of the same run, never re-trained to
reach a later epoch (docs/science.md, Gradient-descent comparators).

A run trains the selected parameters in place for ``epochs`` epochs. After every
``eval_every``-th epoch, and after the last, it calls ``checkpoint(epoch, model)`` with the
model holding the trained weights. It then restores the base weights exactly, from the saved
originals. An epoch takes the demonstrations in prompt order, in consecutive batches of
``batch_size``; the last batch may be smaller, and ``None`` means one batch of all of them
(full-batch GD). A batch's loss is the mean of its examples' losses. By default a loss reads
only the label tokens, Shen et al.'s choice; ``loss_tokens`` gives the other choices of
:func:`icl_probe.finetune`. A full batch sums its examples in a canonical order (by item
index), so full-batch GD does not depend on the prompt's order at all, bit for bit.

Shen et al.'s sub-model GD (ĜD) trains ``W_V`` of one layer: ``params="v:mid"`` is layer
``⌊L/2⌋``, ``"v:deep"`` is layer ``⌊3L/4⌋`` (:func:`sub_model_layer`). The paper says only "a
middle" and "a deep" layer, so this is our choice; ``"v:L"`` names any other layer.

>>> import icl_probe as ip
>>> from icl_probe.gd import EpochFineTune, finetune_epochs
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> seen = []
>>> run = finetune_epochs(model, pair, EpochFineTune(params="v:mid", epochs=3, lr=1e-2),
...                       eval_every=2, checkpoint=lambda epoch, m: seen.append(epoch))
>>> seen, len(run.losses), sorted(run.deltas)
([2, 3], 3, ['model.layers.1.self_attn.v_proj.weight'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import FineTuneError
from ..prompts import PromptPair
from .losses import _example_loss, _examples
from .params import trainable_parameters, training
from .settings import LOSS_TOKENS, learning_rate

OPTIMIZERS = ("sgd", "adam")
SUB_MODEL_LAYERS = ("v:mid", "v:deep")

Checkpoint = Callable[[int, Any], None]


def sub_model_layer(name: str, n_layers: int) -> int:
    """The layer whose ``W_V`` Shen et al.'s sub-model GD trains: ``"v:mid"`` is ``⌊L/2⌋``,
    ``"v:deep"`` is ``⌊3L/4⌋`` (on 30 layers: 15 and 22; on 32: 16 and 24)."""
    if name == "v:mid":
        return n_layers // 2
    if name == "v:deep":
        return (3 * n_layers) // 4
    raise FineTuneError(f"sub_model_layer({name!r}): expected one of {SUB_MODEL_LAYERS}")


def resolve_params(params: str, n_layers: int) -> str:
    """``params`` with ``v:mid`` / ``v:deep`` replaced by ``v:L`` for a model of
    ``n_layers`` layers; any other parameter set unchanged."""
    return f"v:{sub_model_layer(params, n_layers)}" if params in SUB_MODEL_LAYERS else params


@dataclass(frozen=True)
class EpochFineTune:
    """One of Shen et al.'s fine-tuning settings: ``params`` (``all``, ``kv``, ``qkvo``,
    ``mlp``, ``v:mid``, ``v:deep`` or ``v:L``), ``optimizer`` (``sgd``, ``adam``),
    ``batch_size`` (``None``: full batch), ``epochs``, ``lr`` and ``loss_tokens``
    (``label``, Shen's choice; ``demo``; ``demo+sep``)."""

    params: str = "all"
    optimizer: str = "sgd"
    batch_size: int | None = None
    epochs: int = 1
    lr: float = 1e-3
    loss_tokens: str = "label"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise FineTuneError(f"EpochFineTune(optimizer={self.optimizer!r}): expected one of "
                                f"{OPTIMIZERS}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise FineTuneError(f"EpochFineTune(loss_tokens={self.loss_tokens!r}): expected one "
                                f"of {LOSS_TOKENS}")
        for name in ("batch_size", "epochs"):
            v = getattr(self, name)
            if (v is not None or name == "epochs") and (
                    not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise FineTuneError(f"EpochFineTune({name}={v!r}): expected an integer >= 1"
                                    + (" (or None: full batch)" if name == "batch_size" else ""))
        object.__setattr__(self, "lr", learning_rate(self.lr, "EpochFineTune(lr=...)"))

    @property
    def name(self) -> str:
        """``sgd[b=1]``, ``sgd[full]``, ``adam[b=2]``, with the parameter set unless ``all``."""
        batch = "full" if self.batch_size is None else f"b={self.batch_size}"
        return f"{self.optimizer}[{batch}]" + ("" if self.params == "all" else
                                               f"[{self.params}]")


@dataclass
class EpochRun:
    """What a run of :func:`finetune_epochs` leaves: the loss of every step, per epoch; the
    epochs it checkpointed; the epoch it diverged in (a non-finite loss or parameter; it
    stops there), or None; and the final deltas ``θ − θ_0`` of the trained parameters."""

    losses: list[list[float]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    diverged_at: int | None = None
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)


def finetune_epochs(model: Any, pair: PromptPair | Sequence[PromptPair], cfg: EpochFineTune, *,
                    eval_every: int = 1,
                    checkpoint: Checkpoint | None = None, seed: int = 0,
                    keep_deltas: bool = True) -> EpochRun:
    """Fine-tune on ``pair``'s demonstrations for ``cfg.epochs`` epochs (see the module
    docstring), calling ``checkpoint(epoch, model)`` after every ``eval_every``-th epoch and
    after the last, with the trained weights in place (under ``torch.inference_mode``). The
    base model's parameters are restored exactly before returning, also on error.
    ``keep_deltas=False`` leaves ``run.deltas`` empty: for whole-model training that is one
    copy of the weights less at the peak (Shen et al.'s curves read only the checkpoints).

    ``pair`` may be a list of prompts: the training set is then every prompt's demonstrations,
    in list order (more demonstrations than one prompt's context holds: Shen et al.'s Table 1)."""
    pairs = [pair] if isinstance(pair, PromptPair) else list(pair)
    if not pairs or not all(p.spans.demos for p in pairs):
        raise FineTuneError("finetune_epochs(): a prompt has no demonstrations to train on")
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1:
        raise FineTuneError(f"finetune_epochs(eval_every={eval_every!r}): expected an integer "
                            ">= 1 (epochs between checkpoints)")
    train = trainable_parameters(model, resolve_params(cfg.params, model.cfg.n_layers))
    examples = [e for p in pairs for e in _examples(p, cfg.loss_tokens)]
    batches = _batches([d for p in pairs for d in p.demos], cfg.batch_size)
    torch.manual_seed(seed)
    run = EpochRun()
    with training(model, train) as saved:
        plist = list(train.values())
        # Adam one parameter at a time: the multi-tensor path allocates temporaries the size
        # of every trained parameter at once (+12.8 GiB for whole-model Adam at LLaMA-7B
        # size, measured on an H200: 77.2 GiB, over an 80 GB GPU)
        opt = (torch.optim.Adam(plist, lr=cfg.lr, foreach=False) if cfg.optimizer == "adam"
               else torch.optim.SGD(plist, lr=cfg.lr))
        for epoch in range(1, cfg.epochs + 1):
            run.losses.append(_epoch(model, examples, batches, opt, plist))
            if not all(math.isfinite(x) for x in run.losses[-1]) or \
                    not all(torch.isfinite(p).all() for p in plist):
                run.diverged_at = epoch
                break
            if checkpoint is not None and (epoch % eval_every == 0 or epoch == cfg.epochs):
                with torch.inference_mode():
                    checkpoint(epoch, model)
                run.checkpoints.append(epoch)
        if keep_deltas:
            run.deltas = {n: p.detach() - saved[n] for n, p in train.items()}
    return run


def _batches(items: list[int], batch_size: int | None) -> list[list[int]]:
    """The demonstrations (positions in training order; ``items`` are their task item
    indices) of each step of an epoch: consecutive batches of ``batch_size``; one batch, in
    canonical order (by item index), when None or at least the number of demonstrations."""
    n = len(items)
    if batch_size is None or batch_size >= n:
        return [sorted(range(n), key=lambda i: items[i])]
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def _epoch(model: Any, examples: list, batches: list[list[int]], opt: torch.optim.Optimizer,
           plist: list[torch.nn.Parameter]) -> list[float]:
    """One epoch: a step per batch on the mean of its examples' losses; the losses."""
    losses = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = sum(_example_loss(model, *examples[i], "dai", []) for i in batch) / len(batch)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
    return losses

"""The training examples of a prompt's demonstrations and the loss each method trains on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FineTuneError
from ..prompts import PromptPair, Span
from .settings import LOSS_TOKENS


def _examples(pair: PromptPair, loss_tokens: str = "demo"
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, targets mask over positions 1..) for each demonstration, in prompt order.

    One training example is ``[BOS] + the demonstration's tokens``. ``loss_tokens``:
    ``"demo"`` (Dai et al.'s code: the input and label tokens; the separator between
    demonstrations is stripped from the example), ``"demo+sep"`` (the separator kept and
    scored too), ``"label"`` (only the label tokens are scored)."""
    if loss_tokens not in LOSS_TOKENS:
        raise FineTuneError(f"loss_tokens={loss_tokens!r}: expected one of {LOSS_TOKENS}")
    out = []
    bos = pair.icl_ids[: pair.spans.bos.stop] if pair.spans.bos is not None else pair.icl_ids[:0]
    for d in pair.spans.demos:
        whole = d.whole if loss_tokens == "demo+sep" else Span(d.input.start, d.label.stop)
        ids = torch.cat([bos, pair.icl_ids[whole.slice]])
        off = len(bos) - whole.start
        mask = torch.zeros(len(ids), dtype=torch.bool)
        span = d.label if loss_tokens == "label" else whole
        mask[span.start + off: span.stop + off] = True
        mask[0] = False  # the first token has nothing to be predicted from
        out.append((ids, mask))
    return out


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[t] from logits[t-1] over masked positions t."""
    t = mask.nonzero()[:, 0]
    return _ce_rows(logits[t - 1], ids[t])


def _ce_rows(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` under the logits rows ``x`` (in float32 for a
    half-precision model)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.cross_entropy(x, targets)


def _example_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, method: str,
                  qhooks: list) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = mask.to(device)
    if method != "lcgd":
        with model.hooks(fwd_hooks=qhooks):
            logits = model(ids[None])[0]
        return _ce(logits, ids, mask)
    outs: list[torch.Tensor] = []
    hooks = list(qhooks)
    for l in range(model.cfg.n_layers):
        hooks.append((f"blocks.{l}.hook_resid_pre", lambda x, hook=None: x.detach()))
        hooks.append((f"blocks.{l}.hook_resid_post", lambda x, hook=None: outs.append(x)))
    with model.hooks(fwd_hooks=hooks):
        model(ids[None])
    # logit lens through the frozen final norm and unembedding, at the positions the loss
    # reads only (each position is normed and unembedded on its own: the same logits)
    t = mask.nonzero()[:, 0]
    return sum(_ce_rows(model.unembed(model.ln_final(x[:, t - 1]))[0], ids[t]) for x in outs)

"""Which candidate answer a run predicts.

A prompt's ``scoring`` (set by :func:`icl_probe.build_prompt`) says how: ``"first_token"``
takes the argmax over the candidates' first-token logits at the prediction position (label
accuracy, as the anchors read classification tasks with single-token verbalizers);
``"full_answer"`` takes the argmax of each candidate's whole log-probability,
``log p(a_1 | prompt) + log p(a_2 | prompt, a_1) + …``, for open-ended tasks where two answers
share a first token ("Paris" / "Parisian") and the first token alone would merge them.

The continuations run on top of the prompt's own key/value cache (the prompt runs once, each
candidate's tokens after it), batched over candidates.

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> pair.scoring                       # the byte tokenizer: many capitals share a first byte
'full_answer'
>>> lp = answer_logprobs(model, [pair], "zs")
>>> lp.shape == (1, len(pair.labels))
True
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from .hooks import logits_to_keep
from .prompts import PromptPair

CANDIDATE_BATCH = 64


def answer_logprobs(model: Any, pairs: Sequence[PromptPair], kind: str,
                    pred_logits: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(answer | prompt)`` of every candidate answer (batch candidate), float64.

    ``pred_logits`` (batch d_vocab): the logits at each prompt's prediction position, when the
    caller has them already (the first answer token's term); otherwise they are computed."""
    device = next(model.parameters()).device
    width = max(len(p.candidates) for p in pairs)
    out = torch.full((len(pairs), width), float("-inf"), dtype=torch.float64)
    with torch.inference_mode():
        for b, pair in enumerate(pairs):
            ids = pair.ids(kind).to(device)
            _, keep = logits_to_keep(model, torch.tensor([len(ids) - 1]))
            logits, cache = model(ids[None], return_type="logits_and_cache", **keep)
            first = torch.log_softmax((pred_logits[b] if pred_logits is not None
                                       else logits[0, -1]).double(), -1)
            cands = pair.candidates
            total = torch.tensor([float(first[c[0]]) for c in cands], dtype=torch.float64)
            longer = [i for i, c in enumerate(cands) if len(c) > 1]
            for s in range(0, len(longer), CANDIDATE_BATCH):
                chunk = longer[s: s + CANDIDATE_BATCH]
                total[chunk] += _continuations(model, ids, cache, [cands[i] for i in chunk],
                                               device)
            out[b, : len(cands)] = total
    return out


def _continuations(model: Any, ids: torch.Tensor, cache: Any, cands: list[tuple[int, ...]],
                   device: torch.device) -> torch.Tensor:
    """Σ_{t ≥ 2} log p(a_t | prompt, a_<t) for each candidate, on the prompt's cache."""
    L = max(len(c) for c in cands) - 1
    inp = torch.zeros((len(cands), L), dtype=torch.long)
    mask = torch.zeros((len(cands), len(ids) + L), dtype=torch.long)
    mask[:, : len(ids)] = 1
    for r, c in enumerate(cands):
        inp[r, : len(c) - 1] = torch.tensor(c[:-1])
        mask[r, len(ids): len(ids) + len(c) - 1] = 1
    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(cands))
        logits = model(inp.to(device), past_key_values=c, attention_mask=mask.to(device))
    else:  # no cache from this model: the whole prompt again, per candidate
        full = torch.cat([ids.cpu()[None].expand(len(cands), -1), inp], 1)
        logits = model(full.to(device), attention_mask=mask.to(device))[:, len(ids):]
    logp = torch.log_softmax(logits.double(), -1).cpu()
    out = torch.zeros(len(cands), dtype=torch.float64)
    for r, c in enumerate(cands):
        # logits at suffix slot t predict the candidate's token t + 1
        for t in range(len(c) - 1):
            out[r] += logp[r, t, c[t + 1]]
    return out


def predictions(model: Any, pairs: Sequence[PromptPair], kind: str,
                pred_logits: torch.Tensor) -> torch.Tensor:
    """The index of the candidate each run predicts, by each pair's own ``scoring``."""
    out = torch.empty(len(pairs), dtype=torch.long)
    full = [b for b, p in enumerate(pairs) if p.scoring == "full_answer"]
    for b, p in enumerate(pairs):
        if p.scoring != "full_answer":
            out[b] = int(pred_logits[b][p.label_ids.to(pred_logits.device)].argmax())
    if full:
        lp = answer_logprobs(model, [pairs[b] for b in full], kind, pred_logits[full])
        for j, b in enumerate(full):
            out[b] = int(lp[j, : len(pairs[b].candidates)].argmax())
    return out

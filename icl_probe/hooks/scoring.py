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

from ..models import check_layer
from ..models.compat import quiet_cache_rename
from ..prompts import PromptPair
from . import selfcheck
from .capture import hook_names, logits_to_keep
from .quantities import fired_hooks
from .selfcheck import fast_enabled

CANDIDATE_BATCH = 64


def answer_logprobs(model: Any, pairs: Sequence[PromptPair], kind: str,
                    pred_logits: torch.Tensor | None = None, *,
                    fast: bool | None = None) -> torch.Tensor:
    """``log p(answer | prompt)`` of every candidate answer (batch candidate), float64.

    ``pred_logits`` (batch d_vocab): the logits at each prompt's prediction position, when the
    caller has them already (the first answer token's term); otherwise they are computed.
    The continuations run on the prompt's key/value cache; ``fast=False`` (or
    ``ICL_PROBE_FAST=0``) runs the whole prompt again for each candidate instead. The cache
    path checks itself once per call (:mod:`icl_probe.selfcheck`): the first multi-token
    candidate also runs whole, in the forward that builds its prompt's cache, and its
    continuation's logits and last-layer scores are compared."""
    device = next(model.parameters()).device
    width = max(len(p.candidates) for p in pairs)
    out = torch.full((len(pairs), width), float("-inf"), dtype=torch.float64)
    probe: _Probe | None = _Probe(model) if fast_enabled(fast) else None
    with torch.inference_mode(), quiet_cache_rename():
        for b, pair in enumerate(pairs):
            ids = pair.ids(kind).to(device)
            cands = pair.candidates
            longer = [i for i, c in enumerate(cands) if len(c) > 1]
            if probe is not None and not probe.done and longer:
                probe.row = longer[0]
                logits, cache = probe.run_whole(ids, cands[longer[0]])
            else:
                _, keep = logits_to_keep(model, torch.tensor([len(ids) - 1]))
                logits, cache = model(ids[None], return_type="logits_and_cache", **keep)
                logits = logits[0, -1]
            if probe is None:
                cache = None
            first = torch.log_softmax((pred_logits[b] if pred_logits is not None
                                       else logits).double(), -1)
            total = torch.tensor([float(first[c[0]]) for c in cands], dtype=torch.float64)
            for s in range(0, len(longer), CANDIDATE_BATCH):
                chunk = longer[s: s + CANDIDATE_BATCH]
                check = probe if (probe is not None and probe.row in chunk
                                  and not probe.done) else None
                total[chunk] += _continuations(model, ids, cache, [cands[i] for i in chunk],
                                               device, check, chunk)
            out[b, : len(cands)] = total
    return out


class _Probe:
    """The self-check of the cache path: one candidate run whole (prompt and answer in one
    forward, the slow exact path) against the same candidate on the prompt's cache."""

    def __init__(self, model: Any):
        self.model = model
        self.layer = check_layer(model)
        names, _ = hook_names(model)
        self.hook = names["scores"].format(l=self.layer) \
            if names["scores"] in fired_hooks(model) and self.layer >= 0 else None
        self.row = -1
        self.done = False
        self.slow: dict[str, torch.Tensor] = {}
        self.n_keys = 0

    def run_whole(self, ids: torch.Tensor, cand: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
        """The prompt and ``cand``'s tokens but the last, in one forward: returns the logits
        at the prediction position and the cache cut back to the prompt."""
        model = self.model
        whole = torch.cat([ids, torch.tensor(cand[:-1], device=ids.device)])
        self.n_keys = len(whole)
        positions = torch.arange(len(ids) - 1, len(whole))
        keep, kw = logits_to_keep(model, positions)
        hooks = []
        if self.hook is not None:
            hooks.append((self.hook, lambda x, hook=None: self.slow.__setitem__(
                "scores", x[0, :, -1, :])))
        with model.hooks(fwd_hooks=hooks):
            logits, cache = model(whole[None], return_type="logits_and_cache", **kw)
        logits = logits[0, keep.to(logits.device)]  # prompt end, then each answer token
        self.slow["logits"] = logits[1:]
        try:  # cut the cache back to the prompt (a negative count removes tokens)
            cache.crop(-(len(cand) - 1))
        except (AttributeError, RuntimeError, ValueError, NotImplementedError):
            # a sliding-window cache cannot roll back: the prompt alone builds its cache
            _, keep1 = logits_to_keep(model, torch.tensor([len(ids) - 1]))
            _, cache = model(ids[None], return_type="logits_and_cache", **keep1)
        return logits[0], cache

    def compare(self, logits: torch.Tensor, scores: torch.Tensor | None) -> None:
        checks = {"continuation logits": (logits, self.slow["logits"])}
        if scores is not None and "scores" in self.slow:
            checks[f"scores of layer {self.layer}"] = (scores, self.slow["scores"])
        selfcheck.check("answer_logprobs", checks, next(self.model.parameters()).dtype)
        self.done = True


def _continuations(model: Any, ids: torch.Tensor, cache: Any, cands: list[tuple[int, ...]],
                   device: torch.device, probe: _Probe | None = None,
                   rows: list[int] | None = None) -> torch.Tensor:
    """Σ_{t ≥ 2} log p(a_t | prompt, a_<t) for each candidate, on the prompt's cache (or the
    whole prompt again per candidate without one). ``probe``: compare the candidate at
    ``probe.row`` (of ``rows``) with its whole-forward run."""
    L = max(len(c) for c in cands) - 1
    inp = torch.zeros((len(cands), L), dtype=torch.long)
    mask = torch.zeros((len(cands), len(ids) + L), dtype=torch.long)
    mask[:, : len(ids)] = 1
    for r, c in enumerate(cands):
        inp[r, : len(c) - 1] = torch.tensor(c[:-1])
        mask[r, len(ids): len(ids) + len(c) - 1] = 1
    if cache is not None and hasattr(cache, "batch_repeat_interleave"):
        r = rows.index(probe.row) if probe is not None else -1
        n = len(cands[r]) - 1
        fast: dict[str, torch.Tensor] = {}
        hooks = []
        if probe is not None and probe.hook is not None:
            hooks.append((probe.hook, lambda x, hook=None: fast.__setitem__(
                "scores", x[r, :, n - 1, : probe.n_keys])))
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(cands))
        with model.hooks(fwd_hooks=hooks):
            logits = model(inp.to(device), past_key_values=c, attention_mask=mask.to(device))
        if probe is not None:
            probe.compare(logits[r, :n], fast.get("scores"))
    else:  # no cache (or the slow path asked for): the whole prompt again, per candidate
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
                pred_logits: torch.Tensor, *, fast: bool | None = None) -> torch.Tensor:
    """The index of the candidate each run predicts, by each pair's own ``scoring``
    (``fast``: see :func:`answer_logprobs`)."""
    out = torch.empty(len(pairs), dtype=torch.long)
    full = [b for b, p in enumerate(pairs) if p.scoring == "full_answer"]
    for b, p in enumerate(pairs):
        if p.scoring != "full_answer":
            out[b] = int(pred_logits[b][p.label_ids.to(pred_logits.device)].argmax())
    if full:
        lp = answer_logprobs(model, [pairs[b] for b in full], kind, pred_logits[full],
                             fast=fast)
        for j, b in enumerate(full):
            out[b] = int(lp[j, : len(pairs[b].candidates)].argmax())
    return out

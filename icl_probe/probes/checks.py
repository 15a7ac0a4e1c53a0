"""What the probes accept: prompt pairs with demonstrations whose spans tile their tokens."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ProbeError
from ..prompts import PromptPair


def check_pairs(pairs: Sequence[PromptPair]) -> None:
    """Every pair has demonstrations and spans that match its tokens."""
    if not pairs:
        raise ProbeError("implied_updates(): no prompt pairs given")
    for i, p in enumerate(pairs):
        if not isinstance(p, PromptPair):
            raise ProbeError(f"pair {i}: expected a PromptPair from ip.build_prompt, got "
                             f"{type(p).__name__}")
        if not p.spans.demos:
            raise ProbeError(
                f"pair {i} (task {p.task!r}, query {p.query}) has no demonstrations: an implied "
                "update needs k >= 1 (build it with ip.build_prompt(..., k=8))"
            )
        s, n = p.spans, len(p.icl_ids)
        covered = torch.cat([s.query_indices(), s.demo_indices()]).sort().values
        problems = []
        if s.pred != n - 1:
            problems.append(f"pred={s.pred} but the prompt has {n} tokens")
        if not torch.equal(covered, torch.arange(n)):
            problems.append("BOS + demonstration + query spans do not tile the prompt")
        q_idx = s.query_indices()
        if len(p.zs_ids) != len(q_idx) or (q_idx.numel() and q_idx.max() >= n) or \
                not torch.equal(p.icl_ids[q_idx.clamp(max=n - 1)], p.zs_ids):
            problems.append("the ZS ids are not the ICL prompt's BOS + query tokens")
        if problems:
            raise ProbeError(f"pair {i} (task {p.task!r}, query {p.query}): spans do not match "
                             f"the tokens: {'; '.join(problems)}. Rebuild it with ip.build_prompt")

"""Causal tests of "ICL is an implicit weight update", and its rivals (docs/science.md, Causal
tests): implied updates replayed into the weights (:func:`replay`) and transferred to other
queries (:func:`transfer`); task vectors (Hendel et al. 2023) and function vectors (Todd et
al. 2024)."""

from .functions import function_vector, head_sum, indirect_effects
from .patches import REPLAY_UPDATES
from .replay import REPLAY_BASELINES, ReplayResult, layer_subsets, replay, transfer
from .vectors import VectorResult, hidden_at_pred, patched_hits, patched_logits, task_vector

__all__ = ["REPLAY_BASELINES", "REPLAY_UPDATES", "ReplayResult", "VectorResult",
           "function_vector", "head_sum", "hidden_at_pred", "indirect_effects", "layer_subsets",
           "patched_hits", "patched_logits", "replay", "task_vector", "transfer"]

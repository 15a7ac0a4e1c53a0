"""Causal tests of "ICL is an implicit weight update", and its rivals: task vectors (Hendel et
al. 2023) so far (docs/science.md)."""

from .vectors import VectorResult, hidden_at_pred, patched_hits, patched_logits, task_vector

__all__ = ["VectorResult", "hidden_at_pred", "patched_hits", "patched_logits", "task_vector"]

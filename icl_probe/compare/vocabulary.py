"""The names a comparison is made of: its protocols, baseline runs, reading positions,
similarities with the baselines each is read against, and what each run traces."""

from __future__ import annotations

PROTOCOLS = ("shared", "per_query")


BASELINES = ("shuffled_labels", "untrained", "embeddings_only")


POSITIONS = ("pred", "label")


# Similarities and the baselines each is read against (the per-query random ones and SimAM's
# "before" live beside the metric in the same run; the others are runs of their own).
SIMILARITIES = ("SimAOU_norm", "SimAOU", "SimAM_after", "SimAM_delta", "Kendall",
                "Kendall_example", "weight_cos", "Rec2FTP")


IN_RUN_BASELINES = {
    "SimAOU_norm": ("random_update", "uniform_random"),
    "SimAOU": ("random_update", "uniform_random"),
    "SimAM_after": ("SimAM_before",),
    "SimAM_delta": ("random_update",),
    "Kendall": ("uniform_random",),
    "Kendall_example": ("uniform_random",),
    "weight_cos": ("random_update",),
}


# per-layer intervals (for the figures) of these metrics of the model's own run
LAYER_CI_METRICS = ("SimAOU_norm", "SimAOU", "SimAM_delta", "Kendall", "weight_cos")


ICL_WHAT = ("scores", "attn_out")


ZS_BATCH = 32  # zero-shot prompts are short: larger batches cost little memory


EVAL_CHUNK = ZS_BATCH  # queries whose fine-tuned and zero-shot traces an evaluation holds at
# once: one zero-shot batch of the fine-tuned model per chunk (a forward streams the weights, so
# on a CPU two half batches cost nearly twice one)


ZS_WHAT = ("q", "k", "v", "scores", "attn_out")  # a fine-tuned model's zero-shot trace

# what the zero-shot reference record keeps for reuse by every fine-tune of a (task, seed,
# variant); its full-length k and v (most of a process's memory at 7B) are traced again, in
# one short batch, by each evaluation that needs them (compare.evaluation)
ZS_HELD = ("scores", "attn_out")


def baseline_column(metric: str, baseline: str) -> str:
    """The per-layer table's column holding an in-run baseline's value beside ``metric``
    (``SimAOU_norm|random_update``). Per-layer tables stay wide, one row per (query, layer),
    and are written to disk as earlier releases wrote them, so their output directories
    resume; :func:`split_column` reads the name back, and the summary is tidy (``metric`` and
    ``baseline`` columns)."""
    return f"{metric}|{baseline}"


def split_column(column: str) -> tuple[str, str]:
    """``(metric, baseline)`` of a per-layer column (``baseline`` is ``""`` for the metric's
    own value)."""
    metric, _, baseline = column.partition("|")
    return metric, baseline

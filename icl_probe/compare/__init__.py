"""Compare: ICL against real gradient descent as the anchors ran it (:func:`compare`), the
field's metrics, the baselines each is read against, bootstrap intervals and verdicts, the
learning-rate selection and Shen et al.'s order sensitivity (docs/protocol.md).

Above :mod:`icl_probe.probes` and :mod:`icl_probe.gd`; below the experiments
(docs/architecture.md).
"""

from . import metrics, stats
from .metrics import (kendall_icl_ft, kendall_tau, kl, order_sensitivity, overlap_cosine, rec2ftp,
                      same_norm_random, simam, simaou, simaou_uniform_random, top_overlap,
                      uniform_random_cos)
from .order import order_sensitivity_table
from .protocol import Comparison, Tables, compare
from .shen import (SHEN_METRICS, checkpoint_table, many_demos_table, order_curves,
                   shen_curves)
from .queries import demonstrations, resolve_queries
from .summary import (ANCHORS, TABLE_METRICS, anchor_column, compact_table, lr_grid, select_lr,
                      summarise, sweep_rows)
from .vocabulary import (BASELINES, EVAL_CHUNK, ICL_WHAT, IN_RUN_BASELINES, LAYER_CI_METRICS,
                         POSITIONS, PROTOCOLS, SIMILARITIES, ZS_BATCH, ZS_HELD, ZS_WHAT)

__all__ = [
    "ANCHORS", "BASELINES", "Comparison", "EVAL_CHUNK", "ICL_WHAT", "IN_RUN_BASELINES",
    "LAYER_CI_METRICS", "POSITIONS", "PROTOCOLS", "SIMILARITIES", "TABLE_METRICS", "Tables",
    "ZS_BATCH", "ZS_HELD",
    "ZS_WHAT",
    "anchor_column", "compact_table", "compare", "demonstrations", "kendall_icl_ft",
    "kendall_tau", "kl", "lr_grid", "metrics", "order_sensitivity", "order_sensitivity_table",
    "overlap_cosine", "rec2ftp", "resolve_queries", "same_norm_random", "select_lr", "simam",
    "simaou", "simaou_uniform_random", "stats", "summarise", "sweep_rows", "top_overlap",
    "uniform_random_cos", "SHEN_METRICS", "checkpoint_table", "many_demos_table", "order_curves",
    "shen_curves",
]

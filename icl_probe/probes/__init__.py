"""Probes: implied weight updates read off ICL activations, per layer and head at the
prediction position (docs/science.md, Implied weight updates), the identities they rest on
checked on the real model, their trajectory over demonstrations, a first look at one prompt,
and their figures.

Above :mod:`icl_probe.hooks`; beside :mod:`icl_probe.gd`, which it never imports
(docs/architecture.md).
"""

from .checks import check_pairs
from .identities import CONSISTENCY_CHECK, MODEL_IDENTITY, verify_identities
from .inspect import demo_mass, inspect_pair, inspect_text, mass_heatmap, text_heatmap
from .mlp import mlp_first_layers, run_mlp
from .result import ImpliedUpdates
from .trajectory import update_trajectory
from .updates import implied_updates, model_space_trace_what

__all__ = [
    "CONSISTENCY_CHECK", "ImpliedUpdates", "MODEL_IDENTITY", "check_pairs", "demo_mass",
    "implied_updates", "inspect_pair", "inspect_text", "mass_heatmap", "mlp_first_layers",
    "model_space_trace_what", "run_mlp", "text_heatmap", "update_trajectory",
    "verify_identities",
]

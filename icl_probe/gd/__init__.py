"""Gradient descent: real fine-tunes on exactly the demonstrations of an ICL prompt
(docs/science.md, Gradient-descent comparators), their deltas, and the fine-tuned model seen
through them. The methods and parameter sets: :mod:`icl_probe.gd.training`.

Above :mod:`icl_probe.hooks`; beside :mod:`icl_probe.probes`, which it never imports
(docs/architecture.md).
"""

from .epochs import (OPTIMIZERS, SUB_MODEL_LAYERS, EpochFineTune, EpochRun, finetune_epochs,
                     resolve_params, sub_model_layer)
from .params import (PROJECTIONS, Projection, attention_projections, canonical_name,
                     named_parameters, parameter_layers, split_projections, trainable_parameters)
from .result import FineTune, FineTunedModel
from .settings import (COLLAPSE_STD, DIVERGENCE_FACTOR, LOSS_TOKENS, METHODS, PARAM_SETS,
                       RISE_FACTOR, FineTuneConfig, as_config, as_configs, learning_rate)
from .training import finetune, finetune_sweep, is_collapsed

__all__ = [
    "COLLAPSE_STD", "DIVERGENCE_FACTOR", "EpochFineTune", "EpochRun", "FineTune",
    "FineTuneConfig", "FineTunedModel", "OPTIMIZERS", "SUB_MODEL_LAYERS", "finetune_epochs",
    "resolve_params", "sub_model_layer",
    "LOSS_TOKENS", "METHODS", "PARAM_SETS", "PROJECTIONS", "Projection", "RISE_FACTOR",
    "as_config", "as_configs", "attention_projections", "canonical_name", "finetune",
    "finetune_sweep", "is_collapsed", "learning_rate", "named_parameters", "parameter_layers",
    "split_projections", "trainable_parameters",
]

"""In-context regression, linear self-attention and gradient descent (docs/science.md:
Linear self-attention and GD on regression; Trained probes; Linear-attention dual form).

Von Oswald et al. 2023 ("Transformers learn in-context by gradient descent") show that one
linear self-attention (LSA) layer with hand-built weights makes exactly one GD step on a
regression loss over its context, and that trained LSAs find that solution; Akyürek et al.
2022 probe trained transformers for the quantities a learner would compute. This subpackage
reproduces both on synthetic tasks, then puts the construction beside real heads (with
``dual = icl_probe.dual``)::

    # the anchor's line search
    lr, loss = dual.best_one_step_lr(d_x=10, n=10, n_tasks=10_000, seed=0)
    lsa = dual.gd_lsa(d_x=10, d_y=1, lr=lr, n=10)   # the one-step-GD construction
    # x (batch N d_x), y (batch N d_y), x_query (batch d_x) -> y_hat (batch d_y)
    y_hat = lsa.predict(x, y, x_query)

==================  =========================================================================
module              what it holds
==================  =========================================================================
``tasks``           :class:`TaskConfig`, :func:`sample_tasks` (seeded, any device)
``learners``        explicit GD / GD++ / ridge, :func:`best_one_step_lr`, :func:`eigenvalue_table`
``lsa``             :class:`LinearSelfAttention`, :func:`gd_lsa`, :func:`gd_plus_plus_lsa`,
                    the dual form (:func:`implied_update`, :func:`linear_attention`)
``train``           :func:`train_lsa` (+ preds diff / model cos / model diff), :func:`ood_curves`
``probing``         a small softmax transformer, linear / MLP probes of w_OLS and Xᵀy per layer
``heads``           real heads: sparsity vs the construction, block-form similarity, fidelity
``plots``           plotly figures of all of the above
==================  =========================================================================

Axis names (as in the package glossary, plus): ``batch`` tasks, ``ctx`` the N context pairs,
``tok`` context + query tokens, ``d_x`` / ``d_y`` input / target width, ``d_tok = d_x + d_y``,
``layer`` LSA or transformer layer.

Measured (CPU, one thread, seed 0 unless said; the numbers behind each docstring):

- best one-step η at d_x = N = 10 over 10⁴ tasks: 5.978, loss 0.2079 (seeds 0-19: η* =
  6.061 ± 0.059, loss 0.2072 ± 0.0032; paper: 6.05, 0.206).
- max over 10⁴ tasks of λ_max(XᵀX): 4.94 / 7.80 / 10.86 / 16.62 for N = 10/25/50/100
  (seeds 0-9: 4.46 / 7.26 / 10.66 / 16.93 ± 0.2-0.6; paper: 4.6 / 7.7 / 10.8 / 17.2).
  Paper values: docs/science.md, Reference numbers.
- constructed LSA vs explicit GD, float64: ≤ 4e-16 for 1, 2 and 4 layers (and GD++).
- one LSA layer trained with the anchor's settings (5000 steps of 2048 tasks, Adam 1e-3,
  ~40 s): eval loss 0.2059 vs one-step GD 0.2054 (η* = 6.043); preds diff 0.0195, model
  cos 0.9993, model diff 0.082 (from −0.03 / 0.50 / 2.12 at initialisation). OOD loss LSA / GD
  at α = 0.5, 1, 1.5, 2: 0.0802 / 0.0800, 0.1992 / 0.1993, 1.089 / 1.108, 7.63 / 7.76.

>>> from icl_probe import dual
>>> lr, loss = dual.best_one_step_lr(d_x=10, n=10, n_tasks=10_000, seed=0)
>>> round(lr, 2), round(loss, 3)
(5.98, 0.208)
>>> lsa = dual.gd_lsa(d_x=10, d_y=1, lr=lr, n=10)
>>> t = dual.sample_tasks(8, seed=1)
>>> y_hat = lsa.predict(t.x, t.y, t.x_query)
>>> y_hat.shape, bool((y_hat - dual.gd(t.x, t.y, t.x_query, lr)).abs().max() < 1e-5)
(torch.Size([8, 1]), True)
"""

from ._common import DualError, regression_loss
from .heads import (SPARSITY_THRESHOLDS, construction_zero_fraction, head_block_similarity,
                    head_fidelity, head_sparsity, projection_form_score, real_head_claims,
                    sparsity_summary)
from .learners import (ANCHOR_BEST_LOSS, ANCHOR_BEST_LR, ANCHOR_EIGENVALUES, GDPlusPlusResult,
                       best_lr, best_one_step_lr, eigenvalue_table, gd, gd_gradient,
                       gd_plus_plus, gd_weights, line_search, one_step_lr_closed_form, ridge,
                       ridge_predict)
from .lsa import (LinearSelfAttention, construction_weights, gd_lsa, gd_plus_plus_lsa,
                  implied_update, linear_attention)
from .plots import (plot_gd_alignment, plot_head_sparsity, plot_lsa_training, plot_ood,
                    plot_probe_r2)
from .probing import (PROBE_TARGETS, SoftmaxTrainConfig, SoftmaxTransformer,
                      SoftmaxTransformerConfig, akyurek_probes, linear_probe_r2, mlp_probe_r2,
                      probe_layers, probe_targets, r2_score, train_softmax_transformer)
from .tasks import TaskConfig, Tasks, make_generator, sample_tasks
from .train import (LSATrainConfig, LSATrainResult, compare_to_gd, ood_curves, query_jacobian,
                    train_lsa)

__all__ = [
    "ANCHOR_BEST_LOSS", "ANCHOR_BEST_LR", "ANCHOR_EIGENVALUES", "DualError", "GDPlusPlusResult",
    "LSATrainConfig", "LSATrainResult", "LinearSelfAttention", "PROBE_TARGETS",
    "SPARSITY_THRESHOLDS", "SoftmaxTrainConfig", "SoftmaxTransformer",
    "SoftmaxTransformerConfig", "TaskConfig", "Tasks", "akyurek_probes", "best_lr",
    "best_one_step_lr", "compare_to_gd", "construction_weights", "construction_zero_fraction",
    "eigenvalue_table", "gd", "gd_gradient", "gd_lsa", "gd_plus_plus", "gd_plus_plus_lsa",
    "gd_weights", "head_block_similarity", "head_fidelity", "head_sparsity", "implied_update",
    "line_search", "linear_attention", "linear_probe_r2", "make_generator", "mlp_probe_r2",
    "one_step_lr_closed_form", "ood_curves", "plot_gd_alignment", "plot_head_sparsity",
    "plot_lsa_training", "plot_ood", "plot_probe_r2", "probe_layers", "probe_targets",
    "projection_form_score", "query_jacobian", "r2_score", "real_head_claims",
    "regression_loss", "ridge", "ridge_predict", "sample_tasks", "sparsity_summary",
    "train_lsa", "train_softmax_transformer",
]

"""Shared pieces of :mod:`icl_probe.dual`: its exception, input checks, the anchor's loss.

>>> import torch
>>> regression_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]]))  # 0.5·mean(‖ŷ−y‖²)
tensor(2.5000)
"""

from __future__ import annotations

import torch

from ..errors import DualError


def check_regression(op: str, x: torch.Tensor, y: torch.Tensor,
                     x_query: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """Validate ``x`` (batch ctx d_x), ``y`` (batch ctx d_y), ``x_query`` (batch d_x); return
    ``(batch, ctx, d_x, d_y)``. Raises :class:`DualError` naming ``op`` and the shapes."""
    shapes = f"x {tuple(x.shape)}, y {tuple(y.shape)}" + (
        "" if x_query is None else f", x_query {tuple(x_query.shape)}")
    if x.ndim != 3 or y.ndim != 3:
        raise DualError(f"{op}: expected x (batch, ctx, d_x) and y (batch, ctx, d_y), got "
                        f"{shapes}; add a batch axis with x[None] / y[None]")
    if x.shape[:2] != y.shape[:2]:
        raise DualError(f"{op}: x and y disagree on (batch, ctx): {shapes}")
    if x_query is not None and (x_query.ndim != 2 or x_query.shape != (x.shape[0], x.shape[2])):
        raise DualError(f"{op}: expected x_query (batch, d_x) = {(x.shape[0], x.shape[2])}, "
                        f"got {shapes}")
    if not (x.dtype == y.dtype and (x_query is None or x_query.dtype == x.dtype)):
        raise DualError(f"{op}: x, y and x_query must share one dtype, got {x.dtype}, {y.dtype}"
                        + ("" if x_query is None else f", {x_query.dtype}"))
    return x.shape[0], x.shape[1], x.shape[2], y.shape[2]


def regression_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The anchor's loss (von Oswald et al. 2023, code ``compute_loss``):
    ``0.5 · mean_tasks ‖ŷ − y‖²``; for ``d_y = 1`` this is ``0.5·mean((ŷ−y)²)``.
    ``y_hat``, ``y``: (batch, d_y)."""
    if y_hat.shape != y.shape:
        raise DualError(f"regression_loss: prediction {tuple(y_hat.shape)} and target "
                        f"{tuple(y.shape)} differ in shape")
    return 0.5 * (y_hat - y).pow(2).sum(-1).mean()


def batched_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per leading index, over all trailing axes flattened: (batch, ...) -> (batch,).
    A zero vector gives 0 (no division by zero)."""
    a, b = a.flatten(1), b.flatten(1)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)
    return (a * b).sum(1) / den

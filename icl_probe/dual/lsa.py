"""Linear self-attention (LSA) and its gradient-descent constructions (von Oswald et al. 2023).

Tokens ``e_j = (x_j, y_j)`` (d_tok = d_x + d_y) for the ``N`` context pairs and ``(x_q, 0)``
for the query. One LSA layer updates every token (context and query) with keys and values
over the ``N`` context tokens only (von Oswald et al. eq. 3-4; docs/science.md, Linear
self-attention and GD on regression):

    e_j ← e_j + P W_V Σ_{i≤N} e_i e_iᵀ W_Kᵀ W_Q e_j  =  e_j + ΔW e_j,
    ΔW = P (Σ_i v_i ⊗ k_i) W_Q   with  v_i = W_V e_i,  k_i = W_K e_i

``ΔW`` is the layer's *implied weight update*: an outer-product sum ``Σ_i v_i ⊗ k_i``, the
form of a GD update of a linear layer (Dai et al. 2023; docs/science.md, Linear-attention
dual form). Dual-form identity: ``W_0 x + LinearAttn(E, X', x) = (W_0 + Σ_i e_i ⊗ x'_i) x``
with ``LinearAttn(E, X', x) = Σ_i e_i (x'_i · x)`` (:func:`linear_attention`).

**One GD step** (von Oswald et al. Prop. 1): ``W_K = W_Q = [[I_x, 0], [0, 0]]``,
``W_V = [[0, 0], [W_0, −I_y]]``, ``P = (η/N) I``. Then the query's y-slot becomes
``s = (η/N) Σ_i (W_0 x_i − y_i) x_iᵀ x_q = −ΔW_GD x_q`` and the prediction is
``ŷ = W_0 x_q − s`` (``= −s``, "minus the y-slot", when ``W_0 = 0``). The context y-slots
become ``y_i − ΔW_GD x_i``, so ``T`` stacked layers run ``T`` GD steps. **GD++**:
``W_V = [[I_x, 0], [W_0, −I_y]]``, ``P = diag(−γ I_x, (η/N) I_y)``: the same y-update, plus
``x ← (I − γ Σ_i x_i x_iᵀ) x`` for every token.

Weights are stored in the papers' column orientation (``k = W_K e``; docs/science.md,
Notation), as ``layer d_out d_in`` stacks; TransformerLens's ``q = x @ W_Q`` is the transpose.

>>> import torch
>>> t = sample_tasks(4, TaskConfig(d_x=3, d_y=2, n=6), seed=0, dtype=torch.float64)
>>> lsa = gd_lsa(d_x=3, d_y=2, lr=0.9, n=6, dtype=torch.float64)
>>> err = lsa.predict(t.x, t.y, t.x_query) - gd(t.x, t.y, t.x_query, lr=0.9)
>>> bool(err.abs().max() < 1e-12)
True
"""

from __future__ import annotations

import torch
from einops import einsum
from torch import nn

from ._common import DualError, check_regression
from .learners import gd  # noqa: F401  (doctest namespace)
from .tasks import TaskConfig, sample_tasks  # noqa: F401  (doctest namespace)


def implied_update(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``ΔW = Σ_i v_i ⊗ k_i`` (batch d_v d_k) from values (batch ctx d_v) and keys
    (batch ctx d_k): the linear-attention dual form's weight update (Dai et al. 2023, eq. 4-7).

    >>> implied_update(torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    tensor([[[1., 2.]]])
    """
    if values.ndim != 3 or keys.ndim != 3 or values.shape[:2] != keys.shape[:2]:
        raise DualError(f"implied_update: expected values (batch, ctx, d_v) and keys (batch, "
                        f"ctx, d_k) with the same (batch, ctx), got {tuple(values.shape)} and "
                        f"{tuple(keys.shape)}")
    return einsum(values, keys, "batch ctx d_v, batch ctx d_k -> batch d_v d_k")


def linear_attention(values: torch.Tensor, keys: torch.Tensor,
                     query: torch.Tensor) -> torch.Tensor:
    """``LinearAttn(E, X', x) = Σ_i e_i (x'_i · x)`` (batch d_v): attention without softmax or
    scale; values E (batch ctx d_v), keys X' (batch ctx d_k), query x (batch d_k).

    >>> v = torch.tensor([[[1.0], [2.0]]]); k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> linear_attention(v, k, torch.tensor([[3.0, 4.0]]))          # 1·3 + 2·4
    tensor([[11.]])
    """
    if query.ndim != 2 or query.shape != (keys.shape[0], keys.shape[-1]):
        raise DualError(f"linear_attention: expected query (batch, d_k) = "
                        f"{(keys.shape[0], keys.shape[-1])}, got {tuple(query.shape)}")
    scores = einsum(keys, query, "batch ctx d_k, batch d_k -> batch ctx")
    return einsum(values, scores, "batch ctx d_v, batch ctx -> batch d_v")


class LinearSelfAttention(nn.Module):
    """A stack of ``n_layers`` single-head LSA layers on ``(x, y)`` tokens (module docstring).

    Parameters (column orientation, ``k = W_K e``)::

        W_K, W_Q, W_V, P   layer d_out d_in   (d_tok x d_tok; one layer shared when tied)
        W_0                d_y d_x            readout offset (buffer; zero unless constructed)

    Init: ``N(0, init_std²)`` entries (the anchor's ``init_scale = 0.002``; its code divides
    it by the number of layers, pass ``init_std=0.002 / n_layers`` for that).
    The prediction is ``ŷ = W_0 x_q − s_T`` with ``s_T`` the query's y-slot after the last
    layer (von Oswald et al. read out ``−s_T``).

    >>> lsa = LinearSelfAttention(d_x=3, d_y=2, n_layers=2, seed=0)
    >>> lsa.W_K.shape, lsa.n_layers
    (torch.Size([2, 5, 5]), 2)
    >>> lsa(torch.zeros(7, 4, 3), torch.zeros(7, 4, 2), torch.zeros(7, 3)).shape
    torch.Size([7, 2])
    """

    def __init__(self, d_x: int, d_y: int = 1, n_layers: int = 1, *, tied: bool = False,
                 init_std: float = 0.002, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> None:
        super().__init__()
        if min(d_x, d_y, n_layers) < 1:
            raise DualError(f"LinearSelfAttention: d_x={d_x}, d_y={d_y}, n_layers={n_layers}; "
                            "all must be >= 1")
        self.d_x, self.d_y, self.n_layers, self.tied = d_x, d_y, n_layers, tied
        d_tok, n_sets = d_x + d_y, 1 if tied else n_layers
        gen = torch.Generator().manual_seed(seed)

        def init() -> nn.Parameter:
            w = torch.randn(n_sets, d_tok, d_tok, generator=gen, dtype=dtype) * init_std
            return nn.Parameter(w.to(device))

        self.W_K, self.W_Q, self.W_V, self.P = init(), init(), init(), init()
        self.register_buffer("W_0", torch.zeros(d_y, d_x, dtype=dtype, device=device))

    @property
    def d_tok(self) -> int:
        return self.d_x + self.d_y

    def layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        """``(W_K, W_Q, W_V, P)`` of ``layer`` (d_tok x d_tok each)."""
        if not 0 <= layer < self.n_layers:
            raise DualError(f"layer_weights: layer={layer}; the model has {self.n_layers}")
        i = 0 if self.tied else layer
        return self.W_K[i], self.W_Q[i], self.W_V[i], self.P[i]

    def implied_update(self, context: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """``ΔW = P (Σ_i v_i ⊗ k_i) W_Q = P W_V Σ_i e_i e_iᵀ W_Kᵀ W_Q`` (batch d_tok d_tok) of
        ``layer`` for context tokens (batch ctx d_tok): the layer maps ``e ↦ e + ΔW e``."""
        W_K, W_Q, W_V, P = self.layer_weights(layer)
        k = einsum(W_K, context, "d_k d_tok, batch ctx d_tok -> batch ctx d_k")
        v = einsum(W_V, context, "d_v d_tok, batch ctx d_tok -> batch ctx d_v")
        kv = implied_update(v, k)  # batch d_v d_k
        pkv = einsum(P, kv, "d_out d_v, batch d_v d_k -> batch d_out d_k")
        return einsum(pkv, W_Q, "batch d_out d_k, d_k d_in -> batch d_out d_in")

    def run(self, context: torch.Tensor, query: torch.Tensor) -> list[torch.Tensor]:
        """All tokens after each layer: a list of ``n_layers + 1`` tensors (batch tok d_tok),
        the input first; the last token is the query."""
        if context.ndim != 3 or query.shape != (context.shape[0], context.shape[2]) or \
                context.shape[2] != self.d_tok:
            raise DualError(f"LinearSelfAttention.run: expected context (batch, ctx, "
                            f"{self.d_tok}) and query (batch, {self.d_tok}), got "
                            f"{tuple(context.shape)} and {tuple(query.shape)}")
        n = context.shape[1]
        tokens = torch.cat([context, query[:, None]], 1)
        out = [tokens]
        for layer in range(self.n_layers):
            dW = self.implied_update(tokens[:, :n], layer)  # keys/values: context only
            tokens = tokens + einsum(dW, tokens,
                                     "batch d_out d_in, batch tok d_in -> batch tok d_out")
            out.append(tokens)
        return out

    def _tokens(self, x: torch.Tensor, y: torch.Tensor,
                x_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, dx, dy = check_regression("LinearSelfAttention", x, y, x_query)
        if (dx, dy) != (self.d_x, self.d_y):
            raise DualError(f"LinearSelfAttention: built for d_x={self.d_x}, d_y={self.d_y}; "
                            f"got inputs with d_x={dx}, d_y={dy}")
        return torch.cat([x, y], -1), torch.cat([x_query, x_query.new_zeros(B, dy)], -1)

    def predictions_per_layer(self, x: torch.Tensor, y: torch.Tensor,
                              x_query: torch.Tensor) -> torch.Tensor:
        """``ŷ_l = W_0 x_q − s_l`` after each layer ``l = 1 … n_layers`` (layer batch d_y)."""
        stack = torch.stack(self.run(*self._tokens(x, y, x_query))[1:])
        base = einsum(self.W_0, x_query, "d_y d_x, batch d_x -> batch d_y")
        return base - stack[:, :, -1, self.d_x:]

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        """``ŷ = W_0 x_q − s_T`` (batch d_y) for x (batch ctx d_x), y (batch ctx d_y),
        x_query (batch d_x)."""
        return self.predictions_per_layer(x, y, x_query)[-1]

    def predict(self, x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        """Same as calling the module: ``ŷ`` (batch d_y)."""
        return self(x, y, x_query)


def construction_weights(d_x: int, d_y: int, lr: float, n: int, *,
                         w0: torch.Tensor | None = None, gamma: float | None = None,
                         dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The hand-constructed LSA weights (module docstring): one GD step (``gamma=None``) or
    GD++ (``gamma`` given). Returns ``{"W_K", "W_Q", "W_V", "P"}`` (d_tok x d_tok each).

    >>> w = construction_weights(2, 1, lr=3.0, n=6)
    >>> w["W_V"].tolist(), w["P"].diagonal().tolist()
    ([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.0]], [0.5, 0.5, 0.5])
    """
    D = d_x + d_y
    I_x = torch.eye(d_x, dtype=dtype)
    W_KQ = torch.zeros(D, D, dtype=dtype)
    W_KQ[:d_x, :d_x] = I_x
    W_V = torch.zeros(D, D, dtype=dtype)
    W_V[d_x:, d_x:] = -torch.eye(d_y, dtype=dtype)
    if w0 is not None:
        if tuple(w0.shape) != (d_y, d_x):
            raise DualError(f"construction_weights: w0 has shape {tuple(w0.shape)}; expected "
                            f"(d_y, d_x) = {(d_y, d_x)}")
        W_V[d_x:, :d_x] = w0.to(dtype)
    if gamma is None:
        P = torch.eye(D, dtype=dtype) * (lr / n)
    else:
        W_V[:d_x, :d_x] = I_x
        P = torch.diag(torch.cat([torch.full((d_x,), -float(gamma), dtype=dtype),
                                  torch.full((d_y,), lr / n, dtype=dtype)]))
    return {"W_K": W_KQ, "W_Q": W_KQ.clone(), "W_V": W_V, "P": P}


def _constructed(weights: dict[str, torch.Tensor], d_x: int, d_y: int, n_layers: int,
                 w0: torch.Tensor | None, tied: bool, dtype: torch.dtype,
                 device: str | torch.device | None) -> LinearSelfAttention:
    lsa = LinearSelfAttention(d_x, d_y, n_layers, tied=tied, init_std=0.0, dtype=dtype,
                              device=device)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(lsa, name).copy_(w.to(dtype)[None].expand_as(getattr(lsa, name)))
        if w0 is not None:
            lsa.W_0.copy_(w0.to(dtype))
    return lsa


def gd_lsa(d_x: int, d_y: int, lr: float, n: int, *, n_layers: int = 1,
           w0: torch.Tensor | None = None, tied: bool = False,
           dtype: torch.dtype = torch.float32,
           device: str | torch.device | None = None) -> LinearSelfAttention:
    """An LSA whose every layer holds the one-step-GD construction (module docstring):
    ``n_layers`` layers predict exactly as ``n_layers`` GD steps from ``W_0`` with learning
    rate ``lr`` on ``n`` context pairs.

    >>> t = sample_tasks(3, TaskConfig(d_x=4, n=5), seed=0, dtype=torch.float64)
    >>> lsa = gd_lsa(4, 1, lr=2.0, n=5, n_layers=3, dtype=torch.float64)
    >>> err = lsa.predict(t.x, t.y, t.x_query) - gd(t.x, t.y, t.x_query, 2.0, steps=3)
    >>> bool(err.abs().max() < 1e-12)
    True
    """
    weights = construction_weights(d_x, d_y, lr, n, w0=w0, dtype=dtype)
    return _constructed(weights, d_x, d_y, n_layers, w0, tied, dtype, device)


def gd_plus_plus_lsa(d_x: int, d_y: int, lr: float, gamma: float, n: int, *,
                     n_layers: int = 1, w0: torch.Tensor | None = None, tied: bool = False,
                     dtype: torch.dtype = torch.float32,
                     device: str | torch.device | None = None) -> LinearSelfAttention:
    """An LSA holding the GD++ construction in every layer (module docstring); it predicts as
    :func:`~icl_probe.dual.learners.gd_plus_plus` with the same ``lr``, ``gamma``, steps.

    >>> lsa = gd_plus_plus_lsa(2, 1, lr=3.0, gamma=0.1, n=6)
    >>> [round(v, 6) for v in lsa.P[0].diagonal().tolist()]      # diag(−γ I_x, η/N)
    [-0.1, -0.1, 0.5]
    """
    weights = construction_weights(d_x, d_y, lr, n, w0=w0, gamma=gamma, dtype=dtype)
    return _constructed(weights, d_x, d_y, n_layers, w0, tied, dtype, device)

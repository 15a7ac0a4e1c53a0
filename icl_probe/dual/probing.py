"""A small softmax transformer trained on in-context regression, and per-layer probes
(Akyürek et al. 2022, §5; docs/science.md, Trained probes).

The transformer reads von Oswald's tokens ``(x_j, y_j, 0)`` and the query ``(x_q, 0, 1)``
(the last entry flags the query), embeds them linearly, runs ``n_layers`` pre-norm blocks
(causal softmax attention, GELU MLP) and reads ``ŷ`` off the query position. Its hidden state
at the query, ``h_l`` (after block ``l``; ``l = 0`` is the embedding), is probed for

    w_OLS = argmin_W Σ_i ‖W x_i − y_i‖²   (least squares, minimum-norm)     d_y·d_x
    Xᵀy   = Σ_i y_i x_iᵀ                  (the moment vector)               d_y·d_x

with a linear (ridge) probe and a 2-layer MLP probe fitted on training tasks, scored by R² on
held-out tasks. Control (Akyürek et al.): the same architecture trained on tasks that all
share one fixed ``w``, probed on the same varying-``w`` tasks.

R² = 1 − Σ(t − t̂)² / Σ(t − t̄)² per target coordinate on the held-out set, averaged over
coordinates (scikit-learn's ``uniform_average``); 1 is perfect, 0 is the held-out mean.

>>> import torch
>>> h = torch.randn(600, 8, generator=torch.Generator().manual_seed(0))
>>> t = h[:, :3] * 2.0 - h[:, 3:6]                                  # linearly present
>>> round(linear_probe_r2(h[:400], t[:400], h[400:], t[400:]), 4)
1.0
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from einops import einsum, rearrange
from torch import nn
from tqdm.auto import tqdm

from ._common import DualError, check_regression, regression_loss
from .learners import ridge
from .tasks import TaskConfig, Tasks, make_generator, sample_tasks

PROBE_TARGETS = ("w_ols", "xty")


@dataclass(frozen=True)
class SoftmaxTransformerConfig:
    """Sizes of :class:`SoftmaxTransformer`."""

    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    d_mlp: int = 128

    def __post_init__(self) -> None:
        if min(self.d_model, self.n_layers, self.n_heads, self.d_mlp) < 1 or \
                self.d_model % self.n_heads:
            raise DualError(f"SoftmaxTransformerConfig: {self}; sizes must be >= 1 and "
                            "d_model a multiple of n_heads")


class _Block(nn.Module):
    """Pre-norm block: ``h ← h + Attn(LN(h))``, ``h ← h + MLP(LN(h))``; causal softmax
    attention with scores ``q·k / sqrt(d_head)``."""

    def __init__(self, cfg: SoftmaxTransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_mlp), nn.GELU(),
                                 nn.Linear(cfg.d_mlp, cfg.d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        q, k, v = rearrange(self.qkv(self.ln1(h)), "batch pos (three head d_head) -> "
                            "three batch pos head d_head", three=3, head=self.n_heads)
        scores = einsum(q, k, "batch pos head d_head, batch key_pos head d_head -> "
                              "batch head pos key_pos") / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = einsum(pattern, v, "batch head pos key_pos, batch key_pos head d_head -> "
                               "batch pos head d_head")
        h = h + self.out(rearrange(z, "batch pos head d_head -> batch pos (head d_head)"))
        return h + self.mlp(self.ln2(h))


class SoftmaxTransformer(nn.Module):
    """A small softmax transformer for in-context regression (module docstring).

    >>> m = SoftmaxTransformer(d_x=3, d_y=1, config=SoftmaxTransformerConfig(d_model=16,
    ...                        n_layers=2, n_heads=2, d_mlp=32))
    >>> t = sample_tasks(5, TaskConfig(d_x=3, n=7))
    >>> m(t.x, t.y, t.x_query).shape, m.hidden_states(t.x, t.y, t.x_query).shape
    (torch.Size([5, 1]), torch.Size([3, 5, 16]))
    """

    def __init__(self, d_x: int, d_y: int = 1,
                 config: SoftmaxTransformerConfig = SoftmaxTransformerConfig(), *,
                 seed: int = 0) -> None:
        super().__init__()
        self.d_x, self.d_y, self.config = d_x, d_y, config
        # seeded init (GPT-2 style: N(0, 0.02²) matrices, zero biases) that leaves the
        # global RNG untouched: the default init runs inside fork_rng, then is overwritten
        with torch.random.fork_rng(devices=[]):
            self.embed = nn.Linear(d_x + d_y + 1, config.d_model)
            self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.unembed = nn.Linear(config.d_model, d_y)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                elif not name.split(".")[-2].startswith("ln"):
                    p.zero_()

    def _tokens(self, x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        B, N, dx, dy = check_regression("SoftmaxTransformer", x, y, x_query)
        if (dx, dy) != (self.d_x, self.d_y):
            raise DualError(f"SoftmaxTransformer: built for d_x={self.d_x}, d_y={self.d_y}; "
                            f"got d_x={dx}, d_y={dy}")
        ctx = torch.cat([x, y, x.new_zeros(B, N, 1)], -1)
        query = torch.cat([x_query, x.new_zeros(B, dy), x.new_ones(B, 1)], -1)
        return torch.cat([ctx, query[:, None]], 1)  # batch pos d_tok

    def hidden_states(self, x: torch.Tensor, y: torch.Tensor,
                      x_query: torch.Tensor) -> torch.Tensor:
        """Residual stream at the query position after the embedding and after each block
        (layer batch d_model; ``layer = 0 … n_layers``)."""
        h = self.embed(self._tokens(x, y, x_query))
        out = [h[:, -1]]
        for block in self.blocks:
            h = block(h)
            out.append(h[:, -1])
        return torch.stack(out)

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        """``ŷ`` (batch d_y) read off the query position."""
        return self.unembed(self.ln_f(self.hidden_states(x, y, x_query)[-1]))


@dataclass(frozen=True)
class SoftmaxTrainConfig:
    """Training of :class:`SoftmaxTransformer` (Adam, fresh tasks every step, the anchor's
    loss). ``fixed_w=True`` trains Akyürek et al.'s control: every task shares one teacher
    ``w ~ N(0, I)`` drawn from ``seed``."""

    model: SoftmaxTransformerConfig = field(default_factory=SoftmaxTransformerConfig)
    task: TaskConfig = field(default_factory=lambda: TaskConfig(d_x=4, n=12))
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    fixed_w: bool = False


def train_softmax_transformer(config: SoftmaxTrainConfig = SoftmaxTrainConfig(), *,
                              progress: bool | None = None
                              ) -> tuple[SoftmaxTransformer, pd.DataFrame]:
    """Train a :class:`SoftmaxTransformer`; returns it and its history (``step``, ``loss``
    every step).

    >>> cfg = SoftmaxTrainConfig(model=SoftmaxTransformerConfig(d_model=16, n_layers=1,
    ...                          n_heads=2, d_mlp=16), task=TaskConfig(d_x=2, n=4), steps=3,
    ...                          batch_size=8)
    >>> model, hist = train_softmax_transformer(cfg, progress=False)
    >>> hist.step.tolist()
    [1, 2, 3]
    """
    c = config
    model = SoftmaxTransformer(c.task.d_x, c.task.d_y, c.model, seed=c.seed)
    gen = make_generator(c.seed)
    w = torch.randn(c.task.d_y, c.task.d_x, generator=make_generator(c.seed + 7)) \
        if c.fixed_w else None
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    rows = []
    bar = tqdm(range(1, c.steps + 1), desc="train softmax TF", unit="step",
               disable=not (progress or (progress is None and c.steps >= 1000)))
    for step in bar:
        t = sample_tasks(c.batch_size, c.task, generator=gen, w=w)
        loss = regression_loss(model(t.x, t.y, t.x_query), t.y_query)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append({"step": step, "loss": float(loss.detach())})
        if step % 100 == 0:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
    return model, pd.DataFrame(rows)


# ------------------------------------------------------------------------------ probes


def probe_targets(tasks: Tasks) -> dict[str, torch.Tensor]:
    """The probe targets of each task (batch, d_y·d_x): ``w_ols`` (least squares on the
    context, minimum-norm) and ``xty`` (``Σ_i y_i x_iᵀ``).

    >>> t = sample_tasks(2, TaskConfig(d_x=3, n=5), seed=0, dtype=torch.float64)
    >>> bool((probe_targets(t)["w_ols"] - t.w.flatten(1)).abs().max() < 1e-10)
    True
    """
    xty = einsum(tasks.x, tasks.y, "batch ctx d_x, batch ctx d_y -> batch d_y d_x")
    return {"w_ols": ridge(tasks.x, tasks.y).flatten(1), "xty": xty.flatten(1)}


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """R² per target coordinate, averaged (module docstring); pred, target: (n, d).

    >>> r2_score(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [3.0]]))
    1.0
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise DualError(f"r2_score: expected pred and target of one (n, d) shape, got "
                        f"{tuple(pred.shape)} and {tuple(target.shape)}")
    ss_res = (target - pred).pow(2).sum(0)
    ss_tot = (target - target.mean(0)).pow(2).sum(0).clamp_min(torch.finfo(target.dtype).tiny)
    return float((1 - ss_res / ss_tot).mean())


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-8)
    return [(a - mu) / sd for a in (train, *others)]


def linear_probe_r2(h_train: torch.Tensor, t_train: torch.Tensor, h_test: torch.Tensor,
                    t_test: torch.Tensor, *, lam: float = 1e-3) -> float:
    """Held-out R² of a ridge probe ``t ≈ A h + b`` on standardised ``h`` (n, d_model):
    ``A = (HᵀH + λ n I)⁻¹ Hᵀ (T − t̄)``. See the module docstring for an example."""
    h_train, h_test = (a.double() for a in _standardise(h_train, h_test))
    t_train, t_test = t_train.double(), t_test.double()
    mean = t_train.mean(0)
    n, d = h_train.shape
    gram = einsum(h_train, h_train, "n d_i, n d_j -> d_i d_j") + lam * n * torch.eye(
        d, dtype=torch.float64)
    A = torch.linalg.solve(gram, einsum(h_train, t_train - mean, "n d, n t -> d t"))
    return r2_score(einsum(h_test, A, "n d, d t -> n t") + mean, t_test)


def mlp_probe_r2(h_train: torch.Tensor, t_train: torch.Tensor, h_test: torch.Tensor,
                 t_test: torch.Tensor, *, hidden: int = 64, steps: int = 400,
                 lr: float = 1e-2, seed: int = 0) -> float:
    """Held-out R² of a 2-layer MLP probe ``t ≈ W_2 relu(W_1 h + b_1) + b_2`` on standardised
    inputs and targets, trained with Adam (full batch) on 80 % of the training set and kept at
    its best loss on the other 20 %, checked every 10 steps (early stopping); the null model
    (the training mean) is the first checkpoint, so a target with no signal scores ≈ 0.

    >>> h = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    >>> t = h[:, :1] ** 2                                              # not linear in h
    >>> mlp_probe_r2(h[:400], t[:400], h[400:], t[400:], steps=300) > 0.8
    True
    """
    h_train, h_test = _standardise(h_train.float(), h_test.float())
    mu, sd = t_train.float().mean(0), t_train.float().std(0).clamp_min(1e-8)
    z_train = (t_train.float() - mu) / sd
    n_fit = max(1, int(0.8 * len(h_train)))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(h_train), generator=gen)
    fit, val = perm[:n_fit], perm[n_fit:]
    with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
        torch.manual_seed(seed)
        probe = nn.Sequential(nn.Linear(h_train.shape[1], hidden), nn.ReLU(),
                              nn.Linear(hidden, z_train.shape[1]))
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    # the null model (predict the training mean) is the first checkpoint: a probe must beat it
    # on the validation split to be kept
    best = float(z_train[val].pow(2).mean()) if len(val) else math.inf
    best_state = None
    for step in range(steps):
        loss = (probe(h_train[fit]) - z_train[fit]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if len(val) and (step % 10 == 9 or step == steps - 1):
            with torch.no_grad():
                v = float((probe(h_train[val]) - z_train[val]).pow(2).mean())
            if v < best:
                best, best_state = v, copy.deepcopy(probe.state_dict())
    with torch.no_grad():
        if len(val) and best_state is None:  # nothing beat the null model
            return r2_score(mu.expand(len(t_test), -1).double(), t_test.double())
        if len(val):
            probe.load_state_dict(best_state)
        return r2_score((probe(h_test) * sd + mu).double(), t_test.double())


def probe_layers(model: SoftmaxTransformer, train: Tasks, test: Tasks, *,
                 targets: tuple[str, ...] = PROBE_TARGETS,
                 probes: tuple[str, ...] = ("linear", "mlp"), label: str = "trained",
                 mlp_steps: int = 400, seed: int = 0) -> pd.DataFrame:
    """R² of every (layer, target, probe) from the query hidden states of ``model``: probes
    fitted on ``train`` tasks, scored on ``test`` tasks. Columns ``model`` (= ``label``),
    ``layer`` (0 = embedding), ``target``, ``probe``, ``r2``.

    >>> m = SoftmaxTransformer(2, config=SoftmaxTransformerConfig(d_model=8, n_layers=1,
    ...                        n_heads=2, d_mlp=8))
    >>> task = TaskConfig(d_x=2, n=4)
    >>> tr, te = sample_tasks(64, task), sample_tasks(32, task, seed=1)
    >>> probe_layers(m, tr, te, probes=("linear",)).shape      # 2 layers x 2 targets
    (4, 5)
    """
    unknown = set(targets) - set(PROBE_TARGETS) | set(probes) - {"linear", "mlp"}
    if unknown:
        raise DualError(f"probe_layers: unknown targets/probes {sorted(unknown)}; targets are "
                        f"{PROBE_TARGETS}, probes ('linear', 'mlp')")
    with torch.no_grad():
        h_tr = model.hidden_states(train.x, train.y, train.x_query)
        h_te = model.hidden_states(test.x, test.y, test.x_query)
    t_tr, t_te = probe_targets(train), probe_targets(test)
    rows = []
    for layer in range(h_tr.shape[0]):
        for target in targets:
            for kind in probes:
                if kind == "linear":
                    r2 = linear_probe_r2(h_tr[layer], t_tr[target], h_te[layer], t_te[target])
                else:
                    r2 = mlp_probe_r2(h_tr[layer], t_tr[target], h_te[layer], t_te[target],
                                      steps=mlp_steps, seed=seed)
                rows.append({"model": label, "layer": layer, "target": target, "probe": kind,
                             "r2": r2})
    return pd.DataFrame(rows)


def akyurek_probes(config: SoftmaxTrainConfig = SoftmaxTrainConfig(), *,
                   n_probe_train: int = 2000, n_probe_test: int = 1000,
                   probes: tuple[str, ...] = ("linear", "mlp"), mlp_steps: int = 400,
                   progress: bool | None = None) -> pd.DataFrame:
    """Akyürek et al. §5 end to end: train the model and its fixed-``w`` control with the same
    settings, then :func:`probe_layers` both on the same varying-``w`` tasks. Returns the two
    R² tables stacked (``model`` = "trained" / "control") with each model's final training
    loss (mean of its last 10 % of steps) in ``final_loss``.

    Measured (defaults but ``steps=3000``: d_x = 4, N = 12, 3 layers of width 64; one CPU
    thread, 6 min): final loss 0.0063 (trained), 2e-5 (control, which only has to learn one
    w). Held-out R², layers 0 / 1 / 2 / 3, linear | MLP probe:

    ========  ======  =============================  =============================
    model     target  linear                         MLP
    ========  ======  =============================  =============================
    trained   w_OLS   −0.00 / 0.32 / 0.37 / 0.37     −0.00 / 0.43 / 0.45 / 0.46
    trained   Xᵀy     −0.00 / 0.38 / 0.44 / 0.42     −0.00 / 0.51 / 0.56 / 0.56
    control   w_OLS   −0.00 / 0.14 / 0.19 / 0.22     −0.00 / 0.15 / 0.22 / 0.22
    control   Xᵀy     −0.00 / 0.16 / 0.22 / 0.27     −0.00 / 0.22 / 0.29 / 0.32
    ========  ======  =============================  =============================

    The trained model holds both targets better than its control at every layer after the
    embedding, but far from Akyürek et al.'s near-1 R² (bigger models, much longer training).
    """
    out = []
    for label, fixed in (("trained", False), ("control", True)):
        model, hist = train_softmax_transformer(replace(config, fixed_w=fixed),
                                                progress=progress)
        train = sample_tasks(n_probe_train, config.task, seed=config.seed + 11)
        test = sample_tasks(n_probe_test, config.task, seed=config.seed + 12)
        df = probe_layers(model, train, test, probes=probes, label=label,
                          mlp_steps=mlp_steps, seed=config.seed)
        df["final_loss"] = hist.loss.tail(max(1, len(hist) // 10)).mean()
        out.append(df)
    return pd.concat(out, ignore_index=True)

"""icl_probe.dual against slow, explicit references: the LSA constructions vs explicit GD /
GD++ (float64, every layer), the dual-form identity, a short LSA training run, probes, the
anchor's line search and eigenvalue table, and the claims on (tiny) real heads."""

import math
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch

import icl_probe as ip
from icl_probe import dual
from icl_probe.models import tiny_hf_model

F64_TOL = 1e-10  # float64, tiny sizes: only summation-order rounding remains
# distinct axis sizes everywhere, so that a swapped axis cannot pass
B, N, DX, DY = 6, 7, 5, 3
LR, GAMMA = 0.8, 0.05  # learning rates other than 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine is shared: one intra-op thread for this module, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tasks(seed=0, **kw):
    cfg = dual.TaskConfig(**{"d_x": DX, "d_y": DY, "n": N, **kw})
    return dual.sample_tasks(B, cfg, seed=seed, dtype=torch.float64)


def _gd_autograd(x, y, lr, steps, w0):
    """T GD steps by autograd on L(W) = 1/(2N) Σ_i ‖W x_i − y_i‖², one task at a time."""
    out = []
    for b in range(x.shape[0]):
        W = w0.clone()
        for _ in range(steps):
            W = W.detach().requires_grad_(True)
            loss = sum(((W @ x[b, i] - y[b, i]) ** 2).sum() for i in range(x.shape[1]))
            (loss / (2 * x.shape[1])).backward()
            W = W - lr * W.grad
        out.append(W.detach())
    return torch.stack(out)


# ------------------------------------------------------------------------------ tasks


def test_tasks_are_seeded_in_range_and_linear():
    a, b, c = _tasks(seed=3), _tasks(seed=3), _tasks(seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.w, b.w), "same seed must give same tasks"
    assert not torch.equal(a.x, c.x), "different seeds gave the same tasks"
    assert a.x.shape == (B, N, DX) and a.y.shape == (B, N, DY) and a.w.shape == (B, DY, DX)
    assert a.x.abs().max() <= 0.5 and a.x_query.abs().max() <= 0.5
    assert (a.y - torch.einsum("bod,bnd->bno", a.w, a.x)).abs().max() < F64_TOL
    wide = _tasks(seed=3, x_low=-1.0, x_high=1.0, x_scale=2.0)
    assert wide.x.abs().max() <= 2.0 and wide.x.abs().max() > 1.0
    noisy = _tasks(seed=3, noise_std=0.5)
    resid = noisy.y - torch.einsum("bod,bnd->bno", noisy.w, noisy.x)
    assert 0.2 < resid.std() < 1.0, f"noise std {resid.std():.3f}, expected about 0.5"
    fixed = dual.sample_tasks(B, dual.TaskConfig(d_x=DX, d_y=DY), w=torch.ones(DY, DX))
    assert torch.equal(fixed.w, torch.ones(B, DY, DX))
    ctx, query = a.tokens()
    assert ctx.shape == (B, N, DX + DY) and torch.equal(query[:, DX:], torch.zeros(B, DY))


def test_task_errors_name_the_problem():
    with pytest.raises(dual.DualError, match="x_low"):
        dual.TaskConfig(x_low=1.0, x_high=0.0)
    with pytest.raises(dual.DualError, match="fixed w has shape"):
        dual.sample_tasks(2, dual.TaskConfig(d_x=DX, d_y=DY), w=torch.ones(DX, DY))
    t = _tasks()
    with pytest.raises(dual.DualError, match=r"gd: expected x_query \(batch, d_x\)"):
        dual.gd(t.x, t.y, t.x_query[:, :-1], lr=LR)
    lsa = dual.gd_lsa(DX, DY, lr=LR, n=N)
    with pytest.raises(dual.DualError, match="built for d_x=5, d_y=3"):
        lsa.predict(t.x[..., :4].float(), t.y.float(), t.x_query[:, :4].float())


# ------------------------------------------------------------------------------ learners


@pytest.mark.parametrize("steps", [1, 3])
def test_gd_weights_match_autograd(steps):
    t = _tasks()
    w0 = torch.randn(DY, DX, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _gd_autograd(t.x, t.y, LR, steps, w0)
    got = dual.gd_weights(t.x, t.y, LR, steps, w0)
    err = (got - ref).abs().max()
    assert err < F64_TOL, f"explicit GD vs autograd: {err:.2e}"


def test_ridge_and_least_squares():
    t = _tasks()  # N = 7 > d_x = 5, noise-free: least squares recovers W
    assert (dual.ridge(t.x, t.y) - t.w).abs().max() < F64_TOL
    lam = 0.3
    eye = torch.eye(DX, dtype=torch.float64)
    ref = torch.stack([torch.linalg.solve(t.x[b].T @ t.x[b] + lam * eye,
                                          t.x[b].T @ t.y[b]).T for b in range(B)])
    assert (dual.ridge(t.x, t.y, lam) - ref).abs().max() < F64_TOL
    few = dual.sample_tasks(B, dual.TaskConfig(d_x=DX, d_y=DY, n=3), dtype=torch.float64)
    W = dual.ridge(few.x, few.y)  # N < d_x: the minimum-norm interpolant
    assert (torch.einsum("bod,bnd->bno", W, few.x) - few.y).abs().max() < F64_TOL


def test_line_search_finds_an_off_grid_minimum():
    x, fx = dual.line_search(lambda t: (t - 3.14159) ** 2 + 1.0, 0.0, 25.0)
    assert abs(x - 3.14159) < 1e-6 and abs(fx - 1.0) < 1e-10


# the anchor: η ≈ 6.05, loss ≈ 0.206 over 10⁴ tasks. Over 20 seeds a 2000-task estimate has
# std 0.13 in η and 0.0047 in loss (measured, see best_one_step_lr): 4 std each.
LR_TOL_2000, LOSS_TOL_2000 = 0.5, 0.02


@pytest.mark.parametrize("seed", [0, 1])
def test_best_one_step_lr_near_anchor(seed):
    lr, loss = dual.best_one_step_lr(d_x=10, n=10, n_tasks=2000, seed=seed)
    assert abs(lr - dual.ANCHOR_BEST_LR) < LR_TOL_2000, f"best η {lr:.3f}, anchor 6.05"
    assert abs(loss - dual.ANCHOR_BEST_LOSS) < LOSS_TOL_2000, f"loss {loss:.4f}, anchor 0.206"
    # the search agrees with the parabola's closed-form minimum on the same tasks
    tasks = dual.sample_tasks(2000, dual.TaskConfig(), seed=seed, dtype=torch.float64)
    assert abs(lr - dual.one_step_lr_closed_form(tasks)) < 1e-6


# max over 10⁴ tasks of λ_max moves by up to 5 % (std) from seed to seed; seed 0 is 7 % off
# at N = 10 (4.94 vs 4.6). 12 % covers that; the other candidate statistics miss by > 40 %.
EIG_REL_TOL = 0.12


def test_eigenvalue_table_is_the_max_over_tasks_of_lambda_max():
    df = dual.eigenvalue_table(n_tasks=10_000, seed=0)
    assert df.n.tolist() == [10, 25, 50, 100]
    rel = (df.lambda_max_max / df.reference - 1).abs()
    assert (rel < EIG_REL_TOL).all(), f"max-over-tasks λ_max off the reference by {rel.tolist()}"
    # the natural reading (mean λ_max) does not reproduce it: it is what makes the choice
    assert ((df.lambda_max_mean / df.reference - 1).abs() > 0.2).all()
    assert (df.lambda_max_mean_over_n < 1).all()


# ------------------------------------------------------------------------------ LSA and GD


def test_dual_form_identity_on_random_tensors():
    """W_0 x + LinearAttn(E, X', x) = (W_0 + Σ_i e_i ⊗ x'_i) x
    (docs/science.md, Linear-attention dual form)."""
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 4, 9
    W0 = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    E = torch.randn(B, N, d_out, dtype=torch.float64, generator=g)
    Xp = torch.randn(B, N, d_in, dtype=torch.float64, generator=g)
    x = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    lhs = x @ W0.T + dual.linear_attention(E, Xp, x)
    dW = dual.implied_update(E, Xp)
    rhs = torch.einsum("bod,bd->bo", W0 + dW, x)
    assert (lhs - rhs).abs().max() < F64_TOL
    loop = torch.zeros(B, d_out, d_in, dtype=torch.float64)  # slow reference: outer products
    for b in range(B):
        for i in range(N):
            loop[b] += torch.outer(E[b, i], Xp[b, i])
    assert (dW - loop).abs().max() < F64_TOL


def test_one_gd_step_is_an_outer_product_sum():
    """ΔW_GD = Σ_i e_i ⊗ x_i with error signals e_i = −(η/N)(W_0 x_i − y_i)."""
    t = _tasks()
    w0 = torch.randn(DY, DX, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    err = -(LR / N) * (torch.einsum("od,bnd->bno", w0, t.x) - t.y)
    dW = dual.gd_weights(t.x, t.y, LR, 1, w0) - w0
    assert (dW - dual.implied_update(err, t.x)).abs().max() < F64_TOL


def test_lsa_layer_equals_explicit_formula():
    """e_j ← e_j + P W_V Σ_{i≤N} e_i e_iᵀ W_Kᵀ W_Q e_j, keys/values over the context only."""
    t = _tasks()
    lsa = dual.LinearSelfAttention(DX, DY, n_layers=1, init_std=0.4, seed=5,
                                   dtype=torch.float64)
    ctx, query = t.tokens()
    out = lsa.run(ctx, query)[1]  # batch tok d_tok
    W_K, W_Q, W_V, P = (w.detach() for w in lsa.layer_weights(0))
    for b in range(B):
        S = sum(torch.outer(ctx[b, i], ctx[b, i]) for i in range(N))
        tokens = torch.cat([ctx[b], query[b][None]])
        for j in range(N + 1):
            ref = tokens[j] + P @ W_V @ S @ W_K.T @ W_Q @ tokens[j]
            assert (out[b, j] - ref).abs().max() < F64_TOL, f"task {b}, token {j}"
    # the query is no key: changing it leaves every context token's update alone
    out2 = lsa.run(ctx, query + 1.0)[1]
    assert (out2[:, :N] - out[:, :N]).abs().max() == 0


@pytest.mark.parametrize("n_layers", [1, 2, 4])
@pytest.mark.parametrize("with_w0", [False, True])
def test_construction_equals_gd_every_layer(n_layers, with_w0):
    t = _tasks()
    w0 = torch.randn(DY, DX, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(3)) if with_w0 else None
    lsa = dual.gd_lsa(DX, DY, lr=LR, n=N, n_layers=n_layers, w0=w0, dtype=torch.float64)
    per_layer = lsa.predictions_per_layer(t.x, t.y, t.x_query)  # layer batch d_y
    for step in range(1, n_layers + 1):
        ref = dual.gd(t.x, t.y, t.x_query, LR, steps=step, w0=w0)
        err = (per_layer[step - 1] - ref).abs().max()
        assert err < F64_TOL, f"layer {step} vs {step} GD steps: {err:.2e}"
    if w0 is None:  # the query's y-slot is −ŷ
        slot = lsa.run(*t.tokens())[-1][:, -1, DX:]
        assert (slot + dual.gd(t.x, t.y, t.x_query, LR, steps=n_layers)).abs().max() < F64_TOL
    tied = dual.gd_lsa(DX, DY, lr=LR, n=N, n_layers=n_layers, w0=w0, tied=True,
                       dtype=torch.float64)
    assert (tied.predict(t.x, t.y, t.x_query) - per_layer[-1]).abs().max() < F64_TOL


def test_construction_weights_are_the_reference_blocks():
    w0 = torch.arange(DY * DX, dtype=torch.float64).reshape(DY, DX) + 1
    w = dual.construction_weights(DX, DY, lr=LR, n=N, w0=w0)
    I_x, I_y = torch.eye(DX, dtype=torch.float64), torch.eye(DY, dtype=torch.float64)
    Z = torch.zeros
    kq = torch.block_diag(I_x, Z(DY, DY, dtype=torch.float64))
    assert torch.equal(w["W_K"], kq) and torch.equal(w["W_Q"], kq)
    assert torch.equal(w["W_V"], torch.cat([Z(DX, DX + DY, dtype=torch.float64),
                                            torch.cat([w0, -I_y], 1)]))
    assert torch.equal(w["P"], torch.eye(DX + DY, dtype=torch.float64) * (LR / N))


@pytest.mark.parametrize("n_layers", [1, 3])
def test_gd_plus_plus_transforms_inputs_as_specified(n_layers):
    t = _tasks()
    lsa = dual.gd_plus_plus_lsa(DX, DY, lr=LR, gamma=GAMMA, n=N, n_layers=n_layers,
                                dtype=torch.float64)
    states = lsa.run(*t.tokens())
    # one layer, by hand: x ← (I − γ Σ_i x_i x_iᵀ) x for every token; y-slots take a GD step
    one = states[1]
    dW = dual.gd_weights(t.x, t.y, LR, 1)
    for b in range(B):
        C = sum(torch.outer(t.x[b, i], t.x[b, i]) for i in range(N))
        M = torch.eye(DX, dtype=torch.float64) - GAMMA * C
        assert (one[b, :N, :DX] - t.x[b] @ M.T).abs().max() < F64_TOL
        assert (one[b, N, :DX] - M @ t.x_query[b]).abs().max() < F64_TOL
        assert (one[b, :N, DX:] - (t.y[b] - t.x[b] @ dW[b].T)).abs().max() < F64_TOL
        assert (one[b, N, DX:] + dW[b] @ t.x_query[b]).abs().max() < F64_TOL
    # all layers against the explicit GD++ learner
    ref = dual.gd_plus_plus(t.x, t.y, t.x_query, LR, GAMMA, steps=n_layers)
    last = states[-1]
    assert (lsa.predict(t.x, t.y, t.x_query) - ref.y_hat).abs().max() < F64_TOL
    assert (last[:, :N, :DX] - ref.x).abs().max() < F64_TOL
    assert (last[:, N, :DX] - ref.x_query).abs().max() < F64_TOL
    # γ = 0 is plain GD; γ ≠ 0 is not
    plain = dual.gd_plus_plus(t.x, t.y, t.x_query, LR, 0.0, steps=n_layers).y_hat
    gd = dual.gd(t.x, t.y, t.x_query, LR, steps=n_layers)
    assert (plain - gd).abs().max() < F64_TOL
    if n_layers > 1:
        assert (ref.y_hat - gd).abs().max() > 1e-6


def test_query_jacobian_of_the_construction_is_gds_model():
    t = _tasks()
    lsa = dual.gd_lsa(DX, DY, lr=LR, n=N, n_layers=2, dtype=torch.float64)
    J = dual.query_jacobian(lsa, t.x, t.y, t.x_query)
    assert J.shape == (B, DY, DX)
    assert (J - dual.gd_weights(t.x, t.y, LR, steps=2)).abs().max() < F64_TOL
    m = dual.compare_to_gd(lsa, t, gd_lr=LR, gd_steps=2)
    assert m["preds_diff"] < F64_TOL and m["model_diff"] < F64_TOL
    assert abs(m["model_cos"] - 1) < F64_TOL
    off = dual.compare_to_gd(lsa, t, gd_lr=2 * LR, gd_steps=2)
    assert off["preds_diff"] > 1e-3, "the metrics must see a different learning rate"


# ------------------------------------------------------------------------------ training

# 150 Adam steps (lr 1e-2, batch 256) take ~2 s; the anchor's 5000 steps at lr 1e-3 reach
# model cos 0.9993 (package docstring).
SHORT_RUN = dual.LSATrainConfig(task=dual.TaskConfig(d_x=6, n=9), steps=150, batch_size=256,
                                lr=1e-2, eval_every=50, eval_tasks=512, gd_lr_tasks=2000)


@pytest.fixture(scope="module")
def short_run():
    return dual.train_lsa(SHORT_RUN, progress=False)


def test_short_lsa_training_approaches_gd(short_run):
    h = short_run.history
    first, last = h.iloc[0], h.iloc[-1]
    assert h.step.tolist() == [0, 50, 100, 150]
    assert last.eval_loss < 0.6 * first.eval_loss, h.to_string()
    assert abs(last.eval_loss - last.gd_loss) < 0.15 * last.gd_loss, h.to_string()
    assert first.model_cos < 0.5 and last.model_cos > 0.95, h.to_string()
    assert last.preds_diff < 0.3 * first.preds_diff, h.to_string()
    assert last.model_diff < 0.3 * first.model_diff, h.to_string()
    assert 5.0 < short_run.gd_lr < 10.0, f"η* at d_x=6, N=9: {short_run.gd_lr}"


def test_ood_curves_and_plots(short_run):
    curves = dual.ood_curves(short_run.model, short_run.gd_lr, alphas=[0.5, 1.0, 2.0],
                             task=SHORT_RUN.task, n_tasks=256)
    assert curves.shape == (6, 3) and curves.loss.notna().all()
    gd = curves[curves.learner == "gd"].set_index("alpha").loss
    assert gd[2.0] > gd[1.0] > gd[0.5], "GD's loss must grow as inputs leave the training range"
    # the construction is GD at every α
    lsa = dual.gd_lsa(6, 1, lr=short_run.gd_lr, n=9, dtype=torch.float64)
    same = dual.ood_curves(lsa, short_run.gd_lr, alphas=[0.7, 1.6], task=SHORT_RUN.task,
                           n_tasks=64).pivot(index="alpha", columns="learner", values="loss")
    assert ((same.lsa - same.gd).abs() < F64_TOL).all()
    figs = [(dual.plot_lsa_training(short_run.history), 3),
            (dual.plot_gd_alignment(short_run.history), 3), (dual.plot_ood(curves), 2)]
    for fig, n_traces in figs:
        assert isinstance(fig, go.Figure) and len(fig.data) == n_traces
    with pytest.raises(dual.DualError, match="lacks columns"):
        dual.plot_ood(short_run.history)


# ------------------------------------------------------------------------------ probes

# held-out R² of a (nearly) noise-free linear target, and |R²| of one with no signal: a
# linear probe on d features fitted to n noise samples scores about −d/n held out (12/1000)
R2_HIGH, R2_ZERO = 0.98, 0.05
R2_NO_SIGNAL = 0.1  # the same on a transformer's hidden states (24 features, MLP probe too)


def test_probe_r2_high_when_linear_near_zero_when_shuffled():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1500, 12, generator=g)
    A = torch.randn(12, 4, generator=g)
    target = h @ A + 0.01 * torch.randn(1500, 4, generator=g)
    shuffled = target[torch.randperm(1500, generator=g)]  # same marginals, no relation to h
    tr, te = slice(0, 1000), slice(1000, None)
    assert dual.linear_probe_r2(h[tr], target[tr], h[te], target[te]) > R2_HIGH
    assert dual.mlp_probe_r2(h[tr], target[tr], h[te], target[te], steps=300) > 0.9
    assert abs(dual.linear_probe_r2(h[tr], shuffled[tr], h[te], shuffled[te])) < R2_ZERO
    assert abs(dual.mlp_probe_r2(h[tr], shuffled[tr], h[te], shuffled[te], steps=300)) < R2_ZERO


def test_softmax_transformer_probes_per_layer():
    task = dual.TaskConfig(d_x=3, n=8)
    cfg = dual.SoftmaxTrainConfig(model=dual.SoftmaxTransformerConfig(
        d_model=24, n_layers=2, n_heads=2, d_mlp=32), task=task, steps=150, batch_size=64,
        lr=3e-3)
    model, hist = dual.train_softmax_transformer(cfg, progress=False)
    assert hist.loss.tail(20).mean() < 0.7 * hist.loss.head(20).mean(), "training did not help"
    train, test = (dual.sample_tasks(n, task, seed=s) for n, s in ((1500, 1), (400, 2)))
    df = dual.probe_layers(model, train, test, mlp_steps=200)
    assert df.shape == (3 * 2 * 2, 5) and df.r2.notna().all()
    # layer 0 is the query's embedding, a function of x_q alone: it holds nothing of the
    # context, so no target of the context is decodable there (24 features, 1500 tasks:
    # measured −0.03 … −0.02); after attention the MLP probe finds some (measured 0.33-0.38)
    assert (df[df.layer == 0].r2.abs() < R2_NO_SIGNAL).all(), df.to_string()
    assert df[(df.layer > 0) & (df.probe == "mlp")].r2.min() > 0.15, df.to_string()
    targets = dual.probe_targets(test)
    assert targets["w_ols"].shape == targets["xty"].shape == (400, 3)
    assert isinstance(dual.plot_probe_r2(df), go.Figure)


# ------------------------------------------------------------------------------ real heads


def test_construction_zero_fraction_counts_the_construction():
    w0 = torch.randn(DY, DX, dtype=torch.float64)
    w = dual.construction_weights(DX, DY, lr=LR, n=N, w0=w0)
    need = dual.construction_zero_fraction(DX + DY, d_x=DX, d_y=DY)
    for name in ("W_Q", "W_K", "W_V"):
        assert (w[name] == 0).double().mean() == pytest.approx(need[name], abs=1e-12), name
    big = dual.construction_zero_fraction(4096)  # LLaMA-7B width, Shen et al.
    assert big["W_K"] > 0.9998 and abs(big["W_V"] - 0.75) < 1e-3


def _fake_model(W_Q, W_K, W_V, W_O):
    return SimpleNamespace(W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O)


def test_block_similarity_is_one_for_the_construction_and_lower_for_random():
    d_model, d_head, k = 20, 6, 4
    E = torch.eye(d_model)
    Wq = torch.zeros(1, 1, d_model, d_head)
    Wq[0, 0, :, :k] = E[:, :k]  # W_Q W_Kᵀ = Π onto the first k coordinates ("x")
    Wv = torch.zeros(1, 1, d_model, d_head)
    Wv[0, 0, :, :2] = E[:, k:k + 2]
    Wo = -0.3 * Wv.mT  # W_V W_O = −0.3 Π onto two "y" coordinates
    df = dual.head_block_similarity(_fake_model(Wq, Wq.clone(), Wv, Wo))
    got = df.set_index("circuit")
    assert abs(got.score["QK"] - 1) < 1e-6 and got.best_k["QK"] == k
    assert abs(got.score["OV"] - 1) < 1e-6 and got.best_k["OV"] == 2
    assert (got.random_score < 0.9).all(), got.to_string()


def test_real_head_claims_on_tiny_model():
    model = ip.tiny_model()  # 3 layers, 4 query heads over 2 kv heads, d_model 48
    d = model.cfg.d_model
    out = dual.real_head_claims(model)
    sp = out["sparsity"]
    assert len(sp) == 3 * 5 * (4 + 2 + 2)  # layers x thresholds x (W_Q heads + W_K, W_V groups)
    assert sp.frac_below.between(0, 1).all()
    need = sp.groupby("matrix").construction_zeros.first()
    assert need["W_K"] == need["W_Q"] == pytest.approx(1 - (d // 2) / d ** 2)
    assert need["W_V"] == pytest.approx(1 - ((d // 2) ** 2 + d // 2) / d ** 2)
    # fractions grow with the threshold, per head
    wide = sp.pivot_table(index=["layer", "matrix", "head", "kv_head"], columns="threshold",
                          values="frac_below")
    assert (wide.diff(axis=1).iloc[:, 1:] >= 0).all().all()
    summary = out["sparsity_summary"]
    assert summary.heads_meeting.between(0, 1).all() and len(summary) == 15
    sim = out["similarity"]
    assert len(sim) == 3 * 4 * 2 and sim[["score", "random_score"]].abs().le(1).all().all()
    assert sim[["score", "random_score"]].notna().all().all()
    pairs = [ip.build_prompt(model, "capital", query=q, k=3, seed=q) for q in range(3)]
    fid = dual.head_fidelity(model, pairs)
    assert len(fid) == 3 * 4 and (fid.n_prompts == 3).all()
    assert fid[["fidelity_err_mean", "fidelity_err_median"]].ge(0).all().all()
    assert fid[["fidelity_err_mean", "fidelity_err_std"]].notna().all().all()
    assert isinstance(dual.plot_head_sparsity(sp), go.Figure)
    with pytest.raises(dual.DualError, match="stacked W_Q"):
        dual.head_sparsity(object())


# The claims against explicit references: every weight is cut into heads by hand from the
# Hugging Face projections (Llama layout: q_proj/k_proj/v_proj rows h*d_head:(h+1)*d_head,
# o_proj columns likewise), never through the bridge's stacked W_Q/W_K/W_V/W_O.
D_HEAD = 12  # tiny_hf_model() defaults: 3 layers, 4 query heads over 2 kv heads, d_model 48
KV_OF = {0: 0, 1: 0, 2: 1, 3: 1}  # query head -> key/value head, by hand (4 heads, 2 groups)
# a fraction below a threshold is a count over 48 x 12 = 576 entries divided by 576; the
# reference divides |w| by the max exactly as the definition does, so only the final division
# could round differently (measured: identical)
COUNT_TOL = 1e-12
# the block score two ways in float64: eigenvalues of the explicit 48 x 48 symmetric part
# against the library's QR-reduced core (different rounding, same spectrum; measured 1e-15)
SCORE_TOL = 1e-10


def _tiny_and_its_weights(dead=()):
    """A float64 tiny Llama (the tiny_model() default sizes) and its projection weights read
    before wrapping; ``dead``: (layer, "q_proj" | "k_proj" | "v_proj", head) slices zeroed."""
    hf, tok = tiny_hf_model(seed=6)
    hf = hf.double()
    with torch.no_grad():
        for layer, proj, i in dead:
            w = getattr(hf.model.layers[layer].self_attn, proj).weight
            w[i * D_HEAD:(i + 1) * D_HEAD] = 0
    hf_w = {n: p.detach().clone() for n, p in hf.named_parameters()}
    model = ip.load_model(hf, tokenizer=tok, device="cpu", dtype=torch.float64)

    def head(layer, proj, i):  # TransformerLens orientation: d_model d_head (W_O: d_head d_model)
        w = hf_w[f"model.layers.{layer}.self_attn.{proj}.weight"]
        if proj == "o_proj":
            return w[:, i * D_HEAD:(i + 1) * D_HEAD].T
        return w[i * D_HEAD:(i + 1) * D_HEAD].T

    return model, head


def _frac_below_by_hand(w, t, relative):
    vals = [abs(x) for x in w.flatten().tolist()]
    m = max(vals)
    return sum(1 for x in vals if (x / m if relative else x) < t) / len(vals)


def _row(df, **match):
    sel = df
    for k, v in match.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (match, len(sel))
    return sel.iloc[0]


def test_head_sparsity_matches_a_hand_count():
    model, head = _tiny_and_its_weights()
    proj = {"W_Q": "q_proj", "W_K": "k_proj", "W_V": "v_proj"}
    cases = [(2, "W_Q", 1), (0, "W_Q", 3), (1, "W_K", 1), (2, "W_V", 0)]
    refs = {}
    for relative in (True, False):
        sp = dual.head_sparsity(model, thresholds=[1e-2, 1e-3], relative=relative)
        for layer, name, i in cases:
            for t in (1e-2, 1e-3):
                ref = _frac_below_by_hand(head(layer, proj[name], i), t, relative)
                where = {"head": i} if name == "W_Q" else {"head": -1, "kv_head": i}
                row = _row(sp, layer=layer, matrix=name, threshold=t, **where)
                assert abs(row.frac_below - ref) < COUNT_TOL, (relative, layer, name, i, t)
                if name == "W_Q":
                    assert row.kv_head == KV_OF[i]
                refs[relative, layer, name, i, t] = ref
    # the two threshold kinds give different counts here, so a relative/absolute mix-up fails
    assert all(refs[True, *c, 1e-2] != refs[False, *c, 1e-2] for c in cases)


def test_each_sparsity_and_similarity_row_reads_its_own_head():
    """One dead head per matrix: exactly its rows are all-zero (sparsity 1 at every threshold,
    both threshold kinds), and exactly the circuits through it score 0."""
    dead = [(1, "q_proj", 2), (0, "k_proj", 1), (2, "v_proj", 0)]
    model, _ = _tiny_and_its_weights(dead)
    for relative in (True, False):
        sp = dual.head_sparsity(model, thresholds=[1e-2, 1e-4], relative=relative)
        full = sp[sp.frac_below == 1]
        got = sorted(set(map(tuple, full[["layer", "matrix", "head", "kv_head"]].values.tolist())))
        # W_Q head 2 belongs to kv head 1; W_K/W_V rows are per kv head (head = -1)
        assert got == [(0, "W_K", -1, 1), (1, "W_Q", 2, 1), (2, "W_V", -1, 0)], (relative, got)
        assert len(full) == 3 * 2  # each at both thresholds
    sim = dual.head_block_similarity(model)
    zero = sim[sim.score.abs() < SCORE_TOL]
    got = sorted(map(tuple, zero[["layer", "head", "circuit"]].values.tolist()))
    # QK of layer 0's heads 2, 3 (they read kv head 1), QK of layer 1's head 2, OV of
    # layer 2's heads 0, 1 (kv head 0)
    assert got == [(0, 2, "QK"), (0, 3, "QK"), (1, 2, "QK"), (2, 0, "OV"), (2, 1, "OV")]
    assert (sim.drop(zero.index).score > 0.1).all()  # every living circuit scores clearly


def _block_score_by_hand(M, sign):
    """max_k (Σ of the k largest eigenvalues of (M + Mᵀ)/2) / (√k ‖M‖_F) from the explicit
    matrix (sign -1: the k smallest, negated; 0: the better of the two), and its k."""
    lam = torch.linalg.eigvalsh(0.5 * (M + M.T)).tolist()  # ascending
    fro = math.sqrt(sum(x * x for x in M.flatten().tolist()))
    best = (-math.inf, 0)
    for k in range(1, len(lam) + 1):
        top, bottom = sum(lam[-k:]), -sum(lam[:k])
        val = {1: top, -1: bottom, 0: max(top, bottom)}[sign] / (math.sqrt(k) * fro)
        if val > best[0]:
            best = (val, k)
    return best


def test_block_similarity_matches_the_explicit_circuits():
    model, head = _tiny_and_its_weights()
    sim = dual.head_block_similarity(model)
    for layer in range(3):
        for h in range(4):
            g = KV_OF[h]
            qk = head(layer, "q_proj", h) @ head(layer, "k_proj", g).T  # W_Q W_Kᵀ, d_model²
            ov = head(layer, "v_proj", g) @ head(layer, "o_proj", h)  # W_V W_O
            for circuit, M, sign in (("QK", qk, 1), ("OV", ov, 0)):
                score, k = _block_score_by_hand(M, sign)
                row = _row(sim, layer=layer, head=h, circuit=circuit)
                assert abs(row.score - score) < SCORE_TOL, (layer, h, circuit)
                assert row.best_k == k, (layer, h, circuit)


def test_head_fidelity_matches_the_definition():
    """min_c ‖h − c h_lin‖ / ‖h‖ with h = W_O z, h_lin = W_O Σ_j v_j (k_j·q) over the prompt's
    demonstration and query tokens, per prompt by Python loops, then mean / median over
    prompts; also with a subset of layers, whose rows keep their own layer labels."""
    model, head = _tiny_and_its_weights()
    pairs = [ip.build_prompt(model, "capital", query=q, k=3, seed=q) for q in range(3)]
    err = {}  # (layer, head) -> per-prompt errors
    for p in pairs:
        rec = ip.trace(model, [p], what=("q", "k", "v", "z"))  # one prompt: no padding
        keys = p.spans.demo_indices().tolist() + p.spans.query_indices().tolist()
        assert rec.key_positions[0].tolist()[:len(p.icl_ids)] == list(range(len(p.icl_ids)))
        for layer in range(3):
            for h in range(4):
                g, W_O = KV_OF[h], head(layer, "o_proj", h)
                q = rec.at_pred("q")[layer, 0, h]
                k, v = rec.data["k"][layer, 0, :, g], rec.data["v"][layer, 0, :, g]
                z_lin = sum(v[j] * float(k[j] @ q) for j in keys)
                hh, hl = rec.at_pred("z")[layer, 0, h] @ W_O, z_lin @ W_O
                c = float(hh @ hl) / float(hl @ hl)
                err.setdefault((layer, h), []).append(float((hh - c * hl).norm() / hh.norm()))
    fid = dual.head_fidelity(model, pairs)
    some = dual.head_fidelity(model, updates=ip.implied_updates(model, pairs, layers=[2]))
    assert sorted(some.layer.unique()) == [2]
    for table in (fid, some):
        for row in table.itertuples():
            e = sorted(err[row.layer, row.head])
            assert abs(row.fidelity_err_mean - sum(e) / 3) < F64_TOL, (row.layer, row.head)
            assert abs(row.fidelity_err_median - e[1]) < F64_TOL, (row.layer, row.head)
            assert row.n_prompts == 3

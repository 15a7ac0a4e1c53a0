"""Replaying implied updates: zero-shot forwards with ICL's implied weight updates patched into
the weights, one layer after another, each layer's patch computed on the patched stream.

For a prompt pair, ``p`` is the prediction position of its zero-shot and of its ICL prompt.
The ICL forward leaves, per block ``l`` at ``p``: the MLP input ``u_c`` and the block's output
``y_c``. The replay runs the zero-shot prompt; when the stream reaches block ``l`` (already
changed by the patches below it) its own values at ``p`` are ``h_0`` (after attention) and
``u_0`` (the MLP input), and the patches of block ``l`` are built from them:

- ``mlp`` (Dherin et al. 2025; docs/science.md, 1c): each first-layer MLP matrix ``W`` (gate
  and up, or W_in) becomes ``W + W (u_c − u_0) u_0ᵀ / ‖u_0‖²``: at ``p`` the MLP computes what
  it computes on ``u_c``. The attention's direct effect on the residual (``h_c − h_0``) is
  not carried: an approximation.
- ``exact`` (Goldwaser, Munn, Gonzalvo and Dherin 2025): ``mlp`` plus an output patch that
  carries the rest of the block's context effect. In Gemma-style blocks (an RMSNorm after the
  MLP) it is their construction, the norm's scale multiplied elementwise by
  ``(y_c − h_0) / n`` with ``n`` the norm's output at ``p``; in blocks without that norm, a
  rank-1 patch of the MLP's output matrix, ``ΔW_out = (y_c − h_0 − m) aᵀ / ‖a‖²`` with ``a``
  the MLP's hidden activation and ``m`` its output at ``p``. Either way block ``l`` then
  outputs ``y_c`` at ``p``, so patching every block reproduces ICL's logits at ``p`` to
  float precision: exact, not an approximation.
- ``dual`` (Dai et al.'s linear-attention dual form; docs/science.md, 1a-1b): each head's
  output at ``p`` becomes ``(1 − λ) z + s ΔW_ICL q``, with ``λ`` the head's attention mass on
  the demonstrations in the ICL run, ``ΔW_ICL = Σ_{j∈D} v_j k_jᵀ`` and ``q`` the replay's own
  query at ``p``; ``s`` is the one scalar per head that best matches ``s ΔW_ICL q`` to the
  demonstrations' share ``λ z_D`` in the ICL run itself (the dual form drops the softmax's
  normalisation; fitting one scalar per head is the allowance docs/science.md's fidelity
  makes). An approximation by construction: it measures how much of ICL the dual form
  carries.

Patches act on every position, as changed weights do; only the dual form is applied at ``p``
alone, where its update is defined. ``random`` replaces every update by one of the same norm
(per layer and prompt) in a random direction; the ``shuffled_labels`` baseline replays the
updates of the same demonstrations with their labels shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import CausalError, TraceError
from ..probes import implied_updates
from ..probes.mlp import _mlp_weight, mlp_first_layers
from ..prompts import PromptPair

REPLAY_UPDATES = ("exact", "mlp", "dual")
_HOOKS = {
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "mlp_in": "blocks.{l}.mlp.hook_in",
    "resid_post": "blocks.{l}.hook_resid_post",
    "gate": "blocks.{l}.mlp.gate.hook_out",
    "in": "blocks.{l}.mlp.in.hook_out",
    "out_in": "blocks.{l}.mlp.out.hook_in",
    "out": "blocks.{l}.mlp.out.hook_out",
    "post_norm": "blocks.{l}.ln2_post.hook_out",
    "q": "blocks.{l}.attn.hook_rot_q",
    "z": "blocks.{l}.attn.hook_z",
}


@dataclass
class Targets:
    """What the ICL forward leaves at ``p``, per layer (layer batch ...): the MLP input
    ``u_c``, the block output ``y_c``; for the dual form ``dW`` (layer batch head d_head
    d_head), ``lam`` and ``scale`` (layer batch head)."""

    layers: tuple[int, ...]
    u_c: torch.Tensor
    y_c: torch.Tensor
    dW: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def rows(self, lo: int, hi: int) -> "Targets":
        cut = (lambda t: None if t is None else t[:, lo:hi])
        return Targets(self.layers, cut(self.u_c), cut(self.y_c), cut(self.dW), cut(self.lam),
                       cut(self.scale))


@dataclass
class Factors:
    """The patches of one layer for a batch, as factors (batch ...): ``b`` the input direction
    ``u_0 / ‖u_0‖²`` and ``a[name]`` the output vector of each first-layer matrix's rank-1
    update; ``c`` and ``e`` the MLP output matrix's (``ΔW_out = e cᵀ``); ``r`` the post-norm's
    scale ratio; ``dW`` (batch head d_head d_head, scale included) and ``lam`` the dual form's.
    A ``source`` axis after the batch axis holds several updates applied as their mean
    (transfer); computed updates have one."""

    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: torch.Tensor | None = None
    c: torch.Tensor | None = None
    e: torch.Tensor | None = None
    r: torch.Tensor | None = None
    dW: torch.Tensor | None = None
    lam: torch.Tensor | None = None


def check_replayable(model: Any, updates: str) -> None:
    """Refuse, before any forward, a model whose blocks the replay cannot patch."""
    if updates not in REPLAY_UPDATES:
        raise CausalError(f"replay: updates={updates!r}; expected one of {REPLAY_UPDATES}")
    if getattr(model.cfg, "parallel_attn_mlp", False):
        raise CausalError("replay: this model runs attention and MLP in parallel; the replay's "
                          "patches assume the MLP reads the attention's output (sequential "
                          "blocks)")
    need = ["resid_mid", "mlp_in", "resid_post"]
    need += {"exact": ["out_in", "out"], "mlp": [], "dual": ["z"]}[updates]
    for name in need:
        hook = _HOOKS[name].format(l=0)
        if hook not in model.hook_dict:
            raise CausalError(f"replay(updates={updates!r}): this model has no hook {hook!r}")
    if updates != "dual":
        for l in range(model.cfg.n_layers):
            mlp_first_layers(model, l)  # raises where the MLP has no linear first layer


def icl_targets(model: Any, pairs: Sequence[PromptPair], layers: Sequence[int],
                updates: str) -> Targets:
    """One ICL forward of ``pairs`` (and, for ``dual``, the traced one of its implied
    updates)."""
    u_c, y_c = at_pred(model, pairs, layers, (_HOOKS["mlp_in"], _HOOKS["resid_post"]), "icl")
    t = Targets(tuple(layers), u_c, y_c)
    if updates == "dual":
        up = implied_updates(model, list(pairs), layers=layers)
        dWq = torch.einsum("lbhvk,lbhk->lbhv", up.dW_icl, up.q)
        target = up.lam[..., None] * up.z_D
        den = (dWq * dWq).sum(-1).clamp_min(torch.finfo(dWq.dtype).tiny)
        t.dW, t.lam, t.scale = up.dW_icl, up.lam, (target * dWq).sum(-1) / den
    return t


def at_pred(model: Any, pairs: Sequence[PromptPair], layers: Sequence[int],
            hook: str | Sequence[str], kind: str) -> Any:
    """The value of ``hook`` (a template in ``l``) at each prompt's prediction position, per
    layer: (layer batch ...), in right-padded batches; several templates: a tuple, one
    forward."""
    names = (hook,) if isinstance(hook, str) else tuple(hook)
    out: list[list[torch.Tensor]] = [[] for _ in names]
    for ids, last in batches(pairs, kind):
        seen: dict[tuple[int, int], torch.Tensor] = {}
        rows = torch.arange(len(last))

        def keep(x, hook=None, key=(0, 0)):
            seen[key] = x[rows.to(x.device), last.to(x.device)].detach().clone()

        hooks = [(name.format(l=l), _bind(keep, key=(i, l)))
                 for i, name in enumerate(names) for l in layers]
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            model(ids.to(_device(model)))
        for i, name in enumerate(names):
            if any((i, l) not in seen for l in layers):
                raise TraceError(f"{name} did not fire on this model")
            out[i].append(torch.stack([seen[(i, l)] for l in layers]))
    got = tuple(torch.cat(o, 1) for o in out)
    return got[0] if isinstance(hook, str) else got


def replay_logits(model: Any, pairs: Sequence[PromptPair], patched: Sequence[int],
                  updates: str, *, targets: Targets | None = None,
                  factors: dict[int, Factors] | None = None,
                  randomize: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[int, Factors]]:
    """The zero-shot forwards of ``pairs`` with the updates of the blocks in ``patched``: from
    ``targets`` (computed on the patched stream), or the given ``factors`` (transfer). The
    logits at ``p`` (batch d_vocab on the CPU, float32 or float64) and the factors used."""
    if (targets is None) == (factors is None):
        raise CausalError("replay_logits: pass targets or factors, not both")
    out, used, lo = [], {l: [] for l in patched}, 0
    for ids, last in batches(pairs, "zs"):
        hi = lo + len(last)
        part = targets.rows(lo, hi) if targets is not None else None
        given = None if factors is None else {l: _rows(f, lo, hi) for l, f in factors.items()}
        hooks, made = _layer_hooks(model, patched, updates, last, part, given, randomize)
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            logits = model(ids.to(_device(model)))
        at_p = logits[torch.arange(len(last)), last.to(logits.device)]
        out.append(at_p.to(wide(logits.dtype)).cpu())
        for l in patched:
            used[l].append(made[l])
        lo = hi
    return torch.cat(out), {l: _cat(fs) for l, fs in used.items()}


def _layer_hooks(model: Any, patched: Sequence[int], updates: str, last: torch.Tensor,
                 targets: Targets | None, given: dict[int, Factors] | None,
                 randomize: torch.Generator | None) -> tuple[list, dict[int, Factors]]:
    """The forward hooks of one batch, and the factors they build (filled as it runs)."""
    dev = _device(model)
    at = (torch.arange(len(last), device=dev), last.to(dev))  # (row, p) of each prompt
    hooks, made = [], {}
    for l in patched:
        made[l] = given[l] if given is not None else Factors()
        hooks += _block_hooks(model, l, updates, at, made[l], targets, randomize)
    return hooks, made


def _block_hooks(model: Any, l: int, updates: str, at: tuple[torch.Tensor, torch.Tensor],
                 f: Factors, targets: Targets | None, randomize: torch.Generator | None
                 ) -> list:
    """Block ``l``'s hooks: they build ``f`` on the stream (given ``targets``) or apply it."""
    st: dict[str, torch.Tensor] = {}
    compute = targets is not None
    li = targets.layers.index(l) if compute else -1

    def mid(x, hook=None):
        st["h0"] = x[at].clone()

    def mlp_in(x, hook=None):
        st["u"] = x
        if compute:
            u0 = x[at]
            f.b = (u0 / (u0 * u0).sum(-1, keepdim=True))[:, None]
            du = targets.u_c[li].to(x) - u0
            for inp in mlp_first_layers(model, l):
                a = du @ _mlp_weight(model, l, inp).to(x).T
                f.a[inp.name] = _same_norm(a, randomize)[:, None]

    def first(x, hook=None, name="in"):  # (W + a bᵀ) u, for every source's (a, b), averaged
        beta = torch.einsum("bpd,bsd->bps", st["u"], f.b.to(x))
        return x + torch.einsum("bps,bsm->bpm", beta, f.a[name].to(x)) / f.b.shape[1]

    def out_in(x, hook=None):
        st["act"] = x

    def out(x, hook=None):  # (W_out + e cᵀ) act
        if compute:
            a = st["act"][at]
            f.c = (a / (a * a).sum(-1, keepdim=True))[:, None]
            f.e = _same_norm(targets.y_c[li].to(x) - st["h0"] - x[at], randomize)[:, None]
        g = torch.einsum("bpm,bsm->bps", st["act"], f.c.to(x))
        return x + torch.einsum("bps,bsd->bpd", g, f.e.to(x)) / f.c.shape[1]

    def norm_out(x, hook=None):  # the post-MLP norm's scale times r
        if compute:
            n, t = x[at], targets.y_c[li].to(x) - st["h0"]
            f.r = (1 + _same_norm(torch.where(n != 0, t / n, 1) - 1, randomize))[:, None]
        return x * f.r.to(x).mean(1)[:, None]

    def q_at_p(x, hook=None):
        st["q"] = x[at]

    def z_at_p(x, hook=None):  # (1 − λ) z + s ΔW q, at p only
        if compute:
            dW = targets.dW[li] * targets.scale[li][..., None, None]
            f.dW = _same_norm(dW.flatten(-2), randomize).view_as(dW)[:, None]
            f.lam = targets.lam[li][:, None]
        x = x.clone()
        lam = f.lam.to(x).mean(1)
        dz = torch.einsum("bhvk,bhk->bhv", f.dW.to(x).mean(1), st["q"].to(x))
        x[at] = (1 - lam[..., None]) * x[at] + dz
        return x

    H = {k: v.format(l=l) for k, v in _HOOKS.items()}
    if H["q"] not in model.hook_dict:  # no rotary: the query before it is what is used
        H["q"] = f"blocks.{l}.attn.hook_q"
    hooks = [(H["resid_mid"], mid)]
    if updates in ("exact", "mlp"):
        hooks.append((H["mlp_in"], mlp_in))
        hooks += [(H[inp.name], _bind(first, name=inp.name)) for inp in mlp_first_layers(model, l)]
    if updates == "exact" and _HOOKS["post_norm"].format(l=l) in model.hook_dict:
        hooks.append((H["post_norm"], norm_out))
    elif updates == "exact":
        hooks += [(H["out_in"], out_in), (H["out"], out)]
    if updates == "dual":
        hooks += [(H["q"], q_at_p), (H["z"], z_at_p)]
    return hooks


def _same_norm(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """``x`` itself, or with ``gen`` a random direction of each row's norm (batch ...)."""
    if gen is None:
        return x
    r = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
    scale = x.flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)
    return r * scale.view(-1, *([1] * (x.dim() - 1)))


def _rows(f: Factors, lo: int, hi: int) -> Factors:
    cut = (lambda t: None if t is None else t[lo:hi])
    return Factors({k: v[lo:hi] for k, v in f.a.items()}, cut(f.b), cut(f.c), cut(f.e),
                   cut(f.r), cut(f.dW), cut(f.lam))


def _cat(fs: list[Factors]) -> Factors:
    def join(get: Callable[[Factors], torch.Tensor | None]) -> torch.Tensor | None:
        parts = [get(f) for f in fs]
        return None if parts[0] is None else torch.cat(parts)

    return Factors({k: torch.cat([f.a[k] for f in fs]) for k in fs[0].a},
                   join(lambda f: f.b), join(lambda f: f.c), join(lambda f: f.e),
                   join(lambda f: f.r), join(lambda f: f.dW), join(lambda f: f.lam))


def mean_factors(f: Factors, sources: Sequence[Sequence[int]]) -> Factors:
    """Factors whose row ``i`` applies the mean of the updates of rows ``sources[i]`` (all of
    equal length): what query ``i`` receives in a transfer."""
    idx = torch.tensor([list(s) for s in sources])

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, 0][idx]

    return Factors({k: pick(v) for k, v in f.a.items()}, pick(f.b), pick(f.c), pick(f.e),
                   pick(f.r), pick(f.dW), pick(f.lam))


def batches(pairs: Sequence[PromptPair], kind: str, size: int = 32):
    """Right-padded batches of the prompts' ids, in order, with each row's last position."""
    for lo in range(0, len(pairs), size):
        ids = [p.ids(kind) for p in pairs[lo: lo + size]]
        last = torch.tensor([len(x) - 1 for x in ids])
        batch = torch.zeros(len(ids), int(last.max()) + 1, dtype=torch.long)
        for r, x in enumerate(ids):
            batch[r, : len(x)] = x
        yield batch, last


def _bind(fn: Callable, **kw: Any) -> Callable:
    return lambda x, hook=None: fn(x, hook, **kw)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def wide(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; anything narrower is read in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

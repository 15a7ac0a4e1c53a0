"""Real gradient descent on exactly the demonstrations of an ICL prompt (REFERENCE.md §2).

:func:`finetune` trains the selected parameters in place, records the real deltas
``θ_FT − θ_0`` and restores ``θ_0`` exactly (from the saved originals), so the base model is
unchanged afterwards. Memory while training: the model, a copy of the trained parameters'
original values (needed for the exact restore: float deltas cannot give θ_0 back bit for bit),
their gradients and the optimiser's state; afterwards: the model and the deltas. The returned :class:`FineTune` carries the deltas and ``ft.model``, a
view of the base model with the deltas applied during each forward (and to the weights it
reports), usable with :func:`icl_probe.trace` and :func:`icl_probe.implied_updates`.

Methods (one training example = ``[BOS] + one demonstration's tokens``; loss = causal-LM
cross-entropy averaged over the demonstration's input and label tokens, as in Dai et al.'s
code where the separator between demonstrations is stripped; ``loss_tokens`` keeps the
separator or scores the label tokens only):

- ``"dai"``: SGD, batch size 1, one epoch, one step per demonstration in prompt order
  (Dai et al. 2023's code); parameters ``k_proj`` and ``v_proj`` of every layer by default.
- ``"batch"``: full-batch GD, ``steps`` steps on the mean loss over all demonstrations. The
  per-demonstration losses are summed in a canonical order (by item index), so the result is
  exactly independent of the prompt's order.
- ``"adam"``: Adam (β = 0.9, 0.999), batch size 1 in prompt order, ``epochs`` epochs.
- ``"lcgd"``: layer-causal GD (Deutch et al. 2024): every block's input is detached, every
  block's output is decoded through the frozen final norm and unembedding (logit lens), the
  loss is the sum over layers of those cross-entropies; SGD, batch size 1, prompt order.

Parameter sets: ``"kv"``, ``"qkvo"``, ``"mlp"``, ``"all"``, or ``"v:L"`` (layer L's W_V only,
Shen et al.'s sub-model GD). Deltas are keyed by the Hugging Face parameter name
(``model.layers.3.self_attn.k_proj.weight``).

>>> import icl_probe as ip
>>> model = ip.tiny_model()
>>> pair = ip.build_prompt(model, "capital", query=0, k=2)
>>> ft = ip.finetune(model, pair, method="dai", params="kv", lr=1e-2)
>>> sorted(ft.deltas)[:2]
['model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight']
>>> ft.diverged, len(ft.losses)
(False, 2)
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import IclProbeError
from .prompts import PromptPair, Span

METHODS = ("dai", "batch", "adam", "lcgd")
# A run whose last loss exceeds this multiple of its first counts as diverged: at a sane rate
# the per-demonstration losses stay level or fall; lr = 1e3 on the embedded model triples it.
DIVERGENCE_FACTOR = 3.0
PARAM_SETS = ("kv", "qkvo", "mlp", "all")


class FineTuneError(IclProbeError):
    """A fine-tuning request is malformed."""


def canonical_name(bridge_name: str) -> str:
    """The Hugging Face parameter name behind a bridge parameter name."""
    return bridge_name.replace("._original_component", "")


def trainable_parameters(model: Any, params: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a parameter set selects, keyed by Hugging Face name."""
    named: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named[canonical_name(n)] = p
    layer_re = r"\.layers\.(\d+)\."
    if params == "all":
        return named
    if params in ("kv", "qkvo", "mlp"):
        wanted = {"kv": ("k_proj", "v_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp": ("gate_proj", "up_proj", "down_proj", "fc_in", "fc_out", "c_fc",
                          "c_proj", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2")}[params]
        out = {n: p for n, p in named.items()
               if re.search(layer_re, n) and any(f".{w}." in n for w in wanted)
               and (params == "mlp") == (".mlp." in n)}
    elif m := re.fullmatch(r"v:(\d+)", params):
        layer = int(m.group(1))
        if not 0 <= layer < model.cfg.n_layers:
            raise FineTuneError(f"params={params!r}: the model has layers 0..{model.cfg.n_layers - 1}")
        out = {n: p for n, p in named.items()
               if re.search(rf"\.layers\.{layer}\.", n) and ".v_proj." in n}
    else:
        raise FineTuneError(
            f"params={params!r}: expected one of {PARAM_SETS} or 'v:L' (layer L's W_V)")
    if not out:
        raise FineTuneError(
            f"params={params!r} selects no parameter of this model: it needs separate "
            "q/k/v/o projections (Llama-style); fused-QKV models (GPT-2, NeoX) support 'mlp' "
            "and 'all'")
    return out


@dataclass
class FineTune:
    """Result of :func:`finetune`: real deltas ``θ_FT − θ_0`` per parameter, the loss of each
    step, whether the run diverged and why (``divergence``: a non-finite loss or parameter
    stops it, the deltas kept as they were; a final loss above ``DIVERGENCE_FACTOR`` times the
    first also counts; :func:`icl_probe.compare` adds collapsed outputs), the per-step query
    vectors of the demonstration tokens (for Kendall),
    and ``model``: the fine-tuned view of the base model."""

    deltas: dict[str, torch.Tensor]
    losses: list[float]
    diverged: bool
    method: str
    params: str
    lr: float
    step_queries: list[torch.Tensor] = field(default_factory=list, repr=False)
    step_demos: list[int] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    divergence: str | None = None

    def layer_deltas(self) -> dict[int, dict[str, torch.Tensor]]:
        """Deltas grouped by layer index (parameters outside the layers under -1)."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for n, d in self.deltas.items():
            m = re.search(r"\.layers\.(\d+)\.", n)
            out.setdefault(int(m.group(1)) if m else -1, {})[n] = d
        return out


class FineTunedModel:
    """The base model with ``deltas`` applied during every forward and weight access.

    During a forward, each module that owns a fine-tuned parameter gets ``base + delta`` just
    before its own forward runs and its base weights back right after (module hooks), so at
    most one module's patched weights exist at a time: memory stays at the base model plus the
    deltas, even for an ``all`` fine-tune. Stacked weight reads (``W_Q`` ...) patch the whole
    model for the read and restore it in ``finally``. The base model is never modified.
    Everything else (``cfg``, ``tokenizer``, ``hook_dict``, ``hooks``) is the base model's.
    """

    _WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate",
                "W_out", "W_E", "W_U")

    def __init__(self, base: Any, deltas: dict[str, torch.Tensor]):
        self.__dict__["_base"] = base
        self.__dict__["_deltas"] = deltas
        params = trainable_parameters(base, "all")
        missing = [n for n in deltas if n not in params]
        if missing:
            raise FineTuneError(f"deltas for unknown parameters: {missing[:3]}")
        self.__dict__["_params"] = {n: params[n] for n in deltas}
        by_id = {id(p): n for n, p in self._params.items()}
        owners: dict[torch.nn.Module, list[str]] = {}
        for module in base.modules():
            names = [by_id[id(p)] for p in module._parameters.values()
                     if p is not None and id(p) in by_id]
            if names:
                owners[module] = names
        self.__dict__["_owners"] = owners
        self.__dict__["max_patched"] = 0  # most parameters patched at once (for tests)

    def _patch(self, names: Sequence[str]) -> list:
        saved = []
        for n in names:
            p = self._params[n]
            saved.append((p, p.data))
            p.data = p.data + self._deltas[n].to(p.device, p.dtype)
        return saved

    @staticmethod
    def _restore(saved: list) -> None:
        for p, data in reversed(saved):
            p.data = data

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Every fine-tuned parameter patched at once (for weight reads)."""
        saved = []
        try:
            saved = self._patch(list(self._params))
            yield
        finally:
            self._restore(saved)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stack: list[list] = []
        live = [0]

        def pre(module: torch.nn.Module, inputs: Any) -> None:
            stack.append(self._patch(self._owners[module]))
            live[0] += len(stack[-1])
            self.__dict__["max_patched"] = max(self.max_patched, live[0])

        def post(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            saved = stack.pop()
            live[0] -= len(saved)
            self._restore(saved)

        handles = []
        try:
            for module in self._owners:
                handles.append(module.register_forward_pre_hook(pre))
                handles.append(module.register_forward_hook(post))
            return self._base(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            while stack:  # an exception inside a module's forward
                self._restore(stack.pop())

    def __getattr__(self, name: str) -> Any:
        if name in self._WEIGHTS:
            with self.applied():
                w = getattr(self._base, name)
                return w.clone() if isinstance(w, torch.Tensor) else w
        return getattr(self._base, name)


# ------------------------------------------------------------------------------ losses


LOSS_TOKENS = ("demo", "demo+sep", "label")


def _examples(pair: PromptPair, loss_tokens: str = "demo"
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, targets mask over positions 1..) for each demonstration, in prompt order.

    One training example is ``[BOS] + the demonstration's tokens``. ``loss_tokens``:
    ``"demo"`` (Dai et al.'s code: the input and label tokens; the separator between
    demonstrations is stripped from the example), ``"demo+sep"`` (the separator kept and
    scored too), ``"label"`` (only the label tokens are scored)."""
    if loss_tokens not in LOSS_TOKENS:
        raise FineTuneError(f"loss_tokens={loss_tokens!r}: expected one of {LOSS_TOKENS}")
    out = []
    bos = pair.icl_ids[: pair.spans.bos.stop] if pair.spans.bos is not None else pair.icl_ids[:0]
    for d in pair.spans.demos:
        whole = d.whole if loss_tokens == "demo+sep" else Span(d.input.start, d.label.stop)
        ids = torch.cat([bos, pair.icl_ids[whole.slice]])
        off = len(bos) - whole.start
        mask = torch.zeros(len(ids), dtype=torch.bool)
        span = d.label if loss_tokens == "label" else whole
        mask[span.start + off: span.stop + off] = True
        mask[0] = False  # the first token has nothing to be predicted from
        out.append((ids, mask))
    return out


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[t] from logits[t-1] over masked positions t."""
    t = mask.nonzero()[:, 0]
    x = logits[t - 1]
    if x.dtype in (torch.float16, torch.bfloat16):  # the loss in float32 for half models
        x = x.float()
    return F.cross_entropy(x, ids[t])


def _example_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, method: str,
                  qhooks: list) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = mask.to(device)
    if method != "lcgd":
        with model.hooks(fwd_hooks=qhooks):
            logits = model(ids[None])[0]
        return _ce(logits, ids, mask)
    outs: list[torch.Tensor] = []
    hooks = list(qhooks)
    for l in range(model.cfg.n_layers):
        hooks.append((f"blocks.{l}.hook_resid_pre", lambda x, hook=None: x.detach()))
        hooks.append((f"blocks.{l}.hook_resid_post", lambda x, hook=None: outs.append(x)))
    with model.hooks(fwd_hooks=hooks):
        model(ids[None])
    # logit lens through the frozen final norm and unembedding
    return sum(_ce(model.unembed(model.ln_final(x))[0], ids, mask) for x in outs)


def finetune(
    model: Any,
    pair: PromptPair,
    method: str = "dai",
    params: str = "kv",
    lr: float = 1e-3,
    *,
    steps: int = 1,
    epochs: int = 1,
    loss_tokens: str = "demo",
    record_queries: bool = True,
    seed: int = 0,
) -> FineTune:
    """Fine-tune on exactly ``pair``'s demonstrations; return the real deltas and a
    fine-tuned view of the model (see the module docstring for methods and parameter sets).
    The base model's parameters are restored exactly before returning."""
    if method not in METHODS:
        raise FineTuneError(f"method={method!r}: expected one of {METHODS}")
    if not pair.spans.demos:
        raise FineTuneError("finetune(): the prompt has no demonstrations to train on")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise FineTuneError(f"lr={lr!r}: expected a positive finite learning rate")
    torch.manual_seed(seed)
    train = trainable_parameters(model, params)
    if not isinstance(steps, int) or steps < 1 or not isinstance(epochs, int) or epochs < 1:
        raise FineTuneError(f"steps={steps!r}, epochs={epochs!r}: both must be integers >= 1 "
                            "(a fine-tune that trains nothing is almost always a mistake)")
    examples = _examples(pair, loss_tokens)
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    saved = {n: p.detach().clone() for n, p in train.items()}
    losses: list[float] = []
    queries: list[torch.Tensor] = []
    demo_of_step: list[int] = []
    diverged = False

    q_store: list[torch.Tensor] = []
    qhooks = []
    if record_queries:
        names = [f"blocks.{l}.attn.hook_rot_q" if f"blocks.{l}.attn.hook_rot_q" in model.hook_dict
                 else f"blocks.{l}.attn.hook_q" for l in range(model.cfg.n_layers)]
        qhooks = [(n, lambda x, hook=None: q_store.append(x[0].detach().clone())) for n in names]

    try:
        for p in all_params:
            p.requires_grad_(False)
        for p in train.values():
            p.requires_grad_(True)
        plist = list(train.values())
        if method == "adam":
            opt = torch.optim.Adam(plist, lr=lr)
        else:
            opt = torch.optim.SGD(plist, lr=lr)
        model.train(False)  # no dropout: the deltas are deterministic

        def step(loss: torch.Tensor) -> bool:
            """One optimiser step; True when the run has diverged (and must stop)."""
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return True
            loss.backward()
            opt.step()
            return not all(torch.isfinite(p).all() for p in plist)

        if method == "batch":
            canonical = sorted(range(len(examples)), key=lambda i: pair.demos[i])
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = sum(_example_loss(model, *examples[i], method, []) for i in canonical)
                if diverged := step(loss / len(examples)):
                    break
        else:
            for _ in range(epochs if method == "adam" else 1):
                for i, (ids, mask) in enumerate(examples):
                    opt.zero_grad(set_to_none=True)
                    q_store.clear()
                    loss = _example_loss(model, ids, mask, method, qhooks)
                    if record_queries:
                        queries.append(torch.stack(q_store))  # layer pos head d_head
                        demo_of_step.append(i)
                    if diverged := step(loss):
                        break
                if diverged:
                    break
        deltas = {n: (p.detach() - saved[n]) for n, p in train.items()}
    finally:
        with torch.no_grad():
            for n, p in train.items():
                p.copy_(saved[n])
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
        model.eval()
    reason = None
    if diverged:
        reason = "non-finite loss or parameter"
    elif len(losses) > 1 and losses[-1] > DIVERGENCE_FACTOR * losses[0]:
        diverged = True
        reason = (f"final loss {losses[-1]:.3g} > {DIVERGENCE_FACTOR:g} x the first "
                  f"({losses[0]:.3g})")
    ft = FineTune(deltas=deltas, losses=losses, diverged=diverged, method=method, params=params,
                  lr=float(lr), step_queries=queries, step_demos=demo_of_step,
                  divergence=reason)
    ft.model = FineTunedModel(model, deltas)
    return ft


def finetune_sweep(model: Any, pair: PromptPair, lrs: Sequence[float], **kwargs: Any) -> list[FineTune]:
    """:func:`finetune` at each learning rate; diverged runs are kept (``ft.diverged``)."""
    return [finetune(model, pair, lr=lr, **kwargs) for lr in lrs]

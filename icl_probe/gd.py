"""Real gradient descent on exactly the demonstrations of an ICL prompt (docs/science.md,
Gradient-descent comparators).

:func:`finetune` trains the selected parameters in place, records the real deltas
``θ_FT − θ_0`` and restores ``θ_0`` exactly (from the saved originals), so the base model is
unchanged afterwards. Memory while training: the model, a copy of the trained parameters'
original values (needed for the exact restore: float deltas cannot give θ_0 back bit for bit),
their gradients and the optimiser's state; afterwards: the model and the deltas. The returned
:class:`FineTune` carries the deltas and ``ft.model``, a view of the base model with the
deltas applied during each forward (and to the weights it reports), usable with :func:`icl_probe.trace` and :func:`icl_probe.implied_updates`.

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
(``model.layers.3.self_attn.k_proj.weight``); on fused-QKV models (GPT-2, GPT-NeoX) by the
bridge's split q/k/v maps (``transformer.h.0.attn.k.weight``), which its forward runs through.
``ft.projection_deltas()`` gives them per logical projection (q, k, v, o) on every family.

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
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import FineTuneError
from .hooks import logits_to_keep, query_capture_hooks
from .prompts import PromptPair, Span

METHODS = ("dai", "batch", "adam", "lcgd")
# A run whose last loss exceeds this multiple of its first counts as diverged: at a sane rate
# the per-demonstration losses stay level or fall; lr = 1e3 on the embedded model triples it.
DIVERGENCE_FACTOR = 3.0
# ... and so does a run after which the loss of its first training example, recomputed with
# the final weights, exceeds this multiple of that example's loss before training: a run that
# trained on an example and made it much worse has overshot. This also covers one- and
# few-step runs (a full-batch step records one loss), which the rule above cannot judge.
RISE_FACTOR = 2.0
# An output whose logits over the vocabulary vary less than this is collapsed (lr = 1e6 on the
# embedded model drives the standard deviation to exactly 0); compare() applies the same rule
# to every query's fine-tuned logits.
COLLAPSE_STD = 1e-4
PARAM_SETS = ("kv", "qkvo", "mlp", "all")


def learning_rate(lr: Any, where: str) -> float:
    """``lr`` as a float: any real number type (``np.float32(0.01)`` included) that is
    positive and finite; ``True``/``False`` are refused (a bool is not a rate)."""
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise FineTuneError(f"{where}: got {lr!r} ({type(lr).__name__}); expected a positive "
                            "finite number such as 1e-3")
    value = float(lr)
    if not (value > 0 and math.isfinite(value)):
        raise FineTuneError(f"{where}: got {lr!r}; expected a positive finite learning rate")
    return value


@dataclass(frozen=True)
class FineTuneConfig:
    """One fine-tuning setting (see :func:`icl_probe.finetune`): ``method`` (``dai``,
    ``batch``, ``adam``, ``lcgd``), ``params`` (``kv``, ``qkvo``, ``mlp``, ``all``, ``v:L``),
    ``lr``, ``steps`` (full-batch GD), ``epochs`` (Adam) and ``loss_tokens`` (``demo``:
    input + label, Dai's choice; ``demo+sep``; ``label``)."""

    method: str = "dai"
    params: str = "kv"
    lr: float = 1e-3
    steps: int = 1
    epochs: int = 1
    loss_tokens: str = "demo"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FineTuneError(f"FineTuneConfig(method={self.method!r}): expected one of "
                                f"{METHODS}")
        if self.loss_tokens not in LOSS_TOKENS:
            raise FineTuneError(f"FineTuneConfig(loss_tokens={self.loss_tokens!r}): expected one "
                               f"of {LOSS_TOKENS}")
        object.__setattr__(self, "lr", learning_rate(self.lr, "FineTuneConfig(lr=...)"))
        for name in ("steps", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FineTuneError(f"FineTuneConfig({name}={v!r}): expected an integer >= 1")

    @property
    def name(self) -> str:
        """``dai``, or ``dai[qkvo]`` when the parameter set is not Dai's ``kv``."""
        return self.method + ("" if self.params == "kv" else f"[{self.params}]")

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def canonical_name(bridge_name: str) -> str:
    """The Hugging Face parameter name behind a bridge parameter name."""
    return bridge_name.replace("._original_component", "")


def named_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Every distinct parameter of a bridged model, keyed by its Hugging Face name (the first
    of the bridge's aliases)."""
    named: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            named[canonical_name(n)] = p
    return named


PROJECTIONS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Projection:
    """One logical attention projection (``q``, ``k``, ``v`` or ``o``) of one layer: the
    parameters its forward reads, by name, and their layout.

    On fused-QKV models (GPT-2's Conv1D ``c_attn``, GPT-NeoX's ``query_key_value``, interleaved
    per head) the bridge splits the fused matrix when it loads the model into separate q/k/v
    linear maps (views into ``c_attn`` on GPT-2, de-interleaved copies on NeoX), and the forward
    runs through those: they are the parameters a fine-tune trains, so a projection that is not
    selected is never touched (its delta is exactly 0) and nothing needs a gradient mask.
    Their names are the split maps' (``transformer.h.0.attn.k.weight``)."""

    layer: int
    name: str
    weight: str
    bias: str | None
    conv1d: bool  # weight stored (d_in, d_out) as GPT-2's Conv1D, else (d_out, d_in)


def attention_projections(model: Any, layer: int,
                          named: dict[str, torch.nn.Parameter] | None = None
                          ) -> dict[str, Projection]:
    """The q, k, v and o :class:`Projection` s of ``layer``, read off the bridge's attention
    (its ``q``/``k``/``v``/``o`` linear bridges)."""
    from transformers.pytorch_utils import Conv1D

    named = named_parameters(model) if named is None else named
    by_id = {id(p): n for n, p in named.items()}
    attn = model.blocks[layer].attn
    out: dict[str, Projection] = {}
    for proj in PROJECTIONS:
        inner = getattr(attn._modules.get(proj), "original_component", None)
        weight = getattr(inner, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or id(weight) not in by_id:
            raise FineTuneError(
                f"layer {layer}: the attention of this model ({type(attn).__name__}) has no "
                f"linear {proj!r} projection the bridge exposes, so parameter sets built from "
                "q/k/v/o ('kv', 'qkvo', 'v:L') do not apply; use 'mlp' or 'all'")
        bias = getattr(inner, "bias", None)
        out[proj] = Projection(layer, proj, by_id[id(weight)],
                               by_id.get(id(bias)) if isinstance(bias, torch.Tensor) else None,
                               isinstance(inner, Conv1D))
    return out


def parameter_layers(model: Any) -> dict[str, int]:
    """The block index of every parameter inside a block, by Hugging Face name."""
    by_id = {id(p): n for n, p in named_parameters(model).items()}
    return {by_id[id(p)]: l for l, block in enumerate(model.blocks) for p in block.parameters()
            if id(p) in by_id}


def trainable_parameters(model: Any, params: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a parameter set selects, keyed by Hugging Face name.

    ``"kv"`` / ``"qkvo"``: the k and v (q, k, v and o) projections of every layer, weights and
    biases; ``"v:L"``: layer L's v projection; ``"mlp"``: every parameter of every block's MLP;
    ``"all"``: everything. Projections are found through the bridge's attention structure
    (:func:`attention_projections`), so fused-QKV models (GPT-2, GPT-NeoX) select exactly the
    rows of the chosen projections."""
    named = named_parameters(model)
    if params == "all":
        return named
    n_layers = model.cfg.n_layers
    if params in ("kv", "qkvo"):
        chosen = [(l, p) for l in range(n_layers) for p in (("k", "v") if params == "kv"
                                                             else PROJECTIONS)]
    elif m := re.fullmatch(r"v:(\d+)", params):
        layer = int(m.group(1))
        if not 0 <= layer < n_layers:
            raise FineTuneError(f"params={params!r}: the model has layers 0..{n_layers - 1}")
        chosen = [(layer, "v")]
    elif params == "mlp":
        by_id = {id(p): n for n, p in named.items()}
        out = {by_id[id(p)]: p for block in model.blocks for p in block.mlp.parameters()
               if id(p) in by_id}
        if not out:
            raise FineTuneError("params='mlp' selects no parameter: this model's blocks have "
                                "no MLP parameters")
        return out
    else:
        raise FineTuneError(
            f"params={params!r}: expected one of {PARAM_SETS} or 'v:L' (layer L's W_V)")
    out = {}
    projections = {l: attention_projections(model, l, named) for l in {l for l, _ in chosen}}
    for l, p in chosen:
        proj = projections[l][p]
        for name in (proj.weight, proj.bias):
            if name is not None:
                out[name] = named[name]
    return out


def _to_heads(x: torch.Tensor, proj: Projection, n_heads: int, bias: bool) -> torch.Tensor:
    """A projection's weight (or bias) in TransformerLens's per-head layout: W_Q/W_K/W_V
    (head d_model d_head), W_O (head d_head d_model), b_Q/b_K/b_V (head d_head), b_O (d_model)."""
    if bias:
        return x if proj.name == "o" else x.reshape(n_heads, -1)
    if proj.name == "o":  # Linear (d_model, head·d_head); Conv1D (head·d_head, d_model)
        w = x if proj.conv1d else x.T
        return w.reshape(n_heads, -1, w.shape[-1])
    w = x.T if proj.conv1d else x  # (head·d_head, d_model)
    return w.reshape(n_heads, -1, w.shape[-1]).transpose(1, 2)


def split_projections(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors (deltas) regrouped per logical projection in TransformerLens's
    layout, keyed ``blocks.{l}.attn.W_Q`` ... ``b_O``: every projection of every layer any of
    them touches, the untouched ones as exact zeros."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    named = named_parameters(model)
    layer_of = parameter_layers(model)
    out: dict[str, torch.Tensor] = {}
    for l in sorted({layer_of[n] for n in tensors if n in layer_of}):
        projections = attention_projections(model, l, named)
        if not any(n in tensors for pr in projections.values() for n in (pr.weight, pr.bias)):
            continue
        for proj in projections.values():
            heads = n_kv if proj.name in ("k", "v") else cfg.n_heads
            for name, is_bias in ((proj.weight, False), (proj.bias, True)):
                if name is None:
                    continue
                x = tensors.get(name)
                if x is None:
                    x = torch.zeros_like(named[name].detach())
                key = f"blocks.{l}.attn.{'b' if is_bias else 'W'}_{proj.name.upper()}"
                out[key] = _to_heads(x, proj, heads, is_bias)
    return out


@dataclass
class FineTune:
    """Result of :func:`finetune`: real deltas ``θ_FT − θ_0`` per parameter, the loss of each
    step, whether the run diverged and why (``divergence``: a non-finite loss or parameter
    stops it, the deltas kept as they were; a final loss above ``DIVERGENCE_FACTOR`` times the
    first, and a collapsed output on the pair's zero-shot prompt (logits whose std over the
    vocabulary is below ``COLLAPSE_STD``), also count; :func:`icl_probe.compare` applies the
    collapse rule to every query too), the per-step query
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
        layer_of = parameter_layers(self.model._base) if self.model is not None else {}
        out: dict[int, dict[str, torch.Tensor]] = {}
        for n, d in self.deltas.items():
            m = re.search(r"\.(?:layers|h)\.(\d+)\.", n)
            layer = layer_of.get(n, int(m.group(1)) if m else -1)
            out.setdefault(layer, {})[n] = d
        return out

    def projection_deltas(self) -> dict[str, torch.Tensor]:
        """The deltas per logical attention projection, in TransformerLens's layout
        (``blocks.{l}.attn.W_Q`` head d_model d_head, ``W_K``/``W_V`` kv_head d_model d_head,
        ``W_O`` head d_head d_model, and the biases): every projection of every layer the
        fine-tune touched, unselected ones as exact zeros (see :func:`split_projections`)."""
        if self.model is None:
            raise FineTuneError("projection_deltas() needs the fine-tuned view (ft.model)")
        return split_projections(self.model._base, self.deltas)


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
    method: str | FineTuneConfig = "dai",
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
    The base model's parameters are restored exactly before returning. ``method`` may be a
    :class:`FineTuneConfig`, which then gives every setting (the keyword arguments it has must
    be left at their defaults)."""
    if isinstance(method, FineTuneConfig):
        cfg, default = method, FineTuneConfig()
        given = dict(params=params, lr=lr, steps=steps, epochs=epochs, loss_tokens=loss_tokens)
        clash = [k for k, v in given.items() if v != getattr(default, k)]
        if clash:
            raise FineTuneError(f"finetune(config, {clash[0]}=...): give {clash[0]} in the "
                                "FineTuneConfig, not beside it")
        return finetune(model, pair, cfg.method, cfg.params, cfg.lr, steps=cfg.steps,
                        epochs=cfg.epochs, loss_tokens=cfg.loss_tokens,
                        record_queries=record_queries, seed=seed)
    if method not in METHODS:
        raise FineTuneError(f"method={method!r}: expected one of {METHODS}")
    if not pair.spans.demos:
        raise FineTuneError("finetune(): the prompt has no demonstrations to train on")
    lr = learning_rate(lr, "finetune(lr=...)")
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

    watched, first_before = 0, None  # an example's loss before any step (rising-loss rule)
    q_store: list[torch.Tensor] = []
    qhooks = []
    if record_queries:  # the queries as the model uses them (after QK-norm and rotary)
        qhooks = query_capture_hooks(model, q_store)

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
            watched = canonical[0]  # the rising-loss rule's example
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                parts = [_example_loss(model, *examples[i], method, []) for i in canonical]
                if first_before is None:
                    first_before = float(parts[0].detach())
                if diverged := step(sum(parts) / len(examples)):
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
    view = FineTunedModel(model, deltas)
    reason = None if not diverged else "non-finite loss or parameter"
    if reason is None and is_collapsed(_zero_shot_logits(view, pair)):
        reason = (f"collapsed output: the fine-tuned logits at p on the zero-shot prompt vary "
                  f"by less than {COLLAPSE_STD:g} (std over the vocabulary)")
    if reason is None and len(losses) > 1 and losses[-1] > DIVERGENCE_FACTOR * losses[0]:
        reason = (f"final loss {losses[-1]:.3g} > {DIVERGENCE_FACTOR:g} x the first "
                  f"({losses[0]:.3g})")
    # LCGD's loss decodes every layer over the vocabulary (8 % of a k = 8 fine-tune on the
    # embedded model): its runs of 3+ steps are left to the 3x rule above
    if reason is None and not (method == "lcgd" and len(losses) >= 3):
        before = losses[0] if first_before is None else first_before
        after = _final_loss(view, *examples[watched], method)
        if not after <= RISE_FACTOR * before:
            reason = (f"loss rose on a trained example: demonstration {watched}'s loss is "
                      f"{after:.3g} after training, {before:.3g} before (> {RISE_FACTOR:g}x)")
    diverged = reason is not None
    ft = FineTune(deltas=deltas, losses=losses, diverged=diverged, method=method, params=params,
                  lr=float(lr), step_queries=queries, step_demos=demo_of_step,
                  divergence=reason)
    ft.model = view
    return ft


def is_collapsed(logits: torch.Tensor) -> bool:
    """Whether logits over the vocabulary (d_vocab) have collapsed to a constant: their
    standard deviation is below :data:`COLLAPSE_STD` (non-finite logits count as collapsed)."""
    std = float(logits.double().std())
    return not std >= COLLAPSE_STD


def _final_loss(view: FineTunedModel, ids: torch.Tensor, mask: torch.Tensor,
                method: str) -> float:
    """One example's loss, as ``method`` trains it, with the fine-tuned weights (LCGD decodes
    every layer through the final norm and unembedding outside the forward, so its weights are
    patched for the whole computation)."""
    with torch.inference_mode():
        if method != "lcgd":
            return float(_example_loss(view, ids, mask, method, []))
        with view.applied():
            return float(_example_loss(view._base, ids, mask, method, []))


def _zero_shot_logits(view: FineTunedModel, pair: PromptPair) -> torch.Tensor:
    """The fine-tuned view's logits at the prediction position of ``pair``'s zero-shot prompt
    (one short forward)."""
    ids = pair.zs_ids
    device = next(view.parameters()).device
    keep, kw = logits_to_keep(view, torch.tensor([len(ids) - 1]))
    with torch.inference_mode():
        logits = view(ids[None].to(device), **kw)
    return logits[0, keep[0]]


def finetune_sweep(model: Any, pair: PromptPair, lrs: Sequence[float], **kwargs: Any
                   ) -> list[FineTune]:
    """:func:`finetune` at each learning rate; diverged runs are kept (``ft.diverged``)."""
    return [finetune(model, pair, lr=lr, **kwargs) for lr in lrs]

"""What a fine-tune returns: the real deltas with their provenance (:class:`FineTune`), and the
base model seen with the deltas applied (:class:`FineTunedModel`)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ..errors import FineTuneError
from ..models.architectures import LIVE_HOOKS_CACHE
from .params import parameter_layers, split_projections, trainable_parameters


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
        # which hooks fire is the base model's (the deltas change no hook): its probes serve
        self.__dict__[LIVE_HOOKS_CACHE] = base.__dict__.setdefault(LIVE_HOOKS_CACHE, {})
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

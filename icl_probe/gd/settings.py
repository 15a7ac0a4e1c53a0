"""Fine-tuning settings: the methods, parameter sets and loss tokens, the thresholds that call
a run diverged, and :class:`FineTuneConfig` with the one coercion every caller uses."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from ..errors import FineTuneError

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


LOSS_TOKENS = ("demo", "demo+sep", "label")


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



def as_config(value: Any, *, where: str, lr: float | None = None, params: str | None = None,
              error: type[Exception] = FineTuneError) -> FineTuneConfig:
    """One fine-tuning setting from what a caller may give: a :class:`FineTuneConfig` as it
    is; ``None`` (the defaults); a method name, or ``"v:L"`` (Dai's SGD on layer L's W_V only:
    Shen et al.'s sub-model GD); or a dict of the config's fields. ``lr`` and ``params`` fill in
    what a name or dict leaves out. Anything else raises ``error`` naming ``where``."""
    defaults = {k: v for k, v in (("lr", lr), ("params", params)) if v is not None}
    if value is None:
        return FineTuneConfig(**defaults)
    if isinstance(value, FineTuneConfig):
        return value
    if isinstance(value, str):
        if value.startswith("v:"):
            return FineTuneConfig(**(defaults | {"method": "dai", "params": value}))
        return FineTuneConfig(**(defaults | {"method": value}))
    if isinstance(value, dict):
        try:
            return FineTuneConfig(**(defaults | value))
        except TypeError as e:
            fields = [f.name for f in dataclasses.fields(FineTuneConfig)]
            raise error(f"{where}: {value!r}: {e}; FineTuneConfig takes {fields}") from None
    raise error(f"{where}: {value!r}: expected a FineTuneConfig, a method name, 'v:L', or a "
                "dict of FineTuneConfig's fields")


def as_configs(value: Any, *, where: str, error: type[Exception] = FineTuneError,
               **defaults: Any) -> list[FineTuneConfig]:
    """:func:`as_config` of each item of a list or tuple (or of one value)."""
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in as_configs(v, where=where, error=error, **defaults)]
    return [as_config(value, where=where, error=error, **defaults)]

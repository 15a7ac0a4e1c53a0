"""Where a model runs: the device, the compute dtype and a split over several GPUs, checked
before any weight is read, and carried down as one :class:`Placement`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.utilities.multi_gpu import resolve_device_map

from ..errors import ModelLoadError


def default_device() -> torch.device:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in set(_DTYPES.values()):
            raise ModelLoadError(
                f"load_model(dtype={dtype}): a model runs in float32, float64, bfloat16 or "
                "float16; 8-bit float and integer types are storage formats, not compute dtypes")
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ModelLoadError(
        f"load_model(): unknown dtype {dtype!r}; expected one of {sorted(set(_DTYPES))} "
        "or a torch.dtype"
    )


def available_devices() -> list[str]:
    """The device kinds this machine can run on."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked before any weight is loaded: an unavailable one is named with the
    devices this machine has."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"load_model(device={device!r}): not a device ({e}); available "
                             f"here: {', '.join(available_devices())}") from None
    ok = dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available() and (
        dev.index is None or dev.index < torch.cuda.device_count())) or (
        dev.type == "mps" and "mps" in available_devices())
    if not ok:
        raise ModelLoadError(f"load_model(device={device!r}): this machine has no such device; "
                             f"available here: {', '.join(available_devices())}")
    return dev


def _device_map(device_map: Any, n_devices: int | None) -> tuple[Any, Any]:
    """``(device_map, max_memory)`` for ``from_pretrained``: ``n_devices > 1`` becomes
    accelerate's balanced split over that many GPUs (TransformerLens's own resolution);
    ``(None, None)`` loads onto one device."""
    if device_map is None and (n_devices is None or n_devices <= 1):
        return None, None
    if n_devices is not None and (not isinstance(n_devices, int) or n_devices < 1):
        raise ModelLoadError(f"load_model(n_devices={n_devices!r}): expected an integer >= 1")

    try:
        return resolve_device_map(n_devices, device_map, None, None)
    except ValueError as e:
        raise ModelLoadError(f"load_model(device_map={device_map!r}, n_devices={n_devices!r}): "
                             f"{e}; available here: {', '.join(available_devices())}") from None




@dataclass(frozen=True)
class Placement:
    """Where and in what precision a run's models load: ``device`` (None: cuda, then mps,
    then cpu), ``dtype`` (None: float32), and ``device_map`` / ``n_devices`` to spread a
    model over several GPUs. The one object the experiment runner, the launchers and the
    planner pass down to :func:`icl_probe.models.load_model`."""

    device: str | None = None
    dtype: str | None = None
    device_map: Any = None
    n_devices: int | None = None

    def over(self, default: "Placement") -> "Placement":
        """This placement with each unset field taken from ``default`` (a config's)."""
        return Placement(*(a if a is not None else b for a, b in (
            (self.device, default.device), (self.dtype, default.dtype),
            (self.device_map, default.device_map), (self.n_devices, default.n_devices))))

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`icl_probe.models.load_model`."""
        return dict(device=self.device, dtype=self.dtype, device_map=self.device_map,
                    n_devices=self.n_devices)

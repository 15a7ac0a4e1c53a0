"""The experiment kinds: one :class:`~icl_probe.experiments.sections.base.Section` per file,
registered here. Adding a kind is a new file and one line below (docs/architecture.md)."""

from .base import Memory, Section, Unit, VerdictTable, model_order
from .causal import Causal
from .icl_vs_gd import IclVsGd, icl_vs_gd_summary
from .implied_updates import ImpliedUpdates
from .linear_attention import LinearAttention
from .order_sensitivity import OrderSensitivity
from .real_heads import RealHeads
from .shen import Shen

SECTIONS: dict[str, Section] = {s.name: s for s in (
    IclVsGd(),
    ImpliedUpdates(),
    OrderSensitivity(),
    LinearAttention(),
    RealHeads(),
    Shen(),
    Causal(),
)}

__all__ = ["Memory", "SECTIONS", "Section", "Unit", "VerdictTable", "icl_vs_gd_summary",
           "model_order"]

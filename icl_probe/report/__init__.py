"""Report: the HTML page and ``summary.csv`` of an experiment, rebuilt at any time from its
finished units.

Above :mod:`icl_probe.experiments` (it reads their output directories and asks each section
for its tables and figures); below :mod:`icl_probe.runs` and the command line
(docs/architecture.md).
"""

from ..compare import ANCHORS
from ..html import esc
from .page import rebuild_report, write_report

__all__ = ["ANCHORS", "esc", "rebuild_report", "write_report"]

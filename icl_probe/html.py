"""The one escaping helper for every piece of text that reaches HTML (task names, labels,
items, model keys, paths, config values): the report and the sections' own HTML use it."""

from __future__ import annotations

import html
from typing import Any


def esc(text: Any) -> str:
    """``str(text)`` with ``& < > " '`` escaped. Tables go through it cell by cell; plotly
    escapes its own JSON (its titles and legends are escaped by the report)."""
    return html.escape(str(text), quote=True)

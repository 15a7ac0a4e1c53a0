"""In-context learning tasks: the shipped task files, task files of your own, and the anchors'
datasets read from a local copy (docs/datasets.md).

The bottom layer of the package with :mod:`icl_probe.errors`: it imports nothing else of
icl-probe.
"""

from .datasets import ANCHOR_DATASETS, load_anchor_dataset
from .load import load_task
from .task import (DEFAULT_TEMPLATE, SPLITS, Item, Task, check_template, read_task_file,
                   shipped_tasks)

__all__ = [
    "ANCHOR_DATASETS", "DEFAULT_TEMPLATE", "Item", "SPLITS", "Task", "check_template",
    "load_anchor_dataset", "load_task", "read_task_file", "shipped_tasks",
]

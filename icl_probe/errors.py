"""One exception family for icl-probe.

Every message names the operation, what was given, what was expected, and the fix.
"""

from __future__ import annotations


class IclProbeError(Exception):
    """Base class of every error icl-probe raises on purpose."""


class ModelLoadError(IclProbeError):
    """A model could not be found, loaded or wrapped."""


class CacheError(IclProbeError):
    """The on-disk model cache is missing, partial or corrupt."""


class TaskFileError(IclProbeError):
    """A task file or dataset copy is malformed (the message names file and line)."""


class PromptError(IclProbeError):
    """A prompt cannot be built or does not fit the model (length, labels, spans)."""


class TraceError(IclProbeError):
    """A trace request does not fit the model or the prompts."""


class ExperimentError(IclProbeError):
    """An experiment cannot run: its output directory holds other results, is in use, or the
    run was interrupted."""


class ConfigError(ExperimentError):
    """An experiment config is malformed: the message names the file, the table and the key."""


class ProbeError(IclProbeError):
    """A probe cannot be computed for these prompts or this model."""


class FineTuneError(IclProbeError):
    """A fine-tuning request is malformed."""


class CompareError(IclProbeError):
    """A comparison request is malformed (queries, protocol, baselines, learning rates)."""


class DualError(IclProbeError):
    """A synthetic-regression / linear-self-attention request does not fit (shapes, sizes,
    settings); the message names the operation, what was given and what was expected."""


class PlotError(IclProbeError):
    """A plot was asked for a quantity or table it cannot draw."""


class FastPathError(IclProbeError):
    """A fast path (shared-prefix trace, answer scoring on a cache) disagrees with the slow
    exact path on the same prompt: the installed stack broke an internal it relies on. The
    message names the versions, the error, and ``fast=False`` / ``ICL_PROBE_FAST=0``."""


class CausalError(IclProbeError):
    """A causal test (task or function vectors, replayed or transferred updates) is malformed."""

"""Exception classes raised by sntfx.

Every error says what is wrong and how to fix it. Library code raises one of
these; the CLI turns them into a one-paragraph message and a non-zero exit.
"""

from __future__ import annotations

__all__ = [
    "SntfxError",
    "ModelSpecError",
    "TraceError",
    "PassError",
    "PipelineError",
    "PipelineOrderError",
    "PassPreconditionError",
    "EquivalenceError",
    "PolicyError",
    "FileFormatError",
    "UntrustedSourceError",
    "WeightsError",
    "DiskFullError",
]


class SntfxError(Exception):
    """Base class of every error sntfx raises on purpose."""


class ModelSpecError(SntfxError):
    """A model spec (file, factory, zoo name, input shape) cannot be used."""


class TraceError(SntfxError):
    """torch.fx could not trace the model, even with opaque submodules."""

    def __init__(self, message: str, module_path: str = "", reason: str = ""):
        super().__init__(message)
        self.module_path = module_path
        self.reason = reason


class PassError(SntfxError):
    """A pass failed; the message names the pass and the node or module."""

    def __init__(self, pass_name: str, message: str, *, previous: tuple[str, ...] = ()):
        before = f" (after: {', '.join(previous)})" if previous else ""
        super().__init__(f"pass '{pass_name}'{before}: {message}")
        self.pass_name = pass_name
        self.previous = previous


class PipelineError(SntfxError):
    """A pipeline string or pass name cannot be parsed or is not registered."""


class PipelineOrderError(PipelineError):
    """A pass requires a property that no earlier pass (or the model) provides."""


class PassPreconditionError(PipelineError):
    """A pass needs something from the context (example inputs, calibration data) that is not there."""

    def __init__(self, pass_name: str, missing: str, *, position: int = 0):
        super().__init__(f"pass '{pass_name}' (step {position + 1} of the pipeline) cannot run: it needs {missing}; "
                         "nothing was run")
        self.pass_name = pass_name
        self.missing = missing


class EquivalenceError(PassError):
    """A pass that claims exactness changed the model's outputs beyond tolerance."""


class PolicyError(SntfxError):
    """An expansion policy is malformed."""


class FileFormatError(SntfxError):
    """A file is not an sntfx model file, or was modified after it was written."""


class UntrustedSourceError(FileFormatError):
    """A model file's recipe would import or run Python code the user has not trusted."""


class WeightsError(SntfxError):
    """A weights file (state dict) cannot be read, does not fit the model, or pretrained weights are not cached."""


class DiskFullError(SntfxError):
    """Writing a file failed for lack of space (disk full, quota, file-size limit); nothing was written."""

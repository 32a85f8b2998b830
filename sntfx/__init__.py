"""sntfx: sharpness-minimizing network transformation (SNT) on torch.fx.

Trace any vision model, expand its conv/linear layers into over-parameterized
blocks for pretraining, fold them back exactly, then compress and deploy.

Example::

    import torch, sntfx
    x = torch.randn(1, 3, 32, 32)
    snt = sntfx.transform("sntfx:resnet20", x, style="linear", ratio=2)
    # ... train snt ...
    folded = sntfx.fold(snt, x)
    sntfx.save(folded, "folded.pt")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    EquivalenceError,
    FileFormatError,
    ModelSpecError,
    PassError,
    PipelineError,
    PipelineOrderError,
    PolicyError,
    SntfxError,
    TraceError,
    WeightsError,
)
from .pass_base import (  # noqa: E402
    Numerics,
    Pass,
    PassContext,
    PassResult,
    Property,
    parse_pipeline,
    register_pass,
    registered_passes,
)
from .pass_manager import PassManager, PipelineReport  # noqa: E402
from .policy import Policy, Rule  # noqa: E402
from .models import ModelSpec  # noqa: E402
from .api import build_model, fold, trace, transform  # noqa: E402
from .serialization import load, read_recipe, save  # noqa: E402
from .weights import load_weights, original_state_dict, read_state_dict, save_state_dict  # noqa: E402
from . import passes  # noqa: E402,F401  (registers the built-in passes)

__all__ = [
    "__version__",
    "trace",
    "transform",
    "fold",
    "build_model",
    "save",
    "load",
    "read_recipe",
    "read_state_dict",
    "load_weights",
    "original_state_dict",
    "save_state_dict",
    "PassManager",
    "PipelineReport",
    "Pass",
    "PassContext",
    "PassResult",
    "Property",
    "Numerics",
    "register_pass",
    "registered_passes",
    "parse_pipeline",
    "Policy",
    "Rule",
    "ModelSpec",
    "passes",
    "SntfxError",
    "ModelSpecError",
    "TraceError",
    "PassError",
    "PipelineError",
    "PipelineOrderError",
    "EquivalenceError",
    "PolicyError",
    "FileFormatError",
    "WeightsError",
]

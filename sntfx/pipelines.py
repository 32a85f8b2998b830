"""The canonical SNT pipeline, written once as data.

What runs at each point of a model's life, as pipeline strings in the
``--passes`` grammar (``name(key=value,...),name2``). :func:`sntfx.transform`,
:func:`sntfx.fold`, the CLI (``transform``, ``fold``, the default ``--style``)
and the study all read these, so changing the default style or what
deployment folds is one edit here.

================  ==========================  =================================================
stage             pipeline                    what it does
================  ==========================  =================================================
before-training   ``snt``                     expand every eligible layer (:data:`DEFAULT_STYLE`)
after-training    ``fold``                    fold every SNT block back into its layer, exactly
deployment        ``fold,fold_bn``            also fold the model's own BatchNorms into layers
================  ==========================  =================================================
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_STYLE", "DEFAULT_RATIO", "DEFAULT_BUDGET", "DEFAULT_MEMORY_BUDGET", "DEFAULT_BATCH", "CANONICAL",
           "canonical_passes"]

#: The expansion style used when none is named (``sntfx transform``, the policy, ``sntfx.transform``).
DEFAULT_STYLE = "lin-branch"
#: The expansion ratio of styles that take one, when none is named.
DEFAULT_RATIO = 4
#: The most that composing kernels in online training may add to a step, as a fraction of the plain model's
#: conv/linear multiply-adds (the ``snt`` pass's ``budget``), and the batch it is reckoned at.
DEFAULT_BUDGET = 0.10
DEFAULT_BATCH = 128
#: The most that SNT blocks may add to a training step's memory (extra parameters with their gradients and
#: optimizer state, tensors kept by the composition), as a fraction of the plain model's (the ``snt`` pass's
#: ``memory_budget``). The goal is 1.3x; the estimate leaves out workspaces, hence the margin.
DEFAULT_MEMORY_BUDGET = 0.25

CANONICAL: dict[str, str] = {
    "before-training": "snt",
    "after-training": "fold",
    "deployment": "fold,fold_bn",
}


def canonical_passes(stage: str, **params: dict[str, Any]) -> list:
    """The passes of ``stage`` (a key of :data:`CANONICAL`); ``params[name]`` sets that pass's arguments.

    Example: ``canonical_passes("before-training", snt={"style": "linear", "preserve": True})``.
    """
    from .pass_base import get_pass_class

    if stage not in CANONICAL:
        raise ValueError(f"unknown pipeline stage '{stage}'; choose one of {', '.join(CANONICAL)}")
    names = CANONICAL[stage].split(",")
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"the '{stage}' pipeline ({CANONICAL[stage]}) has no pass named {', '.join(unknown)}")
    return [get_pass_class(name)(**params.get(name, {})) for name in names]

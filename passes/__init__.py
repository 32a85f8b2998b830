"""Passes shipped with sntfx; importing this package registers them by name.

Every module of this package is imported with it, so a new pass is one file
here (a :class:`~sntfx.pass_base.Pass` subclass decorated with
``@register_pass``) and its test. The built-ins:

========== ======================== ==========================================
name       class                    what it does
========== ======================== ==========================================
snt        :class:`SNTExpand`       expand conv/linear layers into SNT blocks
fold       :class:`SNTFold`         fold SNT blocks back, exactly
fold_bn    :class:`FoldBatchNorm`   fold the model's own BatchNorms into layers
shapes     :class:`ShapePropagation` record tensor shapes in ``node.meta``
prune      :class:`MagnitudePrune`  unstructured magnitude pruning
prune_nm   :class:`NMPrune`         N:M semi-structured pruning
prune_wanda :class:`WandaPrune`     activation-aware pruning (Wanda), unstructured or N:M
prune_channels :class:`StructuredPrune` channel pruning (torch-pruning)
quantize   :class:`SimulatedQuantize` simulated low-bit weights/activations
========== ======================== ==========================================
"""

from .bn_fold import FoldBatchNorm
from .prune_magnitude import MagnitudePrune
from .prune_nm import NMPrune
from .prune_wanda import WandaPrune
from .prune_structured import StructuredPrune
from .quantize_sim import SimulatedQuantize
from .shape_prop import ShapePropagation
from .snt_expand import SNTExpand
from .snt_fold import SNTFold



def _import_pass_modules() -> None:
    """Import every other module of this package: a new pass is one file here, registered by its decorator."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_pass_modules()

__all__ = ["SNTExpand", "SNTFold", "FoldBatchNorm", "ShapePropagation", "MagnitudePrune", "NMPrune",
           "SimulatedQuantize", "StructuredPrune", "WandaPrune"]

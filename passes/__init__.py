"""Passes shipped with sntfx; importing this package registers them by name.

========== ======================== ==========================================
name       class                    what it does
========== ======================== ==========================================
snt        :class:`SNTExpand`       expand conv/linear layers into SNT blocks
fold       :class:`SNTFold`         fold SNT blocks back, exactly
fold_bn    :class:`FoldBatchNorm`   fold the model's own BatchNorms into layers
shapes     :class:`ShapePropagation` record tensor shapes in ``node.meta``
========== ======================== ==========================================
"""

from .bn_fold import FoldBatchNorm
from .shape_prop import ShapePropagation
from .snt_expand import SNTExpand
from .snt_fold import SNTFold

__all__ = ["SNTExpand", "SNTFold", "FoldBatchNorm", "ShapePropagation"]

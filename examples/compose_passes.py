"""Compose passes in Python: expand, check exactness, fold, fold BatchNorms, save.

    python examples/compose_passes.py
"""

import tempfile
from pathlib import Path

import torch

import sntfx
from sntfx.passes import FoldBatchNorm, SNTExpand, SNTFold

x = torch.randn(4, 3, 32, 32)
gm = sntfx.trace("sntfx:resnet20", x)

# preserve=True starts every block at exactly the original function, so the
# manager can check numerical equivalence after every pass (check=True).
pm = sntfx.PassManager(
    [SNTExpand(style="linear", ratio=2, preserve=True), SNTFold(), FoldBatchNorm()],
    check=True,
)
report = pm.run(gm, sntfx.PassContext(example_inputs=(x,)))
print(report)

# The same pipeline as a string, as on the command line.
report2 = sntfx.PassManager("snt(style=qa-branch),fold,fold_bn").run(
    sntfx.trace("sntfx:resnet20", x), sntfx.PassContext(example_inputs=(x,))
)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "folded.pt"
    sntfx.save(report2.graph_module, path)
    print("saved and reloaded:", type(sntfx.load(path)).__name__, sntfx.read_recipe(path)["pipeline"][-1]["name"])

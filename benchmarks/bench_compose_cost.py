"""Calibrate the snt pass's training-cost model: what composing a kernel and updating extra parameters cost.

The ``snt`` pass's ``budget`` compares each block's extra work per training
step with the plain layers' forward multiply-adds (``sntfx.blocks.base``:
``ELEMENT_MACS``, each style's ``compose_passes``, ``OPTIMIZER_PASSES``).
Composition by matrix products is compute bound and counts its
multiply-adds; elementwise work (an elementwise composition, the optimizer's
update of extra parameters) is memory bound, and one pass over a tensor
element costs far more than one multiply-add of a convolution. This script
measures, on this machine:

- a plain 3x3 convolution's forward + backward, per forward multiply-add (the unit);
- one elementwise pass (``torch.mul`` into a preallocated output), per element, in that unit: ``ELEMENT_MACS``;
- each online style's composition, forward + backward, per kernel element, and beyond its multiply-adds in
  passes per kernel element (``compose_passes`` counts passes over ``SNTBlock.compose_elements()``: the
  kernel for an elementwise style, the factors and products for ``linear``, 22 times a 64-channel kernel);
- the trainer's (fused) Adam update, per parameter element, in passes;
- each online style's fixed cost per call, in units (``call_overhead``, cost model 3): a block on a
  tiny kernel and input, forward through its composed kernel and backward, minus the plain layer's
  call on the same input (dispatching the composition's operations and their backward, whatever
  the kernel's size; on a 3x3 conv of a CIFAR ResNet at batch 128 it is a few percent of the
  layer's own work, which cost model 2 left out).

    python benchmarks/bench_compose_cost.py                   # prints the table, writes JSON
    python benchmarks/bench_compose_cost.py --channels 256,512

Medians of repeated timings in one process, one variant after another. Each
timing cycles through copies of its tensors totalling 512 MiB, more than the
cache, because in a training step the activations evict the kernels between
two uses. (On this machine that doubled the cost of a plain pass, 0.27 ->
0.52 ns per element, but left powerprop's composition at about 2.4 ns per
element, about a third of what powerprop added to a VGG-11 step in one
benchmark run and about what it added in another: the model does not explain
that gap, and the step benchmark's noise is of the same size.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from sntfx.blocks import get_style, make_block, style_names
from sntfx.io import atomic_write
from sntfx.train import TrainConfig, Trainer


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def conv_unit(channels: int, size: int, batch: int, repeats: int) -> float:
    """Seconds per forward multiply-add of a 3x3 conv's training work (forward + backward)."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    grad = torch.ones(batch, channels, size, size)

    def step():
        conv(x).backward(grad)

    return median_seconds(step, repeats) / (batch * channels * channels * 9 * size * size)


#: Tensors of this many bytes in all are cycled through, so that memory-bound work reads memory, not cache,
#: as it does in a training step (between two uses of a kernel, the activations of a whole step pass by).
WORKING_SET = 512 * 2**20


def _copies(nbytes: int) -> int:
    return max(2, -(-WORKING_SET // max(nbytes, 1)))


def pass_seconds(numel: int, repeats: int) -> float:
    """Seconds per element of one elementwise pass (two reads, one write), over a working set larger than cache."""
    tensors = [(torch.randn(numel), torch.randn(numel), torch.empty(numel)) for _ in range(_copies(12 * numel))]

    def run():
        for a, b, out in tensors:
            torch.mul(a, b, out=out)

    return median_seconds(run, repeats) / (numel * len(tensors))


def compose_seconds(style: str, channels: int, repeats: int) -> tuple[float, float]:
    """Seconds per kernel element of composing a 3x3 block's kernel, forward and backward, and its MACs per element."""
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    nbytes = 4 * sum(p.numel() for p in make_block(layer, style, ratio=4).parameters())
    blocks = [make_block(layer, style, ratio=4, gen=torch.Generator().manual_seed(i)) for i in range(_copies(nbytes))]
    grad = torch.ones(layer.weight.shape)

    def run():
        for block in blocks:
            block.composed_weight().backward(grad)

    seconds = median_seconds(run, repeats) / (len(blocks) * layer.weight.numel())
    return seconds, blocks[0].compose_macs() / layer.weight.numel()


def call_overhead_seconds(style: str, repeats: int, channels: int = 8, size: int = 4) -> tuple[float, float]:
    """(block, plain) seconds of one call forward and backward on a tiny kernel and input, interleaved.

    The block runs its composed kernel (``forward_composed``, what an online block does in training); at
    this size the work is nothing, so the difference is what a block adds per call whatever its kernel."""
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    block = make_block(layer, style, ratio=4)
    x = torch.randn(1, channels, size, size)
    grad = torch.ones(1, channels, size, size)
    block_times, plain_times = [], []
    for _ in range(repeats):  # alternate, so that drifts hit both alike
        block_times.append(median_seconds(lambda: block.forward_composed(x).backward(grad), 50, warmup=5))
        plain_times.append(median_seconds(lambda: layer.forward(x).backward(grad), 50, warmup=5))
    return statistics.median(block_times), statistics.median(plain_times)


def optimizer_seconds(numel: int, repeats: int) -> float:
    """Seconds per parameter element of the trainer's Adam update (fused where it can be), memory resident."""
    params = [nn.Parameter(torch.randn(numel)) for _ in range(_copies(16 * numel))]
    opt = Trainer(TrainConfig(optimizer="adam")).build_optimizer(nn.ParameterList(params))
    for p in params:
        p.grad = torch.randn(numel)
    return median_seconds(opt.step, repeats) / (numel * len(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="64,256,512", help="kernel sizes to compose (C x C x 3 x 3)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench-results/compose_cost.json")
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]

    unit = statistics.median(conv_unit(c, s, 128, args.repeats) for c, s in ((64, 16), (256, 8)))
    element = statistics.median(pass_seconds(c * c * 9, args.repeats) for c in channels)
    rows = {"conv_ps_per_forward_mac": unit * 1e12, "pass_ns_per_element": element * 1e9,
            "element_macs": element / unit, "styles": {}, "optimizer_passes": {}}
    print(f"3x3 conv, forward + backward: {unit * 1e12:.2f} ps per forward multiply-add (the unit)")
    print(f"one elementwise pass: {element * 1e9:.2f} ns per element = {element / unit:.1f} units (ELEMENT_MACS)")
    for style in style_names():
        if not get_style(style).trains_online:
            continue
        for c in channels:
            seconds, macs_per_element = compose_seconds(style, c, args.repeats)
            passes = (seconds - macs_per_element * unit) / element  # composing MACs: forward + 2x backward, like the unit
            rows["styles"].setdefault(style, {})[c] = {"ns_per_element": seconds * 1e9, "passes": passes,
                                                      "compose_macs_per_element": macs_per_element}
            print(f"{style:11s} C={c:4d}: {seconds * 1e9:7.2f} ns per kernel element, compose MACs "
                  f"{macs_per_element:6.0f} per element, elementwise work {passes:5.1f} passes")
    rows["call_overhead"] = {}
    for style in style_names():
        if not get_style(style).trains_online:
            continue
        block, plain = call_overhead_seconds(style, args.repeats)
        rows["call_overhead"][style] = {"block_us": block * 1e6, "plain_us": plain * 1e6,
                                        "units": (block - plain) / unit}
        print(f"{style:11s} per call: {block * 1e6:6.0f} us against the plain layer's {plain * 1e6:5.0f} us: "
              f"{(block - plain) / unit / 1e6:.1f} M units (call_overhead)")
    for c in channels:
        seconds = optimizer_seconds(c * c * 9, args.repeats)
        rows["optimizer_passes"][c] = seconds / element
        print(f"Adam update ({c * c * 9} elements): {seconds * 1e9:.2f} ns per element = {seconds / element:.1f} passes")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps({"meta": meta, **rows}, indent=1)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

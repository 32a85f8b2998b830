"""``snt``: expand every eligible conv/linear layer into an over-parameterized block.

Rewrites (module swap; the graph keeps its nodes)::

    %y = call_module[target=layer1.0.conv1](%x)        # nn.Conv2d
      ->
    %y = call_module[target=layer1.0.conv1](%x)        # sntfx.blocks.LinearExpansion

Eligible: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` and ``nn.Linear`` called as modules
(any kernel, stride, padding and padding mode, dilation, groups, bias), and
subclasses that keep their parent's forward. A layer called at several places
becomes one shared block. Skipped, with the reason counted in ``stats``:
layers whose weight is shared with another module, subclasses with their own
forward, layers inside modules kept opaque by tracing, layers the policy
excludes, and convolutions or matmuls called functionally on raw parameters.

Styles, folding algebra and initialisation: :mod:`sntfx.blocks`. For
``branch`` styles on a bias-free layer, the branch norms keep their shift only
when the layer's output feeds a single BatchNorm (the fold moves the bias
there); otherwise they are scale-only.

Training cost: a style that trains online composes each block's kernel once
per step, at a cost that does not shrink with the batch or the feature map
(``SNTBlock.compose_cost``: ``linear`` at ratio r multiplies about
r^2 C_out^2 C_in k^2 times; elementwise styles make a few memory-bound passes
over the kernel), and its extra parameters add gradient and optimizer work
(``SNTBlock.parameter_cost``). On a wide layer over a small map (VGG-11's
512-channel convs on 2x2 maps, ResNet-18's last stage) that is more than the
layer itself. Each call of an online block also costs a fixed amount
whatever its kernel's size (``SNTBlock.call_overhead``: dispatching the
composition's operations forward and backward), which adds up over a deep
model of small layers (ResNet-56); and composing by matrix products makes
memory-bound passes over tensors much larger than the kernel (``linear`` x4's
core has 16 times the kernel's elements: ``SNTBlock.compose_elements``). ``budget`` bounds it: the blocks' extra work may be at most
``budget`` times the plain model's conv/linear multiply-adds per step at
``batch_size`` (measured on the example inputs' shapes; memory-bound work
converted with the calibrated ``sntfx.blocks.base.ELEMENT_MACS``); the layers
cheapest relative to their own work are expanded first and the rest stay plain
(counted as :data:`OVER_BUDGET`); the blocks may always add :data:`MIN_SPENT`
(a small model's step is mostly per-operation overhead). ``budget=None``
expands every eligible layer. Recipes saved before the budget existed replay without it.

Training memory: an online block holds its extra parameters with their
gradients and optimizer state, and what composing its kernel keeps for the
backward pass (``SNTBlock.memory_cost``); ``linear`` x4 on a 3x3 conv holds
about 16 times the layer's weights. ``memory_budget`` bounds the sum to a
fraction of the plain model's training memory at ``batch_size`` (parameters
with gradients and optimizer state, plus the activations autograd keeps,
measured on the example inputs): after the time budget, the blocks that hold
the most memory relative to their layer's work stay plain until it holds
(counted as :data:`OVER_MEMORY`); the blocks may always hold
:data:`MIN_HELD`. It applies together with ``budget``: ``budget=None`` sets
no limit of either kind.

Requires: nothing. Provides: ``expanded``. Numerics: changes the function
(fresh initialisation), or exact with ``preserve=True``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from sntfx.blocks import LayerConfig, SNTBlock, get_style, layer_kind, layer_macs, make_block
from sntfx.blocks.base import LATEST_COST_MODEL, LAYER_CLASSES
from sntfx.graph_utils import (FUNCTIONAL_WEIGHT_OPS, call_sites, find_bias_sink, is_plain, output_shape,
                               saved_for_backward, set_module, shared_parameter_owners, unsupported_weight_layers)
from sntfx.pass_base import Numerics, Pass, PassContext, PassResult, Property, register_pass
from sntfx.pipelines import DEFAULT_BATCH, DEFAULT_BUDGET, DEFAULT_MEMORY_BUDGET
from sntfx.policy import Policy
from sntfx.tracing import propagate_shapes

__all__ = ["SNTExpand", "FUNCTIONAL_LAYERS", "OVER_BUDGET", "OVER_MEMORY", "COST_MODEL"]

log = logging.getLogger(__name__)

#: The layer classes the snt pass expands (subclasses too, when they keep the class's forward).
SUPPORTED = tuple(LAYER_CLASSES.values())

#: The stat counting layers left plain by the training-cost budget (``PassResult.stats``).
OVER_BUDGET = "skip: over the training-cost budget"
#: The stat counting layers left plain by the training-memory budget.
OVER_MEMORY = "skip: over the training-memory budget"
#: The budget's cost model: 1 counted one multiply-add per element of an elementwise composition and
#: nothing for extra parameters (recipes saved with it replay with it); 2 is the calibrated model
#: (``SNTBlock.compose_cost`` and ``parameter_cost``), which did not count blocks below ``MIN_COUNTED``;
#: 3 adds each block's fixed cost per call (``SNTBlock.call_overhead``) and counts every block (model 2's
#: exemptions add up over many small blocks: ``linear`` on ResNet-56 measured 1.13x Adam within a 10% budget);
#: 4 counts a composition's memory-bound passes over the tensors it makes and reads (``SNTBlock.compose_elements``:
#: ``linear``'s factors, intermediate product and layout copy, 22x its 64-channel kernel) instead of over the
#: kernel alone (model 3 put ResNet-56's 46 ``linear`` compositions at 46 ms of a step, measured 84 ms; model 4
#: at 76 ms). Only ``linear`` changes: the elementwise styles' compositions pass over the kernel.
COST_MODEL = LATEST_COST_MODEL
#: Under cost model 2, a block whose extra work per step is below this many units (about 0.3 ms on the
#: calibration CPU) is not counted against the budget: at that size a step's time is set by per-operation
#: overhead, which that model does not describe.
MIN_COUNTED = 10_000_000
#: Under cost models 3 and 4 the blocks may always add this many units (about 2 ms per step on the calibration
#: CPU), whatever the budget: a small model's step is mostly per-operation overhead, a budget relative to
#: its multiply-adds would leave it nothing, and a couple of milliseconds per step do not limit training.
MIN_SPENT = 65_000_000
#: The memory budget allows the blocks at least this many bytes (16 MiB): below it memory does not limit
#: training, and a small model (whose activations are tiny beside an expansion's parameters) expands as before.
MIN_HELD = 16 * 2**20

#: The weighted layers called as functions (graph_utils.FUNCTIONAL_WEIGHT_OPS, transposed convs and bilinear
#: included), by the kind the snt pass's "skip: functional KIND" count names: they have no module to expand.
FUNCTIONAL_LAYERS = {op: "linear" if op.__name__.endswith("linear") else "conv" for op in FUNCTIONAL_WEIGHT_OPS}


@register_pass
class SNTExpand(Pass):
    """Expand eligible layers into SNT blocks.

    Args:
        style: ``linear``, ``branch`` or ``qa-branch`` (overrides the policy's default).
        ratio: expansion ratio for ``linear`` (overrides the policy's default).
        policy: a :class:`~sntfx.policy.Policy`, its dict, or a JSON/TOML file path.
        preserve: initialise every block to compute exactly the layer it replaces.
        online: ``linear`` blocks compose their kernel and run one conv per call.
        seed: initialisation seed (default: the context's seed).
        budget: the most that online training (composing kernels, updating
            the extra parameters) may add to a step, as a fraction of the plain
            model's conv/linear multiply-adds at ``batch_size`` (module
            docstring); None: no limit.
        memory_budget: the most that the blocks may add to a training step's
            memory, as a fraction of the plain model's at ``batch_size``
            (module docstring); applies only with ``budget``. None: no limit.
        batch_size: the training batch the budgets are reckoned at.
        plain_layers: the layers the budget leaves plain, as decided before:
            a saved model's recipe records them, so that loading rebuilds the
            same structure whatever the cost model has become. None: decide.
        cost_model: the budget's cost model (:data:`COST_MODEL`).

    Example::

        pm = PassManager([SNTExpand(style="branch")])
    """

    name = "snt"
    provides = frozenset({Property.EXPANDED})
    invalidates = frozenset({Property.FOLDED})
    #: Recipes saved before the budget existed expanded every eligible layer; those saved before the
    #: calibrated cost model used the first one.
    legacy_params = {"budget": None, "cost_model": 1, "memory_budget": None}

    def __init__(
        self,
        style: str | None = None,
        ratio: int | None = None,
        policy: Policy | dict | str | Path | None = None,
        preserve: bool = False,
        online: bool = False,
        seed: int | None = None,
        budget: float | None = DEFAULT_BUDGET,
        batch_size: int = DEFAULT_BATCH,
        plain_layers: list[str] | None = None,
        cost_model: int = COST_MODEL,
        memory_budget: float | None = DEFAULT_MEMORY_BUDGET,
    ):
        for name, value in (("budget", budget), ("memory_budget", memory_budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{name} must be a fraction >= 0 (e.g. 0.1) or None, got {value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if cost_model not in (1, 2, 3, 4):
            raise ValueError(f"cost_model must be 1, 2, 3 or 4, got {cost_model!r}")
        if plain_layers is not None and (isinstance(plain_layers, str)
                                         or not all(isinstance(p, str) for p in plain_layers)):
            raise ValueError(f"plain_layers must be a list of layer names, got {plain_layers!r}")
        if isinstance(policy, (str, Path)):
            policy = Policy.from_file(policy)
        elif isinstance(policy, dict):
            policy = Policy.from_dict(policy)
        policy = policy or Policy()
        overrides: dict[str, Any] = {}
        if style is not None:
            overrides["style"] = style
        if ratio is not None:
            overrides["ratio"] = ratio
        self.policy = Policy.from_dict({**policy.to_dict(), **overrides}) if overrides else policy
        self.preserve = bool(preserve)
        self.online = bool(online)
        self.seed = seed
        self.budget = None if budget is None else float(budget)
        self.memory_budget = None if memory_budget is None else float(memory_budget)
        self.batch_size = batch_size
        self.plain_layers = None if plain_layers is None else sorted(plain_layers)
        self.cost_model = cost_model
        self._decided: list[str] | None = None  # what the last run's budget left plain (recorded in the recipe)

    @property
    def numerics(self) -> Numerics:
        return Numerics.EXACT if self.preserve else Numerics.CHANGES

    def params(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "preserve": self.preserve, "online": self.online, "seed": self.seed,
                "budget": self.budget, "memory_budget": self.memory_budget, "batch_size": self.batch_size,
                "cost_model": self.cost_model,
                "plain_layers": self._decided if self._decided is not None else self.plain_layers}

    def spec(self) -> str:
        return f"snt(style={self.policy.style},ratio={self.policy.ratio}" + (",preserve=true)" if self.preserve else ")")

    def run(self, gm, ctx: PassContext) -> PassResult:
        stats: Counter = Counter()
        modules = dict(gm.named_modules())
        targets: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target not in targets and layer_kind(modules[node.target]):
                targets.append(node.target)
            elif node.op == "call_function" and node.target in FUNCTIONAL_LAYERS:
                stats[f"skip: functional {FUNCTIONAL_LAYERS[node.target]}"] += 1

        # conv/linear-like modules of other kinds (ConvTranspose2d, Conv3d, ...); custom forwards are counted
        # below, functional layers above
        for kind, n in unsupported_weight_layers(gm, *SUPPORTED, functional=False, custom_forwards=False).items():
            stats[f"skip: {kind} (no SNT form)"] += n
        # Layers the graph never calls sit inside an opaque (leaf) module.
        for path, mod in modules.items():
            if layer_kind(mod) and path not in targets and not _inside(path, targets) and not isinstance(mod, SNTBlock):
                if not any(isinstance(modules.get(p), SNTBlock) for p in _ancestors(path)):
                    stats["skip: inside opaque module"] += 1

        shared = shared_parameter_owners(gm)
        gen_seed = self.seed if self.seed is not None else ctx.seed
        gen = PassContext(seed=gen_seed).generator()
        blocks: dict[str, tuple[SNTBlock, str]] = {}
        for index, path in enumerate(targets):
            layer = modules[path]
            kind = layer_kind(layer)
            if not is_plain(layer, *SUPPORTED):
                stats[f"skip: custom forward ({type(layer).__name__})"] += 1
                continue
            if any(id(p) in shared for p in layer.parameters(recurse=False)):
                stats["skip: shared weight"] += 1
                continue
            decision = self.policy.decide(
                path, kind, layer.weight.numel(), first=index == 0, last=index == len(targets) - 1
            )
            if not decision.expand:
                stats[f"skip: {decision.reason}"] += 1
                continue
            center = True
            style = get_style(decision.style)
            if style.bias_sink and layer.bias is None:
                out = layer.out_features if kind == "linear" else layer.out_channels
                center = find_bias_sink(gm, path, out, linear=kind == "linear") is not None
            block = make_block(
                layer, decision.style, ratio=decision.ratio, center=center, preserve=self.preserve, gen=gen
            )
            if self.online and style.trains_online:
                block.online = True
            blocks[path] = (block, decision.style)
        self._decided = None
        if self.budget is not None:
            # blocks are built (and the generator drawn) for every layer first, so a replay matches
            if self.plain_layers is not None:
                # as recorded (which budget left each plain is not: both count as over budget)
                dropped = {p: OVER_BUDGET for p in self.plain_layers if p in blocks}
            elif any(b.trains_online for b, _ in blocks.values()):
                dropped = self._over_budget(gm, ctx, targets, blocks)
            else:
                dropped = {}
            for path in dropped:
                del blocks[path]
                stats[dropped[path]] += 1
            self._decided = sorted(dropped)
        for path, (block, style_name) in blocks.items():
            set_module(gm, path, block)
            stats[f"expanded: {style_name}"] += 1
            if len(call_sites(gm, path)) > 1:
                stats["shared block (several call sites)"] += 1
        log.info("snt: expanded %d of %d layers", len(blocks), len(targets))
        return PassResult(gm, bool(blocks), stats)

    def _over_budget(self, gm, ctx: PassContext, targets: list[str],
                     blocks: dict[str, tuple[SNTBlock, str]]) -> dict[str, str]:
        """The blocks to leave out, each with the stat that says why: their extra training work is at most
        ``budget`` of the plain layers', and the memory they add at most ``memory_budget`` of the plain model's."""
        calls = _layer_calls(gm, ctx.example_inputs, targets, self.batch_size)
        if calls is None:
            log.warning("snt: no example inputs to measure the layers on; the training-cost budget is not applied")
            return {}
        modules = dict(gm.named_modules())
        plain = {p: sum(layer_macs(LayerConfig.from_module(modules[p]), o) for _, o in calls[p]) for p in targets}
        allowed = self.budget * sum(plain.values())
        if self.cost_model >= 3:
            allowed = max(allowed, MIN_SPENT)
        extra = {}
        for path, (block, _) in blocks.items():
            if not block.trains_online:  # trains explicitly: its cost is the style's, stated where it is chosen
                extra[path] = 0
                continue
            # an online block composes at every call, or (linear on few rows) runs its chain when that is
            # cheaper; its extra parameters cost gradient and optimizer work every step
            chain = sum(block.macs(i, o) for i, o in calls[path]) - plain[path]
            if self.cost_model == 1:  # one multiply-add per element of an elementwise composition
                once = block.compose_macs() or math.prod(block.config.weight_shape())
                extra[path] = min(once * max(len(calls[path]), 1), max(chain, 0))
                continue
            once = block.compose_cost(self.cost_model) + (block.call_overhead if self.cost_model >= 3 else 0)
            compose = once * max(len(calls[path]), 1)
            if not block.always_composes:
                compose = min(compose, max(chain, 0))
            extra[path] = compose + block.parameter_cost()
            if self.cost_model == 2 and extra[path] < MIN_COUNTED:
                extra[path] = 0
        order = sorted(blocks, key=lambda p: extra[p] / max(plain[p], 1))  # cheapest relative to its own work first
        spent, dropped = 0, {}
        for path in order:
            if spent + extra[path] <= allowed:
                spent += extra[path]
                continue
            dropped[path] = OVER_BUDGET
            log.info("snt: %s stays plain: as a block it adds %.2fx its own work per step at batch %d "
                     "(budget: %.0f%% of the model's)", path, extra[path] / max(plain[path], 1), self.batch_size,
                     100 * self.budget)
        if self.memory_budget is not None:
            kept = [p for p in order if p not in dropped and blocks[p][0].trains_online]
            dropped.update(self._over_memory(gm, ctx, kept, blocks, plain))
        return dropped

    def _over_memory(self, gm, ctx: PassContext, kept: list[str], blocks: dict[str, tuple[SNTBlock, str]],
                     plain: dict[str, int]) -> dict[str, str]:
        """Of the blocks ``kept``, those to leave plain so that the memory they add is at most ``memory_budget``
        of the plain model's training memory: the ones holding the most per unit of their layer's work go first."""
        activations = _activation_bytes(gm, tuple(ctx.example_inputs or ()), self.batch_size)
        if activations is None:
            log.warning("snt: could not run the model on its example inputs to measure its activations; the "
                        "training-memory budget is not applied")
            return {}
        from sntfx.blocks.base import OPTIMIZER_STATES

        params = sum(p.numel() * p.element_size() for p in gm.parameters())
        model = (2 + OPTIMIZER_STATES) * params + activations
        allowed = max(self.memory_budget * model, MIN_HELD)
        held = {p: blocks[p][0].memory_cost() for p in kept}
        total, dropped = sum(held.values()), {}
        for path in sorted(kept, key=lambda p: held[p] / max(plain[p], 1), reverse=True):
            if total <= allowed:
                break
            total -= held[path]
            dropped[path] = OVER_MEMORY
            log.info("snt: %s stays plain: as a block it holds %.1f MB more in training (memory budget: %.0f%% of "
                     "the plain model's %.1f MB at batch %d)", path, held[path] / 2**20, 100 * self.memory_budget,
                     model / 2**20, self.batch_size)
        return dropped


def _layer_calls(gm, example_inputs, targets: list[str], batch_size: int) -> dict[str, list] | None:
    """Each target layer's (input shape, output shape) per call, from the example inputs' shapes, at ``batch_size``."""
    inputs = tuple(example_inputs or ())
    if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() == 0:
        return None
    batch = inputs[0].shape[0]
    propagate_shapes(gm, inputs)

    def at_batch(shape: tuple[int, ...] | None) -> tuple[int, ...]:
        shape = shape or ()
        return (batch_size, *shape[1:]) if shape and shape[0] == batch else shape

    calls: dict[str, list] = {path: [] for path in targets}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in calls and isinstance(node.args[0], fx.Node):
            calls[node.target].append((at_batch(output_shape(node.args[0])), at_batch(output_shape(node))))
    return calls


def _activation_bytes(gm, example_inputs: tuple, batch_size: int) -> float | None:
    """Bytes of the activations autograd keeps for the backward pass of ``gm`` at ``batch_size``.

    One forward on the example inputs, in eval mode (BatchNorm keeps its input
    either way; a batch of one is allowed), counting each storage that
    autograd saves once, parameters and buffers aside; scaled from the example
    batch to ``batch_size``. None when the model cannot run on them.
    """
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs) or inputs[0].dim() == 0:
        return None
    if inputs[0].device.type == "meta" or any(p.device.type == "meta" for p in gm.parameters()):
        return None
    modes = {m: m.training for m in gm.modules()}  # put back module by module (a frozen BatchNorm stays in eval)
    gm.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                saved_for_backward((*gm.parameters(), *gm.buffers())) as saved:
            out = gm(*inputs)
        total = sum(saved.values())
        del out
    except Exception as exc:  # a model the shapes pass could run but this cannot: no estimate, said by the caller
        log.debug("snt: activation estimate failed: %s", exc)
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    return total * batch_size / inputs[0].shape[0]


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _inside(path: str, targets: list[str]) -> bool:
    return any(path.startswith(t + ".") for t in targets)


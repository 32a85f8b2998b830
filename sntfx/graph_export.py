"""The traced model as a networkx graph, and its GraphML export (``sntfx inspect FILE --graph OUT.graphml``).

:func:`to_networkx` gives a :class:`networkx.DiGraph` with one node per fx
node, keyed by the fx node's name, in graph order, and one edge
``producer -> consumer`` per data-flow dependency (``node.all_input_nodes``;
a node that reads the same value twice gets one edge). Node attributes:

* ``op``, ``target`` (a module path, attribute path, method name or the
  function's qualified name) and ``index`` (position in the fx graph);
* ``module_type`` (class name of the called module, ``call_module`` only);
* ``shape`` (comma-separated, e.g. ``1,16,28,28``; several outputs joined by
  ``;``) and ``dtype`` (``torch.float32``) when recorded in
  ``node.meta["tensor_meta"]``;
* ``params``: parameter elements of the called module or of the
  parameter read by ``get_attr`` (0 for other nodes; a module called twice
  shows its count on both nodes);
* ``snt_block`` (the module is an SNT block), with ``snt_style`` and, for
  styles that take one, ``snt_ratio``;
* ``layer_kind`` (``conv1d``, ``conv2d``, ``conv3d`` or ``linear``: of the layer, or of
  the layer an SNT block replaces) and ``prunable`` (a plain conv/linear
  layer the pruning and quantization passes act on, see
  :func:`sntfx.compress_utils.prunable_layers`).

Attributes that do not apply are left out (GraphML has no null). The graph
itself carries ``sntfx_version``, ``expanded`` and, when recorded, ``source``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

__all__ = ["to_networkx", "write_graphml"]


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"{module}.{name}" if module else name


def _describe_meta(meta: Any) -> tuple[str, str] | None:
    """(shape, dtype) of a node's ``tensor_meta``: one tensor, or a tuple/list/dict of them."""
    shape = getattr(meta, "shape", None)
    if shape is not None:
        return ",".join(str(int(d)) for d in shape), str(getattr(meta, "dtype", ""))
    parts = meta.values() if isinstance(meta, dict) else meta if isinstance(meta, (tuple, list)) else ()
    described = [d for d in (_describe_meta(p) for p in parts) if d is not None]
    if not described:
        return None
    return ";".join(s for s, _ in described), ";".join(t for _, t in described)


def _needs_shapes(gm: fx.GraphModule) -> bool:
    return any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op not in ("output", "get_attr"))


def to_networkx(gm: fx.GraphModule, example_inputs: Any = None):
    """The fx graph of ``gm`` as a :class:`networkx.DiGraph` annotated for sntfx (see the module docstring).

    Shapes come from ``node.meta["tensor_meta"]``. Where some are missing,
    they are propagated first (metadata only, in eval mode) from
    ``example_inputs`` or, without them, from the input recorded when the
    model was traced; with neither, the nodes have no ``shape``/``dtype``.
    """
    import networkx as nx

    from . import __version__
    from .blocks import SNTBlock, get_style, is_expanded, layer_kind
    from .compress_utils import prunable_layers
    from .tracing import inputs_from_spec, propagate_shapes, sntfx_meta

    meta = sntfx_meta(gm)
    if _needs_shapes(gm):
        if example_inputs is None and meta.get("input_spec"):
            example_inputs = inputs_from_spec(meta["input_spec"])
        if example_inputs is not None:
            propagate_shapes(gm, example_inputs)

    prunable = {name for name, _ in prunable_layers(gm)}
    graph = nx.DiGraph(sntfx_version=__version__, expanded=is_expanded(gm))
    if meta.get("source"):
        graph.graph["source"] = json.dumps(meta["source"], sort_keys=True)
    for index, node in enumerate(gm.graph.nodes):
        attrs: dict[str, Any] = {"op": node.op, "target": _target_name(node.target), "index": index, "params": 0,
                                 "snt_block": False, "prunable": False}
        described = _describe_meta(node.meta.get("tensor_meta"))
        if described is not None:
            attrs["shape"], attrs["dtype"] = described
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            attrs["module_type"] = type(module).__name__
            attrs["params"] = sum(p.numel() for p in module.parameters())
            if isinstance(module, SNTBlock):
                attrs["snt_block"], attrs["snt_style"] = True, module.style
                attrs["layer_kind"] = module.config.kind
                ratio = getattr(module, "ratio", None)
                if "ratio" in get_style(module.style).options and ratio is not None:
                    attrs["snt_ratio"] = int(ratio)
            elif layer_kind(module) is not None:
                attrs["layer_kind"] = layer_kind(module)
            attrs["prunable"] = node.target in prunable
        elif node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.nn.Parameter):
                attrs["params"] = value.numel()
        graph.add_node(node.name, **attrs)
        for src in node.all_input_nodes:
            graph.add_edge(src.name, node.name)
    return graph


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def write_graphml(gm: fx.GraphModule, path: str | os.PathLike, example_inputs: Any = None) -> Path:
    """Write :func:`to_networkx` of ``gm`` to ``path`` as GraphML, atomically (the whole file or nothing)."""
    import networkx as nx

    from .io import atomic_write

    graph = to_networkx(gm, example_inputs)
    return atomic_write(path, lambda tmp: nx.write_graphml(graph, str(tmp)))

"""``onnx2torch.convert`` without its quadratic initializer naming.

onnx2torch 1.5 (``converter.convert``) names the buffer of each initializer use after the number of
buffers already registered, which it counts by iterating over all of them: ``U`` initializer uses
cost ``U^2 / 2`` steps (a chain of 10,000 ``Mul`` by a constant took over a minute).  This is the
same function (Apache-2.0, onnx2torch authors) with a running counter: the same buffers under the
same names, the same modules and the same fx graph, in linear time.  It uses onnx2torch's own
converter registry and graph wrapper.

Warnings
--------
Tracks onnx2torch's ``convert`` of 1.5.x; :func:`convert` falls back to the library's own when those
internals are missing (another version), so a conversion never depends on this copy being current.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from operator import getitem

from torch import fx, nn


def convert(onnx_model) -> fx.GraphModule:
    """onnx2torch's ``convert(onnx_model)`` (``ModelProto`` only) in linear time."""
    try:
        from onnx2torch.converter import InitializersContainer, _remove_initializers_from_input
        from onnx2torch.node_converters import get_converter
        from onnx2torch.onnx_graph import OnnxGraph, ValueType
        from onnx2torch.utils.safe_shape_inference import safe_shape_inference
    except ImportError:  # pragma: no cover - another onnx2torch layout
        import onnx2torch

        return onnx2torch.convert(onnx_model)

    onnx_model = safe_shape_inference(onnx_model)
    if onnx_model.ir_version < 3:
        raise NotImplementedError("Onnx IR is too old (minimal supported version is 3).")
    onnx_model = _remove_initializers_from_input(onnx_model)
    opset_import = {o.domain: o.version for o in onnx_model.opset_import}
    onnx_graph = OnnxGraph(onnx_model.graph)
    torch_graph = fx.Graph()
    torch_initializers = InitializersContainer()
    torch_modules = nn.Module()
    torch_modules.add_module("initializers", torch_initializers)
    torch_nodes = {}
    n_buffers = 0

    for input_value, name in enumerate(onnx_graph.input_values, 1):
        torch_nodes[name] = torch_graph.placeholder(name=f"input_{input_value}")

    for name, onnx_node in onnx_graph.nodes.items():
        version = opset_import[onnx_node.domain]
        converter = get_converter(domain=onnx_node.domain, operation_type=onnx_node.operation_type,
                                  version=version)
        torch_module, onnx_mapping = converter(onnx_node, onnx_graph)
        torch_modules.add_module(name, torch_module)
        args = []
        for value_name in onnx_mapping.inputs:
            value_type = onnx_graph.value_type(value_name)
            if value_type == ValueType.GRAPH_INPUT:
                args.append(torch_nodes[value_name])
            elif value_type == ValueType.NODE_OUTPUT:
                onnx_input_node, _ = onnx_graph.value_as_node_output(value_name)
                torch_input_node = torch_nodes[onnx_input_node.unique_name]
                if len(onnx_input_node.output_values) > 1:
                    index = onnx_input_node.output_values.index(value_name)
                    torch_input_node = torch_graph.call_function(getitem, args=(torch_input_node, index))
                    torch_nodes[name + "_split_output"] = torch_input_node
                args.append(torch_input_node)
            elif value_type == ValueType.GRAPH_INITIALIZER:
                buffer_name = f"onnx_initializer_{n_buffers}"  # the library counts its buffers here
                if value_name not in torch_nodes:
                    torch_initializers.add_initializer(buffer_name, onnx_graph.initializers[value_name].to_torch())
                    n_buffers += 1
                    torch_nodes[buffer_name] = torch_graph.get_attr(f"initializers.{buffer_name}")
                args.append(torch_nodes[buffer_name])
            elif value_type == ValueType.EMPTY:
                args.append(None)
            else:
                raise RuntimeError(f"Got unexpected input value type ({value_type})")

        kwargs = {}
        if None in args:
            first_skipped_arg = args.index(None)
            forward_args = tuple(inspect.signature(torch_module.forward).parameters.keys())
            forward_args = forward_args[first_skipped_arg:len(args)]
            args, kwargs_values = args[:first_skipped_arg], args[first_skipped_arg:]
            kwargs.update({k: v for k, v in zip(forward_args, kwargs_values) if v is not None})
        torch_nodes[name] = torch_graph.call_module(module_name=name, args=tuple(args), kwargs=kwargs)

    onnx_output_nodes = [onnx_graph.value_as_node_output(v)[0] for v in onnx_graph.output_values]
    onnx_output_nodes = list(OrderedDict.fromkeys(onnx_output_nodes))
    torch_output_nodes = [torch_nodes[n.unique_name] for n in onnx_output_nodes]
    if len(torch_output_nodes) == 1:
        torch_output_nodes = torch_output_nodes[0]
    torch_graph.output(torch_output_nodes)
    torch_graph.lint()
    return fx.GraphModule(root=torch_modules, graph=torch_graph)

"""Derivation steps of models/fetch.py: files made from an upstream artifact, not downloaded.

`dequantize` turns an onnxruntime *dynamic* int8 model back into a float32 one: each
DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast -> Mul(scale) -> Add(bias) chain
becomes one float Conv (or MatMul + Add) whose weight is (q - zero_point) * scale. The float
model computes exactly what the int8 weights encode, without quantizing the activations per
call, so its outputs do not depend on the batch it runs in (the int8 model's do). The output is
deterministic (node, initializer and tensor names follow the int8 graph), so the manifest checks
it by sha256.

Needs the `onnx` package (the `models` extra); fetch.py imports this module only when a file
must be derived.
"""

from __future__ import annotations

from pathlib import Path


def dequantize(src: Path, dest: Path) -> None:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def only_consumer(name: str, op: str):
        nodes = consumers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type != op:
            raise ValueError(f"{src.name}: {name} feeds {[n.op_type for n in nodes]}, expected one {op}")
        return nodes[0]

    dropped: set[int] = set()  # ids of the int8 nodes a float node replaces
    replacement: dict[int, list] = {}  # id of the integer op -> its float node(s)
    new_inits = []
    for node in graph.node:
        if node.op_type not in ("ConvInteger", "MatMulInteger"):
            continue
        x_q, w_q, _x_zp, w_zp = node.input
        quantize = producer[x_q]
        if quantize.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"{src.name}: {node.name} reads {quantize.op_type}, expected DynamicQuantizeLinear")
        w_scale_name = w_q[: -len("_quantized")] + "_scale"
        weight = (array(w_q).astype(np.float32) - array(w_zp).astype(np.float32)) * array(w_scale_name).astype(np.float32)
        cast = only_consumer(node.output[0], "Cast")
        scale_mul = only_consumer(cast.output[0], "Mul")
        bias_add = only_consumer(scale_mul.output[0], "Add")
        scales_mul = producer[next(i for i in scale_mul.input if i != cast.output[0])]
        bias_in = next(i for i in bias_add.input if i != scale_mul.output[0])
        bias_reshape = producer.get(bias_in)
        if bias_reshape is not None and bias_reshape.op_type == "Reshape":
            bias = array(bias_reshape.input[0])
            dropped.add(id(bias_reshape))
        else:
            bias = array(bias_in)
        # One DynamicQuantizeLinear may feed several integer ops; it goes once none is left.
        dropped.update({id(cast), id(scale_mul), id(bias_add), id(scales_mul)})
        w_name, b_name = node.name + "_wf", node.name + "_bf"
        new_inits += [numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias.astype(np.float32), b_name)]
        x = quantize.input[0]
        if node.op_type == "ConvInteger":
            conv = helper.make_node("Conv", [x, w_name, b_name], [bias_add.output[0]], name=node.name + "_f")
            conv.attribute.extend(node.attribute)
            replacement[id(node)] = [conv]
        else:
            mm = node.name + "_mm"
            replacement[id(node)] = [
                helper.make_node("MatMul", [x, w_name], [mm], name=node.name + "_f"),
                helper.make_node("Add", [mm, b_name], [bias_add.output[0]], name=node.name + "_add"),
            ]
    if not replacement:
        raise ValueError(f"{src.name} has no ConvInteger/MatMulInteger: not a dynamically quantized model")

    nodes = []
    for node in graph.node:
        if id(node) in replacement:
            nodes.extend(replacement[id(node)])
        elif id(node) not in dropped and node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    # Shapes inferred for the int8 graph name tensors that no longer exist; the batch
    # dimension is free now that no activation is quantized per call.
    del graph.value_info[:]
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    onnx.checker.check_model(model)
    dest.write_bytes(model.SerializeToString())


STEPS = {"dequantize": dequantize}

"""ONNX graph passes that give an exported QDQ graph the shape integer runtimes fuse.

A runtime runs a quantized op in integer kernels only when the op matches its fusion pattern
(onnxruntime: ``DQ(x) , DQ(W int8) , DQ(bias int32) -> Conv -> [Relu] -> Q`` becomes
``QLinearConv``; ``DQ , DQ -> Add -> Q`` becomes ``QLinearAdd``; ``DQ , DQ -> MatMul`` becomes
``MatMulIntegerToFloat``); otherwise it dequantizes and runs float kernels. The passes here, run in
this order by :func:`integer_graph`:

* :func:`constants_to_initializers`: ``Constant`` nodes become initializers (one place to read values);
* :func:`fold_batchnorm`: a BatchNorm after a conv with an int8 per-channel weight is folded into it,
  exactly: the integers stay (negated where gamma < 0), the step is scaled by ``|gamma| / sigma``,
  the bias is ``beta - mu * gamma / sigma`` (plus the conv's own bias times ``gamma / sigma``);
* :func:`int32_biases`: a float conv bias becomes int32 at scale ``s_x * s_w`` behind a DequantizeLinear;
* :func:`move_column_scales`: ``MatMul(x, DQ(W, 1) * s)`` with ``s`` constant along the reduced axis
  becomes ``MatMul(x, DQ(W, 1)) * s`` (the per-part FC's per-(part, output) steps);
* :func:`hoist_quantize`: a ``Q -> DQ`` behind reshapes/transposes moves up to the op that made the
  tensor (per-frame wrappers reshape between a conv's ReLU and the next layer's quantizer);
* :func:`requantize_after_reuse`: a max pool, reduce-max, split, slice or ReLU of a dequantized tensor
  gets the same ``Q -> DQ`` after it, so the runtime runs it on integers and its readers see a DQ;
* :func:`uint8_weights`: the convs that read the graph input (binary silhouettes at 255), or every
  conv, get their weights as uint8 with zero point 128, so x86 CPUs without VNNI do not saturate;
* :func:`integer_pattern_problems` lists every quantized Conv/MatMul/Add whose pattern is incomplete.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

#: ops that only move or reshape data: a DequantizeLinear behind them still feeds the consumer
#: (onnxruntime propagates Q/DQ through them)
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


class Graph:
    """Producer/consumer index and constant values of an ONNX model's main graph (rebuilt on demand)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.g = model.graph
        self.refresh()

    def refresh(self) -> None:
        from onnx import numpy_helper

        self.producer: Dict[str, Any] = {}
        self.consumers: Dict[str, List[Any]] = {}
        for n in self.g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in self.g.initializer}
        self._np = numpy_helper
        self.outputs = {o.name for o in self.g.output}

    def value(self, name: str) -> Optional[np.ndarray]:
        """The constant behind ``name`` (an initializer, possibly behind Identity nodes), else ``None``."""
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":
            name = node.input[0]
            node = self.producer.get(name)
        init = self.inits.get(name)
        return None if init is None else self._np.to_array(init)

    def add_init(self, name: str, arr: np.ndarray) -> str:
        name = self.unique(name)
        init = self._np.from_array(arr, name=name)
        self.g.initializer.append(init)
        self.inits[name] = init
        return name

    def unique(self, base: str) -> str:
        names = set(self.inits) | set(self.producer) | {i.name for i in self.g.input}
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        return name

    def source(self, name: str) -> Optional[Any]:
        """The node behind ``name``, looking through shape-only ops."""
        node = self.producer.get(name)
        while node is not None and node.op_type in SHAPE_OPS:
            node = self.producer.get(node.input[0])
        return node

    def only_consumer(self, name: str) -> Any:
        cons = self.consumers.get(name, [])
        return cons[0] if len(cons) == 1 and name not in self.outputs else None


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def drop_unused_initializers(model: Any) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), then initializers nothing reads."""
    g = model.graph
    graph_out = {o.name for o in g.output}
    while True:
        read = {i for n in g.node for i in n.input} | graph_out
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | graph_out
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)


def toposort(model: Any) -> None:
    """Reorder the main graph's nodes so that every node comes after the producers of its inputs."""
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    order: List[Any] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input around {rest[0].name!r}")
        pending = rest
    copies = [type(n)() for n in order]
    for c, n in zip(copies, order):
        c.CopyFrom(n)
    del g.node[:]
    g.node.extend(copies)


def constants_to_initializers(model: Any) -> int:
    """Move every ``Constant`` node holding a tensor into the initializers. Returns how many."""
    from onnx import numpy_helper

    g = model.graph
    moved = 0
    for n in list(g.node):
        if n.op_type != "Constant" or len(n.attribute) != 1 or n.attribute[0].name != "value":
            continue
        arr = numpy_helper.to_array(n.attribute[0].t)
        g.initializer.append(numpy_helper.from_array(arr, name=n.output[0]))
        g.node.remove(n)
        moved += 1
    return moved


def _weight_dq(gr: Graph, conv: Any) -> Optional[Any]:
    """The DequantizeLinear that gives ``conv`` an int8 weight with zero points 0, or ``None``."""
    if len(conv.input) < 2:
        return None
    dq = gr.producer.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    ints = gr.value(dq.input[0])
    zp = gr.value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if ints is None or ints.dtype != np.int8 or gr.value(dq.input[1]) is None or (zp is not None and zp.any()):
        return None
    return dq


def _input_scale(gr: Graph, name: str) -> Optional[float]:
    """The per-tensor scale of the DequantizeLinear that ``name`` comes from (through shape ops)."""
    dq = gr.source(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    s = gr.value(dq.input[1])
    return None if s is None or s.size != 1 else float(s.reshape(()))


def fold_batchnorm(model: Any) -> int:
    """Fold each ``BatchNormalization`` that follows a Conv with a quantized weight into that Conv."""

    gr = Graph(model)
    folded = 0
    bns: List[Any] = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for bn in bns:
        conv: Any = gr.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or gr.only_consumer(conv.output[0]) is not bn:
            continue
        dq = _weight_dq(gr, conv)
        vals = [gr.value(n) for n in bn.input[1:5]]
        if dq is None or any(v is None for v in vals):
            continue
        gamma, beta, mean, var = (np.asarray(v, dtype=np.float64) for v in vals)
        ints = gr.value(dq.input[0])
        assert ints is not None
        cout = ints.shape[0]
        step_raw = np.asarray(gr.value(dq.input[1]), np.float64).reshape(-1)
        if _attr(dq, "axis", 1) != 0 and step_raw.size > 1:  # per-channel steps must run along the output axis
            continue
        step = np.broadcast_to(step_raw, (cout,))
        g = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        sign = np.where(g < 0, -1, 1).astype(np.int8)
        new_ints = (ints * sign.reshape((-1,) + (1,) * (ints.ndim - 1))).astype(np.int8)
        new_step = np.maximum(step * np.abs(g), np.finfo(np.float32).tiny).astype(np.float32)
        bias = beta - mean * g
        if len(conv.input) > 2 and conv.input[2]:
            b0 = gr.value(conv.input[2])
            if b0 is None:
                continue
            bias = bias + np.asarray(b0, np.float64) * g
        base = conv.name or conv.output[0]
        w_out = _insert_constant_dq(model, gr, conv, f"{base}_w", new_ints, new_step, f"{base}_w")
        b_name = gr.add_init(f"{base}_bias", bias.astype(np.float32))
        inputs = [conv.input[0], w_out, b_name]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = bn.output[0]
        model.graph.node.remove(bn)
        gr.refresh()
        folded += 1
    drop_unused_initializers(model)
    return folded


def _insert_constant_dq(model: Any, gr: Graph, before: Any, prefix: str, ints: np.ndarray, scale: np.ndarray,
                        out_name: str) -> str:
    """A per-channel (axis 0, zero point 0) DequantizeLinear of constant ``ints`` inserted before
    ``before``; its initializers are named ``<prefix>_<dtype>``, ``_scale``, ``_zp``. Returns its output."""
    from onnx import helper

    q_name = gr.add_init(f"{prefix}_{ints.dtype.name}", ints)
    s_name = gr.add_init(f"{prefix}_scale", scale)
    z_name = gr.add_init(f"{prefix}_zp", np.zeros(ints.shape[0], ints.dtype))
    out = gr.unique(out_name)
    node = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=out, axis=0)
    model.graph.node.insert(list(model.graph.node).index(before), node)
    return out


def int32_biases(model: Any) -> int:
    """Give each quantized Conv's float bias as int32 at scale ``s_x * s_w`` behind a DequantizeLinear."""

    gr = Graph(model)
    done = 0
    convs: List[Any] = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        if len(conv.input) < 3 or not conv.input[2]:
            continue
        dq = _weight_dq(gr, conv)
        sx = _input_scale(gr, conv.input[0])
        b = gr.value(conv.input[2])
        if dq is None or sx is None or b is None:
            continue
        cout = b.shape[0]
        sw = np.broadcast_to(np.asarray(gr.value(dq.input[1]), np.float32).reshape(-1), (cout,))
        sb = (np.float32(sx) * sw).astype(np.float32)  # as the runtime computes it, in float32
        info = np.iinfo(np.int32)
        q = np.clip(np.rint(b.astype(np.float64) / sb.astype(np.float64)), info.min, info.max).astype(np.int32)
        base = conv.name or conv.output[0]
        conv.input[2] = _insert_constant_dq(model, gr, conv, f"{base}_bias", q, sb, f"{base}_bias_dq")
        gr.refresh()
        done += 1
    drop_unused_initializers(model)
    return done


def move_column_scales(model: Any) -> int:
    """``MatMul(x, DQ(W) * s)`` -> ``MatMul(x, DQ(W)) * s`` where ``s`` is constant along W's rows."""
    from onnx import helper

    gr = Graph(model)
    moved = 0
    matmuls: List[Any] = [n for n in model.graph.node if n.op_type == "MatMul"]
    for mm in matmuls:
        mul: Any = gr.producer.get(mm.input[1])
        if mul is None or mul.op_type != "Mul" or gr.only_consumer(mul.output[0]) is not mm:
            continue
        dq_in = [i for i in mul.input if (p := gr.producer.get(i)) is not None and p.op_type == "DequantizeLinear"]
        const_in = [i for i in mul.input if gr.value(i) is not None]
        if len(dq_in) != 1 or len(const_in) != 1:
            continue
        s = gr.value(const_in[0])
        assert s is not None
        if s.ndim < 2 or s.shape[-2] != 1:
            continue
        raw = gr.unique(f"{mm.output[0]}_int")
        out = mm.output[0]
        mm.input[1] = dq_in[0]
        mm.output[0] = raw
        node = helper.make_node("Mul", [raw, const_in[0]], [out], name=gr.unique(f"{out}_scale"))
        model.graph.node.insert(list(model.graph.node).index(mm) + 1, node)
        model.graph.node.remove(mul)
        gr.refresh()
        moved += 1
    return moved


def hoist_quantize(model: Any) -> int:
    """Move ``Q [-> Clip] -> DQ`` above reshapes/transposes to sit right after the op that makes the tensor.

    ``src -> Reshape -> Transpose -> Q -> DQ`` (as a per-frame wrapper leaves it) becomes
    ``src -> Q -> DQ -> Reshape -> Transpose``: per-tensor quantization commutes with moving
    elements, so the values are the same, and ``src`` (a conv, ReLU or add) now ends in a Q, which
    its fusion needs. The old shape chain stays, fed by the DQ, only where something else (a Shape
    op) reads it, so ``src`` has the Q as its only consumer.
    """
    from onnx import helper

    gr = Graph(model)
    moved = 0
    qs: List[Any] = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for q in qs:
        chain: List[Any] = []
        node = gr.producer.get(q.input[0])
        while node is not None and node.op_type in SHAPE_OPS:
            chain.append(node)
            node = gr.producer.get(node.input[0])
        if not chain or node is None:
            continue
        tail: List[Any] = []  # [Clip], DQ after the Q, each the only consumer of the one before
        nxt = gr.only_consumer(q.output[0])
        if nxt is not None and nxt.op_type == "Clip":
            tail.append(nxt)
            nxt = gr.only_consumer(nxt.output[0])
        if nxt is None or nxt.op_type != "DequantizeLinear":
            continue
        tail.append(nxt)
        src = chain[-1].input[0]
        at = list(model.graph.node).index(q)  # everything the new nodes read is made before the old Q
        new: List[Any] = []
        cur = src
        for old in [q] + tail:
            out = gr.unique(f"{old.output[0]}_hoisted")
            n = helper.make_node(old.op_type, [cur] + list(old.input[1:]), [out], name=out)
            n.attribute.extend(old.attribute)
            new.append(n)
            gr.producer[out] = n
            cur = out
        for i, old in enumerate(reversed(chain)):
            last = i == len(chain) - 1
            out = tail[-1].output[0] if last else gr.unique(f"{old.output[0]}_dq")
            n = helper.make_node(old.op_type, [cur] + list(old.input[1:]), [out], name=gr.unique(f"{old.name}_dq"))
            n.attribute.extend(old.attribute)
            new.append(n)
            gr.producer[out] = n
            cur = out
        chain[-1].input[0] = new[len(tail)].output[0]  # what still reads the old chain (Shape ops) reads the DQ
        for old in [q] + tail:
            model.graph.node.remove(old)
        for k, n in enumerate(new):
            model.graph.node.insert(at + k, n)
        moved += 1
        gr.refresh()
    moved += _shapes_from_dq(model)
    if moved:
        toposort(model)
        drop_unused_initializers(model)
    return moved


def _shapes_from_dq(model: Any) -> int:
    """``Shape`` ops reading a tensor that also goes to ``Q [-> Clip] -> DQ`` read the DQ's output
    instead (same shape), so the Q is the tensor's only consumer, as fusions require."""
    gr = Graph(model)
    changed = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        nxt = gr.only_consumer(q.output[0])
        if nxt is not None and nxt.op_type == "Clip":
            nxt = gr.only_consumer(nxt.output[0])
        if nxt is None or nxt.op_type != "DequantizeLinear":
            continue
        for c in gr.consumers.get(q.input[0], []):
            if c.op_type == "Shape":
                c.input[0] = nxt.output[0]
                changed += 1
    return changed


#: ops that pick or move values: their output is on their input's grid (same scale and zero point)
REUSE_OPS = ("MaxPool", "ReduceMax", "Split", "Slice", "Relu", "GlobalMaxPool")


def requantize_after_reuse(model: Any) -> int:
    """``DQ -> MaxPool -> reader`` becomes ``DQ -> MaxPool -> Q -> DQ -> reader`` (same scale, zero point).

    The values are unchanged (a max or a slice of grid values is on the grid), and the runtime sees
    the pattern it runs in int8 (DQ -> op -> Q with one scale) while the reader gets a DQ input.
    Only outputs read by something other than a QuantizeLinear are changed.
    """
    from onnx import helper

    gr = Graph(model)
    done = 0
    for n in list(model.graph.node):
        if n.op_type not in REUSE_OPS or not n.input:
            continue
        dq = gr.source(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        for k, out in enumerate(list(n.output)):
            cons = gr.consumers.get(out, [])
            if out in gr.outputs or not any(_reads_dq(gr, c, out) for c in cons):
                continue
            raw = gr.unique(f"{out}_raw")
            qn = gr.unique(f"{out}_requant")
            n.output[k] = raw
            at = list(model.graph.node).index(n) + 1
            model.graph.node.insert(at, helper.make_node("QuantizeLinear", [raw, dq.input[1], dq.input[2]], [qn],
                                                         name=qn))
            model.graph.node.insert(at + 1, helper.make_node("DequantizeLinear", [qn, dq.input[1], dq.input[2]],
                                                             [out], name=gr.unique(f"{out}_dq")))
            done += 1
        gr.refresh()
    return done


def _reads_dq(gr: Graph, node: Any, name: str) -> bool:
    """``node`` runs in integer kernels when ``name`` comes from a DQ: a conv or matmul, a concat, an
    add/mul whose other inputs are dequantized already (a float add stays as it is), or a shape or
    reuse op on the way to one of those."""
    if node.op_type in ("Conv", "MatMul", "Gemm", "Concat"):
        return True
    if node.op_type in ("Add", "Mul"):
        return all(_from_dq(gr, i) for i in node.input if i != name)
    if node.op_type in SHAPE_OPS or node.op_type in REUSE_OPS:  # a later reuse op or reader may need it
        return any(_reads_dq(gr, c, o) for o in node.output for c in gr.consumers.get(o, []))
    return False


def uint8_weights(model: Any, every_conv: bool = False) -> int:
    """Weights as uint8 with zero point 128: those of the convs that read the quantized graph
    input, or (``every_conv``) of every quantized conv and weight matmul. Returns how many.

    onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2) add pairs of products in
    int16, which saturates for inputs near 255 (binary silhouettes at scale 1/255 are 0 or 255, and
    so are many ReLU outputs) with large weights; the uint8 x uint8 kernels do not, at some cost in
    speed. The symmetric int8 grid maps into uint8 exactly, so the values are the same.
    """
    gr = Graph(model)
    inputs = {i.name for i in model.graph.input}
    done = 0
    for conv in [n for n in model.graph.node if n.op_type in ("Conv", "MatMul")]:
        if every_conv:
            done += _weights_to_u8(gr, conv)
            continue
        if conv.op_type != "Conv":
            continue
        src = gr.source(conv.input[0])
        q = gr.producer.get(src.input[0]) if src is not None and src.op_type == "DequantizeLinear" else None
        while q is not None and q.op_type == "Clip":
            q = gr.producer.get(q.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        read = q.input[0]
        while (p := gr.producer.get(read)) is not None and p.op_type in SHAPE_OPS:
            read = p.input[0]
        if read in inputs:
            done += _weights_to_u8(gr, conv)
    drop_unused_initializers(model)
    return done


def _weights_to_u8(gr: Graph, conv: Any) -> int:
    dq = _weight_dq(gr, conv)
    if dq is None or len(dq.input) < 3:
        return 0
    ints, zp = gr.value(dq.input[0]), gr.value(dq.input[2])
    if ints is None or zp is None or ints.ndim < 2:
        return 0
    dq.input[0] = gr.add_init(f"{dq.input[0]}_u8", (ints.astype(np.int16) + 128).astype(np.uint8))
    dq.input[2] = gr.add_init(f"{dq.input[2]}_u8", (zp.astype(np.int16) + 128).astype(np.uint8))
    gr.refresh()
    return 1


def integer_graph(model: Any, uint8_conv_weights: bool = False) -> Dict[str, int]:
    """Run every pass in order; returns how many places each changed. ``uint8_conv_weights``: every
    conv's weights as uint8 (:func:`uint8_weights`; else only the convs reading the exact input)."""
    res = {"constants": constants_to_initializers(model), "batchnorm_folded": fold_batchnorm(model),
           "int32_biases": int32_biases(model), "column_scales": move_column_scales(model),
           "quantize_hoisted": hoist_quantize(model), "requantized_after_reuse": requantize_after_reuse(model),
           "uint8_weights": uint8_weights(model, uint8_conv_weights)}
    drop_unused_initializers(model)
    return res


def _quantized_output(gr: Graph, name: str) -> bool:
    """``name`` (an op's output) goes to exactly one QuantizeLinear, directly or through one Relu."""
    nxt = gr.only_consumer(name)
    if nxt is not None and nxt.op_type == "Relu":
        nxt = gr.only_consumer(nxt.output[0])
    return nxt is not None and nxt.op_type == "QuantizeLinear"


def _from_dq(gr: Graph, name: str) -> bool:
    src = gr.source(name)
    return src is not None and src.op_type == "DequantizeLinear"


def integer_pattern_problems(model: Any) -> List[str]:
    """Every quantized op whose integer pattern is incomplete, as ``"<op> <name>: <what is missing>"``.

    A Conv/Gemm/MatMul counts as quantized when its weight comes from a DequantizeLinear; an Add
    when either input does. A Conv needs a quantized input, an int32 bias (or none) and a Q after
    its output; an Add both inputs and its output quantized; a MatMul a quantized input (its output
    may stay float: MatMulIntegerToFloat).
    """
    gr = Graph(model)
    problems: List[str] = []
    for n in model.graph.node:
        label = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and _from_dq(gr, n.input[1]):
            if not _from_dq(gr, n.input[0]):
                problems.append(f"{label}: input is not quantized")
            if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]:
                b = gr.producer.get(n.input[2])
                bias_ints = None if b is None or b.op_type != "DequantizeLinear" else gr.value(b.input[0])
                if bias_ints is None or bias_ints.dtype != np.int32:
                    problems.append(f"{label}: bias is not int32")
            if n.op_type != "MatMul" and not _quantized_output(gr, n.output[0]):
                problems.append(f"{label}: output has no QuantizeLinear after it")
        elif n.op_type == "Add" and any(_from_dq(gr, i) for i in n.input):
            if not all(_from_dq(gr, i) for i in n.input):
                problems.append(f"{label}: an input is not quantized")
            if not _quantized_output(gr, n.output[0]):
                problems.append(f"{label}: output has no QuantizeLinear after it")
    return problems


def compact_names(model: Any) -> int:
    """Rename the graph's internal tensors and initializers to short names and drop node names.

    The exporter names every tensor after the module path that made it; in a quantized graph,
    whose weights are a quarter of the float ones, those names are a few percent of the file.
    Graph inputs and outputs keep their names. A graph with subgraphs (If, Loop), which may read
    outer names, is left as it is. Returns how many names changed.
    """
    from onnx import AttributeProto

    g = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0
    keep = {i.name for i in g.input} | {o.name for o in g.output} | {""}
    names: Dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names):x}"
        return names[name]

    for init in g.initializer:
        init.name = short(init.name)
    for n in g.node:
        n.name = ""
        for k, i in enumerate(n.input):
            n.input[k] = short(i)
        for k, o in enumerate(n.output):
            n.output[k] = short(o)
    for vi in list(g.value_info):
        if vi.name in names:
            vi.name = names[vi.name]
    return len(names)


def op_counts(nodes: Iterable[Any]) -> Dict[str, int]:
    """``{op: count}``; ops outside the default domain are written ``domain:op``."""
    c: Counter = Counter()
    for n in nodes:
        c[f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
    return dict(sorted(c.items()))

"""Rewrite the exported ``DiJiangLinearAttention`` nodes into one flavor.

* ``linear-attention``: the ONNX standard op ``LinearAttention`` (opset 27).
* ``function``: our node plus a model-local function whose body uses only
  opset-21 operators (runtimes without opset 27; TensorRT may swap in the
  plugin instead of inlining the body).
* ``plugin``: our node without a body (TensorRT 10.3 resolves it through the
  plugin registry; other runtimes need a custom-op implementation).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..contract.names import DOMAIN, DOMAIN_VERSION, OP_TYPE, PORTABLE_OPSET, STANDARD_OP, STANDARD_OPSET

FLAVORS = ("linear-attention", "function", "plugin")
_TRT_ONLY_ATTRS = ("plugin_version", "plugin_namespace")
#: IR version written with opset 27 (ONNX 1.19+ maps opset 24+ to IR 11+).
_IR_FOR_OPSET27 = 11


def apply_flavor(model: onnx.ModelProto, flavor: str) -> onnx.ModelProto:
    """Rewrite ``model`` (in place) to ``flavor`` and return it."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown attention op flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    if not nodes:
        raise ValueError(f"the graph has no {OP_TYPE} node to rewrite")
    rules = {helper.get_attribute_value(a).decode() for n in nodes for a in n.attribute if a.name == "update_rule"}
    del model.opset_import[:]
    if flavor == "linear-attention":
        for node in nodes:
            node.op_type, node.domain = STANDARD_OP, ""
            keep = [a for a in node.attribute if a.name not in _TRT_ONLY_ATTRS]
            del node.attribute[:]
            node.attribute.extend(keep)
        model.opset_import.append(helper.make_opsetid("", STANDARD_OPSET))
        model.ir_version = max(model.ir_version, _IR_FOR_OPSET27)
        return model
    model.opset_import.extend([helper.make_opsetid("", PORTABLE_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    if flavor == "function":
        if len(rules) != 1:
            raise ValueError(f"one update rule per graph is supported by the function flavor, got {sorted(rules)}")
        model.functions.append(function_body(rules.pop()))
    return model


def function_body(rule: str) -> onnx.FunctionProto:
    """``DiJiangLinearAttention`` as opset-21 operators (one chunk, quadratic in T).

    The runtime feeds at most ``max_chunk`` tokens per call, so the T x T
    terms stay bounded and the whole prompt is linear in its length. Exponents
    are cumulative sums of ``g <= 0`` restricted to ``m <= t``: never positive.
    """
    # One function on purpose: the ONNX function body is a straight sequence of nodes, read top to bottom against the spec.
    if rule not in ("gated", "linear"):
        raise ValueError(f"update_rule must be 'gated' or 'linear', got {rule!r}")
    gated = rule == "gated"
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, outputs, **attrs):
        nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const_i64(name, values):
        t = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        return node("Constant", [], [name], value=t)

    # Heads come from the call node's attribute, so one body serves any H.
    heads = helper.make_node("Constant", [], ["heads"])
    heads.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name="q_num_heads", type=onnx.AttributeProto.INT))
    nodes.append(heads)
    scale = helper.make_node("Constant", [], ["scale_f"])
    scale.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name="scale", type=onnx.AttributeProto.FLOAT))
    nodes.append(scale)

    zero_axis = const_i64("axis0", [0])
    heads1 = node("Unsqueeze", ["heads", zero_axis], ["heads1"])
    split_shape = node("Concat", [const_i64("zz", [0, 0]), heads1, const_i64("m1", [-1])], ["split_shape"], axis=0)
    merged_shape = const_i64("merged_shape", [0, 0, -1])

    def heads_first(x, name):
        r = node("Reshape", [x, split_shape], [f"{name}_r"])
        return node("Transpose", [r], [f"{name}_h"], perm=[0, 2, 1, 3])

    q = heads_first("query", "q")
    k = heads_first("key", "k")
    v = heads_first("value", "v")
    s0 = node("CastLike", ["past_state", "query"], ["s0"])
    kt = node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2])
    scores = node("MatMul", [q, kt], ["scores"])
    # Causal mask [T, T] from the time axis of the query.
    t_len = node("Shape", ["query"], ["t_len"], start=1, end=2)
    tt = node("Concat", [t_len, t_len], ["tt"], axis=0)
    one = helper.make_tensor("one", TensorProto.BOOL, [1], [True])
    ones = node("ConstantOfShape", [tt], ["ones"], value=one)
    ones_i = node("Cast", [ones], ["ones_i"], to=TensorProto.INT32)
    causal = node("Cast", [node("Trilu", [ones_i], ["tri"], upper=0)], ["causal"], to=TensorProto.BOOL)
    inter_q = node("MatMul", [q, s0], ["q_s0"])
    if gated:
        g = node("Transpose", ["decay"], ["g"], perm=[0, 2, 1])
        minus_one = const_i64("minus_one", [-1])
        c = node("CumSum", [g, node("Constant", [], ["ax_last"], value_int=-1)], ["c"])
        ci = node("Unsqueeze", [c, minus_one], ["ci"])
        cj = node("Unsqueeze", [c, const_i64("minus_two", [-2])], ["cj"])
        diff = node("Sub", [ci, cj], ["diff"])
        neg_inf = node("CastLike", [node("Constant", [], ["ninf_f"], value_float=float("-inf")), "query"], ["ninf"])
        decay_tt = node("Exp", [node("Where", [causal, diff, neg_inf], ["diff_m"])], ["decay_tt"])
        weighted = node("Mul", [scores, decay_tt], ["weighted"])
        inter = node("Mul", [node("Exp", [ci], ["to_start"]), inter_q], ["inter"])
        c_last = node("Gather", [c, node("Constant", [], ["last"], value_int=-1)], ["c_last"], axis=2)
        from_m = node("Exp", [node("Sub", [node("Unsqueeze", [c_last, minus_one], ["c_last1"]), c], ["c_to_end"])], ["from_m"])
        k_w = node("Mul", [k, node("Unsqueeze", [from_m, minus_one], ["from_m1"])], ["k_w"])
        total = node("Exp", [node("Unsqueeze", [c_last, const_i64("last2", [-1, -2])], ["c_last2"])], ["total"])
        s_carry = node("Mul", [total, s0], ["s_carry"])
    else:
        zero = node("CastLike", [node("Constant", [], ["zero_f"], value_float=0.0), "query"], ["zero"])
        weighted = node("Where", [causal, scores, zero], ["weighted"])
        inter = inter_q
        k_w = k
        s_carry = s0
    intra = node("MatMul", [weighted, v], ["intra"])
    o = node("Add", [intra, inter], ["o"])
    o = node("Reshape", [node("Transpose", [o], ["o_t"], perm=[0, 2, 1, 3]), merged_shape], ["o_m"])
    node("Mul", [o, node("CastLike", ["scale_f", "query"], ["scale_t"])], ["output"])
    update = node("MatMul", [node("Transpose", [k_w], ["k_wt"], perm=[0, 1, 3, 2]), v], ["update"])
    node("CastLike", [node("Add", [s_carry, update], ["s_new"]), "past_state"], ["present_state"])
    inputs = ["query", "key", "value", "past_state"] + (["decay"] if gated else [])
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs,
        ["output", "present_state"],
        nodes,
        opset_imports=[helper.make_opsetid("", PORTABLE_OPSET)],
        attributes=["q_num_heads", "kv_num_heads", "scale", "update_rule", "chunk_size", "plugin_version", "plugin_namespace"],
    )

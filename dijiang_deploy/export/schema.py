"""The ``DiJiangLinearAttention`` node: names and its ONNX ``OpSchema``.

Registering the schema lets ``onnx.checker`` (full check) and shape inference
accept the ``plugin`` flavor, whose node has no body. ``plugins/README.md``
is the contract these constants follow.
"""

from __future__ import annotations

from onnx import defs, helper

from ..contract.names import DOMAIN, DOMAIN_VERSION, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

_DOC = """DiJiang attention recurrence (semantics of ONNX LinearAttention, opset 27).
gated:  S_t = exp(g_t) * S_{t-1} + k_t v_t^T ; o_t = scale * q_t^T S_t
linear: S_t = S_{t-1} + k_t v_t^T            ; o_t = scale * q_t^T S_t
query/key/value [B, T, H*d] (float or float16), past_state/present_state
[B, H, dk, dv] float32, decay [B, T, H] (gated only). See plugins/README.md."""


def _infer(ctx) -> None:
    # Output 0 has the query's type and shape, output 1 the state's.
    ctx.set_output_type(0, ctx.get_input_type(0))
    ctx.set_output_type(1, ctx.get_input_type(3))


def make_schema() -> defs.OpSchema:
    S = defs.OpSchema
    schema = S(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        doc=_DOC,
        inputs=[
            S.FormalParameter("query", "T"),
            S.FormalParameter("key", "T"),
            S.FormalParameter("value", "T"),
            S.FormalParameter("past_state", "S"),
            S.FormalParameter("decay", "T", param_option=S.FormalParameterOption.Optional),
        ],
        outputs=[S.FormalParameter("output", "T"), S.FormalParameter("present_state", "S")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "activations"),
            ("S", ["tensor(float)"], "recurrent state, always float32"),
        ],
        attributes=[
            S.Attribute("q_num_heads", S.AttrType.INT, "number of heads H", required=True),
            S.Attribute("kv_num_heads", S.AttrType.INT, "must equal q_num_heads", required=True),
            S.Attribute("scale", S.AttrType.FLOAT, "output scale (exporter writes 1.0)", required=True),
            S.Attribute("update_rule", S.AttrType.STRING, "'gated' or 'linear'", required=True),
            S.Attribute("chunk_size", helper.make_attribute("chunk_size", 64), "prefill chunk hint"),
            S.Attribute("plugin_version", helper.make_attribute("plugin_version", PLUGIN_VERSION), "TensorRT"),
            S.Attribute("plugin_namespace", helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE), "TensorRT"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_schema() -> None:
    """Register the schema once per process (idempotent)."""
    try:
        defs.get_schema(OP_TYPE, DOMAIN_VERSION, DOMAIN)
        return
    except defs.SchemaError:
        pass
    defs.register_schema(make_schema())

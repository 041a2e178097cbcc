"""Build the step graph directly from the weights, recurrence inlined.

The traced graph (:func:`.graph.trace`) mirrors the PyTorch modules node for
node: ~140 nodes per layer after ONNX Runtime's rewrites, mostly shape
arithmetic, transposes and casts around rotary, GQA and the recurrence, plus a
``Scan`` for ``LinearAttention``. On a CPU decoding one token those small
nodes cost more than the matrix products of a quantized model. This builder
writes the same function with far fewer nodes:

* fused projections: one ``MatMul`` for q|k|v|W_G, one for the MLP's
  gate|up (the quantizer still sees plain ``[K, N]`` weights);
* standard opset-23 ``RMSNormalization`` / ``RotaryEmbedding`` kernels;
  rotary runs once on q and k together, the feature map once on both;
* grouped-query heads broadcast inside ``MatMul`` (``[B, KV, G, L, d]``)
  instead of expanding k and v;
* the chunked recurrence of spec section 5 in plain ``MatMul``/``Exp`` ops,
  its per-token decay factors for all layers computed once per step;
* one ``If`` per layer: a one-token step (decode) skips the chunk form and
  computes ``o = phi(q) S_new`` with reshapes instead of transposes (SmolLM2:
  ~37 instead of ~49 nodes per layer on the decode path after ONNX Runtime's
  rewrites; steps 2-4% (fp32) and ~5% (int4) shorter on a 2-core CPU,
  ``benchmarks/step_time.py``). The per-step preamble of the chunk form
  (the [L, L] count differences, decay tables) still runs on decode steps:
  a few dozen microseconds, shared by all layers.

Same inputs, outputs and numerics as the traced graph (tested against the
PyTorch reference); geometric decay only (the general D1/D2 form keeps the
traced flavors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..contract.errors import ExportError
from ..modeling.model import DiJiangForCausalLM

#: RMSNormalization and RotaryEmbedding are standard from opset 23.
DIRECT_OPSET = 23
_IR_VERSION = 10

_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}


class _Graph:
    """Tiny helper: nodes with generated output names, numpy initializers."""

    def __init__(self, sink=None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self.sink = sink  # an onnx_io.ExternalData: large weights go straight to the data file

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outs = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self._count}_{op_type}", **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, name: str, value) -> str:
        value = np.asarray(value)  # 0-d stays 0-d (ascontiguousarray would make it 1-d)
        if self.sink is not None:
            self.inits.append(self.sink.tensor(name, value))
        else:
            self.inits.append(numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def ints(self, name: str, values) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))

    def branch(self, name: str, build) -> onnx.GraphProto:
        """A subgraph of the nodes ``build()`` adds; it returns the output names.

        Initializers made meanwhile stay in the main graph (outer scope), so
        both branches of an ``If`` read the same copy.
        """
        outer, self.nodes = self.nodes, []
        try:
            outs = build()
            nodes = self.nodes
        finally:
            self.nodes = outer
        values = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
        return helper.make_graph(nodes, name, [], values)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _check(model: DiJiangForCausalLM, dtype: str) -> None:
    if dtype != "fp32":
        raise ExportError("--attention-op inline builds float32 graphs (use --weights int8/int4 to shrink them)")
    if not all(a.geometric for a in model.attention_layers()):
        raise ExportError(
            "--attention-op inline needs geometric decay tables in every layer; this checkpoint has general "
            "D1/D2 tables: export it with --attention-op linear-attention"
        )
    cfg = model.config
    if cfg.hidden_act not in _GELU and cfg.hidden_act not in ("silu", "swish", "relu"):
        raise ExportError(f"--attention-op inline does not know hidden_act {cfg.hidden_act!r}")


@dataclass
class _StepInputs:
    """Graph values of one step that every layer reads."""

    cos: str | None
    sin: str | None
    single: str  # bool: a one-token step
    mask_1: str  # [B,1,1,1,1] mask of a one-token step
    diff: str  # [B,1,1,L,L] count differences, huge outside the causal real pairs
    decay_q: str  # [NL,B,KV,G,L,1]
    decay_k: str  # [NL,B,KV,G,1,L]
    decay_s: str  # [NL,B,KV,G,1,1]
    log_gamma: np.ndarray  # [NL,KV,G,1,1], <= -1e-12


@dataclass
class _Shapes:
    """Reshape targets shared by the layers (int64 initializers)."""

    state: str
    state_out: str
    q: str
    kv: str
    qk: str
    gn: str
    merged: str
    q1: str
    k1: str
    v1: str
    gn1: str
    gn_ones: str


def build_step_graph(model: DiJiangForCausalLM, logits: str = "last", dtype: str = "fp32", sink=None) -> onnx.ModelProto:
    """The step graph of ``model`` with the recurrence as standard ops.

    Inputs/outputs are those of :func:`.graph.io_specs`: ``input_ids [B, L]``,
    ``attention_mask [B, L]``, ``past_position [B]`` (int64),
    ``past_state.{i} [B, H, d, d]`` float32 -> ``logits`` ``[B, 1, V]`` (or
    ``[B, L, V]`` with ``logits="all"``) float32 and ``present_state.{i}``.
    ``sink`` (an :class:`~.onnx_io.ExternalData`) receives the large weights
    as they are made, instead of the graph holding them.

    Raises:
        ExportError: see :func:`_check`.
    """
    _check(model, dtype)
    cfg = model.config
    layers = list(model.body.layers)
    llama = cfg.family != "gpt_neox"
    g = _Graph(sink)
    step = _step_inputs(g, model, layers)
    emb_name = g.const("embed.weight", _np(model.body.embed.weight))
    hidden = g.op("Gather", emb_name, "input_ids", name="embedded")
    shapes = _shapes(g, cfg)
    for i, layer in enumerate(layers):
        tag = f"layers.{i}"
        x_in = _norm(g, layer.input_layernorm, hidden, f"{tag}.input_norm", llama)
        a = _attention(g, step, shapes, layer.attn, i, x_in, cfg)
        if layer.parallel_residual:
            m = _mlp(g, layer.mlp, _norm(g, layer.post_attention_layernorm, hidden, f"{tag}.post_norm", llama), cfg, tag)
            hidden = g.op("Add", g.op("Add", hidden, a), m, name=f"{tag}.hidden")
        else:
            hidden = g.op("Add", hidden, a, name=f"{tag}.resid")
            m = _mlp(g, layer.mlp, _norm(g, layer.post_attention_layernorm, hidden, f"{tag}.post_norm", llama), cfg, tag)
            hidden = g.op("Add", hidden, m, name=f"{tag}.hidden")

    if logits == "last":
        hidden = g.op("Slice", hidden, g.ints("last_s", [-1]), g.ints("last_e", [1 << 62]), g.ints("last_a", [1]))
    hidden = _norm(g, model.body.final_norm, hidden, "final_norm", llama)
    if cfg.tie_word_embeddings:
        # Transpose of the embedding: the file holds the matrix once; the
        # quantizer folds it into its own int weight when it quantizes the head.
        g.op("MatMul", hidden, g.op("Transpose", emb_name, perm=[1, 0], name="head.weight_t"), name="logits")
    else:
        g.op("MatMul", hidden, g.const("head.weight_t", _np(model.head.weight).T), name="logits")
    return _model(g, cfg, logits)


def _step_inputs(g: _Graph, model: DiJiangForCausalLM, layers: list) -> _StepInputs:
    """Positions, rotary tables and the decay factors of all layers, once per step."""
    cfg = model.config
    kv, grp = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    mask_i = "attention_mask"
    cnt_i = g.op("CumSum", mask_i, g.ints("axis1", 1), name="count_i")
    pos = g.op(
        "Add",
        g.op("Unsqueeze", "past_position", g.ints("ax_1", [1])),
        g.op("Max", g.op("Sub", cnt_i, g.ints("one_i", 1)), g.ints("zero_i", 0)),
        name="positions",
    )
    cos = sin = None
    if cfg.rotary_ndims:
        inv_freq = _np(model.rotary.inv_freq)
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=TensorProto.FLOAT), g.ints("ax_last", [-1])),
                     g.const("inv_freq", inv_freq), name="freqs")
        cos, sin = g.op("Cos", freqs, name="cos"), g.op("Sin", freqs, name="sin")
        scaling = float(model.rotary.attention_scaling)
        if scaling != 1.0:
            s = g.const("rope_scaling", np.float32(scaling))
            cos, sin = g.op("Mul", cos, s, name="cos_s"), g.op("Mul", sin, s, name="sin_s")

    # Decay, spec section 5 with padding: between real tokens m <= t the state
    # decays by gamma^(n_t - n_m), n = running count of real tokens. All
    # exponents are (count difference >= 0) * log(gamma) <= 0.
    mask = g.op("Cast", mask_i, to=TensorProto.FLOAT, name="mask_f")
    cnt = g.op("CumSum", mask, g.ints("axis1_f", 1), name="count")
    cnt_t = g.op("Unsqueeze", cnt, g.ints("ax_t", [1, 2, 4]), name="count_t")  # [B,1,1,L,1]
    cnt_m = g.op("Unsqueeze", cnt, g.ints("ax_m", [1, 2, 3]), name="count_m")  # [B,1,1,1,L]
    mask_m = g.op("Unsqueeze", mask, g.ints("ax_mm", [1, 2, 3]), name="mask_m")  # [B,1,1,1,L]
    t_len = g.op("Shape", mask_i, start=1, end=2, name="t_len")
    # A one-token step (decode) takes the If's first branch, which skips the
    # chunk machinery: with L = 1 the [L, L] decay is 1 (or 0 for a padded
    # token, whose k is masked anyway), so o = phi(q) S_new exactly, and the
    # head split needs reshapes, not transposes.
    single = g.op("Squeeze", g.op("Equal", t_len, g.ints("one_len", [1])), name="single_token")
    # Made once here rather than in each layer's branch; unused when L > 1.
    mask_1 = g.op("Reshape", mask, g.ints("mask_1_shape", [-1, 1, 1, 1, 1]), name="mask_1")  # [B,1,1,1,1] when L=1
    ones = g.op("ConstantOfShape", g.op("Concat", t_len, t_len, axis=0),
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    causal = g.op("Mul", g.op("Trilu", ones, upper=0), mask_m, name="causal")  # m <= t, m real
    # Pairs outside `causal` get a huge count difference, so exp(diff * log gamma)
    # underflows to exactly 0 there (log gamma is kept <= -1e-12 below).
    outside = g.op("Mul", g.op("Sub", g.const("one_f", np.float32(1.0)), causal), g.const("huge", np.float32(1e30)))
    diff = g.op("Add", g.op("Mul", g.op("Sub", cnt_t, cnt_m), causal), outside, name="count_diff")  # [B,1,1,L,L]
    cnt_last = g.op("Slice", cnt_m, g.ints("m1", [-1]), g.ints("big", [1 << 62]), g.ints("ax4", [4]), name="count_last")
    to_end = g.op("Mul", g.op("Sub", cnt_last, cnt_m), mask_m, name="to_end")  # [B,1,1,1,L]
    # gamma rounds to 1.0 in float32 for very slow decay; a log of exactly 0
    # would turn the 1e30 mask above into exp(0) = 1.
    log_gamma = np.minimum(np.stack([_np(layer.attn.log_gamma).reshape(kv, grp, 1, 1) for layer in layers]), -1e-12)
    lg = g.const("log_gamma", log_gamma[:, None])  # [NL,1,KV,G,1,1]
    decay_q = g.op("Exp", g.op("Mul", g.op("Unsqueeze", cnt, g.ints("ax_q", [1, 2, 4])), lg), name="decay_q")
    decay_k = g.op("Mul", g.op("Exp", g.op("Mul", to_end, lg)), mask_m, name="decay_k")  # [NL,B,KV,G,1,L]
    decay_s = g.op("Exp", g.op("Mul", cnt_last, lg), name="decay_s")  # [NL,B,KV,G,1,1]
    return _StepInputs(cos, sin, single, mask_1, diff, decay_q, decay_k, decay_s, log_gamma)


def _shapes(g: _Graph, cfg) -> _Shapes:
    h_, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    grp, big_d = h_ // kv, cfg.hidden_size
    gn_groups = d  # num_groups = head size (spec section 2)
    return _Shapes(
        state=g.ints("state_grouped", [-1, kv, grp, d, d]),
        state_out=g.ints("state_flat", [-1, h_, d, d]),
        q=g.ints("q_split", [0, 0, kv, grp, d]),
        kv=g.ints("kv_split", [0, 0, kv, 1, d]),
        qk=g.ints("qk_split", [0, 0, h_ + kv, d]),
        gn=g.ints("gn_split", [0, 0, gn_groups, big_d // gn_groups]),
        merged=g.ints("merged", [0, 0, big_d]),
        q1=g.ints("q_step", [-1, kv, grp, 1, d]),
        k1=g.ints("k_step", [-1, kv, 1, d, 1]),
        v1=g.ints("v_step", [-1, kv, 1, 1, d]),
        gn1=g.ints("gn_step", [-1, 1, gn_groups, big_d // gn_groups]),
        gn_ones=g.const("gn_unit", np.ones(big_d // gn_groups, np.float32)),
    )


def _norm(g: _Graph, module, x: str, tag: str, llama: bool) -> str:
    w = g.const(f"{tag}.weight", _np(module.weight))
    if llama:
        return g.op("RMSNormalization", x, w, axis=-1, epsilon=float(module.eps), name=f"{tag}.out")
    b = g.const(f"{tag}.bias", _np(module.bias))
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=float(module.eps), name=f"{tag}.out")


def _linear(g: _Graph, x: str, weight_t: np.ndarray, bias: np.ndarray | None, tag: str) -> str:
    y = g.op("MatMul", x, g.const(f"{tag}.weight_t", weight_t), name=f"{tag}.mm")
    if bias is not None:
        y = g.op("Add", y, g.const(f"{tag}.bias", bias), name=f"{tag}.out")
    return y


def _qkvg_weights(attn, cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """``[D, (H + 2 KV) d + D]`` weight of the fused q|k|v|gate product, and its bias."""
    h_, d, big_d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    # NeoX rows are [H, 3, d] per head.
    if cfg.family != "gpt_neox":
        ws = [attn.q_proj, attn.k_proj, attn.v_proj]
        w_qkv = np.concatenate([_np(m.weight) for m in ws], 0)
        b_qkv = np.concatenate([_np(m.bias) for m in ws]) if ws[0].bias is not None else None
    else:
        w3 = _np(attn.query_key_value.weight).reshape(h_, 3, d, big_d)
        w_qkv = np.concatenate([w3[:, j].reshape(big_d, big_d) for j in range(3)], 0)
        b_qkv = None
        if attn.query_key_value.bias is not None:
            b3 = _np(attn.query_key_value.bias).reshape(h_, 3, d)
            b_qkv = np.concatenate([b3[:, j].reshape(-1) for j in range(3)])
    w_all = np.concatenate([w_qkv.T, _np(attn.W_G)], 1)
    b_all = None if b_qkv is None else np.concatenate([b_qkv, np.zeros(big_d, np.float32)])
    return w_all, b_all


def _attention(g: _Graph, step: _StepInputs, sh: _Shapes, attn, i: int, x_in: str, cfg) -> str:
    """Layer ``i``'s DiJiang attention on the normed input ``x_in`` [B, L, D]; writes ``present_state.{i}``."""
    h_, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    big_d, rd = cfg.hidden_size, cfg.rotary_ndims
    tag = f"layers.{i}"
    proj = _linear(g, x_in, *_qkvg_weights(attn, cfg), f"{tag}.attn.qkvg")
    qk, v, gate = g.op("Split", proj, g.ints(f"{tag}.split", [(h_ + kv) * d, kv * d, big_d]), axis=-1, outputs=3,
                       name=f"{tag}.qkvg")
    if rd:
        extra = {"rotary_embedding_dim": rd} if rd != d else {}
        qk = g.op("RotaryEmbedding", qk, step.cos, step.sin, num_heads=h_ + kv, name=f"{tag}.rope", **extra)
    p = g.const(f"{tag}.attn.proj_matrix", _np(attn.proj_matrix))
    phi = g.op("Softmax", g.op("MatMul", g.op("Reshape", qk, sh.qk), p), axis=-1, name=f"{tag}.phi")
    fq, fk = g.op("Split", phi, g.ints(f"{tag}.qk_heads", [h_, kv]), axis=2, outputs=2, name=f"{tag}.phi_qk")
    s0 = g.op("Reshape", f"past_state.{i}", sh.state, name=f"{tag}.s0")  # [B,KV,G,d,d]
    idx = g.const(f"{tag}.index", np.int64(i))
    gamma_s = g.op("Gather", step.decay_s, idx, axis=0, name=f"{tag}.decay_s")

    def one_token():
        q1 = g.op("Reshape", fq, sh.q1, name=f"{tag}.step.q")  # [B,KV,G,1,d]
        k1 = g.op("Mul", g.op("Reshape", fk, sh.k1), step.mask_1, name=f"{tag}.step.kT")  # [B,KV,1,d,1]
        v1 = g.op("Reshape", v, sh.v1, name=f"{tag}.step.v")  # [B,KV,1,1,d]
        s_new = g.op("Add", g.op("Mul", s0, gamma_s), g.op("MatMul", k1, v1), name=f"{tag}.step.s_new")
        o = g.op("Reshape", g.op("MatMul", q1, s_new), sh.gn1, name=f"{tag}.step.o_groups")
        return [o, g.op("Reshape", s_new, sh.state_out, name=f"{tag}.step.present")]

    def chunk():
        q5 = g.op("Transpose", g.op("Reshape", fq, sh.q), perm=[0, 2, 3, 1, 4], name=f"{tag}.q")  # [B,KV,G,L,d]
        kt5 = g.op("Transpose", g.op("Reshape", fk, sh.kv), perm=[0, 2, 3, 4, 1], name=f"{tag}.kT")  # [B,KV,1,d,L]
        v5 = g.op("Transpose", g.op("Reshape", v, sh.kv), perm=[0, 2, 3, 1, 4], name=f"{tag}.v")  # [B,KV,1,L,d]
        gamma_q = g.op("Gather", step.decay_q, idx, axis=0, name=f"{tag}.decay_q")
        gamma_k = g.op("Gather", step.decay_k, idx, axis=0, name=f"{tag}.decay_k")
        # The [L, L] factors per layer, not stacked for all layers: a stacked
        # [layers, B, H, L, L] tensor would reach gigabytes at long chunks.
        lg_i = g.const(f"{tag}.log_gamma", step.log_gamma[i])  # [KV,G,1,1]
        gamma_tt = g.op("Exp", g.op("Mul", step.diff, lg_i), name=f"{tag}.decay_tt")  # [B,KV,G,L,L]
        scores = g.op("Mul", g.op("MatMul", q5, kt5), gamma_tt, name=f"{tag}.scores")
        o = g.op(
            "Add",
            g.op("MatMul", scores, v5),
            g.op("Mul", g.op("MatMul", q5, s0), gamma_q),
            name=f"{tag}.o",
        )
        update = g.op("MatMul", g.op("Mul", kt5, gamma_k), v5, name=f"{tag}.update")
        s_new = g.op("Add", g.op("Mul", s0, gamma_s), update, name=f"{tag}.s_new")
        # Heads merged ([B, L, H*d], head-major), split into GroupNorm's groups.
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 3, 1, 2, 4]), sh.gn, name=f"{tag}.o_groups")
        return [o, g.op("Reshape", s_new, sh.state_out, name=f"{tag}.present")]

    # The If writes present_state.{i} itself ([B, H, d, d]): a Reshape after it
    # kept every layer's new state alive until the graph's end (4 state sizes
    # of resident memory per row at batch 16 instead of 2.3).
    o, _ = g.op(
        "If", step.single, outputs=2, name=f"{tag}.core",
        then_branch=g.branch(f"{tag}.one_token", one_token), else_branch=g.branch(f"{tag}.chunk", chunk),
    )  # o: [B, L, d, H] (GroupNorm groups)
    g.nodes[-1].output[1] = f"present_state.{i}"
    # GroupNorm(num_groups = d) as a LayerNormalization over each group of H
    # consecutive channels.
    gn = attn.group_norm
    o = g.op("Reshape", g.op("LayerNormalization", o, sh.gn_ones, axis=-1, epsilon=float(gn.eps)), sh.merged)
    o = g.op("Add", g.op("Mul", o, g.const(f"{tag}.gn.weight", _np(gn.weight))), g.const(f"{tag}.gn.bias", _np(gn.bias)))
    silu = g.op("Mul", gate, g.op("Sigmoid", gate), name=f"{tag}.gate")
    out_mod = attn.o_proj if cfg.family != "gpt_neox" else attn.dense
    return _linear(g, g.op("Mul", silu, o), _np(out_mod.weight).T, None if out_mod.bias is None else _np(out_mod.bias),
                   f"{tag}.attn.out")


def _mlp(g: _Graph, mlp, x: str, cfg, tag: str) -> str:
    if cfg.family != "gpt_neox":
        w = np.concatenate([_np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)], 0).T
        b = None if mlp.gate_proj.bias is None else np.concatenate([_np(mlp.gate_proj.bias), _np(mlp.up_proj.bias)])
        gate, up = g.op("Split", _linear(g, x, w, b, f"{tag}.mlp.gate_up"), axis=-1, num_outputs=2, outputs=2,
                        name=f"{tag}.mlp.gate_up_split")
        act = _activation(g, gate, cfg.hidden_act, tag)
        down = mlp.down_proj
        return _linear(g, g.op("Mul", act, up), _np(down.weight).T, None if down.bias is None else _np(down.bias),
                      f"{tag}.mlp.down")
    up = mlp.dense_h_to_4h
    y = _linear(g, x, _np(up.weight).T, None if up.bias is None else _np(up.bias), f"{tag}.mlp.up")
    dn = mlp.dense_4h_to_h
    return _linear(g, _activation(g, y, cfg.hidden_act, tag), _np(dn.weight).T,
                   None if dn.bias is None else _np(dn.bias), f"{tag}.mlp.down")


def _activation(g: _Graph, x: str, name: str, tag: str) -> str:
    if name in ("silu", "swish"):
        return g.op("Mul", x, g.op("Sigmoid", x), name=f"{tag}.mlp.act")
    if name == "relu":
        return g.op("Relu", x, name=f"{tag}.mlp.act")
    return g.op("Gelu", x, approximate=_GELU[name], name=f"{tag}.mlp.act")


def _model(g: _Graph, cfg, logits: str) -> onnx.ModelProto:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    state = ["batch", *cfg.state_shape]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "sequence"]),
        helper.make_tensor_value_info("past_position", i64, ["batch"]),
    ] + [helper.make_tensor_value_info(f"past_state.{i}", f32, state) for i in range(cfg.num_layers)]
    out_len = 1 if logits == "last" else "sequence"
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", out_len, cfg.vocab_size])] + [
        helper.make_tensor_value_info(f"present_state.{i}", f32, state) for i in range(cfg.num_layers)
    ]
    graph = helper.make_graph(g.nodes, "dijiang_step", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DIRECT_OPSET)], producer_name="dijiang-deploy")
    model.ir_version = _IR_VERSION
    return model


__all__ = ["DIRECT_OPSET", "build_step_graph"]

"""Host references for the LinearAttention recurrence (plugins/README.md).

recurrence(): the token-by-token definition in float64.
chunked(): the chunk decomposition the CUDA prefill kernels implement (same
    per-chunk quantities, same workspace scan), in float64, so the algorithm can
    be checked on any machine.
onnxruntime_reference(): ONNX Runtime's LinearAttention (opset 27), CPU provider.
"""

from __future__ import annotations

import numpy as np

RULES = ("gated", "linear")


def make_inputs(rng: np.random.Generator, batch: int, seq: int, heads: int, dk: int, dv: int, rule: str,
                dtype=np.float32) -> dict:
    """DiJiang-like inputs: softmax feature maps for q/k, per-head geometric decay with
    per-token jitter, a non-zero incoming state. Activations are rounded to dtype."""

    def feature(shape):
        x = rng.standard_normal(shape)
        e = np.exp(x - x.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).reshape(batch, seq, heads * shape[-1])

    gamma = 1.0 - np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=heads))
    decay = np.log(gamma)[None, None, :] * rng.uniform(0.5, 1.5, size=(batch, seq, heads))
    inputs = {
        "query": feature((batch, seq, heads, dk)).astype(dtype),
        "key": feature((batch, seq, heads, dk)).astype(dtype),
        "value": rng.standard_normal((batch, seq, heads * dv)).astype(dtype),
        "past_state": (0.1 * rng.standard_normal((batch, heads, dk, dv))).astype(np.float32),
        "decay": decay.astype(dtype) if rule == "gated" else None,
    }
    return inputs


def recurrence(inputs: dict, heads: int, scale: float = 1.0):
    q, k, v = (inputs[n].astype(np.float64) for n in ("query", "key", "value"))
    state = inputs["past_state"].astype(np.float64).copy()
    batch, seq, _ = q.shape
    dk, dv = state.shape[2], state.shape[3]
    q = q.reshape(batch, seq, heads, dk)
    k = k.reshape(batch, seq, heads, dk)
    v = v.reshape(batch, seq, heads, dv)
    decay = inputs.get("decay")
    out = np.empty((batch, seq, heads, dv))
    for t in range(seq):
        if decay is not None:
            state *= np.exp(decay[:, t, :].astype(np.float64))[:, :, None, None]
        state += k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = scale * np.einsum("bhi,bhij->bhj", q[:, t], state)
    return out.reshape(batch, seq, heads * dv), state


def chunked(inputs: dict, heads: int, scale: float = 1.0, chunk: int = 64):
    q, k, v = (inputs[n].astype(np.float64) for n in ("query", "key", "value"))
    past = inputs["past_state"].astype(np.float64)
    batch, seq, _ = q.shape
    dk, dv = past.shape[2], past.shape[3]
    q = q.reshape(batch, seq, heads, dk).transpose(0, 2, 1, 3)
    k = k.reshape(batch, seq, heads, dk).transpose(0, 2, 1, 3)
    v = v.reshape(batch, seq, heads, dv).transpose(0, 2, 1, 3)
    g = np.zeros((batch, heads, seq)) if inputs.get("decay") is None else \
        inputs["decay"].astype(np.float64).transpose(0, 2, 1)
    n_chunks = -(-seq // chunk)
    deltas, chunk_decay = [], []
    for c in range(n_chunks):  # chunkStateKernel
        sl = slice(c * chunk, min(seq, (c + 1) * chunk))
        G = np.cumsum(g[:, :, sl], axis=-1)
        w = np.exp(G[..., -1:] - G)  # exponents <= 0
        deltas.append(np.einsum("bhm,bhmi,bhmj->bhij", w, k[:, :, sl], v[:, :, sl]))
        chunk_decay.append(G[..., -1])
    s = past.copy()
    entering = []
    for c in range(n_chunks):  # stateScanKernel
        entering.append(s.copy())
        s = np.exp(chunk_decay[c])[..., None, None] * s + deltas[c]
    out = np.empty((batch, heads, seq, dv))
    for c in range(n_chunks):  # chunkOutputKernel
        sl = slice(c * chunk, min(seq, (c + 1) * chunk))
        G = np.cumsum(g[:, :, sl], axis=-1)
        diff = G[..., :, None] - G[..., None, :]
        causal = np.tril(np.ones(diff.shape[-2:], dtype=bool))
        decay_mask = np.where(causal, np.exp(np.where(causal, diff, 0.0)), 0.0)
        scores = np.einsum("bhri,bhmi->bhrm", q[:, :, sl], k[:, :, sl]) * decay_mask
        intra = np.einsum("bhrm,bhmj->bhrj", scores, v[:, :, sl])
        inter = np.exp(G)[..., None] * np.einsum("bhri,bhij->bhrj", q[:, :, sl], entering[c])
        out[:, :, sl] = scale * (inter + intra)
    return out.transpose(0, 2, 1, 3).reshape(batch, seq, heads * dv), s


def onnxruntime_reference(inputs: dict, heads: int, rule: str, scale: float = 1.0):
    """Runs ONNX Runtime's LinearAttention in float32 on the (already rounded) inputs.
    ORT needs static shapes on the graph inputs and outputs for this op."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = ["query", "key", "value", "past_state"] + (["decay"] if rule == "gated" else [])
    feeds = {n: inputs[n].astype(np.float32) for n in names}
    batch, seq, _ = feeds["query"].shape
    dv = feeds["past_state"].shape[3]
    graph = helper.make_graph(
        [helper.make_node("LinearAttention", names, ["output", "present_state"], q_num_heads=heads,
                          kv_num_heads=heads, scale=float(scale), update_rule=rule)],
        "linear_attention",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(feeds[n].shape)) for n in names],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, seq, heads * dv]),
         helper.make_tensor_value_info("present_state", TensorProto.FLOAT, list(feeds["past_state"].shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, state = session.run(None, feeds)
    return out, state

"""GPU tests of libdijiang_kernels.so through its C API (ctypes).

Compared against the float64 recurrence and ONNX Runtime's LinearAttention:
fp32 max abs <= 1e-4; fp16 output cosine >= 0.99999 and max abs <= 1e-2 (the
state is float32 in both cases). Skipped without a CUDA device.
"""

from __future__ import annotations

import numpy as np
import pytest

from reference import make_inputs, onnxruntime_reference, recurrence

B, H, D = 3, 9, 64
DTYPES = {"float32": np.float32, "float16": np.float16}
RULES = ("gated", "linear")


class Runner:
    def __init__(self, kernels, torch):
        self.kernels, self.torch = kernels, torch

    def _dev(self, array):
        return None if array is None else self.torch.from_numpy(np.ascontiguousarray(array)).cuda()

    def __call__(self, entry: str, inputs: dict, rule: str, dtype: str, scale: float = 1.0, chunk: int = 64,
                 in_place: bool = False):
        torch = self.torch
        t = {n: self._dev(inputs[n]) for n in ("query", "key", "value", "past_state", "decay")}
        batch, seq, _ = inputs["query"].shape
        dk, dv = inputs["past_state"].shape[2:]
        out = torch.full((batch, seq, H * dv), float("nan"), dtype=t["query"].dtype, device="cuda")
        present = t["past_state"] if in_place else torch.full_like(t["past_state"], float("nan"))
        tensors = (t["query"], t["key"], t["value"], t["past_state"], t["decay"], out, present)
        if entry == "decode":
            self.kernels.decode(*tensors, heads=H, rule=rule, scale=scale)
        else:
            size = self.kernels.workspace_size(batch, seq, H, dk, dv, chunk)
            ws = torch.full((max(size, 1),), 0xFF, dtype=torch.uint8, device="cuda")  # garbage, not zeros
            self.kernels.prefill(*tensors, ws, heads=H, rule=rule, scale=scale, chunk=chunk, entry=entry)
        torch.cuda.synchronize()
        return out.float().cpu().numpy().astype(np.float64), present.cpu().numpy().astype(np.float64)


@pytest.fixture(scope="module")
def run(kernels, torch_cuda):
    return Runner(kernels, torch_cuda)


def assert_close(actual, expected, dtype: str, what: str) -> None:
    err = np.abs(actual - expected).max()
    if dtype == "float32" or what == "state":
        assert err <= 1e-4, f"{what}: max abs error {err:.3g}"
    else:
        cos = float((actual * expected).sum() / (np.linalg.norm(actual) * np.linalg.norm(expected)))
        assert cos >= 0.99999, f"{what}: cosine {cos:.8f}"
        assert err <= 1e-2, f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("seq", [1, 7, 64, 513])
def test_forward_matches_references(run, dtype: str, rule: str, seq: int) -> None:
    inputs = make_inputs(np.random.default_rng(seq), B, seq, H, D, D, rule, DTYPES[dtype])
    out, state = run("forward", inputs, rule, dtype)
    ref_out, ref_state = recurrence(inputs, H)
    assert_close(out, ref_out, dtype, "output")
    assert_close(state, ref_state, dtype, "state")
    if dtype == "float32":
        pytest.importorskip("onnxruntime")
        ort_out, ort_state = onnxruntime_reference(inputs, H, rule)
        assert_close(out, ort_out, dtype, "output vs onnxruntime")
        assert_close(state, ort_state, dtype, "state vs onnxruntime")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_prefill_kernel_at_one_token_equals_decode(run, dtype: str, rule: str) -> None:
    inputs = make_inputs(np.random.default_rng(11), B, 1, H, D, D, rule, DTYPES[dtype])
    d_out, d_state = run("decode", inputs, rule, dtype)
    p_out, p_state = run("prefill", inputs, rule, dtype)
    assert_close(p_out, d_out, dtype, "output")
    assert_close(p_state, d_state, dtype, "state")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_prefill_then_decode_equals_one_scan(run, dtype: str, rule: str) -> None:
    prompt, steps = 100, 13
    full = make_inputs(np.random.default_rng(5), B, prompt + steps, H, D, D, rule, DTYPES[dtype])
    whole_out, whole_state = run("forward", full, rule, dtype)

    def tokens(sl, state):
        part = {n: (None if full[n] is None else full[n][:, sl]) for n in ("query", "key", "value", "decay")}
        part["past_state"] = state.astype(np.float32)
        return part

    out, state = run("prefill", tokens(slice(0, prompt), full["past_state"]), rule, dtype)
    outs = [out]
    for t in range(prompt, prompt + steps):
        out, state = run("decode", tokens(slice(t, t + 1), state), rule, dtype)
        outs.append(out)
    assert_close(np.concatenate(outs, axis=1), whole_out, dtype, "output")
    assert_close(state, whole_state, dtype, "state")


@pytest.mark.parametrize("seq", [1, 7, 513])
def test_batch_permutation(run, seq: int) -> None:
    inputs = make_inputs(np.random.default_rng(3), B, seq, H, D, D, "gated")
    out, state = run("forward", inputs, "gated", "float32")
    perm = np.array([2, 0, 1])
    permuted = {n: (None if a is None else a[perm]) for n, a in inputs.items()}
    p_out, p_state = run("forward", permuted, "gated", "float32")
    np.testing.assert_array_equal(p_out, out[perm])
    np.testing.assert_array_equal(p_state, state[perm])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("seq", [1, 7, 64, 513])
def test_in_place_state_equals_out_of_place(run, dtype: str, seq: int) -> None:
    inputs = make_inputs(np.random.default_rng(9), B, seq, H, D, D, "gated", DTYPES[dtype])
    out, state = run("forward", inputs, "gated", dtype)
    io_out, io_state = run("forward", inputs, "gated", dtype, in_place=True)
    np.testing.assert_array_equal(io_out, out)
    np.testing.assert_array_equal(io_state, state)


@pytest.mark.parametrize("dk,dv", [(32, 32), (128, 128), (32, 128), (96, 48), (40, 24), (256, 64)])
@pytest.mark.parametrize("seq", [1, 70])
def test_other_head_sizes(run, dk: int, dv: int, seq: int) -> None:
    inputs = make_inputs(np.random.default_rng(dk + dv), 2, seq, H, dk, dv, "gated")
    out, state = run("forward", inputs, "gated", "float32", scale=0.5)
    ref_out, ref_state = recurrence(inputs, H, scale=0.5)
    assert_close(out, ref_out, "float32", "output")
    assert_close(state, ref_state, "float32", "state")


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_size_does_not_change_results(run, chunk: int) -> None:
    inputs = make_inputs(np.random.default_rng(21), B, 200, H, D, D, "gated")
    out, state = run("prefill", inputs, "gated", "float32", chunk=chunk)
    ref_out, ref_state = recurrence(inputs, H)
    assert_close(out, ref_out, "float32", "output")
    assert_close(state, ref_state, "float32", "state")

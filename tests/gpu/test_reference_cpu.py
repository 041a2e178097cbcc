"""CPU checks of the host references used by the GPU tests: the float64 recurrence
agrees with ONNX Runtime's LinearAttention, and the chunk decomposition implemented by
the prefill kernels (chunked()) agrees with the recurrence for every chunk length."""

from __future__ import annotations

import numpy as np
import pytest

from reference import chunked, make_inputs, onnxruntime_reference, recurrence

B, H, D = 3, 9, 64


@pytest.mark.parametrize("rule", ["gated", "linear"])
@pytest.mark.parametrize("seq", [1, 7, 64, 513])
def test_recurrence_matches_onnxruntime(rule: str, seq: int) -> None:
    pytest.importorskip("onnxruntime")
    inputs = make_inputs(np.random.default_rng(seq), B, seq, H, D, D, rule)
    out, state = recurrence(inputs, H)
    ort_out, ort_state = onnxruntime_reference(inputs, H, rule)
    np.testing.assert_allclose(ort_out, out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ort_state, state, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rule", ["gated", "linear"])
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("seq,dk,dv", [(1, 64, 64), (7, 64, 64), (64, 64, 64), (513, 64, 64), (77, 32, 128)])
def test_chunked_matches_recurrence(rule: str, chunk: int, seq: int, dk: int, dv: int) -> None:
    inputs = make_inputs(np.random.default_rng(1000 + seq), B, seq, H, dk, dv, rule)
    out, state = recurrence(inputs, H, scale=0.5)
    c_out, c_state = chunked(inputs, H, scale=0.5, chunk=chunk)
    np.testing.assert_allclose(c_out, out, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c_state, state, rtol=0, atol=1e-10)


def test_strong_decay_stays_finite() -> None:
    # Decays far below float range over one chunk must not produce inf/nan: every
    # exponent formed is a sum over later tokens, hence <= 0.
    inputs = make_inputs(np.random.default_rng(7), 1, 130, 2, 16, 16, "gated")
    inputs["decay"] = np.full_like(inputs["decay"], -30.0)
    out, state = chunked(inputs, 2)
    ref_out, ref_state = recurrence(inputs, 2)
    assert np.isfinite(out).all() and np.isfinite(state).all()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)

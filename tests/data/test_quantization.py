"""Quantisation exactly as paper §3.2.1, with its error bound."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from transact.data.quantization import MAX_ERROR, SCALE, dequantize, quantize


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, (7, 32), elements=st.floats(-0.649, 0.649).map(np.float32)))
def test_round_trip_error_is_at_most_half_a_step(e):
    q = quantize(e)
    assert q.dtype == np.int8
    assert np.abs(dequantize(q) - e).max() <= MAX_ERROR + 1e-7


@settings(max_examples=100, deadline=None)
@given(arrays(np.float32, (5, 32), elements=st.floats(-10, 10).map(np.float32)))
def test_numpy_and_torch_agree_and_saturate(e):
    q = quantize(e)
    qt = quantize(torch.from_numpy(e))
    np.testing.assert_array_equal(q, qt.numpy())
    assert q.min() >= -127 and q.max() <= 127
    assert (q[e >= SCALE] == 127).all() and (q[e <= -SCALE] == -127).all()


def test_formula_on_known_values():
    e = np.array([0.0, 0.65, -0.65, 0.325, 1.0, -3.0, 0.65 / 254 * 0.99], dtype=np.float32)
    np.testing.assert_array_equal(quantize(e), np.array([0, 127, -127, 64, 127, -127, 0], dtype=np.int8))
    np.testing.assert_allclose(dequantize(np.array([127], np.int8)), [0.65], rtol=1e-6)

"""The sequence encoder owns the layout: packed (training) and padded (inference, BST's
appended token, the stock reference) give the model the same answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import random_encoder, valid_pattern
from transact.kernels import dispatch
from transact.model.encoder import Encoded, SequenceEncoder, make_encoder


def features_of(x: torch.Tensor):
    """The TokenFeatures of a fixed x [B, L, d]."""
    return lambda rows, cols: x if rows is None else x[rows, cols]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["mixed", "full", "empty", "one"]))
def test_packed_and_padded_layouts_answer_alike(seed, kind):
    rng = np.random.default_rng(seed)
    B, L, d = 5, 13, 64
    enc = random_encoder(seed % 1000)
    enc.__class__ = SequenceEncoder  # the stock layers, as the model holds them
    enc.train()
    x = torch.from_numpy(rng.normal(size=(B, L, d)).astype(np.float32))
    valid = valid_pattern(rng, B, L, kind)
    packed = enc.encode(valid, features_of(x))
    assert packed.packed
    assert packed.U.shape == (int(valid.sum()), d)
    with dispatch.using(train_encoder="stock"):
        padded = enc.encode(valid, features_of(x))
    assert not padded.packed
    assert padded.U.shape == (B, L, d)
    torch.testing.assert_close(packed.U, padded.U[valid], rtol=0, atol=1e-5)
    z_p, z_d = packed.U[:, :7], padded.U[..., :7]  # any per-token values
    torch.testing.assert_close(packed.max_pool(z_p), padded.max_pool(z_d), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.padded(z_p)[valid], z_d[valid], rtol=0, atol=1e-5)
    assert (packed.padded(z_p)[~valid] == 0).all()
    idx = torch.tensor([2, 3, 11])
    got, want = packed.at_slots(idx), padded.at_slots(idx)
    v = valid[:, idx]
    torch.testing.assert_close(got[v], want[v], rtol=0, atol=1e-5)
    assert (got[~v] == 0).all()


def test_inference_and_appended_tokens_run_padded():
    enc = make_encoder()
    valid = torch.rand(3, 6) < 0.5
    x = torch.randn(3, 6, 64)
    with torch.no_grad():
        out = enc.eval().encode(valid, features_of(x))
    assert not out.packed
    assert out.U.shape == (3, 6, 64)
    enc.train()
    out = enc.encode(valid, features_of(x), append=torch.randn(3, 64))  # BST: one more token per row
    assert not out.packed
    assert out.U.shape == (3, 7, 64)
    assert out.valid[:, -1].all()


def test_a_row_without_tokens_pools_to_zero():
    e = Encoded(U=torch.zeros(0, 4), valid=torch.zeros(2, 3, dtype=torch.bool),
                rows=torch.zeros(0, dtype=torch.long), cols=torch.zeros(0, dtype=torch.long))
    assert torch.equal(e.max_pool(torch.zeros(0, 4)), torch.zeros(2, 4))


def test_the_kernel_config_is_set_once_not_read_from_the_environment():
    """TRANSACT_TRAIN_ENCODER / TRANSACT_DISABLE_TRITON were read from the environment on every
    call: the configuration is an object now, and the environment changes nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRANSACT_TRAIN_ENCODER": "stock", "TRANSACT_DISABLE_TRITON": "1"}
    out = subprocess.run([sys.executable, "-c", "from transact.kernels import dispatch; print(dispatch.config())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(dispatch.KernelConfig()), out
    assert dispatch.config().triton
    assert dispatch.config().train_encoder is dispatch.TrainEncoder.PACKED
    with dispatch.using(triton=False) as inside:
        assert not dispatch.config().triton
        assert inside.train_encoder is dispatch.TrainEncoder.PACKED
    assert dispatch.config().triton
    with pytest.raises(ValueError, match="train encoder must be one of"):
        dispatch.KernelConfig(train_encoder="sdpa")


def test_the_cli_sets_the_kernel_config():
    from typer.testing import CliRunner

    from transact.cli import app

    before = dispatch.config()
    try:
        r = CliRunner().invoke(app, ["--train-encoder", "stock", "--no-triton", "seal-world", "/nonexistent"])
        assert r.exit_code == 2  # the command's own refusal: the options were taken
        assert dispatch.config() == dispatch.KernelConfig(triton=False, train_encoder=dispatch.TrainEncoder.STOCK)
        dispatch.configure(before)
        r = CliRunner().invoke(app, ["--train-encoder", "sdpa", "seal-world", "/nonexistent"])
        assert r.exit_code == 2
        assert "train encoder must be one of" in r.output
        assert dispatch.config() == before
        for command in (["demo"], ["pipeline", "run"]):  # their steps run in other processes
            r = CliRunner().invoke(app, ["--train-encoder", "stock", *command])
            assert r.exit_code == 2
            assert "runs its steps in other processes" in " ".join(r.output.split()), r.output
            assert dispatch.config() == before
    finally:
        dispatch.configure(before)

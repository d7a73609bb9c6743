"""The training path: the whole model through the SDPA training encoder against the stock
module (outputs and gradients), batch gathering, the trainer's hooks, and `bench train`."""
from __future__ import annotations

import json

import pytest
import torch

from transact.features.config import FeatureConfig
from transact.kernels import dispatch
from transact.model.dataset import synthetic_rows, table_to_batch, write_synthetic_rows
from transact.model.losses import label_weight_matrix, total_loss
from transact.model.transact import Batch, TransActModel, model_config

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)


def batch_with_empty_rows(seed: int) -> Batch:
    """Random rows; row 0 fully padded (cold start), row 1 full, ages spread over 0..2 days."""
    b = table_to_batch(synthetic_rows(3, FCFG, per_request=4, seed=seed), FCFG)
    b.seg_len[0] = 0
    b.seg_len[1] = torch.tensor(FCFG.segment_sizes, dtype=torch.int16)
    g = torch.Generator().manual_seed(seed)
    b.age_s = torch.randint(0, 2 * 86_400, b.age_s.shape, generator=g, dtype=torch.int32)
    return b


def forward_and_grads(net: TransActModel, b: Batch, encoder: str, seed: int):
    """Logits, NAL user embeddings, loss and every parameter's gradient with one training encoder
    (the time-window mask drawn from the same generator seed)."""
    net.zero_grad(set_to_none=True)
    M = label_weight_matrix(net.cfg)
    with dispatch.using(train_encoder=encoder):
        out = net(b, generator=torch.Generator().manual_seed(seed))
        loss, _ = total_loss(out, b, net.cfg, FCFG, M)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize(("name", "overrides"), [
    ("v2", {"time_window_mask": True}),  # concat fusion, NAL with impression negatives, time window
    ("v2", {"n_heads": 2, "first_k": 3}),
    ("bst", {}),  # append fusion: the candidate as the last token
    ("transact_nal_inbatch", {"time_window_mask": True}),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_outputs_and_gradients_equal_the_stock_encoder(name, overrides, seed):
    """Fresh random weights and rows (a fully padded row, a full row, the V1 time-window mask
    on), dropout 0, train mode: logits, the NAL user embeddings of valid queries, the loss
    and the gradient of every parameter are the stock module's to fp32 tolerance."""
    torch.manual_seed(seed)
    net = TransActModel(model_config(name, **overrides), FCFG).train()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    b = batch_with_empty_rows(seed)
    new, loss_new, g_new = forward_and_grads(net, b, "packed", seed)
    old, loss_old, g_old = forward_and_grads(net, b, "stock", seed)
    torch.testing.assert_close(new.logits, old.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_new, loss_old, rtol=1e-5, atol=1e-6)
    if new.nal_user is not None:
        assert torch.equal(new.nal_query_valid, old.nal_query_valid)
        v = new.nal_query_valid
        torch.testing.assert_close(new.nal_user[v], old.nal_user[v], rtol=1e-5, atol=1e-5)
    assert g_new.keys() == g_old.keys() and "encoder.layers.0.self_attn.in_proj_weight" in g_new
    for n in g_new:
        torch.testing.assert_close(g_new[n], g_old[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["v2", "bst"])
def test_training_path_on_cuda_equals_the_stock_encoder(name):
    """On the GPU (SDPA's causal kernels, the packed gathers): logits, loss and every gradient
    equal the stock module's; under bf16 autocast the step is finite and close."""
    torch.manual_seed(0)
    net = TransActModel(model_config(name), FCFG).cuda().train()
    b = batch_with_empty_rows(0).to("cuda")
    M = label_weight_matrix(net.cfg).cuda()
    runs = {}
    for enc, bf16 in (("packed", False), ("stock", False), ("packed", True)):
        net.zero_grad(set_to_none=True)
        with dispatch.using(train_encoder=enc), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = total_loss(net(b), b, net.cfg, FCFG, M)
        loss.backward()
        runs[enc, bf16] = (loss.detach().float(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    (l_new, g_new), (l_old, g_old), (l_bf, g_bf) = runs["packed", False], runs["stock", False], runs["packed", True]
    torch.testing.assert_close(l_new, l_old, rtol=1e-4, atol=1e-5)
    for n in g_old:
        torch.testing.assert_close(g_new[n], g_old[n], rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"grad {n}: {m}")
        assert torch.isfinite(g_bf[n]).all(), n
    assert abs(float(l_bf) - float(l_old)) < 0.05


def test_batch_index_gathers_rows_by_tensor_mask_or_slice():
    b = table_to_batch(synthetic_rows(4, FCFG, per_request=4, seed=3), FCFG)
    idx = torch.tensor([5, 0, 15, 5])
    got = b.index(idx)
    for f in ("emb_q", "action", "tok_surface", "age_s", "seg_len", "cand_emb_q", "labels", "user_id"):
        assert torch.equal(getattr(got, f), getattr(b, f)[idx]), f
    mask = torch.arange(len(b)) % 3 == 0
    assert torch.equal(b.index(mask).action, b.action[mask])
    assert torch.equal(b.index(slice(2, 6)).emb_q, b.emb_q[2:6])


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_synthetic_rows(tmp_path_factory.mktemp("rows") / "rows.parquet", 24, FCFG, per_request=8,
                                n_users=6, seed=0, row_group_size=64)


def test_trainer_hook_data_time_and_resume_at_the_end(rows, tmp_path):
    from transact.model.train import train

    recs = []
    kw = dict(epochs=2, batch_size=32, lr=3e-3, progress=False, log_every=2, num_threads=1, train_end_ts=2**62)
    s = train(rows, tmp_path / "m", "transact", on_log=recs.append, **kw)
    assert s["steps"] == s["total_steps"] == 12 and s["finished"] and s["precision"] == "fp32"
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12] and all(r["total_steps"] == 12 for r in recs)
    assert 0 <= s["data_s"] < s["seconds"]
    again = train(rows, tmp_path / "m", "transact", on_log=recs.append, **kw)  # resumed at the end
    assert again["steps"] == 12 and again["resumed_from_step"] == 12 and again["history"] == [] and len(recs) == 6
    budget = train(rows, tmp_path / "b", "transact", step_budget=5, **kw)
    assert budget["steps"] == 5
    assert train(rows, tmp_path / "b", "transact", step_budget=5, **kw)["steps"] == 5  # not one step more


def test_trainer_bf16_precision(rows, tmp_path):
    from transact.model.train import train

    s = train(rows, tmp_path / "bf", "v2", epochs=1, batch_size=32, progress=False, num_threads=1,
              train_end_ts=2**62, precision="bf16", log_every=1)
    assert s["precision"] == "bf16" and all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])
    with pytest.raises(ValueError, match="precision"):
        train(rows, tmp_path / "x", "v2", progress=False, train_end_ts=2**62, precision="fp8")


def test_flops_per_example_follow_the_config():
    from transact.bench.train import flops_per_example, seq_tokens

    f = FeatureConfig()
    v2 = flops_per_example(model_config("v2"), f)
    L, d = 192, 64
    assert seq_tokens(model_config("v2"), f) == L
    assert v2["attn_qk"] == v2["attn_av"] == 2 * 2 * L * L * d
    assert v2["ffn"] == 2 * 2 * (2 * L * d * 32)
    deeper = flops_per_example(model_config("v2", n_layers=4), f)
    assert deeper["attn_qk"] == 2 * v2["attn_qk"] and deeper["dcn"] == v2["dcn"]
    wdl = flops_per_example(model_config("wdl"), f)
    assert wdl["attn_qk"] == wdl["ffn"] == wdl["embed_proj"] == 0 and wdl["dcn"] == 2 * 2 * 40 * 40
    assert seq_tokens(model_config("bst"), f) == 32 + 32 + 1  # RT segments + the appended candidate


def test_bench_train_pairs_the_paths_and_writes_json(tmp_path):
    from transact.bench.report import write_json
    from transact.bench.train import bench_train, format_bench

    res = bench_train(["v2"], [4], steps=1, warmup=1, rounds=2, num_threads=1, bf16=True)
    by_path = {r["path"]: r for r in res["results"]}
    assert list(by_path) == ["stock", "packed", "packed-bf16"]
    assert by_path["stock"]["speedup_vs_stock"] == 1.0 and by_path["stock"]["loss_max_diff"] == 0.0
    assert by_path["packed"]["loss_max_diff"] < 1e-4  # the same loss curve, step by step
    assert by_path["packed-bf16"]["gemm_dtype"] == "bf16" and by_path["packed"]["gemm_dtype"] == "fp32"
    assert by_path["packed-bf16"]["loss_max_diff"] < 0.05  # bf16: close, not the same to the bit
    assert 0 < res["models"]["v2"]["gemm"][0]["valid_token_fraction"] <= 1
    for r in by_path.values():
        assert r["examples_per_s"] > 0 and r["gflops"] > 0 and 0 < r["share_of_gemm_rep"]
        assert r["speedup_range"][0] <= r["speedup_vs_stock"] <= r["speedup_range"][1]
    assert res["models"]["v2"]["train_flops_per_example"] == 3 * sum(res["models"]["v2"]["forward_flops_per_example"].values())
    text = format_bench(res)
    assert "x stock" in text and "GEMM reference" in text
    data = json.loads(write_json(tmp_path / "train.json", res).read_text())
    assert data["machine"]["cpu"] and data["results"][1]["path"] == "packed"


def test_bench_train_on_logged_rows(rows):
    """--rows: the batch is drawn from the user's rows (their feature config, their share of
    valid tokens), reported in the JSON; too few rows is a one-line refusal."""
    from transact.bench.train import bench_train, rows_batch
    from transact.features.nn_features import valid_mask

    res = bench_train(["v2"], [16], steps=1, warmup=1, rounds=1, num_threads=1, rows=rows)
    assert res["rows"] == str(rows) and res["feature_config"] == FCFG.to_dict()
    table, fcfg = rows_batch(rows, 16)
    want = float(valid_mask(table_to_batch(table, fcfg).seg_len, fcfg).float().mean())
    assert res["models"]["v2"]["gemm"][0]["valid_token_fraction"] == round(want, 3)
    assert [r["path"] for r in res["results"]] == ["stock", "packed"] and res["results"][1]["loss_max_diff"] < 1e-4
    with pytest.raises(ValueError, match="fewer than the batch size"):
        rows_batch(rows, 10_000)

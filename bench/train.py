"""``transact bench train``: training throughput (examples/s) and peak memory per model
and batch size, on synthetic rows; a table and JSON naming the machine."""
from __future__ import annotations

import time

import torch

from transact.model.losses import label_weight_matrix, total_loss
from transact.model.transact import TransActModel, count_parameters, model_config

def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bench_train(models: tuple[str, ...] | list[str] = ("v2",), batch_sizes: tuple[int, ...] | list[int] = (256,),
                steps: int = 20, warmup: int = 3, device: str | None = None, num_threads: int | None = None,
                seed: int = 0) -> dict:
    """Training throughput (examples/s) and peak memory per (model, batch size).

    Runs full training steps (forward, L_CE + w_NAL L_NAL, backward, Adam) on synthetic
    rows of the default feature contract (|S_all| = 192) held on the device, so the
    number is the model's, not the data loader's. Peak memory: RSS high-water mark on
    CPU (reset before each configuration where the kernel allows), else
    ``torch.cuda.max_memory_allocated``.
    """
    from transact.bench.machine import device_label, machine_info, peak_rss_mib
    from transact.model.config import FeatureConfig
    from transact.model.dataset import synthetic_rows, table_to_batch

    if num_threads:
        torch.set_num_threads(num_threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fcfg = FeatureConfig()
    results = []
    for name in models:
        for bs in batch_sizes:
            mcfg = model_config(name)
            torch.manual_seed(seed)
            table = synthetic_rows(max(1, -(-bs // 8)), fcfg, per_request=8, seed=seed)
            batch = table_to_batch(table.slice(0, bs), fcfg).to(dev)
            net = TransActModel(mcfg, fcfg).to(dev).train()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            M = label_weight_matrix(mcfg).to(dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            reset = _reset_peak_rss() if dev.type == "cpu" else False

            def one_step():
                loss, _ = total_loss(net(batch), batch, mcfg, fcfg, M)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(warmup):
                one_step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                one_step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rec = {"model": name, "batch_size": len(batch), "steps": steps,
                   "examples_per_s": round(len(batch) * steps / dt, 1),
                   "step_ms": round(1000 * dt / steps, 2), "parameters": count_parameters(net)}
            if dev.type == "cuda":
                rec["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                rec["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
                rec["model_state_mb"] = round(base / 2**20, 1)
            else:
                rec["peak_mem_mb"] = round(peak_rss_mib(), 1)
                rec["peak_mem_kind"] = "process peak RSS" + ("" if reset else " (not reset between runs)")
            results.append(rec)
            net = opt = batch = None  # free before the next configuration
    return {"benchmark": "train", "device": str(dev), "device_label": device_label(),
            "threads": torch.get_num_threads(), "feature_config": fcfg.to_dict(),
            "machine": machine_info(), "results": results}


def format_bench(result: dict) -> str:
    lines = [f"training throughput on {result['device_label']} ({result['threads']} threads), |S_all| = "
             f"{result['feature_config']['k_ll'] + result['feature_config']['k_rt'] + result['feature_config']['r'] + result['feature_config']['k_imp']}",
             f"{'model':<22} {'batch':>6} {'examples/s':>11} {'step ms':>9} {'peak MB':>9}"]
    for r in result["results"]:
        lines.append(f"{r['model']:<22} {r['batch_size']:>6} {r['examples_per_s']:>11.1f} "
                     f"{r['step_ms']:>9.1f} {r['peak_mem_mb']:>9.1f}")
    lines.append(f"peak memory: {result['results'][0]['peak_mem_kind']}" if result["results"] else "")
    return "\n".join(lines)

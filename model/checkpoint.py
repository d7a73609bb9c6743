"""Checkpoints as safetensors + JSON (never pickles).

A model folder holds::

    config.json                 {"format", "model_config", "feature_config", "heads", "training"}
    model.safetensors           parameters (metadata: step)
    train_state/state.json      step, epoch, optimizer param groups, run arguments
    train_state/optimizer.safetensors
                                Adam moments as "state.<param index>.<name>" tensors,
                                plus the RNG states ("rng.torch", "rng.cuda") (metadata: step)

Every file is written to a temporary name and renamed, ``state.json`` last; a resume
checks that the three files name the same step.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transact.features.config import FeatureConfig
from transact.model.calibration import Calibration
from transact.model.transact import ModelConfig, TransActModel

FORMAT = "transact-model/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE_DIR = "train_state"
#: what a served or registered model is: the training state is not part of it
MODEL_FILES = (CONFIG, WEIGHTS)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False)))


def unwrap(model: nn.Module) -> TransActModel:
    """The bare model under DDP / torch.compile wrappers."""
    while hasattr(model, "module"):
        inner = model.module
        assert isinstance(inner, nn.Module), f"{type(model).__name__}.module is not a module"
        model = inner
    bare = getattr(model, "_orig_mod", model)
    assert isinstance(bare, TransActModel), f"not a TransActModel under the wrappers: {type(bare).__name__}"
    return bare


def save_model(model_dir: str | Path, model: nn.Module, training: dict | None = None, step: int = 0) -> None:
    """Writes config.json and model.safetensors."""
    model_dir = Path(model_dir)
    m = unwrap(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()}
    _atomic(model_dir / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))
    _write_json(model_dir / CONFIG, {
        "format": FORMAT,
        "model_config": m.cfg.to_dict(),
        "feature_config": m.fcfg.to_dict(),
        "heads": list(m.cfg.heads),
        "training": training or {},
        **({"calibration": m.calibration.to_dict()} if not m.calibration.is_identity else {}),
    })


def model_digest(model_dir: str | Path) -> str:
    """SHA-256 over the names and bytes of :data:`MODEL_FILES`: the model's identity (the BentoML
    version, the registry's model id), the same for the same weights wherever they were copied."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        p = Path(model_dir) / name
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (a model folder holds {', '.join(MODEL_FILES)})")
        h.update(name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (not a model folder?)")
    cfg = json.loads(path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {cfg.get('format')!r} (expected {FORMAT})")
    return cfg


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> TransActModel:
    """Rebuilds the model from config.json and loads model.safetensors (eval mode)."""
    cfg = read_config(model_dir)
    model = TransActModel(ModelConfig.from_dict(cfg["model_config"]),
                          FeatureConfig.from_dict(cfg["feature_config"], where=f"{model_dir}/config.json: feature_config"))
    state = load_file(str(Path(model_dir) / WEIGHTS))
    model.load_state_dict(state, strict=True)
    if "calibration" in cfg:  # a model trained before calibration existed gives its raw sigmoid
        model.set_calibration(Calibration.from_dict(cfg["calibration"], model.cfg.heads,
                                                    where=f"{model_dir}/config.json: calibration"))
    return model.to(device).eval()


def weights_step(model_dir: str | Path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / WEIGHTS), framework="pt") as f:
        return int((f.metadata() or {}).get("step", -1))


# --- optimizer / training state --------------------------------------------------------------

def save_train_state(model_dir: str | Path, optimizer: torch.optim.Optimizer, step: int, epoch: int,
                     extra: dict | None = None) -> None:
    """Optimizer moments + RNG states as safetensors, the rest as JSON (state.json last)."""
    d = Path(model_dir) / STATE_DIR
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"state.{idx}.{name}"] = t.detach().contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    _atomic(d / "optimizer.safetensors", lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    _write_json(d / "state.json", {"step": step, "epoch": epoch, "param_groups": groups, **(extra or {})})


def load_train_state(model_dir: str | Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restores the optimizer (and RNG states); returns state.json."""
    d = Path(model_dir) / STATE_DIR
    state = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "optimizer.safetensors"))
    from safetensors import safe_open

    with safe_open(str(d / "optimizer.safetensors"), framework="pt") as f:
        opt_step = int((f.metadata() or {}).get("step", -1))
    if not (opt_step == state["step"] == weights_step(model_dir)):
        raise ValueError(f"{model_dir}: checkpoint files disagree on the step "
                         f"(state {state['step']}, optimizer {opt_step}, weights {weights_step(model_dir)})")
    per_param: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def has_train_state(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / STATE_DIR / "state.json").exists() and (d / WEIGHTS).exists()

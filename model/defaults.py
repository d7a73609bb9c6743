"""Training defaults, stated once: the trainer, the ablation, the CLI, the pipeline steps and
the pipelines' parameters read them from here (a light module: no torch import, so
``transact --help`` stays fast).

The values are the ones the pipeline (and so ``make demo`` and its published figures) trained
with: 2 epochs at a peak learning rate of 2e-3, 256 examples per step and process.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainDefaults:
    model: str = "v2"
    epochs: int = 2
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0


TRAIN = TrainDefaults()

"""Training defaults are stated once (model/defaults.py): the trainer, the ablation, the CLI,
the pipeline steps and the pipelines' parameters all start from the same values."""
from __future__ import annotations

import inspect

from typer.main import get_command

from transact.model.defaults import TRAIN


def defaults_of(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_every_entry_point_trains_with_the_same_defaults():
    from transact.cli import app
    from transact.components import steps
    from transact.model.ablation import ablation
    from transact.model.train import train
    from transact.pipelines.training import Defaults

    want = {"epochs": TRAIN.epochs, "batch_size": TRAIN.batch_size, "lr": TRAIN.lr}
    seen = {"model.train": defaults_of(train), "ablation": defaults_of(ablation),
            "steps.train": defaults_of(steps.train), "steps.train_trainjob": defaults_of(steps.train_trainjob),
            "pipelines.Defaults": vars(Defaults())}
    cli = get_command(app)
    for name in ("train", "ablation"):
        seen[f"transact {name}"] = {p.name: p.default for p in cli.commands[name].params}  # type: ignore[attr-defined]
    for where, got in seen.items():
        assert {k: got[k] for k in want} == want, where
    assert defaults_of(train)["seed"] == defaults_of(steps.train)["seed"] == Defaults().seed == TRAIN.seed

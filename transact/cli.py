"""The one command line over everything: ``transact --help``.

Each area of the system registers its commands from ``transact/commands/<area>.py``;
heavy libraries are imported inside the commands so ``transact --help`` stays fast.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="TransAct V2: lifelong-sequence CTR ranking, from simulated events to a served model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON naming the machine.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        from transact import __version__

        typer.echo(f"transact {__version__}")
        raise typer.Exit()


#: Commands whose work runs in other processes (kfp.local steps, the retrain pipeline), which
#: the kernel options of this process do not reach: refused with them rather than ignored.
OTHER_PROCESSES = ("demo", "pipeline", "monitor")


@app.callback()
def _main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    train_encoder: str = typer.Option("packed", help="Training encoder: packed (the valid tokens only) or "
                                                     "stock (the nn.TransformerEncoder reference)."),
    triton: bool = typer.Option(True, help="Triton kernels on CUDA (--no-triton: the PyTorch references)."),
) -> None:
    """TransAct V2: lifelong-sequence CTR ranking, from simulated events to a served model."""
    if train_encoder != "packed" or not triton:  # the defaults need no torch import (fast --help)
        from transact.kernels import dispatch

        if ctx.invoked_subcommand in OTHER_PROCESSES:
            raise typer.BadParameter(f"applies to the work of this process; `transact {ctx.invoked_subcommand}` "
                                     "runs its steps in other processes, which would not see it",
                                     param_hint="--train-encoder/--no-triton")

        try:
            dispatch.configure(dispatch.KernelConfig(triton=triton, train_encoder=dispatch.train_encoder_named(train_encoder)))
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--train-encoder") from None

#: Command modules, each with ``register(app, bench_app)``.
COMMAND_MODULES = ("data", "demo", "model", "registry", "kernels", "validation", "features", "serving", "pipeline",
                   "monitoring")

for _name in COMMAND_MODULES:
    importlib.import_module(f"transact.commands.{_name}").register(app, bench_app)


if __name__ == "__main__":
    app()

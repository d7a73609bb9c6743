"""``transact pipeline run|compile|submit``: the KFP pipelines."""
from __future__ import annotations

from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error, parse_params

IMAGE_HELP = ("The image every step runs (make image; make image-push REGISTRY=...), e.g. "
              "registry.example.com/transact:0.1.0 (default: the project's ghcr.io tag).")


SECRET_HELP = ("Kubernetes Secret whose AWS_* keys (credentials, AWS_ENDPOINT_URL) every step's pod and the "
               "TrainJob's nodes get as variables (default: none; the pods' own identity, e.g. IRSA).")
PVC_HELP = "ReadWriteMany claim mounted on the TrainJob step and its nodes (the volume mode; default: none)."
SHARED_DIR_HELP = "Where --shared-pvc is mounted in those pods."


def _cluster(storage_secret: str, shared_pvc: str, shared_dir: str):
    from transact.pipelines.training import Cluster

    return Cluster(storage_secret=storage_secret, shared_pvc=shared_pvc, shared_dir=shared_dir)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    pipe = typer.Typer(help="Kubeflow pipelines: run locally, compile to YAML, submit to a cluster.",
                       no_args_is_help=True)
    app.add_typer(pipe, name="pipeline")

    @pipe.command("run")
    @fail_on_user_error
    def run(
        name: str = typer.Option("training", help="training | retrain"),
        run_dir: Path = typer.Option(Path("runs/pipeline"), help="Run folder (artefacts + summary)."),
        param: list[str] = typer.Option([], "--param", "-p", help="Pipeline parameter key=value (repeatable)."),
    ) -> None:
        """Run the pipeline on this machine (kfp.local, one subprocess per step)."""
        import sys

        from transact.pipelines.runner import local_params, run_local

        # checked first, so a `-p live=...` is refused as unknown instead of clashing with the keyword
        params = local_params(name, parse_params(param))
        typer.secho(f"running the {name} pipeline locally -> {run_dir} (one line per step)", bold=True)
        summary = run_local(name, run_dir, live=sys.stdout, **params)
        typer.echo((run_dir / "summary.md").read_text())
        if not summary["outcome"].startswith("packaged"):
            raise typer.Exit(1)

    @pipe.command("compile")
    @fail_on_user_error
    def compile_(
        name: str = typer.Option("training", help="training | retrain"),
        out: Path | None = typer.Option(None, help="YAML path (default: build/<name>.yaml)."),
        image: str | None = typer.Option(None, help=IMAGE_HELP),
        storage_secret: str = typer.Option("", help=SECRET_HELP),
        shared_pvc: str = typer.Option("", help=PVC_HELP),
        shared_dir: str = typer.Option("/mnt/transact-shared", help=SHARED_DIR_HELP),
    ) -> None:
        """Write the KFP IR YAML (upload it in the Kubeflow UI or with `submit`)."""
        from transact.pipelines.runner import compile_pipeline

        path = compile_pipeline(name, out or Path("build") / f"{name}.yaml", image=image,
                                cluster=_cluster(storage_secret, shared_pvc, shared_dir))
        typer.echo(f"compiled {name} -> {path}")

    @pipe.command("submit")
    @fail_on_user_error
    def submit_(
        host: str = typer.Option(..., help="Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline"),
        name: str = typer.Option("training", help="training | retrain"),
        param: list[str] = typer.Option([], "--param", "-p", help="Pipeline parameter key=value (repeatable)."),
        experiment: str = typer.Option("transact", help="Experiment name."),
        namespace: str | None = typer.Option(None, help="Kubeflow namespace (multi-user clusters)."),
        run_name: str | None = typer.Option(None, help="Run name."),
        token: str | None = typer.Option(None, envvar="KFP_TOKEN", help="Bearer token (or $KFP_TOKEN)."),
        image: str | None = typer.Option(None, help=IMAGE_HELP),
        storage_secret: str = typer.Option("", help=SECRET_HELP),
        shared_pvc: str = typer.Option("", help=PVC_HELP),
        shared_dir: str = typer.Option("/mnt/transact-shared", help=SHARED_DIR_HELP),
    ) -> None:
        """Compile and submit a run to a Kubeflow cluster."""
        from transact.pipelines.runner import submit

        result = submit(host, name, parse_params(param), experiment, namespace, run_name, token, image=image,
                        cluster=_cluster(storage_secret, shared_pvc, shared_dir))
        typer.echo(f"submitted: run id {getattr(result, 'run_id', result)}")

"""Validation commands: ``transact validate`` (Great Expectations on a world or an
NN-row file; a bad batch is quarantined), ``transact corrupt`` (inject one kind of bad
data, for demos and tests) and ``transact bench validation``."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("validate")
    @fail_on_user_error
    def validate(
        path: Path = typer.Argument(..., help="World folder (or, with --rows, an NN-row parquet file)."),
        quarantine: Path = typer.Option(Path("runs/quarantine"), help="Where a failed batch is moved."),
        reference: Path | None = typer.Option(
            None, help="Profile JSON of the previous accepted batch (distribution checks). A path "
                       "that does not exist yet is created on pass."),
        reference_out: Path | None = typer.Option(
            None, help="Where a passing batch writes its profile (default: --reference)."),
        update_reference: bool = typer.Option(True, help="Write the new reference on pass."),
        rows: bool = typer.Option(False, "--rows", help="PATH is a file of logged NN-feature rows."),
        items: Path | None = typer.Option(None, help="--rows: world folder whose items the rows must reference."),
        now: str | None = typer.Option(None, help="'Now' for the future-timestamp check: ISO time or epoch ms "
                                                     "(default: the wall clock)."),
        max_candidates: int | None = typer.Option(None, help="Rows per request allowed (default: world.json "
                                                                "chunk_size, else 1000)."),
        max_duplicate_rate: float = typer.Option(0.01, help="Share of duplicated events allowed."),
        min_ts: str | None = typer.Option(None, help="No event may be older (ISO date or epoch ms); default: "
                                                        "min_ts of world.json, else 2010-01-01."),
        label_window_ms: int | None = typer.Option(
            None, help="A label's engagement is logged at most this long after its request (ms); "
                       "default: world.json, else 1 h."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of text."),
    ) -> None:
        """Validate a batch with Great Expectations; exit 1 (and quarantine it) if it fails."""
        from transact.data.times import to_epoch_ms
        from transact.validation import validate_rows, validate_world
        from transact.validation.report import render_console

        lower = None if min_ts is None else to_epoch_ms(min_ts, "--min-ts")
        if rows:
            result = validate_rows(path, quarantine, reference=reference, now=now, items=items,
                                   reference_out=reference_out, update_reference=update_reference,
                                   min_ts=lower)
        else:
            result = validate_world(path, quarantine, reference=reference, now=now,
                                    reference_out=reference_out, update_reference=update_reference,
                                    max_candidates=max_candidates, max_duplicate_rate=max_duplicate_rate,
                                    min_ts=lower, label_window_ms=label_window_ms)
        if json_out:
            d = result.to_dict()
            d.pop("summary", None)
            typer.echo(json.dumps(d, indent=2))
        else:
            typer.echo(render_console(result))
        if not result.passed:
            raise typer.Exit(1)

    @app.command("corrupt")
    @fail_on_user_error
    def corrupt_cmd(
        path: Path = typer.Argument(..., help="Clean world folder (or, with --rows, an NN-row file)."),
        kind: str = typer.Option(..., help="Corruption kind; --kind list shows them."),
        seed: int = typer.Option(0, help="Which rows are hit."),
        out: Path | None = typer.Option(None, help="Write a corrupted copy here instead of in place."),
        rows: bool = typer.Option(False, "--rows", help="PATH is a file of logged NN-feature rows."),
    ) -> None:
        """Inject one kind of bad data (as a broken upstream would) to see validation reject it."""
        from transact.validation.corruption import CAUGHT_BY, KINDS, ROW_KINDS, corrupt, corrupt_rows

        if kind == "list":
            for k, (table, what) in KINDS.items():
                typer.echo(f"{k:24s} {table:12s} {what}  [caught by: {CAUGHT_BY[k]}]")
            for k, what in ROW_KINDS.items():
                typer.echo(f"{k:24s} {'nn_rows':12s} {what}  (--rows)")
            return
        summary = corrupt_rows(path, kind, seed, out) if rows else corrupt(path, kind, seed, out)
        typer.echo(f"{summary['kind']}: {summary['description']} ({summary['rows']:,} rows of "
                   f"{summary['table']}) -> {summary['path']}")
        typer.echo(f"expected to be caught by: {summary['caught_by']}")

    @bench_app.command("validation")
    @fail_on_user_error
    def bench_validation_cmd(
        actions: int = typer.Option(1_000_000, help="Action rows."),
        request_rows: int = typer.Option(200_000, help="Request rows (and as many impressions)."),
        items: int = typer.Option(200_000, help="Items."),
        workdir: Path | None = typer.Option(None, help="Scratch folder (default: the system temp)."),
        out: Path = typer.Option(Path("bench/results/validation.json"), help="JSON result path."),
    ) -> None:
        """Validation time on a synthetic world (~1M actions, ~200k requests by default)."""
        from transact.bench.validation import bench_validation, format_bench, write_bench_json

        result = bench_validation(actions, request_rows, items, workdir)
        typer.echo(format_bench(result))
        write_bench_json(result, out)
        typer.echo(f"written {out}")

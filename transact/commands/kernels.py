"""Kernel benchmarks: ``transact bench nn-search`` and ``transact bench skut``."""
from __future__ import annotations

from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error


def _ints(text: str | None) -> list[int] | None:
    """'64,128, 192' -> [64, 128, 192]; None stays None (the benchmark's defaults)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def _report(result: dict, columns: list[str], out: Path | None, name: str) -> None:
    from transact.bench.report import default_output, format_table, write_json

    typer.echo(f"device: {result['device']}")
    for note in result["notes"]:
        typer.secho(note, fg=typer.colors.YELLOW)
    typer.echo(format_table(result["rows"], columns))
    for row in result["rows"]:
        if row.get("error"):
            typer.secho(f"{row['impl']} at batch {row.get('batch')} / length {row.get('seq_len')}: "
                        f"{row['error']}", fg=typer.colors.RED)
    path = write_json(out or default_output(name), result)
    typer.echo(f"results -> {path}")


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @bench_app.command("nn-search")
    @fail_on_user_error
    def bench_nn_search_cmd(
        out: Path | None = typer.Option(None, help="JSON output (default bench/results/nn-search-<device>.json)."),
        lengths: str | None = typer.Option(None, help="L_LL values, comma-separated (GPU default 1024..16384; CPU 256,1024)."),
        n_cand: int | None = typer.Option(None, help="Candidates N in all (GPU default 256; CPU 64)."),
        k: int = typer.Option(96, help="Neighbours K."),
        requests: int = typer.Option(1, help="Requests (users) sharing the N candidates."),
        repeats: int | None = typer.Option(None, help="Timed runs per row (median reported)."),
        warmup: int | None = typer.Option(None, help="Untimed runs first."),
    ) -> None:
        """Fused Triton NN search vs the unfused broadcast PyTorch path, across L_LL."""
        from transact.bench.nn_search import TABLE_COLUMNS, bench_nn_search

        result = bench_nn_search(_ints(lengths), n_cand, k, requests, repeats, warmup)
        _report(result, TABLE_COLUMNS, out, "nn-search")

    @bench_app.command("skut")
    @fail_on_user_error
    def bench_skut_cmd(
        out: Path | None = typer.Option(None, help="JSON output (default bench/results/skut-<device>.json)."),
        table: str = typer.Option("both", help="Paper layout: 5 (lengths at a batch), 8 (batches at a length) or both."),
        lengths: str | None = typer.Option(None, help="Table 5 lengths (GPU default 64..2048)."),
        batch: int | None = typer.Option(None, help="Table 5 batch (GPU default 256)."),
        batches: str | None = typer.Option(None, help="Table 8 batches (GPU default 16..2048)."),
        length: int | None = typer.Option(None, help="Table 8 length (GPU default 192)."),
        dtype: str = typer.Option("fp16", help="fp16 | bf16 | fp32 (GPU; CPU runs fp32)."),
        repeats: int | None = typer.Option(None, help="Timed runs per row (median reported)."),
        warmup: int | None = typer.Option(None, help="Untimed runs first."),
        compile: bool = typer.Option(True, help="Also time torch.compile of the module (GPU)."),
    ) -> None:
        """SKUT vs nn.TransformerEncoder (memory-efficient SDPA) and torch.compile."""
        from transact.bench.skut import TABLE_COLUMNS, bench_skut

        result = bench_skut(table, _ints(lengths), batch, _ints(batches), length, dtype, repeats, warmup, compile)
        _report(result, TABLE_COLUMNS, out, "skut")

"""Human-readable rendering of a :class:`~transact.components.validation.ValidationResult`:
the Markdown report written with every validated batch, and the short console summary
the ``transact validate`` command prints."""
from __future__ import annotations

import json
from typing import Any


def _ms_iso(ms: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 120 else s[:117] + "..."
    return str(v)


def _cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _kwargs(kw: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in kw.items() if v is not None)


def _what_failed(f) -> str:
    if not f.gx:
        return f.exception or "structural problem"
    parts = []
    if f.unexpected_count is not None and f.element_count:
        pct = 100.0 * f.unexpected_count / f.element_count
        parts.append(f"{f.unexpected_count:,} of {f.element_count:,} rows unexpected ({pct:.3g}%)")
    if f.sample_values:
        parts.append("sample values: " + ", ".join(_fmt(v) for v in f.sample_values))
    if f.observed is not None and f.unexpected_count is None:
        parts.append(f"observed: {_fmt(f.observed)}")
    if f.exception:
        parts.append(f"error: {f.exception}")
    return "; ".join(parts) or "failed"


def _examples_table(examples: list[dict]) -> list[str]:
    if not examples:
        return []
    cols = list(dict.fromkeys(k for e in examples for k in e))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(e.get(c)) for c in cols) + " |" for e in examples]
    return lines


def _rows_table(rows: dict) -> list[str]:
    lines = ["| table | rows in | accepted | quarantined |", "|---|---:|---:|---:|"]
    tot = {"in": 0, "accepted": 0, "quarantined": 0}
    for t, r in rows.items():
        lines.append(f"| {t} | " + " | ".join(
            f"{r[k]:,}" if r[k] is not None else "?" for k in ("in", "accepted", "quarantined")) + " |")
        for k in tot:
            tot[k] += r[k] or 0
    lines.append("| **total** | " + " | ".join(f"**{tot[k]:,}**" for k in ("in", "accepted", "quarantined"))
                 + " |")
    return lines


def render_markdown(result) -> str:
    """The full report: decision, where the batch is, row accounting, every failed
    expectation with example rows, and the per-table expectation counts."""
    status = "PASSED" if result.passed else "FAILED"
    n_eval = sum(c["evaluated"] for c in result.checks.values())
    n_fail = len(result.failures)
    lines = [f"# Validation {status}: {result.kind} batch `{result.batch}`", "",
             f"- checked: {result.checked_at}; timestamps after {_ms_iso(result.now_ms)} count as "
             "in the future",
             f"- source: `{result.source}`"]
    if result.passed:
        lines.append("- decision: **accepted**; the batch goes on")
    else:
        lines.append(f"- decision: **rejected**; the whole batch was moved to quarantine: "
                     f"`{result.quarantine}`")
    lines += [f"- expectations: {n_eval} evaluated over {len(result.checks)} table(s), {n_fail} failed",
              f"- reference: {result.reference}"]
    if result.reference_written:
        lines.append(f"- new reference written: `{result.reference_written}`")
    took = f"- took {result.seconds:.2f} s"
    if result.timings:
        took += " (" + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()) + ")"
    lines += [took, ""]
    for note in result.notes:
        lines.append(f"> note: {note}")
    lines += ["## Row accounting", "", "Rows are never dropped one by one: a failed batch is "
              "quarantined whole, so rows in = accepted + quarantined.", ""]
    lines += _rows_table(result.rows) + [""]
    if result.failures:
        lines += ["## Failed expectations", ""]
        for f in result.failures:
            lines += [f"### `{f.name}`", "",
                      f"- table: {f.table}; check: `{f.expectation}`"
                      + (f"({_kwargs(f.kwargs)})" if f.kwargs else ""),
                      f"- {_what_failed(f)}"]
            if getattr(f, "hint", None):
                lines.append(f"- how to read / fix: {f.hint}")
            lines.append("")
            ex = _examples_table(f.examples)
            if ex:
                lines += ["Example rows:", ""] + ex + [""]
    lines += ["## Expectations per table", "", "| table | evaluated | failed | skipped |",
              "|---|---:|---:|---:|"]
    lines += [f"| {t} | {c['evaluated']} | {c['failed']} | {c['skipped']} |" for t, c in result.checks.items()]
    if result.reports:
        lines += ["", "Files: " + ", ".join(f"{k} `{v}`" for k, v in result.reports.items())]
    return "\n".join(lines) + "\n"


def render_console(result, max_examples: int = 3) -> str:
    """A short plain-text summary for the command line."""
    rows_in = sum(r["in"] or 0 for r in result.rows.values())
    if result.passed:
        n_eval = sum(c["evaluated"] for c in result.checks.values())
        out = [f"PASS {result.kind} batch '{result.batch}': {rows_in:,} rows in {len(result.rows)} "
               f"table(s), {n_eval} expectations, {result.seconds:.1f} s",
               f"reference: {result.reference}"]
        if result.reference_written:
            out.append(f"new reference: {result.reference_written}")
        out.append(f"report: {result.reports.get('markdown')}")
        return "\n".join(out)
    out = [f"FAIL {result.kind} batch '{result.batch}': {len(result.failures)} failed expectation(s); "
           f"{rows_in:,} rows quarantined (accepted 0)"]
    for f in result.failures:
        out.append(f"  x {f.name}")
        out.append(f"      {_what_failed(f)}")
        if getattr(f, "hint", None):
            out.append(f"      {f.hint}")
        for e in f.examples[:max_examples]:
            out.append("      e.g. " + ", ".join(f"{k}={_fmt(v)}" for k, v in e.items()))
    out += [f"quarantined to: {result.quarantine}",
            f"report: {result.reports.get('markdown')}",
            f"GX results: {result.reports.get('json')}"]
    return "\n".join(out)

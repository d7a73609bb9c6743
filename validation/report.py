"""The reports of a validated batch: the Markdown report and the GX results JSON (and the
profile on pass) written with every batch (:func:`_finish`), and the short console
summary the ``transact validate`` command prints -- renderings of a
:class:`~transact.validation.results.ValidationResult`. Both reports point at the
batch's GX Data Docs site (:mod:`.docs`) when it was built: the Markdown by a relative
link, which still works after the batch moved to quarantine."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import UTC
from pathlib import Path
from typing import Any

from transact.validation.docs import site_dir
from transact.validation.params import Params
from transact.validation.results import ValidationResult, _write_json, _write_text

# Files written next to (or into the quarantine folder of) a batch.
REPORT_MD = "validation_report.md"
RESULTS_JSON = "validation_results.json"
PROFILE_JSON = "validation_profile.json"


def _ms_iso(ms: int) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


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
    if result.data_docs:
        link = _relative(result.data_docs, result.reports.get("markdown"))
        lines.append(f"- GX Data Docs (expectation suites and validation results): [{link}]({link})")
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
        if result.data_docs:
            out.append(f"Data Docs: {result.data_docs}")
        return "\n".join(out + [f"note: {n}" for n in result.notes])
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
    if result.data_docs:
        out.append(f"Data Docs: {result.data_docs}")
    return "\n".join(out + [f"note: {n}" for n in result.notes])


def _results_json(result: ValidationResult, gx_results: dict, params: Params) -> dict:
    return {"batch": result.batch, "kind": result.kind, "passed": result.passed,
            "checked_at": result.checked_at, "source": result.source, "location": result.location,
            "params": asdict(params), "rows": result.rows, "checks": result.checks,
            "failures": [asdict(f) for f in result.failures], "data_docs": result.data_docs,
            "great_expectations": gx_results}


def _relative(target: str, report: str | None) -> str:
    """``target`` as a link from the folder of the Markdown ``report`` (POSIX slashes)."""
    if not report:
        return target
    return Path(os.path.relpath(target, Path(report).parent)).as_posix()


def _finish(result: ValidationResult, gx_results: dict, params: Params, report_dir: Path,
            stem: str = "") -> None:
    """Writes the reports into ``report_dir`` (rewritten there after a quarantine move);
    the Data Docs site, built there beforehand, is recorded when its index is there."""
    result.reports = {"markdown": str(report_dir / f"{stem}{REPORT_MD}"),
                      "json": str(report_dir / f"{stem}{RESULTS_JSON}")}
    index = site_dir(report_dir, stem) / "index.html"
    result.data_docs = str(index) if result.data_docs is not None and index.is_file() else None
    if result.data_docs:
        result.reports["data_docs"] = result.data_docs
    if result.profile is not None:
        result.reports["profile"] = str(report_dir / f"{stem}{PROFILE_JSON}")
        _write_json(Path(result.reports["profile"]), result.profile)
    result.summary = render_markdown(result)
    _write_json(Path(result.reports["json"]), _results_json(result, gx_results, params))
    _write_text(Path(result.reports["markdown"]), result.summary)

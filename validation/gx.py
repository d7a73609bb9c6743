"""Running Great Expectations: one ephemeral GX context with a pandas data source, one
checkpoint per table (whole-dataframe batch definition, ``ValidationDefinition`` +
``Checkpoint``), and its results turned into :class:`Failure` records with example rows.
The context keeps every suite and result of the batch, so its Data Docs site is built
from it once the batch's report folder is known (:meth:`_GX.build_docs`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transact.validation.derive import TYPE_ERRORS
from transact.validation.docs import build_site
from transact.validation.results import Failure, _json_safe
from transact.validation.suites import Check


def _import_gx() -> None:
    import great_expectations  # noqa: F401


class _GX:
    """One ephemeral GX context with a pandas data source: one checkpoint per table.
    ``run_name`` (the batch's name) names the runs in the Data Docs."""

    def __init__(self, run_name: str | None = None) -> None:
        import logging

        import great_expectations as gx
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.ctx.data_sources.add_pandas("transact")
        self.run_id = RunIdentifier(run_name=run_name) if run_name else None

    def run(self, table: str, df: pd.DataFrame, checks: list[Check]):
        gx = self.gx
        asset = self.source.add_dataframe_asset(name=table)
        batch_def = asset.add_batch_definition_whole_dataframe(f"{table}-whole")
        # Expectations given at construction: one store write instead of one per expectation.
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=table,
                                                        expectations=[c.expectation for c in checks]))
        vd = self.ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate-{table}", data=batch_def, suite=suite))
        cp = self.ctx.checkpoints.add(gx.Checkpoint(
            name=f"checkpoint-{table}", validation_definitions=[vd],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))
        result = cp.run(batch_parameters={"dataframe": df}, run_id=self.run_id)
        return next(iter(result.run_results.values()))

    def build_docs(self, site: Path) -> Path:
        """The Data Docs of every table run so far, into ``site``; returns its index.html."""
        return build_site(self.ctx, site)


def _exception_message(info: Any) -> str | None:
    if not info:
        return None
    if isinstance(info, dict):
        if "raised_exception" in info:
            return info.get("exception_message") if info.get("raised_exception") else None
        for v in info.values():  # keyed by metric id
            msg = _exception_message(v)
            if msg:
                return msg
    return None


def _example_rows(df: pd.DataFrame, idx: list, show: tuple[str, ...], k: int = 5) -> list[dict]:
    cols = [c for c in dict.fromkeys(show) if c in df.columns]
    out = []
    for i in idx[:k]:
        try:
            row = df.loc[i, cols] if cols else df.loc[i]
        except KeyError:
            continue
        out.append({"row": i, **{c: _json_safe(v.item() if hasattr(v, "item") else v)
                                 for c, v in row.items()}})
    return out


def _collect(checks: list[Check], vr, df: pd.DataFrame) -> list[Failure]:
    by_name = {c.name: c for c in checks}
    failures = []
    for r in vr.results:
        if r.success:
            continue
        cfg = r.expectation_config
        name = (cfg.meta or {}).get("name", cfg.type)
        check = by_name.get(name)
        res = dict(r.result or {})
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        if isinstance(kwargs.get("value_set"), list) and len(kwargs["value_set"]) > 12:
            vs = kwargs["value_set"]
            kwargs["value_set"] = f"{len(vs)} values, {vs[0]}..{vs[-1]}"
        idx = res.get("partial_unexpected_index_list") or []
        failures.append(Failure(
            name=name, table=check.table if check else "?", expectation=cfg.type, kwargs=kwargs,
            hint=(check.hint or None) if check else None,
            unexpected_count=res.get("unexpected_count"), element_count=res.get("element_count"),
            observed=_json_safe(res["details"]["mismatched"] if isinstance(res.get("details"), dict)
                                and "mismatched" in res["details"]
                                else res.get("observed_value", res.get("details"))),
            sample_values=[] if all(isinstance(v, (bool, np.bool_)) for v in
                                    res.get("partial_unexpected_list") or [True])
            else _json_safe((res.get("partial_unexpected_list") or [])[:5]),
            examples=_example_rows(df, list(idx), check.show if check else ()),
            exception=_exception_message(r.exception_info),
        ))
    order = {c.name: i for i, c in enumerate(checks)}
    failures.sort(key=lambda f: order.get(f.name, 1 << 30))
    return failures


def _validate_frame(gxr: _GX, table: str, df: pd.DataFrame, checks: list[Check]):
    """Runs the checks whose columns exist and have the schema's type; the others count as
    skipped (the columns check names the missing columns, the type check the wrong types)."""
    wrong = df.attrs.get(TYPE_ERRORS, {})
    run = [c for c in checks if all(col in df.columns and col not in wrong for col in c.columns)]
    vr = gxr.run(table, df, run)
    failures = [Failure(f"{table}: {col} has type {want}", table, "column type", {"column": col},
                        gx=False, exception=msg, hint=fix)
                for col, (want, msg, fix) in wrong.items()]
    failures += _collect(run, vr, df)
    stats = {"evaluated": len(run) + len(wrong), "failed": len(failures),
             "skipped": len(checks) - len(run)}
    return vr, failures, stats


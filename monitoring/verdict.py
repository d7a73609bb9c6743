"""One verdict per window: the monitor's decision first, in the report and on the dashboard.

The monitor decides drift by :class:`~transact.monitoring.drift.DriftRule` (four
criteria); Evidently's ``DataDriftPreset`` prints its own dataset verdict ("Dataset Drift
is NOT detected") from one of them, the share of drifted scalar features. A report that
opens with Evidently's verdict contradicts the monitor whenever another criterion fires
(the demo's drifted day: history match and prediction). So :func:`put_decision_first`
makes each window's snapshot -- the HTML report and the run the dashboard holds --

1. open with the monitor's decision, its rule and the numbers it used (one row per
   criterion: measured, bound, fired);
2. carry the decision as metrics (:data:`DECISION_COLUMNS`, Evidently's own ``MeanValue``
   of a one-row frame, so the UI needs nothing of ours to draw them) for the dashboard's
   first panels (:mod:`~transact.monitoring.dashboard`);
3. keep Evidently's verdict, labelled "Evidently's share rule, not the monitor's decision";
4. when labels were joined (``transact monitor --labels``), show the window's calibration
   -- predicted vs observed rate, ECE, log-loss per head
   (:mod:`~transact.monitoring.calibration`) -- in a table of its own right after the rule's,
   titled as calibration, not drift (it is a drift criterion only when the rule's
   ``calibration_gap`` is set, and then its rows are in the rule's table too), and carry the
   predicted and observed rates as metrics for the dashboard's calibration panel.

It edits the snapshot's widget list and metric results (``Snapshot._widgets``,
``_metrics``, ``_top_level_metrics`` of Evidently 0.7: there is no public way to add a
widget or a value to a finished run); ``tests/monitoring/test_drift_verdict.py`` reads the
saved HTML and the served dashboard, so an Evidently change that breaks this fails there.
"""
from __future__ import annotations

from transact.monitoring.drift import DriftRule, WindowResult, criteria

#: The decision as metric columns: 1/0 drift, how many criteria fired, and the number the
#: history-match criterion holds to its bound (the share of those features that drifted).
DECISION_COLUMNS: tuple[str, ...] = ("monitor_drift", "monitor_criteria_fired", "monitor_history_match_share")
#: What Evidently's own verdict is, wherever it shows.
EVIDENTLY_LABEL = "Evidently's share rule, not the monitor's decision"


def headline(result: WindowResult) -> str:
    """The decision in one line, as ``transact monitor`` prints it: ``drift: yes (history
    match, prediction)``, ``drift: no`` or ``not judged (insufficient data: ...)``."""
    if result.reasons and result.reasons[0].startswith("insufficient data"):
        return f"not judged ({result.reasons[0]})"
    if result.drift:
        return "drift: yes (" + ", ".join(sorted({r.split(":")[0] for r in result.reasons})) + ")"
    return "drift: no"


def rule_text(rule: DriftRule) -> str:
    """The rule in one paragraph (the dashboard's first panel, the report's first table)."""
    return (f"Drift when any criterion fires: history match (at least {rule.match_share:.0%} of "
            f"{', '.join(rule.match_columns)} with normed Wasserstein >= {rule.match_threshold}); embedding "
            f"(classifier ROC AUC > {rule.embedding_threshold} on the candidate embedding, > "
            f"{rule.seq_embedding_threshold} on the mean sequence embedding); prediction (a head's normed "
            f"Wasserstein >= {rule.pred_threshold}); scalar share (>= {rule.drift_share:.0%} of the scalar "
            f"features drifted -- Evidently's own 'Dataset Drift' verdict is this criterion alone). Windows "
            f"under {rule.min_rows} rows are not judged." + _calibration_text(rule))


def _calibration_text(rule: DriftRule) -> str:
    if rule.calibration_gap is None:
        return (" Calibration (predicted vs observed rate, when labels are attached) is reported, "
                "not a criterion (calibration_gap off).")
    return (f" Calibration criterion on: a head's |mean predicted - observed| / observed > "
            f"{rule.calibration_gap:.0%} on the window's labelled rows (heads with at least "
            f"{rule.calibration_min_positives} positives).")


def decision_values(result: WindowResult, rule: DriftRule) -> dict[str, float]:
    """:data:`DECISION_COLUMNS` of a window (NaN history-match share when not computed)."""
    every = criteria(result.scores, rule) if result.rows >= rule.min_rows else []
    match = next((c.value for c in every if c.name == "history match"), float("nan"))
    return {"monitor_drift": float(result.drift), "monitor_criteria_fired": float(sum(c.fired for c in every)),
            "monitor_history_match_share": float(match)}


def decision_widgets(result: WindowResult, rule: DriftRule) -> list:
    """The report's opening group: the decision, then its rule and the numbers it used."""
    from evidently.legacy.renderers.html_widgets import CounterData, counter, group_widget, table_data

    rows = [[c.name, c.measured, c.limit, "yes" if c.fired else "no"] for c in criteria(result.scores, rule)]
    ref = result.scores.get("reference_rows")
    return [group_widget(title="", widgets=[
        counter(title="", counters=[CounterData(
            f"window {result.window}, {result.rows:,} rows" + (f" against {ref:,} reference rows" if ref else "")
            + ". " + rule_text(rule), f"Monitor's decision -- {headline(result)}")]),
        table_data(title="The monitor's rule and the numbers it used (any criterion fired = drift)",
                   column_names=["criterion", "numbers used", "drift when", "fired"], data=rows),
        *calibration_widgets(result.scores.get("calibration"), rule),
    ])]


#: the title of the report's calibration table (or counter, for a window without labels)
CALIBRATION_TITLE = "Calibration on labelled rows (predicted vs observed rate) -- calibration, not drift"


def calibration_widgets(calibration: dict | None, rule: DriftRule) -> list:
    """The window's calibration table (none when labels were not joined; a counter saying so
    for a window without labels)."""
    from evidently.legacy.renderers.html_widgets import CounterData, counter, table_data

    from transact.monitoring.calibration import TABLE_COLUMNS, table_rows

    if calibration is None:
        return []
    left_out = (f"{calibration['unlabelled_rows']:,} rows without a label and {calibration['repeated_rows']:,} "
                "repeated served copies left out")
    if calibration.get("note"):
        return [counter(title="", counters=[CounterData(left_out, f"{CALIBRATION_TITLE}: {calibration['note']}")])]
    role = ("a drift criterion (calibration_gap " + f"{rule.calibration_gap:.0%})" if rule.calibration_gap is not None
            else "reported, not a drift criterion")
    return [table_data(title=f"{CALIBRATION_TITLE} ({role}); {calibration['labelled_rows']:,} rows labelled, "
                             + left_out, column_names=TABLE_COLUMNS, data=table_rows(calibration))]


def _relabel(widgets: list) -> None:
    """Marks Evidently's dataset verdict (its share rule) as such, in place, at any depth."""
    for w in widgets:
        for c in (w.params or {}).get("counters", []) if isinstance(w.params, dict) else []:
            if str(c.get("label", "")).startswith("Dataset Drift is"):
                c["value"] = "Evidently's dataset verdict"
                c["label"] = f"{EVIDENTLY_LABEL}: {c['label']}"
        if (w.title or "").startswith("Drift is detected for"):
            w.title = f"{EVIDENTLY_LABEL}: {w.title}"
        _relabel(w.widgets or [])


def _decision_metrics(result: WindowResult, rule: DriftRule):
    """A finished Evidently run of :data:`DECISION_COLUMNS` -- and, with labels joined, each head's
    predicted and observed rate (:func:`~transact.monitoring.calibration.dashboard_values`) --
    over one row (its metric results)."""
    import numpy as np
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    from transact.monitoring.calibration import dashboard_values

    calibrated = list((result.scores.get("calibration") or {}).get("heads", {}))
    heads = calibrated + [h for h in result.scores.get("predictions", {}) if h not in calibrated]
    values = {**decision_values(result, rule), **dashboard_values(result.scores.get("calibration"), heads)}
    frame = pd.DataFrame([values])
    with np.errstate(all="ignore"):  # a NaN share (no history-match feature) is a value, not an error
        data = Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(values)))
        return Report([MeanValue(column=c) for c in values]).run(data, None)


def put_decision_first(snapshot, result: WindowResult, rule: DriftRule) -> None:
    """Edits a window's snapshot in place (module docstring): the decision's widgets and
    metrics first, Evidently's own verdict labelled as its share rule."""
    decision = _decision_metrics(result, rule)
    snapshot._metrics.update(decision._metrics)
    snapshot._top_level_metrics = list(decision._top_level_metrics) + list(snapshot._top_level_metrics)
    _relabel(snapshot._widgets)
    snapshot._widgets = decision_widgets(result, rule) + list(snapshot._widgets)

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
3. keep Evidently's verdict, labelled "Evidently's share rule, not the monitor's decision".

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
            f"under {rule.min_rows} rows are not judged.")


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
    ])]


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
    """A finished Evidently run of :data:`DECISION_COLUMNS` over one row (its metric results)."""
    import numpy as np
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    frame = pd.DataFrame([decision_values(result, rule)])
    with np.errstate(all="ignore"):  # a NaN share (no history-match feature) is a value, not an error
        data = Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(DECISION_COLUMNS)))
        return Report([MeanValue(column=c) for c in DECISION_COLUMNS]).run(data, None)


def put_decision_first(snapshot, result: WindowResult, rule: DriftRule) -> None:
    """Edits a window's snapshot in place (module docstring): the decision's widgets and
    metrics first, Evidently's own verdict labelled as its share rule."""
    decision = _decision_metrics(result, rule)
    snapshot._metrics.update(decision._metrics)
    snapshot._top_level_metrics = list(decision._top_level_metrics) + list(snapshot._top_level_metrics)
    _relabel(snapshot._widgets)
    snapshot._widgets = decision_widgets(result, rule) + list(snapshot._widgets)

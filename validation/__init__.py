"""Data validation with Great Expectations (docs/design.md §9): suites, checkpoint, decision,
quarantine.

Every batch -- a world folder (items, actions, impressions, requests) or a file of
logged NN-feature rows -- is checked table by table with one GX checkpoint per table
(ephemeral context, pandas data source, whole-dataframe batch definition,
``ValidationDefinition`` + ``Checkpoint``). Then one decision for the whole batch:

* pass: the batch goes on; its profile (action-type mix, label rates, row counts) is
  written as the new *reference* JSON that the next batch is compared with;
* fail: the batch is **moved** whole to ``quarantine_dir/<batch>-<UTC time>/`` with the
  GX result JSON and a Markdown report naming each failed expectation with example
  rows; the caller stops. Rows are never dropped one by one, so per table
  ``rows in = accepted + quarantined`` (written in the report, checked after the move).

Either way the batch's report folder also gets GX's own Data Docs site
(``data_docs/index.html``: the suites and each table's validation result), linked from
the Markdown report and recorded in the results JSON and ``ValidationResult.data_docs``.

GX has no array-column support, so list columns (embeddings, token blocks) are
validated through *derived scalar columns* computed here with numpy: lengths,
non-finite counts, max quantisation error, padding violations per row, ... Each
expectation carries a stable human-readable name in ``meta["name"]`` (also its
``description``), e.g. ``"actions: action is a non-empty mask of explicit action bits"``.

Modules, one job each: :mod:`.params` (bounds, defaults, "now"), :mod:`.derive` (derived
frames), :mod:`.links` (cross-table facts), :mod:`.suites` (named expectations),
:mod:`.gx` (running GX), :mod:`.profile` (the reference), :mod:`.batch` (shared set-up),
:mod:`.decide` (pass or quarantine), :mod:`.report` (reports), :mod:`.docs` (GX Data
Docs), :mod:`.results` (result records), :mod:`.run` (``validate_world`` /
``validate_rows``), :mod:`.corruption` and :mod:`.synthetic` (bad and big test data).
Nothing here imports components, serving, pipelines, monitoring or the CLI.

Public API: :func:`validate_world`, :func:`validate_rows`, :class:`ValidationResult`,
:func:`build_checks` / :func:`build_suite` (the suites), :func:`derive_frame` (the
derived columns), :func:`world_profile`, :class:`Tolerance`.
"""
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from transact.validation.derive import derive_frame
from transact.validation.params import Params, Tolerance, now_ms
from transact.validation.profile import load_reference, world_profile
from transact.validation.report import PROFILE_JSON, REPORT_MD, RESULTS_JSON
from transact.validation.results import Failure, ValidationResult
from transact.validation.run import validate_rows, validate_world
from transact.validation.suites import build_checks, build_suite

__all__ = ["PROFILE_JSON", "REPORT_MD", "RESULTS_JSON", "Failure", "Params", "Tolerance", "ValidationResult",
           "build_checks", "build_suite", "derive_frame", "load_reference", "now_ms", "validate_rows",
           "validate_world", "world_profile"]

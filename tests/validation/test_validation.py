"""Data validation (Great Expectations): clean batches pass, every corruption kind is
rejected by its named expectation and quarantined whole, rows are accounted for, the
CLI exits accordingly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from transact.data import schema as S
from transact.data.io import table_path
from transact.data.quantization import MAX_ERROR, quantize
from transact.features.config import FeatureConfig
from transact.validation import (
    PROFILE_JSON,
    REPORT_MD,
    RESULTS_JSON,
    Params,
    Tolerance,
    build_checks,
    derive_frame,
    now_ms,
    validate_rows,
    validate_world,
)
from transact.validation.corruption import (
    CAUGHT_BY,
    KINDS,
    NEEDS_REFERENCE,
    ROW_KINDS,
    ROWS_CAUGHT_BY,
    corrupt,
    corrupt_rows,
)

SMALL_CFG = FeatureConfig(ll_cap=256, rt_cap=32, imp_cap=32, k_ll=16, k_rt=8, r=8, k_imp=8)


def _make_world(out: Path, seed: int) -> Path:
    """A tiny simulated world when the simulator is there, else the hand-made one."""
    try:
        from transact.data.simulator import get_profile, simulate
    except ModuleNotFoundError:
        from helpers import write_world

        write_world(out, seed=seed)
        return out
    simulate(get_profile("tiny"), out, seed=seed, progress=False)
    return out


def _rows(world: Path) -> dict[str, int]:
    return {t: pq.ParquetFile(table_path(world, t)).metadata.num_rows
            for t in S.TABLES if table_path(world, t).exists()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A clean tiny world (never modified: tests work on copies)."""
    return _make_world(tmp_path_factory.mktemp("clean") / "world", seed=0)


@pytest.fixture(scope="module")
def reference(clean, tmp_path_factory) -> Path:
    """The clean batch validated once: its profile is the reference of later batches."""
    root = tmp_path_factory.mktemp("ref")
    batch = shutil.copytree(clean, root / "batch")
    ref = root / "reference.json"
    result = validate_world(batch, root / "quarantine", reference=ref)
    assert result.passed, result.summary
    return ref


def _assert_quarantined(result, world: Path, rows_before: dict[str, int], name: str) -> None:
    assert not result.passed
    assert name in result.failed_names, result.summary
    # moved whole: nothing left at the source, everything in the quarantine folder
    assert not world.exists()
    q = Path(result.quarantine)
    assert q.is_dir() and q.name.startswith(world.name + "-")
    assert _rows(q) == rows_before
    # reports: GX result JSON + Markdown naming the expectation (with example rows)
    md = (q / REPORT_MD).read_text()
    assert name in md and "FAILED" in md
    data = json.loads((q / RESULTS_JSON).read_text())
    assert data["passed"] is False and name in [f["name"] for f in data["failures"]]
    assert set(data["great_expectations"]) <= set(S.TABLES)
    assert not (q / PROFILE_JSON).exists()
    # row accounting: in = accepted + quarantined, nothing accepted, nothing lost
    for t, r in result.rows.items():
        assert r["in"] == r["accepted"] + r["quarantined"]
        assert r["accepted"] == 0 and r["in"] == rows_before.get(t, 0)


# ---------------------------------------------------------------------------- clean batches
def test_clean_world_passes_and_writes_reference(clean, tmp_path):
    world = shutil.copytree(clean, tmp_path / "batch")
    before = _rows(world)
    ref = tmp_path / "ref" / "reference.json"
    result = validate_world(world, tmp_path / "quarantine", reference=ref)
    assert result.passed, result.summary
    assert result.failures == [] and result.quarantine is None
    assert world.is_dir() and _rows(world) == before  # untouched, still in place
    assert not (tmp_path / "quarantine").exists() or not any((tmp_path / "quarantine").iterdir())
    assert {t: r["accepted"] for t, r in result.rows.items()} == before
    assert all(r["quarantined"] == 0 for r in result.rows.values())
    assert sum(c["evaluated"] for c in result.checks.values()) >= 40
    # the profile is the new reference
    prof = json.loads(ref.read_text())
    assert prof == json.loads((world / PROFILE_JSON).read_text())
    assert set(prof["actions"]["rates"]) == set(S.EXPLICIT_ACTIONS)
    assert 0 < prof["requests"]["rates"]["label_click"] < 1
    assert "PASSED" in (world / REPORT_MD).read_text()
    assert result.to_dict()["passed"] is True and "summary" in result.to_dict()


def test_equivalent_batch_passes_distribution_checks(reference, tmp_path):
    """Another seed of the same world: same statistics, so the distribution checks
    against the reference must not fire."""
    world = _make_world(tmp_path / "other", seed=1)
    ref_before = reference.read_text()
    result = validate_world(world, tmp_path / "q", reference=reference, update_reference=False)
    assert result.passed, result.summary
    names = [c.name for c in build_checks("requests", Params(now_ms=0), json.loads(ref_before), 5000)]
    assert "requests: label_click rate matches the reference" in names
    assert reference.read_text() == ref_before  # update_reference=False


def test_hand_made_world(tmp_path):
    """The conftest world draws request candidates with replacement (~5% duplicates)."""
    from helpers import write_world

    write_world(tmp_path / "w")
    result = validate_world(tmp_path / "w", tmp_path / "q", max_duplicate_rate=0.1)
    assert result.passed, result.summary


# ---------------------------------------------------------------------------- corruptions
def test_enough_corruption_kinds():
    assert len(KINDS) >= 10 and set(CAUGHT_BY) == set(KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_corruption_is_rejected_by_its_named_expectation(kind, clean, reference, tmp_path):
    world = tmp_path / "batch"
    summary = corrupt(clean, kind, seed=0, out=world)
    assert summary["caught_by"] == CAUGHT_BY[kind] and summary["rows"] > 0
    before = _rows(world)
    ref_before = reference.read_text()
    result = validate_world(world, tmp_path / "quarantine",
                            reference=reference if kind in NEEDS_REFERENCE else None)
    _assert_quarantined(result, world, before, CAUGHT_BY[kind])
    assert reference.read_text() == ref_before  # a failed batch never becomes the reference
    failure = next(f for f in result.failures if f.name == CAUGHT_BY[kind])
    if failure.gx and failure.unexpected_count:  # row-level failures come with example rows
        assert failure.examples


def test_distribution_kinds_pass_without_reference(clean, tmp_path):
    """A shift of the action mix that the labels agree with is only visible against a
    reference: without one the batch is valid."""
    world = tmp_path / "action_mix_shift"
    corrupt(clean, "action_mix_shift", seed=0, out=world)
    result = validate_world(world, tmp_path / "q")
    assert result.passed, result.summary


def test_label_rate_shift_without_actions_is_caught_without_reference(clean, tmp_path):
    """Labels flipped on without their engagement in the action log: the batch's own
    actions expose it, no reference needed (the reference check names it when given)."""
    world = tmp_path / "click_rate_shift"
    corrupt(clean, "click_rate_shift", seed=0, out=world)
    result = validate_world(world, tmp_path / "q")
    assert not result.passed
    assert CAUGHT_BY["labels_without_actions"] in result.failed_names
    assert CAUGHT_BY["click_rate_shift"] not in result.failed_names  # no reference: not evaluated


def test_future_is_relative_to_now(clean, tmp_path):
    world = shutil.copytree(clean, tmp_path / "batch")
    first_ts = pq.read_table(table_path(world, "requests"), columns=["ts"]).column("ts").to_numpy().min()
    result = validate_world(world, tmp_path / "q", now=int(first_ts) - 86_400_000)
    assert "requests: ts in range (not before min_ts, not in the future)" in result.failed_names


def test_quarantine_inside_batch_is_refused(clean, tmp_path):
    world = shutil.copytree(clean, tmp_path / "batch")
    with pytest.raises(ValueError, match="quarantine"):
        validate_world(world, world / "q")


# ---------------------------------------------------------------------------- NN rows
@pytest.fixture(scope="module")
def rows_file(clean, tmp_path_factory) -> Path:
    from transact.features.nn_logging import log_nn_features

    out = tmp_path_factory.mktemp("rows") / "nn_rows.parquet"
    log_nn_features(clean, out, SMALL_CFG, progress=False)
    return out


def test_clean_rows_pass(rows_file, clean, tmp_path):
    path = tmp_path / "nn_rows.parquet"
    shutil.copy2(rows_file, path)
    result = validate_rows(path, tmp_path / "q", items=clean, reference=tmp_path / "ref.json")
    assert result.passed, result.summary
    assert path.exists() and (tmp_path / f"nn_rows.{REPORT_MD}").exists()
    assert json.loads((tmp_path / "ref.json").read_text())["nn_rows"]["n"] == result.rows["nn_rows"]["in"]
    # its Data Docs site beside it, prefixed like its reports
    assert result.data_docs == str(tmp_path / "nn_rows.data_docs" / "index.html")
    assert _docs_link(tmp_path / f"nn_rows.{REPORT_MD}") == Path(result.data_docs).resolve()


@pytest.mark.parametrize("kind", list(ROW_KINDS))
def test_row_corruption_is_rejected(kind, rows_file, clean, tmp_path):
    path = tmp_path / "nn_rows.parquet"
    summary = corrupt_rows(rows_file, kind, seed=0, out=path)
    n = pq.ParquetFile(path).metadata.num_rows
    result = validate_rows(path, tmp_path / "q", items=clean)
    assert not result.passed and ROWS_CAUGHT_BY[kind] in result.failed_names, result.summary
    assert summary["caught_by"] == ROWS_CAUGHT_BY[kind]
    assert not path.exists()
    q = Path(result.quarantine)
    assert pq.ParquetFile(q / "nn_rows.parquet").metadata.num_rows == n
    assert result.rows["nn_rows"] == {"in": n, "accepted": 0, "quarantined": n}
    assert ROWS_CAUGHT_BY[kind] in (q / REPORT_MD).read_text()
    assert result.data_docs == str(q / "data_docs" / "index.html")  # built in quarantine
    assert ROWS_CAUGHT_BY[kind] in _validation_pages(Path(result.data_docs), "nn_rows")


# ---------------------------------------------------------------------------- derived columns
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.float16, (5, S.EMB_DIM), elements=st.floats(-2, 2, width=16)))
def test_quantize_always_passes_the_quantisation_checks(emb):
    """Any fp16 embedding quantised by the project's quantize() is consistent (the bound
    of the check is tight, not loose: see the next test)."""
    q = quantize(emb.astype(np.float32))
    t = pa.table({"item_id": np.arange(5), "topic": np.zeros(5, np.int32),
                  "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), S.EMB_DIM),
                  "emb_q": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), S.EMB_DIM)})
    df = derive_frame("items", t)
    assert (df["emb_q_max_err"] <= MAX_ERROR + 1e-6).all()
    assert (df["emb_q_saturation_errors"] == 0).all()
    assert (df["emb_q_absmax"] <= 127).all() and (df["emb_nonfinite"] == 0).all()


def test_quantisation_checks_catch_one_step_and_wrong_saturation():
    emb = np.array([[0.1] * S.EMB_DIM, [0.9] * S.EMB_DIM], np.float16)
    q = quantize(emb.astype(np.float32)).astype(np.int16)
    q[0, 3] += 1  # one step off inside the range
    q[1, 5] = -127  # saturated to the wrong side
    t = pa.table({"item_id": [1, 2], "topic": [0, 0],
                  "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), S.EMB_DIM),
                  "emb_q": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1).astype(np.int8)),
                                                             S.EMB_DIM)})
    df = derive_frame("items", t)
    assert df["emb_q_max_err"][0] > MAX_ERROR and df["emb_q_max_err"][1] == 0
    assert list(df["emb_q_saturation_errors"]) == [0, 1]


def test_tolerance_band_and_now():
    lo, hi = Tolerance().band(0.1, 5000, 5000)
    assert lo < 0.08 and hi > 0.12 and hi < 0.2
    assert now_ms("2024-01-01T00:00:00Z") == 1_704_067_200_000 == now_ms(1_704_067_200_000)


# ---------------------------------------------------------------------------- CLI
def test_cli_exit_codes(clean, tmp_path):
    from typer.testing import CliRunner

    from transact.cli import app

    runner = CliRunner()
    good = shutil.copytree(clean, tmp_path / "good")
    res = runner.invoke(app, ["validate", str(good), "--quarantine", str(tmp_path / "q"),
                              "--reference", str(tmp_path / "ref.json")])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("PASS") and (tmp_path / "ref.json").exists()

    res = runner.invoke(app, ["corrupt", str(clean), "--kind", "unknown_surface", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(tmp_path / "bad"), "--quarantine", str(tmp_path / "q"),
                              "--reference", str(tmp_path / "ref.json")])
    assert res.exit_code == 1, res.output
    assert CAUGHT_BY["unknown_surface"] in res.output and "quarantined to:" in res.output
    assert "e.g. row=" in res.output  # example rows
    assert not (tmp_path / "bad").exists()

    res = runner.invoke(app, ["validate", str(tmp_path / "nope"), "--quarantine", str(tmp_path / "q")])
    assert res.exit_code == 2 and "no world folder" in res.output


# ---------------------------------------------------------------------------- GX Data Docs
def _docs_link(md_path: Path) -> Path:
    """The Data Docs index the Markdown report links, resolved from the report's folder."""
    import re

    links = re.findall(r"\]\(([^)\s]*index\.html)\)", md_path.read_text())
    assert len(links) == 1, md_path.read_text()[:2000]
    assert not Path(links[0]).is_absolute()  # relative: still right after a move
    return (md_path.parent / links[0]).resolve()


def _validation_pages(index: Path, table: str) -> str:
    pages = list((index.parent / "validations" / table).rglob("*.html"))
    assert len(pages) == 1, pages
    return pages[0].read_text()


def test_data_docs_site_in_the_batch(clean, tmp_path):
    """A passing world carries GX's own Data Docs: suites and results of every table,
    linked from the Markdown report and recorded in the results JSON and the result."""
    from transact.validation.docs import DATA_DOCS_DIR

    world = shutil.copytree(clean, tmp_path / "batch")
    result = validate_world(world, tmp_path / "quarantine")
    assert result.passed, result.summary
    index = world / DATA_DOCS_DIR / "index.html"
    assert result.data_docs == str(index) and index.is_file()
    assert _docs_link(world / REPORT_MD) == index.resolve()
    assert json.loads((world / RESULTS_JSON).read_text())["data_docs"] == str(index)
    assert result.to_dict()["data_docs"] == str(index) and result.reports["data_docs"] == str(index)
    html = index.read_text()
    for table in S.TABLES:
        assert (index.parent / "expectations" / f"{table}.html").is_file()
        assert f"expectations/{table}.html" in html  # the index lists the suite and its run
        assert f"validations/{table}/{world.name}/" in html
    name = "actions: action is a non-empty mask of explicit action bits"
    assert name in (index.parent / "expectations" / "actions.html").read_text()
    assert name in _validation_pages(index, "actions")
    # GX's tutorial GIFs are not copied into every batch
    assert sum(p.stat().st_size for p in index.parent.rglob("*") if p.is_file()) < 2_000_000
    assert "docs" in result.timings


def test_quarantined_batch_carries_its_data_docs(clean, tmp_path):
    world = tmp_path / "batch"
    corrupt(clean, "unknown_surface", seed=0, out=world)
    result = validate_world(world, tmp_path / "quarantine")
    q = Path(result.quarantine)
    assert not result.passed and not world.exists()
    index = q / "data_docs" / "index.html"
    assert result.data_docs == str(index) and index.is_file()
    assert _docs_link(q / REPORT_MD) == index.resolve()
    assert json.loads((q / RESULTS_JSON).read_text())["data_docs"] == str(index)
    page = _validation_pages(index, "requests")
    assert CAUGHT_BY["unknown_surface"] in page  # the failed expectation, with its results


def test_data_docs_are_written_before_the_move(clean, tmp_path, monkeypatch):
    """Report first, move last: killed between the two, the batch is still in place with
    its reports and its site (which then moves with it)."""
    import transact.data.world as W

    def stop_at(step):
        if step == "quarantine-reported":
            raise KeyboardInterrupt(step)

    monkeypatch.setattr(W, "fault_point", stop_at)
    world = tmp_path / "batch"
    corrupt(clean, "unknown_surface", seed=0, out=world)
    with pytest.raises(KeyboardInterrupt):
        validate_world(world, tmp_path / "quarantine")
    index = world / "data_docs" / "index.html"
    assert index.is_file() and _docs_link(world / REPORT_MD) == index.resolve()
    assert json.loads((world / RESULTS_JSON).read_text())["data_docs"] == str(index)


def test_a_data_docs_error_never_blocks_the_decision(clean, tmp_path, monkeypatch):
    import transact.validation.gx as G

    def broken(ctx, site):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(G, "build_site", broken)
    world = tmp_path / "batch"
    corrupt(clean, "unknown_surface", seed=0, out=world)
    result = validate_world(world, tmp_path / "quarantine")
    q = Path(result.quarantine)
    assert not result.passed and q.is_dir() and not world.exists()
    assert result.data_docs is None and not (q / "data_docs").exists()
    assert any("renderer broke" in n for n in result.notes)
    assert "index.html" not in (q / REPORT_MD).read_text()
    assert json.loads((q / RESULTS_JSON).read_text())["data_docs"] is None

"""RecBole atomic files through the front door: a hand-made set with exact expectations,
bad inputs as one-line errors, and ML-100K from the recbole wheel (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from transact.data import schema as S
from transact.data.io import SchemaError
from transact.data.recbole import EMB_NORM, import_recbole
from transact.validation import validate_world

T0 = 1_000_000_000  # 2001-09-09, seconds
DAY, HOUR = 86_400, 3_600
CR = S.ACTION_BIT["click"] | S.ACTION_BIT["repin"]
# (user, item, rating, day); user u acts at hour u of the day
INTER = [(1, 1, 5, 0), (2, 1, 4, 0), (3, 6, 3, 0), (1, 2, 4, 1), (2, 6, 2, 1), (3, 7, 5, 1),
         (1, 6, 1, 2), (2, 2, 3, 2), (3, 1, 4, 2), (1, 3, 5, 3), (2, 7, 5, 3), (3, 2, 2, 3),
         (1, 7, 3, 4), (2, 3, 4, 4), (3, 8, 4, 4), (2, 8, 5, 5), (1, 9, 4, 8), (3, 10, 5, 9), (2, 9, 2, 9)]
GENRES = {1: "Action", 2: "Action", 3: "Action", 4: "Action", 5: "Action", 6: "Drama", 7: "Drama",
          8: "Drama", 9: "Drama", 10: "Action Drama"}


def ts_ms(u: int, day: int) -> int:
    return (T0 + day * DAY + u * HOUR) * 1000


def write_atomic(src: Path, name: str = "tiny", inter_header: str = "user_id:token\titem_id:token\trating:float"
                 "\ttimestamp:float", rows=None) -> Path:
    src.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [f"{u}\t{i}\t{r}\t{T0 + d * DAY + u * HOUR}" for u, i, r, d in INTER]
    (src / f"{name}.inter").write_text("\n".join([inter_header, *rows]) + "\n")
    (src / f"{name}.item").write_text("item_id:token\ttitle:token_seq\tclass:token_seq\n"
                                      + "".join(f"{i}\tMovie {i}\t{g}\n" for i, g in GENRES.items()))
    (src / f"{name}.user").write_text("user_id:token\tage:token\n" + "".join(f"{u}\t{20 + u}\n" for u in (1, 2, 3, 4)))
    return src


def tiny_world(tmp_path: Path, seed: int = 0) -> tuple[Path, dict]:
    src = write_atomic(tmp_path / "tiny")
    out = tmp_path / f"world-{seed}"
    return out, import_recbole(src, out, request_days=3, negatives=3, eval_fraction=0.5, seed=seed)


def test_tiny_atomic_files_exact_world(tmp_path):
    world, summary = tiny_world(tmp_path)
    assert summary["rows"] == {"items": 10, "actions": 19, "impressions": 6, "requests": 6}
    assert summary["recbole"]["users"] == 4 and summary["recbole"]["users_with_interactions"] == 3
    assert summary["min_ts"] == (T0 // DAY) * DAY * 1000 and summary["label_window_ms"] == 1
    assert summary["train_end_ts"] == ts_ms(2, 9)  # median of the 3 request ts
    meta = json.loads((world / "world.json").read_text())
    assert meta["train_end_ts"] == summary["train_end_ts"]

    actions = pq.read_table(world / "actions.parquet").to_pandas()
    bits = {(r.user_id, r.item_id): r.action for r in actions.itertuples()}
    assert bits[(1, 1)] == CR and bits[(3, 6)] == S.ACTION_BIT["click"] and bits[(2, 6)] == S.ACTION_BIT["hide"]

    req = pq.read_table(world / "requests.parquet").to_pandas()
    # requests = the interactions of the last 3 days, in ts order: (1, 9), (2, 9), (3, 10)
    heads = req.groupby("request_id").agg(user=("user_id", "first"), ts=("ts", "first"), n=("item_id", "size"))
    assert heads[["user", "ts", "n"]].values.tolist() == [[1, ts_ms(1, 8), 2], [2, ts_ms(2, 9), 1],
                                                          [3, ts_ms(3, 9), 3]]
    pos = req[(req[list(S.LABEL_COLUMNS)].sum(1) > 0)]
    assert sorted(zip(pos.user_id, pos.item_id, pos.label_click, pos.label_repin, pos.label_hide)) == [
        (1, 9, 1, 1, 0), (2, 9, 0, 0, 1), (3, 10, 1, 1, 0)]
    # negatives: in the catalog at ts, never an item the user interacted with by then
    neg = req.drop(pos.index)
    assert sorted(zip(neg.user_id, neg.item_id)) == [(1, 8), (3, 3), (3, 9)]
    inter_ts = {(u, i): ts_ms(u, d) for u, i, _, d in INTER}
    for r in neg.itertuples():
        assert inter_ts.get((r.user_id, r.item_id), np.inf) > r.ts
    assert sorted(req.groupby("request_id").position.apply(sorted).sum()) == sorted([0, 1, 0, 0, 1, 2])
    imp = pq.read_table(world / "impressions.parquet").to_pandas()
    assert sorted(zip(imp.request_id, imp.item_id, imp.position)) == sorted(zip(req.request_id, req.item_id,
                                                                                 req.position))

    # embeddings: SVD rows of norm 0.6; items without training interactions (4, 5: never;
    # 10: first seen after train_end_ts) get the genre mean of the training items
    items = pq.read_table(world / "items.parquet").to_pandas().set_index("item_id")
    emb = {i: np.asarray(e, np.float64) for i, e in items.emb.items()}
    assert summary["recbole"]["embeddings"]["filled_items"] == 3
    for i in emb:
        assert np.linalg.norm(emb[i]) == pytest.approx(EMB_NORM, abs=2e-3)
        assert np.abs(emb[i]).max() <= 0.65

    def unit(v):
        return v / np.linalg.norm(v) * EMB_NORM

    action_mean, drama_mean = np.mean([emb[i] for i in (1, 2, 3)], 0), np.mean([emb[i] for i in (6, 7, 8, 9)], 0)
    for i in (4, 5):
        np.testing.assert_allclose(emb[i], unit(action_mean), atol=2e-3)
    np.testing.assert_allclose(emb[10], unit((action_mean + drama_mean) / 2), atol=2e-3)

    result = validate_world(world, tmp_path / "q")
    assert result.passed, result.summary


def test_tiny_world_is_deterministic_and_log_nn_runs(tmp_path):
    from transact.features.nn_logging import log_nn_features

    w0, _ = tiny_world(tmp_path)
    w0b = tmp_path / "again"
    import_recbole(tmp_path / "tiny", w0b, request_days=3, negatives=3, eval_fraction=0.5, seed=0)
    for t in ("requests", "items", "actions"):
        assert pq.read_table(w0 / f"{t}.parquet").equals(pq.read_table(w0b / f"{t}.parquet"))
    summary = log_nn_features(w0, w0 / "nn_rows.parquet", progress=False)
    assert summary["rows"] == 6 and summary["requests"] == 3


def test_cli_import_recbole(tmp_path):
    from transact.cli import app

    write_atomic(tmp_path / "tiny")
    r = CliRunner().invoke(app, ["import-recbole", str(tmp_path / "tiny"), "--out", str(tmp_path / "w"),
                                 "--request-days", "3", "--negatives", "3", "--eval-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "w" / "world.json").read_text())["rows"]["requests"] == 6
    r = CliRunner().invoke(app, ["import-recbole", str(tmp_path / "nothing"), "--out", str(tmp_path / "w2")])
    assert r.exit_code == 2 and "no folder" in r.output


@pytest.mark.parametrize(("make", "message"), [
    (lambda src: (src / "tiny.inter").unlink(), r"tiny\.inter: no such file"),
    (lambda src: write_atomic(src, inter_header="user_id:token\titem_id:token\trating\ttimestamp:float"),
     r"tiny\.inter: header field 'rating' is not name:type"),
    (lambda src: write_atomic(src, rows=["1\t1\t5\t881250949", "1\t2\t4\tyesterday"]),
     r"tiny\.inter: column 'timestamp' has 1 non-numeric values, e.g. line 3 = 'yesterday'"),
    (lambda src: write_atomic(src, inter_header="user_id:token\titem:token\trating:float\ttimestamp:float"),
     r"tiny\.inter: no column 'item_id'"),
])
def test_bad_atomic_files_are_one_line_errors(tmp_path, make, message):
    src = write_atomic(tmp_path / "tiny")
    make(src)
    with pytest.raises(SchemaError, match=message) as e:
        import_recbole(src, tmp_path / "w")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


ML100K = "recbole/dataset_example/ml-100k/ml-100k"


@pytest.mark.slow
def test_ml100k_from_the_recbole_wheel(tmp_path):
    """ML-100K as RecBole ships it, read from the wheel (recbole itself cannot be installed
    beside ray 2.60: it pins ray<=2.6.3). The wheel comes from the package registry, which
    `make test` needs anyway to install the project: a failed download fails the test."""
    from transact.features.nn_logging import log_nn_features

    dl = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "recbole==1.2.1", "-d",
                         str(tmp_path / "whl")], capture_output=True, text=True)
    wheels = list((tmp_path / "whl").glob("recbole-1.2.1-*.whl"))
    assert dl.returncode == 0 and wheels, f"pip download recbole==1.2.1 failed: {dl.stderr.strip()[-300:]}"
    src = tmp_path / "ml-100k"
    src.mkdir()
    with zipfile.ZipFile(wheels[0]) as z:
        for ext in ("inter", "item", "user"):
            (src / f"ml-100k.{ext}").write_bytes(z.read(f"{ML100K}.{ext}"))
    summary = import_recbole(src, tmp_path / "world")
    rb = summary["recbole"]
    assert (rb["interactions"], rb["users"], rb["items"]) == (100_000, 943, 1_682)
    assert summary["rows"]["actions"] == 100_000 and summary["rows"]["items"] == 1_682
    assert summary["min_ts"] < S.DEFAULT_MIN_TS_MS  # 1997-98: min_ts comes from the data
    assert summary["rows"]["requests"] == summary["rows"]["impressions"]
    result = validate_world(tmp_path / "world", tmp_path / "q")
    assert result.passed, result.summary
    rows = log_nn_features(tmp_path / "world", tmp_path / "world" / "nn_rows.parquet", progress=False)
    assert rows["rows"] == summary["rows"]["requests"]

"""The model registry on a storage root that outlives pods: the champion, its history and the
models, locally and on a real S3-protocol server (moto).

Found in the pipeline before (issue 25): the champion lived in a pod-local folder, so on a
cluster every run found "no champion yet" and promoted whatever it trained; two runs could
both replace the champion; nothing kept the previous one.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import at_once, rows_with_split
from transact.cli import app
from transact.components import steps
from transact.data import storage
from transact.features.config import FeatureConfig
from transact.model.checkpoint import MODEL_FILES, model_digest, save_model
from transact.model.registry import ChampionMoved, ChampionRecord, Registry, model_id
from transact.model.transact import build_model

FCFG = FeatureConfig(k_ll=8, k_rt=6, r=6, k_imp=6)


def _model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_model(folder, build_model("v2", FCFG))
    (folder / "train_state").mkdir()
    (folder / "train_state" / "state.json").write_text("{}")  # not part of a registered model
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return [_model(root / f"m{i}", i) for i in range(5)]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A storage root: a local folder, or a fresh bucket on the session's S3 server."""
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3").bucket()


def test_promote_publishes_the_model_then_names_it_with_its_metrics_and_lineage(root, models, tmp_path):
    reg = Registry(storage.join(root, "registry"))
    assert reg.champion() is None
    record = reg.promote(models[0], {"hit": {"repin": {"value": 0.5}}}, {"run_id": "r1", "rows_count": 10}, expected=0)
    assert (record.generation, record.action, record.previous) == (1, "promote", None)
    assert record.model_id == model_id(models[0]) and reg.champion() == record
    assert record.lineage == {"run_id": "r1", "rows_count": 10}
    got = reg.fetch_model(record.model_id, tmp_path / "fetched")
    assert model_digest(got) == model_digest(models[0])
    assert sorted(p.name for p in got.iterdir()) == sorted([*MODEL_FILES, storage.MANIFEST])  # no training state


@pytest.mark.parametrize("runs", [2, 4])
def test_of_runs_racing_to_replace_the_same_champion_exactly_one_wins(root, models, runs):
    """Every run gated against generation 1 and promotes at once: one writes generation 2; the
    others are told the champion moved (and would gate again), none overwrites it."""
    reg = Registry(storage.join(root, "registry"))
    reg.promote(models[0], {}, expected=0)
    results = at_once(lambda i: Registry(reg.root).promote(models[i + 1], {"run": i}, expected=1), runs)
    won = [r for r in results if isinstance(r, ChampionRecord)]
    moved = [r for r in results if isinstance(r, ChampionMoved)]
    assert len(won) == 1 and len(moved) == runs - 1
    history = reg.history()
    assert [r.generation for r in history] == [1, 2] and history[-1] == won[0]
    assert history[-1].previous == model_id(models[0])
    assert all(e.current is not None and e.current.generation == 2 for e in moved)
    assert all("gate against it again" in str(e) for e in moved)


def test_a_retried_promotion_writes_no_second_record(root, models, rows, tmp_path, monkeypatch):
    """The package step promotes, then fails (export, packaging) and KFP retries it with the
    generation its gate saw: the model is the champion already, so the retry gets the same
    answer -- no record of a model replacing itself, and rollback still knows the previous one.
    Likewise a PUT that landed but whose answer was lost, retried and refused: it is ours."""
    registry = steps.Layout(root).registry
    reg = Registry(registry)
    reg.promote(models[0], {}, expected=0)
    first = steps.promote(str(models[1]), registry, {}, 1, rows)
    again = steps.promote(str(models[1]), registry, {}, 1, rows)
    assert first["promoted"] and again["promoted"] and again["generation"] == first["generation"] == 2
    assert [r.model_id for r in reg.history()] == [model_id(models[0]), model_id(models[1])]
    assert reg.rollback().model_id == model_id(models[0])

    storage.check_exclusive_writes(registry)  # the store's probe, before the store is made to misbehave
    real = storage.write_bytes

    def lost_answer(location, data, *, exclusive=False):  # the PUT lands; its retry is refused
        real(location, data, exclusive=exclusive)
        if exclusive:
            real(location, data, exclusive=exclusive)

    monkeypatch.setattr(storage, "write_bytes", lost_answer)
    record = reg.promote(models[2], {}, expected=3)
    assert record.generation == 4 and reg.champion() == record
    monkeypatch.setattr(storage, "write_bytes", real)
    assert model_digest(reg.fetch_model(record.model_id, tmp_path / "m2")) == model_digest(models[2])  # intact


def test_a_promotion_that_dies_before_its_manifest_names_no_model(root, models, monkeypatch):
    reg = Registry(storage.join(root, "registry"))

    def dies(*_a, **_k):
        raise OSError("pod evicted")

    with monkeypatch.context() as m:
        m.setattr(storage, "write_json", dies)
        with pytest.raises(OSError, match="pod evicted"):
            reg.promote(models[0], {}, expected=0)
    assert reg.champion() is None
    assert reg.promote(models[0], {}, expected=0).generation == 1  # the retry finishes the job


def test_rollback_makes_the_replaced_model_champion_again_and_keeps_the_history(root, models):
    reg = Registry(storage.join(root, "registry"))
    with pytest.raises(ValueError, match="no champion yet, nothing to roll back"):
        reg.rollback()
    a = reg.promote(models[0], {"hit": {"repin": {"value": 0.4}}}, expected=0)
    with pytest.raises(ValueError, match="replaced no model"):
        reg.rollback()
    b = reg.promote(models[1], {}, expected=1)
    back = reg.rollback()
    assert (back.generation, back.model_id, back.action, back.previous) == (3, a.model_id, "rollback", b.model_id)
    assert back.metrics == a.metrics  # the metrics it was promoted with
    with pytest.raises(ValueError, match="already the champion"):
        reg.rollback(to=a.model_id)
    with pytest.raises(storage.Unpublished, match="not published"):
        reg.rollback(to="v2-0000000000000000")
    with pytest.raises(ChampionMoved):
        reg.rollback(expected=2)  # a rollback is a change of champion like any other
    assert [r.model_id for r in reg.history()] == [a.model_id, b.model_id, a.model_id]


def test_registry_commands_history_rollback_fetch(root, models, tmp_path):
    registry = storage.join(root, "registry")
    reg = Registry(registry)
    runner = CliRunner()
    r = runner.invoke(app, ["registry", "history", "--registry", registry])
    assert r.exit_code == 0 and "no champion yet" in r.output
    a = reg.promote(models[0], {"hit": {"repin": {"value": 0.4321}}}, expected=0)
    b = reg.promote(models[1], {}, expected=1)
    r = runner.invoke(app, ["registry", "rollback", "--registry", registry])
    assert r.exit_code == 0, r.output
    assert f"champion generation 3: {a.model_id} (was {b.model_id})" in r.output
    r = runner.invoke(app, ["registry", "history", "--registry", registry])
    lines = r.output.strip().splitlines()
    assert len(lines) == 4 and "rollback" in lines[-1] and "0.4321" in lines[1], r.output
    r = runner.invoke(app, ["registry", "fetch", "--registry", registry, "--out", str(tmp_path / "champ")])
    assert r.exit_code == 0, r.output
    assert model_digest(tmp_path / "champ") == model_digest(models[0])
    r = runner.invoke(app, ["registry", "rollback", "--registry", registry, "--to", "v2-nosuchmodel"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "not published" in r.output, r.output
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()


# --- the pipeline's gate and promotion against the registry ---------------------------------

@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return str(rows_with_split(tmp_path_factory.mktemp("world"), 48, FCFG, n_users=12, seed=0))


def _judged(model: Path, rows: str, tmp: Path) -> dict:
    return steps.evaluate(str(model), rows, str(tmp / f"eval-{model.name}"), n_boot=10, progress=False)


def test_run_two_is_gated_against_run_ones_champion(root, models, rows, tmp_path):
    layout = steps.Layout(root)
    first = _judged(models[0], rows, tmp_path)
    g1 = steps.gate(first, str(models[0]), rows, layout.registry)
    assert g1["passed"] and g1["champion_generation"] == 0
    p1 = steps.promote(str(models[0]), layout.registry, first, g1["champion_generation"], rows)
    assert p1["promoted"] and p1["generation"] == 1

    second = _judged(models[1], rows, tmp_path)
    g2 = steps.gate(second, str(models[1]), rows, layout.registry)
    assert g2["champion_generation"] == 1 and g2["champion_model"] == model_id(models[0])
    assert g2["champion"]["repin"] == pytest.approx(first["hit"]["repin"]["value"])  # judged against run 1's model


def test_a_run_whose_champion_moved_gates_again_before_it_promotes(root, models, rows, tmp_path):
    """Runs 1 and 2 both gated against "no champion". Run 1 promotes; run 2's promotion finds the
    champion moved, gates again against run 1's model and promotes only if it passes that."""
    registry = steps.Layout(root).registry
    judged = [_judged(m, rows, tmp_path) for m in models[:3]]
    assert steps.promote(str(models[0]), registry, judged[0], 0, rows)["generation"] == 1
    late = steps.promote(str(models[1]), registry, judged[1], 0, rows, tolerance=1e9)  # passes any gate
    assert late["promoted"] and late["generation"] == 2 and late["previous"] == model_id(models[0])
    assert "the champion moved: expected generation 0, now generation 1" in late["reason"]

    repin_now = judged[1]["hit"]["repin"]["value"]
    assert repin_now > 0  # so that a tolerance of -50% below makes the gate refuse
    refused = steps.promote(str(models[2]), registry, judged[1], 1, rows, tolerance=-0.5)
    assert not refused["promoted"] and "regressed" in refused["reason"]
    assert [r.generation for r in Registry(registry).history()] == [1, 2]


def test_the_champion_is_exported_and_a_fresh_machine_serves_it_from_the_registry(root, models, tmp_path):
    """`package` exports the BentoML model to the registry; another BentoML home (a fresh
    machine) imports the champion from there with the same tag and bytes."""
    from transact.serving.packaging import export_location, import_champion, local_stores, package_model

    registry = steps.Layout(root).registry
    Registry(registry).promote(models[0], {}, expected=0)
    with local_stores(tmp_path / "pod"):
        packaged = steps.package(str(models[0]), registry)
        assert packaged["exported"] == export_location(registry, packaged["tag"])
        assert storage.read_manifest(packaged["exported"])["meta"] == {"tag": packaged["tag"]}
        assert steps.package(str(models[0]), registry)["exported"] == packaged["exported"]  # idempotent
    with local_stores(tmp_path / "fresh"):
        import bentoml

        assert import_champion(registry) == packaged["tag"]
        served = Path(bentoml.models.get(packaged["tag"]).path)
        assert model_digest(served) == model_digest(models[0])
    with local_stores(tmp_path / "no-export"):  # a champion never exported: packaged from its files
        storage.remove_tree(storage.join(registry, "bentoml"))
        assert import_champion(registry) == package_model(models[0])["tag"]


def test_an_unreachable_store_or_a_moved_champion_is_one_line(tmp_path, monkeypatch, models):
    """botocore's own errors (no endpoint, no credentials) came through s3fs as tracebacks."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # a client made for the session's server would be reused
    try:
        r = CliRunner().invoke(app, ["registry", "history", "--registry", "s3://nowhere-bucket/registry"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output

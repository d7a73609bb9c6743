"""Feature store commands (Feast): ``transact features apply|materialize|push|show`` and
``transact bench features``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from transact.commands._common import fail_on_user_error

REPO_HELP = "Feast repo folder (its data/ holds the offline sources, registry and SQLite store)."
ONLINE_HELP = ("Online store: sqlite (feature_store.yaml) or redis (feature_store.redis.yaml, "
               "server from --redis or $TRANSACT_REDIS).")


def _store(repo: Path, online: str, redis: str | None):
    from transact.features.feast.store import REDIS_ENV, open_store

    if online == "sqlite":
        return open_store(repo)
    if online != "redis":
        raise ValueError(f"--online must be sqlite or redis, got {online!r}")
    # --redis, else $TRANSACT_REDIS (read here, at the edge), else a local server
    return open_store(repo, "feature_store.redis.yaml", redis=redis or os.environ.get(REDIS_ENV) or "localhost:6379")


def _cfg(ll_cap: int | None, rt_cap: int | None, imp_cap: int | None):
    from transact.features.config import FeatureConfig

    kw = {k: v for k, v in (("ll_cap", ll_cap), ("rt_cap", rt_cap), ("imp_cap", imp_cap)) if v is not None}
    if "rt_cap" in kw:
        kw["r"] = min(FeatureConfig().r, kw["rt_cap"])
    return FeatureConfig(**kw)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    features_app = typer.Typer(help="Feast feature store: offline sources, apply, materialise, push.",
                               no_args_is_help=True)
    app.add_typer(features_app, name="features")

    @features_app.command("apply")
    @fail_on_user_error
    def apply_cmd(
        repo: Path = typer.Option(Path("feature_repo"), help=REPO_HELP),
        world: Path | None = typer.Option(None, help="Write this world's events into the offline sources first."),
        online: str = typer.Option("sqlite", help=ONLINE_HELP),
        redis: str | None = typer.Option(None, help="Redis host:port[,db=N,password=...]."),
        since_ms: int | None = typer.Option(None, help="First instant training reads must serve "
                                                        "(default: the first request)."),
        until_ms: int | None = typer.Option(None, help="Leave out events at or after this instant (ms)."),
        ll_cap: int | None = typer.Option(None, help="L_LL (default 16384)."),
        rt_cap: int | None = typer.Option(None, help="L_RT (default 100)."),
        imp_cap: int | None = typer.Option(None, help="L_imp (default 100)."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Write a world's events into the offline sources (with --world), then `feast apply`."""
        from transact.features.feast.offline import write_offline
        from transact.features.feast.store import REPO_TEMPLATE, apply, init_repo

        if not (repo / "feature_store.yaml").exists():
            if repo.resolve() == REPO_TEMPLATE.resolve():
                raise FileNotFoundError(f"{repo}/feature_store.yaml is missing")
            init_repo(repo)
            typer.echo(f"created Feast repo {repo} from {REPO_TEMPLATE}")
        if world is not None:
            s = write_offline(world, repo, _cfg(ll_cap, rt_cap, imp_cap), since_ms=since_ms,
                              until_ms=until_ms, progress=progress)
            typer.echo(f"offline sources of {s['users']:,} users for [{s['since_ms']}, {s['until_ms']}] in "
                       f"{s['seconds']:.1f} s: " + ", ".join(f"{v} {x['rows']:,} rows" for v, x in s["views"].items()))
        out = apply(_store(repo, online, redis))
        typer.echo(f"applied {len(out['applied'])} objects ({out['online_store']} online store)")

    @features_app.command("materialize")
    @fail_on_user_error
    def materialize_cmd(
        repo: Path = typer.Option(Path("feature_repo"), help=REPO_HELP),
        online: str = typer.Option("sqlite", help=ONLINE_HELP),
        redis: str | None = typer.Option(None, help="Redis host:port[,db=N,password=...]."),
        end_ms: int | None = typer.Option(None, help="Materialise the state at this instant (default: the sources' end)."),
        engine: str = typer.Option("direct", help="direct (streamed, bounded memory) | feast (FeatureStore.materialize)."),
        batch_rows: int = typer.Option(2048, help="Entities per online write (direct engine; also capped at 32 MiB)."),
        progress: bool = typer.Option(True, help="Show progress bars."),
    ) -> None:
        """Load the latest offline rows into the online store."""
        from transact.features.feast.materialize import materialize

        out = materialize(_store(repo, online, redis), end_ms=end_ms, engine=engine,
                          batch_rows=batch_rows, progress=progress)
        for v, x in out["views"].items():
            typer.echo(f"{v}: {x['entities']:,} entities, {x['tokens']:,} tokens in {x['seconds']:.1f} s")
        typer.echo(f"materialised in {out['seconds']:.1f} s ({engine})")

    @features_app.command("push")
    @fail_on_user_error
    def push_cmd(
        repo: Path = typer.Option(Path("feature_repo"), help=REPO_HELP),
        actions: Path | None = typer.Option(None, help="New explicit actions (parquet, actions schema)."),
        impressions: Path | None = typer.Option(None, help="New impressions (parquet, impressions schema)."),
        online: str = typer.Option("sqlite", help=ONLINE_HELP),
        redis: str | None = typer.Option(None, help="Redis host:port[,db=N,password=...]."),
        offline: bool = typer.Option(False, help="Also append the new states to the offline sources."),
    ) -> None:
        """Push new events into the realtime and impression features (online store)."""
        from transact.data import schema as S
        from transact.data.io import read_table
        from transact.features.feast.push import push_events

        if actions is None and impressions is None:
            raise ValueError("give --actions and/or --impressions")
        a = read_table(actions, S.ACTIONS_TABLE, what="actions") if actions else None
        i = read_table(impressions, S.IMPRESSIONS, what="impressions") if impressions else None
        out = push_events(_store(repo, online, redis), a, i, to="online_and_offline" if offline else "online")
        typer.echo(json.dumps(out))

    @features_app.command("show")
    @fail_on_user_error
    def show_cmd(
        user_id: list[int] = typer.Argument(..., help="User ids."),
        repo: Path = typer.Option(Path("feature_repo"), help=REPO_HELP),
        online: str = typer.Option("sqlite", help=ONLINE_HELP),
        redis: str | None = typer.Option(None, help="Redis host:port[,db=N,password=...]."),
    ) -> None:
        """Print users' online sequences (lengths and newest token times)."""
        from transact.features.feast.online import OnlineSequences

        seqs = OnlineSequences(_store(repo, online, redis)).sequences(user_id)
        for n, u in enumerate(user_id):
            parts = []
            for name, s in zip(("S_LL", "S_RT", "S_imp"), seqs):
                lo, hi = int(s.offsets[n]), int(s.offsets[n + 1])
                newest = int(s.ts[lo]) if hi > lo else None
                parts.append(f"{name} {hi - lo} tokens (newest ts {newest})")
            typer.echo(f"user {u}: " + "; ".join(parts))

    @bench_app.command("features")
    @fail_on_user_error
    def bench_features_cmd(
        world: Path = typer.Option(Path("runs/world"), help="World folder (demo or bench profile)."),
        max_users: int | None = typer.Option(None, help="Only the N users with the most actions."),
        online: str = typer.Option("sqlite,redis", help="Online stores to measure, comma-separated."),
        redis: str | None = typer.Option(None, help="Redis host:port (default: start a local redis-server)."),
        engines: str = typer.Option("direct,feast", help="Materialisation engines, comma-separated."),
        reads: int = typer.Option(300, help="Online reads timed per store."),
        ll_cap: int = typer.Option(16_384, help="L_LL."),
        workdir: Path | None = typer.Option(None, help="Keep the benchmark repos here (default: a temp dir)."),
        out: Path = typer.Option(Path("bench/results/features.json"), help="JSON result path."),
        progress: bool = typer.Option(False, help="Show progress bars."),
    ) -> None:
        """Materialisation throughput and peak memory, online read latency (SQLite, Redis)."""
        from transact.bench.features import bench_features, format_bench, write_bench_json
        from transact.features.config import FeatureConfig

        res = bench_features(world, workdir, max_users, [x.strip() for x in online.split(",") if x.strip()],
                             redis, [x.strip() for x in engines.split(",") if x.strip()], reads,
                             FeatureConfig(ll_cap=ll_cap), progress=progress)
        typer.echo(format_bench(res))
        typer.echo(f"written {write_bench_json(res, out)}")

"""Importer for RecBole atomic files: public recommendation data sets as a world.

RecBole (https://recbole.io) ships 40+ public data sets as *atomic files*: in a folder
``<name>/``, ``<name>.inter`` (interactions), optional ``<name>.item`` and ``<name>.user``.
Each is tab-separated; the header names every field as ``name:type`` with type one of
``token``, ``token_seq``, ``float``, ``float_seq`` (sequences are space-separated).
:func:`import_recbole` turns them into the generic schema (:mod:`transact.data.schema`)
and publishes a world with the project's own writer, so ``transact validate`` and
``transact log-nn`` work on it unchanged.

The mapping (recorded in ``world.json`` under ``recbole``):

* **ids**: ``user_id`` / ``item_id`` tokens that are all digits are kept as integers;
  otherwise the field's sorted distinct tokens are numbered 0..n-1 (``ids`` in world.json
  says which). Items are the union of ``.item`` and ``.inter``; users of ``.user`` and
  ``.inter``.
* **ts**: the ``timestamp`` field (float seconds since the epoch, as RecBole stores it)
  times 1000, rounded, as int ms. Rows with the same (user, item, ts) are one event
  (the last row in file order wins).
* **actions** (one row per interaction, surface ``homefeed``): ``rating >= 4`` ->
  ``click|repin``; ``2 < rating < 4`` -> ``click``; ``rating <= 2`` -> ``hide``
  (thresholds ``pos_rating`` / ``hide_rating``); no rating field -> ``click``.
* **requests** (point in time, seeded, deterministic): every interaction in the request
  window (its last ``request_days`` days) is one request at its ts, with the engaged item
  plus ``negatives`` items sampled uniformly from the items already in the catalog at that
  instant (first interacted with by anyone at or before ts) that this user had not
  interacted with at or before ts + label_window_ms; the rows are shuffled into random
  positions. Labels are attached by the production join (:mod:`transact.data.labels`):
  the engaged row owns its interaction (logged at the request's own ts, so
  ``label_window_ms`` is 1) and gets its action bits; the negatives own none (0).
  Impressions are the request rows.
* **split**: ``train_end_ts`` is the ``1 - eval_fraction`` quantile of request ts (as
  :func:`transact.data.adapter.import_logs`); ``min_ts`` is the UTC midnight before the
  earliest interaction (ML-100K is from 1997-98, before validation's 2010 default).
* **item embeddings** (learned only from interactions with ts < train_end_ts): truncated
  SVD of the binary user x item matrix, item vectors ``V_k * sqrt(s_k)``, k <= 32 (fewer
  when the matrix has lower rank: the other dims are 0), signs fixed (largest loading
  positive), each row scaled to L2 norm 0.6 so that ``|e| <= 0.6 < 0.65`` never
  saturates the int8 codes. Items without training interactions (first seen later, or
  only in ``.item``) get the **genre mean**: the mean of the per-genre means of the
  training items sharing their genres (the ``.item`` genre field: ``genre_field``, by
  default the first of ``class``/``genre``/``genres``/``categories``/``category``),
  else the mean of all training items, rescaled to norm 0.6.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from transact.data import schema as S
from transact.data.io import SchemaError, conform, table_path, write_table
from transact.data.labels import label_requests
from transact.data.quantization import quantize
from transact.data.world import publishing, write_world_json

TYPES: tuple[str, ...] = ("token", "token_seq", "float", "float_seq")
GENRE_FIELDS: tuple[str, ...] = ("class", "genre", "genres", "categories", "category")
DAY_MS: int = 86_400_000
EMB_NORM: float = 0.6  # row norm of the stored embeddings: |e| <= 0.6 < quantisation SCALE 0.65
LABEL_WINDOW_MS: int = 1  # labels are the engagement at the request's own ts
CLICK_REPIN = S.ACTION_BIT["click"] | S.ACTION_BIT["repin"]


# ----------------------------------------------------------------------------- reading
def read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """One atomic file -> (frame of strings keyed by field name, {field: type}).
    A header field without a known ``:type`` is a one-line error naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path.name}: no such file in {path.parent}")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    types: dict[str, str] = {}
    for field in header:
        name, sep, typ = field.rpartition(":")
        if not sep or not name or typ not in TYPES:
            raise SchemaError(f"{path.name}: header field {field!r} is not name:type "
                              f"(type one of {', '.join(TYPES)})")
        types[name] = typ
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE,
                     encoding="utf-8", encoding_errors="replace", header=0, names=list(types),
                     index_col=False)
    return df, types


def _field(df: pd.DataFrame, types: dict[str, str], file: str, name: str, want: tuple[str, ...]) -> pd.Series:
    if name not in types:
        raise SchemaError(f"{file}: no column '{name}' (header fields: {', '.join(f'{k}:{v}' for k, v in types.items())})")
    if types[name] not in want:
        raise SchemaError(f"{file}: column '{name}' has type {types[name]}, expected {' or '.join(want)}")
    return df[name]


def _floats(col: pd.Series, file: str, name: str) -> np.ndarray:
    v = pd.to_numeric(col.str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise SchemaError(f"{file}: column '{name}' has {len(bad)} non-numeric values, "
                          f"e.g. line {bad[0] + 2} = {col.iloc[bad[0]]!r}")
    return v


def _id_map(tokens: np.ndarray) -> tuple[dict[str, int] | None, str]:
    """None (the tokens are integers, kept) or {token: dense id} in sorted token order."""
    uniq = np.unique(tokens)
    if all(t.isdigit() and len(t) <= 18 for t in uniq):
        return None, "as given (integer tokens)"
    return {t: i for i, t in enumerate(uniq.tolist())}, "dense 0..n-1 in sorted token order"


def _ids(tokens: np.ndarray, mapping: dict[str, int] | None) -> np.ndarray:
    if mapping is None:
        return tokens.astype(np.int64)
    return np.fromiter((mapping[t] for t in tokens), dtype=np.int64, count=len(tokens))


# ----------------------------------------------------------------------------- embeddings
def _svd_items(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, dim: int,
               seed: int) -> np.ndarray:
    """Item factors [n_items, dim] of the binary user x item matrix (dense exact SVD when
    it is small, else a seeded randomized SVD over the sparse entries)."""
    key = np.unique(users.astype(np.int64) * n_items + items)
    r, c = key // n_items, key % n_items
    k = min(dim, n_users, n_items)
    if n_users * n_items <= 8_000_000:
        x = np.zeros((n_users, n_items), dtype=np.float64)
        x[r, c] = 1.0
        _, s, vt = np.linalg.svd(x, full_matrices=False)
    else:  # randomized SVD (Halko et al.), sparse products as per-column bincounts
        def xm(m):  # X @ m, m [n_items, l]
            return np.stack([np.bincount(r, weights=m[c, j], minlength=n_users) for j in range(m.shape[1])], 1)

        def xtm(m):  # X^T @ m, m [n_users, l]
            return np.stack([np.bincount(c, weights=m[r, j], minlength=n_items) for j in range(m.shape[1])], 1)

        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(xm(rng.normal(size=(n_items, k + 8))))
        for _ in range(4):
            z, _ = np.linalg.qr(xtm(q))
            q, _ = np.linalg.qr(xm(z))
        _, s, vt = np.linalg.svd(xtm(q).T, full_matrices=False)
    s, vt = s[:k], vt[:k]
    keep = s > 1e-9 * max(float(s[0]) if len(s) else 0.0, 1e-30)
    v = (vt[keep] * np.sqrt(s[keep])[:, None]).T  # [n_items, k']
    sign = np.sign(v[np.abs(v).argmax(0), np.arange(v.shape[1])])
    v = v * np.where(sign == 0, 1.0, sign)
    out = np.zeros((n_items, dim))
    out[:, :v.shape[1]] = v
    return out


def _unit(e: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(e, axis=-1, keepdims=True)
    return np.where(n > 1e-12, e / np.where(n > 1e-12, n, 1.0) * EMB_NORM, 0.0)


def item_embeddings(inter_users: np.ndarray, inter_items: np.ndarray, inter_ts: np.ndarray,
                    item_ids: np.ndarray, genres: list[list[str]], train_end_ts: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n_items, 32] embeddings for ``item_ids`` (sorted) from interactions with
    ts < train_end_ts, and a bool mask of the items that got the genre-mean fill."""
    train = inter_ts < train_end_ts
    if not train.any():
        raise SchemaError(f"no interaction before train_end_ts {train_end_ts}: nothing to learn item "
                          f"embeddings from (lower eval_fraction or widen request_days)")
    uu, ui = np.unique(inter_users[train], return_inverse=True)
    col = np.searchsorted(item_ids, inter_items[train])
    emb = _unit(_svd_items(ui, col, len(uu), len(item_ids), S.EMB_DIM, seed))
    learned = np.zeros(len(item_ids), dtype=bool)
    learned[col] = True
    learned &= np.linalg.norm(emb, axis=1) > 0
    fill = ~learned
    glob = _unit(emb[learned].mean(0))
    by_genre: dict[str, list[int]] = {}
    for i in np.flatnonzero(learned):
        for g in genres[i]:
            by_genre.setdefault(g, []).append(int(i))
    means = {g: emb[ix].mean(0) for g, ix in by_genre.items()}
    for i in np.flatnonzero(fill):
        got = [means[g] for g in genres[i] if g in means]
        emb[i] = _unit(np.mean(got, 0)) if got else glob
    return emb, fill


# ----------------------------------------------------------------------------- import
def _source_files(src: Path, name: str | None) -> tuple[Path, str]:
    src = Path(src)
    if src.suffix == ".inter":
        return src.parent, src.stem
    if not src.is_dir():
        raise FileNotFoundError(f"recbole: no folder {src}")
    name = name or src.name
    if not (src / f"{name}.inter").is_file():
        found = sorted(p.name for p in src.glob("*.inter"))
        raise SchemaError(f"{name}.inter: no such file in {src}" + (f" (found: {', '.join(found)}; pass --name)"
                                                                   if found else ""))
    return src, name


def import_recbole(src: str | Path, out: str | Path, name: str | None = None, *,
                   request_days: float | None = 30, negatives: int = 20, eval_fraction: float = 0.2,
                   seed: int = 0, max_users: int | None = None, pos_rating: float = 4.0,
                   hide_rating: float = 2.0, user_field: str = "user_id", item_field: str = "item_id",
                   rating_field: str = "rating", time_field: str = "timestamp",
                   genre_field: str | None = None) -> dict:
    """Reads ``src/<name>.{inter,item,user}`` (``src`` may also be the ``.inter`` file) and
    publishes the world ``out``; returns its summary (also ``world.json``). See the module
    docstring for the mapping. ``request_days`` None: every interaction is a request.
    ``max_users``: keep only the interactions of the first N users (by id)."""
    if not 0 < eval_fraction < 1:
        raise SchemaError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if negatives < 0 or negatives + 1 > 1000:
        raise SchemaError(f"negatives must be in [0, 999], got {negatives}")
    if hide_rating >= pos_rating:
        raise SchemaError(f"hide_rating ({hide_rating}) must be below pos_rating ({pos_rating})")
    folder, name = _source_files(Path(src), name)
    inter_file = f"{name}.inter"
    inter, itypes = read_atomic(folder / inter_file)
    u_tok = _field(inter, itypes, inter_file, user_field, ("token",)).to_numpy(dtype=str)
    i_tok = _field(inter, itypes, inter_file, item_field, ("token",)).to_numpy(dtype=str)
    ts_ms = np.rint(_floats(_field(inter, itypes, inter_file, time_field, ("float",)),
                            inter_file, time_field) * 1000).astype(np.int64)
    has_rating = rating_field in itypes
    rating = (_floats(_field(inter, itypes, inter_file, rating_field, ("float",)), inter_file, rating_field)
              if has_rating else None)
    if not len(inter):
        raise SchemaError(f"{inter_file}: no interactions")

    item_tok_file, genres_by_tok, gfield = np.zeros(0, dtype=str), {}, None
    if (folder / f"{name}.item").is_file():
        item_file = f"{name}.item"
        items_df, ttypes = read_atomic(folder / item_file)
        item_tok_file = _field(items_df, ttypes, item_file, item_field, ("token",)).to_numpy(dtype=str)
        gfield = genre_field or next((g for g in GENRE_FIELDS if g in ttypes), None)
        if gfield is not None:
            gcol = _field(items_df, ttypes, item_file, gfield, ("token", "token_seq"))
            genres_by_tok = {t: (g.split() if ttypes[gfield] == "token_seq" else [g.strip()])
                             for t, g in zip(item_tok_file, gcol.to_numpy(dtype=str))}
    elif genre_field:
        raise SchemaError(f"{name}.item: no such file in {folder} (needed for --genre-field {genre_field})")
    user_tok_file = np.zeros(0, dtype=str)
    if (folder / f"{name}.user").is_file():
        user_file = f"{name}.user"
        users_df, utypes = read_atomic(folder / user_file)
        user_tok_file = _field(users_df, utypes, user_file, user_field, ("token",)).to_numpy(dtype=str)

    umap, u_kind = _id_map(np.concatenate([u_tok, user_tok_file]))
    imap, i_kind = _id_map(np.concatenate([i_tok, item_tok_file]))
    all_item_tok = np.unique(np.concatenate([i_tok, item_tok_file]))
    item_ids_unsorted = _ids(all_item_tok, imap)
    order = np.argsort(item_ids_unsorted, kind="stable")
    item_ids = item_ids_unsorted[order]
    genres = [genres_by_tok.get(t, []) for t in all_item_tok[order]]
    n_users_all = len(np.unique(np.concatenate([u_tok, user_tok_file])))

    users, items = _ids(u_tok, umap), _ids(i_tok, imap)
    if rating is None:
        action = np.full(len(users), S.ACTION_BIT["click"], dtype=np.int64)
    else:
        action = np.where(rating >= pos_rating, CLICK_REPIN,
                          np.where(rating <= hide_rating, S.ACTION_BIT["hide"], S.ACTION_BIT["click"]))
    ev = pd.DataFrame({"user_id": users, "item_id": items, "ts": ts_ms, "action": action})
    ev = ev.drop_duplicates(["user_id", "item_id", "ts"], keep="last")
    if max_users is not None:
        ev = ev[ev["user_id"].isin(np.sort(ev["user_id"].unique())[:max_users])]
    ev = ev.sort_values(["ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    min_ts = int(ev["ts"].min()) // DAY_MS * DAY_MS
    max_ts = int(ev["ts"].max())

    # ------------------------------------------------------------------ requests
    start = -np.inf if request_days is None else max_ts - float(request_days) * DAY_MS
    req_ix = np.flatnonzero(ev["ts"].to_numpy() >= start)
    e_user, e_item, e_ts, e_act = (ev[c].to_numpy() for c in ("user_id", "item_id", "ts", "action"))
    train_end_ts = int(np.quantile(e_ts[req_ix], 1 - eval_fraction))
    first_seen = ev.groupby("item_id")["ts"].min()  # catalog: an item exists from its first interaction
    cat_items = first_seen.sort_values(kind="stable").index.to_numpy()
    cat_ts = first_seen.sort_values(kind="stable").to_numpy()
    user_first = ev.groupby(["user_id", "item_id"])["ts"].min()  # per user: first interaction with an item
    seen: dict[int, dict[int, int]] = {}
    for (u, i), t in user_first.items():
        seen.setdefault(int(u), {})[int(i)] = int(t)
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in ("request_id", "user_id", "item_id", "ts", "position")}
    for rid, j in enumerate(req_ix):
        u, pos_item, t = int(e_user[j]), int(e_item[j]), int(e_ts[j])
        horizon = t + LABEL_WINDOW_MS
        mine = seen.get(u, {})
        n_cat = int(np.searchsorted(cat_ts, t, side="right"))
        neg = _sample_negatives(rng, cat_items[:n_cat], mine, horizon, negatives)
        cands = np.concatenate([[pos_item], neg]).astype(np.int64)
        positions = rng.permutation(len(cands))
        cols["request_id"].append(np.full(len(cands), rid))
        cols["user_id"].append(np.full(len(cands), u))
        cols["item_id"].append(cands)
        cols["ts"].append(np.full(len(cands), t))
        cols["position"].append(positions)
    cat = {c: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for c, v in cols.items()}
    req = {k: cat[k] for k in ("request_id", "user_id", "item_id", "ts")}
    req["surface"] = np.zeros(len(req["ts"]), dtype=np.int8)
    req["position"] = cat["position"].astype(np.int16)
    # labels by the production join: the engaged row owns its interaction (same ts), and no
    # negative owns one (none was interacted with by ts + LABEL_WINDOW_MS)
    req.update(label_requests(req, {"user_id": e_user, "item_id": e_item, "ts": e_ts, "action": e_act},
                              LABEL_WINDOW_MS))
    requests = conform(pa.table(req), S.REQUESTS, "requests")
    requests = requests.sort_by([("request_id", "ascending"), ("position", "ascending")])
    impressions = conform(requests.select(["user_id", "item_id", "ts", "surface", "request_id", "position"]),
                          S.IMPRESSIONS, "impressions")
    actions = conform(pa.table({"user_id": e_user, "item_id": e_item, "ts": e_ts,
                                "action": e_act.astype(np.uint8), "surface": np.zeros(len(ev), dtype=np.int8)}),
                      S.ACTIONS_TABLE, "actions")

    # ------------------------------------------------------------------ items
    emb, filled = item_embeddings(e_user, e_item, e_ts, item_ids, genres, train_end_ts, seed)
    emb16 = emb.astype(np.float16)
    items_t = conform(pa.table({
        "item_id": item_ids, "topic": np.full(len(item_ids), -1, dtype=np.int32),
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb16.ravel()), S.EMB_DIM),
        "emb_q": pa.FixedSizeListArray.from_arrays(pa.array(quantize(emb16).ravel()), S.EMB_DIM),
    }), S.ITEMS, "items")

    tables = {"items": items_t, "actions": actions, "impressions": impressions, "requests": requests}
    summary = {
        "source": str(folder / inter_file),
        "rows": {n: t.num_rows for n, t in tables.items()},
        "train_end_ts": train_end_ts,
        "min_ts": min_ts,
        "label_window_ms": LABEL_WINDOW_MS,
        "recbole": {
            "name": name, "interactions": int(len(ev)), "users": n_users_all,
            "users_with_interactions": int(ev["user_id"].nunique()), "items": int(len(item_ids)),
            "ids": {"user_id": u_kind, "item_id": i_kind},
            "actions": (f"{rating_field} >= {pos_rating}: click|repin; {hide_rating} < {rating_field} < "
                        f"{pos_rating}: click; {rating_field} <= {hide_rating}: hide") if has_rating
                       else "no rating field: click",
            "request_start_ts": int(max(start, min_ts)) if request_days is not None else min_ts,
            "request_days": request_days, "negatives": negatives, "seed": seed, "max_users": max_users,
            "embeddings": {"method": "truncated SVD of the binary user x item matrix, ts < train_end_ts",
                           "dims": S.EMB_DIM, "row_norm": EMB_NORM, "genre_field": gfield,
                           "filled_items": int(filled.sum()),
                           "fill": "genre mean of training items (else mean of all training items)"},
        },
    }
    with publishing(out) as stage:
        for tname, table in tables.items():
            write_table(table_path(stage, tname), table, S.TABLES[tname])
        write_world_json(stage, summary, indent=2)
    return summary


def _sample_negatives(rng: np.random.Generator, catalog: np.ndarray, seen: dict[int, int], horizon: int,
                      k: int) -> np.ndarray:
    """Up to ``k`` distinct items of ``catalog``, uniformly, none that the user interacted
    with at or before ``horizon`` (rejection sampling; exact set difference when dense)."""
    if k == 0 or not len(catalog):
        return np.zeros(0, dtype=np.int64)
    banned = {i for i, t in seen.items() if t <= horizon}
    for _ in range(4):
        draw = catalog[rng.choice(len(catalog), size=min(len(catalog), 2 * k + 8), replace=False)]
        ok = [int(i) for i in draw if int(i) not in banned]
        if len(ok) >= k:
            return np.asarray(ok[:k], dtype=np.int64)
    allowed = np.asarray([int(i) for i in catalog if int(i) not in banned], dtype=np.int64)
    return allowed[rng.permutation(len(allowed))[:k]]

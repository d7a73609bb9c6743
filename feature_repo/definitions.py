"""Feast definitions of TransAct V2's features (only Feast objects: `feast apply` imports this).

Every sequence is ONE packed ``Bytes`` feature (a "token blob", layout in README.md and
``transact.features.feast.codec``): per token ts int64, action uint8, surface int8 and
the int8 embedding[32], stored column by column. That is ~42 bytes per token, and
materialisation converts one value per user instead of ~35 per token.

Timestamps: a row's ``event_timestamp`` is the first instant at which the row is the
user's state; it holds events strictly *before* it. Feast's point-in-time join is
inclusive (feature ts <= entity ts), so a request at t reads exactly the events before t:
- lifelong snapshots are taken at multiples of the refresh period (a day);
- realtime / impression rows are written at event ts + 1 ms.
Sequences have no age limit, hence ``ttl=timedelta(0)`` (Feast: "lives forever").
"""
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Bytes, Int32, Int64

# --- entities ----------------------------------------------------------------------------

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A user of the feed.")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64,
              description="A pin (candidate or sequence token).")

# --- offline sources: parquet folders under data/offline (written by `transact features apply`)

items_source = FileSource(
    name="items_source", path="data/offline/items", timestamp_field="event_timestamp",
    description="Item content embeddings (int8, 32 bytes).")
lifelong_source = FileSource(
    name="user_lifelong_source", path="data/offline/user_lifelong",
    timestamp_field="event_timestamp",
    description="Daily lifelong-sequence snapshots, one row per user and day it changed.")
realtime_source = FileSource(
    name="user_realtime_source", path="data/offline/user_realtime",
    timestamp_field="event_timestamp",
    description="Realtime-sequence states, one row per user and action time (+1 ms).")
impressions_source = FileSource(
    name="user_impressions_source", path="data/offline/user_impressions",
    timestamp_field="event_timestamp",
    description="Impression-window states, one row per user and change (+1 ms).")

# Narrow twins of the sequence sources, for training: one row per row of the source above,
# holding only the row's own time. Feast's point-in-time join over them stays fast (the file
# offline store reads whole sources, payload included); the payload row is then read by key.
lifelong_index_source = FileSource(
    name="user_lifelong_index_source", path="data/offline/user_lifelong_index",
    timestamp_field="event_timestamp")
realtime_index_source = FileSource(
    name="user_realtime_index_source", path="data/offline/user_realtime_index",
    timestamp_field="event_timestamp")
impressions_index_source = FileSource(
    name="user_impressions_index_source", path="data/offline/user_impressions_index",
    timestamp_field="event_timestamp")

# Streaming updates reach the online store through these (FeatureStore.push).
realtime_push = PushSource(name="user_realtime_push", batch_source=realtime_source)
impressions_push = PushSource(name="user_impressions_push", batch_source=impressions_source)

# --- feature views -----------------------------------------------------------------------

item_embedding = FeatureView(
    name="item_embedding", entities=[item], ttl=timedelta(0), online=True,
    schema=[Field(name="item_id", dtype=Int64), Field(name="emb_q", dtype=Bytes)],
    source=items_source,
    description="int8[32] content embedding of an item (quantised PinSage stand-in).")

user_lifelong = FeatureView(
    name="user_lifelong", entities=[user], ttl=timedelta(0), online=True,
    schema=[Field(name="user_id", dtype=Int64), Field(name="ll_tokens", dtype=Bytes),
            Field(name="ll_len", dtype=Int32)],
    source=lifelong_source,
    description="S_LL: the last L_LL explicit actions before the daily snapshot, newest first.",
    tags={"kind": "batch", "refresh": "daily"})

user_realtime = FeatureView(
    name="user_realtime", entities=[user], ttl=timedelta(0), online=True,
    schema=[Field(name="user_id", dtype=Int64), Field(name="rt_tokens", dtype=Bytes),
            Field(name="rt_len", dtype=Int32)],
    source=realtime_push,
    description="S_RT: the last L_RT explicit actions, newest first.",
    tags={"kind": "streaming"})

user_impressions = FeatureView(
    name="user_impressions", entities=[user], ttl=timedelta(0), online=True,
    schema=[Field(name="user_id", dtype=Int64), Field(name="imp_window", dtype=Bytes),
            Field(name="imp_len", dtype=Int32)],
    source=impressions_push,
    description="The last 3 x L_imp impressions with item ids and engaged flags; S_imp is "
                "its first L_imp not-engaged tokens (derived on read).",
    tags={"kind": "streaming"})

# Training-only (online=False): which source row a point-in-time lookup lands on.
user_lifelong_index = FeatureView(
    name="user_lifelong_index", entities=[user], ttl=timedelta(0), online=False,
    schema=[Field(name="user_id", dtype=Int64), Field(name="ll_asof_ms", dtype=Int64)],
    source=lifelong_index_source,
    description="event_timestamp (ms) of the user_lifelong row in force.")
user_realtime_index = FeatureView(
    name="user_realtime_index", entities=[user], ttl=timedelta(0), online=False,
    schema=[Field(name="user_id", dtype=Int64), Field(name="rt_asof_ms", dtype=Int64)],
    source=realtime_index_source,
    description="event_timestamp (ms) of the user_realtime row in force.")
user_impressions_index = FeatureView(
    name="user_impressions_index", entities=[user], ttl=timedelta(0), online=False,
    schema=[Field(name="user_id", dtype=Int64), Field(name="imp_asof_ms", dtype=Int64)],
    source=impressions_index_source,
    description="event_timestamp (ms) of the user_impressions row in force.")

# --- what the ranking service reads --------------------------------------------------------

ranking_v2 = FeatureService(
    name="ranking_v2", features=[user_lifelong, user_realtime, user_impressions],
    description="TransAct V2 /rank: a user's lifelong, realtime and impression sequences.")
ranking_v2_items = FeatureService(
    name="ranking_v2_items", features=[item_embedding],
    description="TransAct V2 /rank: candidate item embeddings.")
training_v2 = FeatureService(
    name="training_v2", features=[user_lifelong_index, user_realtime_index, user_impressions_index],
    description="Point-in-time training lookups: the sequence rows in force at each request.")

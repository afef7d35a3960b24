"""Feast definitions for LoopFM: three entities, four feature views, one service per VM variant.

One FM serves many VMs: `fm_history` is keyed by user alone and shared by every VM, while
`vm_click_history` is keyed by (user, vertical), so each vertical's VM reads its own
vertical's clicks from the same view (a VM's `model.json` names its vertical).

Sources are the parquet tables `loopfm features build` writes to $LOOPFM_RUN_DIR/features.
Sequences are packed bytes (int32 item ids; int4 FM codes, code_dim/2 bytes each), oldest
first, so a user's whole history is one Redis hash field.
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Bytes, Int64

SOURCES = Path(os.environ.get("LOOPFM_RUN_DIR", Path(__file__).parent / "data")) / "features"
# Long enough to cover any run; feature views' ttl bounds only offline point-in-time lookback.
TTL = timedelta(days=3650)


def _source(name: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=str(SOURCES / f"{name}.parquet"), timestamp_field="event_timestamp")


def _pushed(name: str) -> PushSource:
    """Histories also arrive between materializations: `loopfm ingest` pushes the new
    snapshot of each touched user here (Feast's push API); the batch source stays the parquet."""
    return PushSource(name=f"{name}_push", batch_source=_source(name))


user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A person seeing impressions")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A rankable item")
vertical = Entity(name="vertical", join_keys=["vertical"], value_type=ValueType.STRING, description="A surface with its own VM")

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=TTL,
    schema=[Field(name="age_bucket", dtype=Int64), Field(name="gender", dtype=Int64)],
    source=_source("user_profile"),
)

item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=TTL,
    schema=[
        Field(name="category", dtype=Int64),
        Field(name="brand", dtype=Int64),
        Field(name="price_bucket", dtype=Int64),
    ],
    source=_source("item_features"),
)

vm_click_history = FeatureView(
    name="vm_click_history",
    entities=[user, vertical],
    ttl=TTL,
    schema=[Field(name="item_ids", dtype=Bytes, description="last L clicked item ids in this vertical, int32 LE")],
    source=_pushed("vm_click_history"),
)

fm_history = FeatureView(
    name="fm_history",
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name="fm_codes", dtype=Bytes, description="last L FM codes of clicked events, int4 packed"),
        Field(name="fm_newest_available_at_us", dtype=Int64, description="unix µs: when the newest code became available"),
        Field(name="fm_trained_until_us", dtype=Int64, description="unix µs: newest data any code's FM checkpoint saw"),
    ],
    source=_pushed("fm_history"),
)

_vm_features = [user_profile, item_features, vm_click_history]
vm_base = FeatureService(name="vm_base", features=_vm_features)
vm_kd = FeatureService(name="vm_kd", features=_vm_features, description="KD labels come with the entity rows")
vm_loopfm = FeatureService(name="vm_loopfm", features=[*_vm_features, fm_history])
vm_loopfm_kd = FeatureService(name="vm_loopfm_kd", features=[*_vm_features, fm_history])

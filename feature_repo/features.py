"""Feast definitions for LoopFM: three entities, five feature views, one service per VM variant.

One FM serves many VMs: `fm_history` is keyed by user alone and shared by every VM, while
`vm_click_history` is keyed by (user, vertical), so each vertical's VM reads its own
vertical's clicks from the same view (a VM's `model.json` names its vertical).

Sources are the parquet tables `loopfm features build` writes to $LOOPFM_RUN_DIR/features.
Sequences are packed bytes (int32 item ids; int4 FM codes, code_dim/2 bytes each), oldest
first, so a user's whole history is one Redis hash field.

The user and item join keys hold the ids of the user's own logs, int64 or strings per entity
as recorded in $LOOPFM_RUN_DIR/features/entity_types.json; the packed histories and the
`item_index` feature hold the models' dense indices.
"""

import json
import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Bytes, Int64

from loopfm.contract.names import (
    ENTITY_TYPES_FILE,
    ID_INT64,
    ID_STRING,
    FM_HISTORY,
    FM_HISTORY_FEATURES,
    ITEM_FEATURES,
    ITEM_ACTIVITY,
    ITEM_COUNT_FEATURES,
    ITEM_FEATURES_VIEW,
    ITEM_INDEX,
    ITEM_KEY,
    USER_FEATURES,
    USER_KEY,
    USER_PROFILE,
    VERTICAL_KEY,
    VM_CLICK_HISTORY,
    VM_COUNT_FEATURES,
    VM_HISTORY_FEATURE,
    feature_service,
)

SOURCES = Path(os.environ.get("LOOPFM_RUN_DIR", Path(__file__).parent / "data")) / "features"
# Long enough to cover any run; feature views' ttl bounds only offline point-in-time lookback.
TTL = timedelta(days=3650)


def _source(name: str) -> FileSource:
    return FileSource(name=f"{name}_source", path=str(SOURCES / f"{name}.parquet"), timestamp_field="event_timestamp")


def _pushed(name: str) -> PushSource:
    """A push source over the parquet batch source, for a producer that pushes fresh snapshots
    through Feast's push API; loopfm's own live loop writes Feast's Redis layout directly
    (loopfm/stream/online.py) and pushes nothing here."""
    return PushSource(name=f"{name}_push", batch_source=_source(name))


def _id_type(key: str) -> ValueType:
    """The join key's type as `loopfm features build` recorded it (loopfm/data/ids.py): the
    source ids are int64 or strings; Int64 for sources written without a record."""
    path = SOURCES / ENTITY_TYPES_FILE
    recorded = json.loads(path.read_text()).get(key, ID_INT64) if path.exists() else ID_INT64
    return {ID_INT64: ValueType.INT64, ID_STRING: ValueType.STRING}[recorded]


user = Entity(name="user", join_keys=[USER_KEY], value_type=_id_type(USER_KEY), description="A person seeing impressions")
item = Entity(name="item", join_keys=[ITEM_KEY], value_type=_id_type(ITEM_KEY), description="A rankable item")
vertical = Entity(name="vertical", join_keys=[VERTICAL_KEY], value_type=ValueType.STRING, description="A surface with its own VM")

user_profile = FeatureView(
    name=USER_PROFILE,
    entities=[user],
    ttl=TTL,
    schema=[Field(name=name, dtype=Int64) for name in USER_FEATURES],
    source=_source(USER_PROFILE),
)

item_features = FeatureView(
    name=ITEM_FEATURES_VIEW,
    entities=[item],
    ttl=TTL,
    schema=[Field(name=name, dtype=Int64, description="dense index in the VM's item vocabulary" if name == ITEM_INDEX else "")
            for name in ITEM_FEATURES],
    source=_source(ITEM_FEATURES_VIEW),
)

_item_impressions, _item_clicks = ITEM_COUNT_FEATURES
item_activity = FeatureView(
    name=ITEM_ACTIVITY,
    entities=[item],
    ttl=TTL,
    schema=[
        Field(name=_item_impressions, dtype=Int64, description="the item's impressions so far, by every user"),
        Field(name=_item_clicks, dtype=Int64, description="the item's clicks so far, by every user"),
    ],
    source=_pushed(ITEM_ACTIVITY),
)

_impressions, _clicks = VM_COUNT_FEATURES
vm_click_history = FeatureView(
    name=VM_CLICK_HISTORY,
    entities=[user, vertical],
    ttl=TTL,
    schema=[
        Field(name=VM_HISTORY_FEATURE, dtype=Bytes, description="last L clicked item ids in this vertical, int32 LE"),
        Field(name=_impressions, dtype=Int64, description="the user's impressions in this vertical so far"),
        Field(name=_clicks, dtype=Int64, description="the user's clicks in this vertical so far"),
    ],
    source=_pushed(VM_CLICK_HISTORY),
)

_codes, _newest, _trained_until = FM_HISTORY_FEATURES
fm_history = FeatureView(
    name=FM_HISTORY,
    entities=[user],
    ttl=TTL,
    schema=[
        Field(name=_codes, dtype=Bytes, description="last L FM codes of the user's events (fm.history_events: every impression or clicks only), int4 or fp32 packed"),
        Field(name=_newest, dtype=Int64, description="unix µs: when the newest code became available"),
        Field(name=_trained_until, dtype=Int64, description="unix µs: newest data any code's FM checkpoint saw"),
    ],
    source=_pushed(FM_HISTORY),
)

_vm_features = [user_profile, item_features, item_activity, vm_click_history]
vm_base = FeatureService(name=feature_service("base"), features=_vm_features)
vm_kd = FeatureService(name=feature_service("kd"), features=_vm_features, description="KD labels come with the entity rows")
vm_loopfm = FeatureService(name=feature_service("loopfm"), features=[*_vm_features, fm_history])
vm_loopfm_kd = FeatureService(name=feature_service("loopfm_kd"), features=[*_vm_features, fm_history])

"""Names and sizes that training and serving must agree on (feature_repo/features.py defines
the Feast objects with them; exported model.json files carry them to the server)."""

from __future__ import annotations

PROJECT = "loopfm"  # feature_repo/feature_store.yaml's `project`, the suffix of every Redis key

# Entity join keys. The user and item keys hold the ids of the user's own logs (source ids), as
# int64 or as strings per entity: a run records its types in features/ENTITY_TYPES_FILE (read by
# feature_repo/), an exported model in model.json's `entity_types` (read by the server).
USER_KEY, ITEM_KEY, VERTICAL_KEY = "user_id", "item_id", "vertical"
ID_INT64, ID_STRING = "int64", "string"  # Feast ValueType.INT64 / ValueType.STRING
ENTITY_TYPES_FILE = "entity_types.json"

# Feature views and their features.
USER_PROFILE = "user_profile"
ITEM_FEATURES_VIEW = "item_features"
VM_CLICK_HISTORY = "vm_click_history"
FM_HISTORY = "fm_history"
ITEM_ACTIVITY = "item_activity"
USER_FEATURES = ("age_bucket", "gender")
ITEM_INDEX = "item_index"  # the item's dense index in the models' vocabulary (loopfm/data/ids.py)
ITEM_FEATURES = (ITEM_INDEX, "category", "brand", "price_bucket")  # the candidate tensor's columns, in order
VM_HISTORY_FEATURE = "item_ids"  # packed int32 item ids, oldest first
VM_COUNT_FEATURES = ("impressions", "clicks")  # the user's counts so far in the VM's vertical
ITEM_COUNT_FEATURES = ("item_impressions", "item_clicks")  # the item's counts so far, by every user
CANDIDATE_FEATURES = (*ITEM_FEATURES, *ITEM_COUNT_FEATURES)  # what contract/tensorize.candidate_tensors reads
FM_HISTORY_FEATURE = "fm_codes"  # packed codes (contract/codec.py), oldest first
FM_HISTORY_FEATURES = (FM_HISTORY_FEATURE, "fm_newest_available_at_us", "fm_trained_until_us")
VIEW_FEATURES = {
    USER_PROFILE: USER_FEATURES,  # keyed by user_id
    FM_HISTORY: FM_HISTORY_FEATURES,  # keyed by user_id, shared by every vertical's VM
    VM_CLICK_HISTORY: (VM_HISTORY_FEATURE, *VM_COUNT_FEATURES),  # keyed by (user_id, vertical)
    ITEM_FEATURES_VIEW: ITEM_FEATURES,  # keyed by item_id
    ITEM_ACTIVITY: ITEM_COUNT_FEATURES,  # keyed by item_id
}


def views(*names: str) -> dict[str, list[str]]:
    """{view: [features]} of the named feature views, as model.json and the reader take them."""
    return {name: list(VIEW_FEATURES[name]) for name in names}


def ready_marker(project: str) -> bytes:
    """The key `loopfm features apply` sets once `feast materialize` has written `project`'s
    features (loopfm/features/store.py): the server's /readyz tells an empty store from a
    filled one. A push does not set it: it writes only its batch's users."""
    return f"loopfm:materialized:{project}".encode()


def feature_service(variant: str) -> str:
    """The Feast feature service a VM variant reads: vm_<variant>."""
    return f"vm_{variant}"


# Vocabularies fixed by the canonical schema (categorical values are 0 .. n-1).
N_HOURS = 24
N_AGE_BUCKETS = 6  # the six MovieLens-1M age groups
N_GENDERS = 2
N_PRICE_BUCKETS = 10  # price deciles
N_RATE_BUCKETS = 96  # a user's (or an item's) click rate so far: bins of 0.125 in log-odds over [-7, 5] (contract/tensorize.activity_buckets)
RATE_LOGIT_LOW, RATE_LOGIT_BIN = -7.0, 0.125  # rates 0.09% .. 99.3%; bins of 0.25 cost a regression on the bucket centres 0.001-0.003 AUC against the exact rates (docs/training.md, "Click rates so far")
N_COUNT_BUCKETS = 12  # a user's impressions so far: floor(log2(n + 1)), capped

# ONNX graph inputs: request-side ones for the request's one user, candidate-side ones once per candidate.
USER_SIDE_INPUTS = ("user_context", "vm_history", "fm_codes", "fm_mask")


def input_names(use_fm_history: bool) -> list[str]:
    """The exported graph's input names, in the order of ServingHead's arguments."""
    names = ["user_context", "vm_history", "candidates"]
    return names + ["fm_codes", "fm_mask"] if use_fm_history else names


def items_written_key(project: str) -> str:
    """Redis stream: one entry per micro-batch of the live loop that wrote items' online
    values, {items: JSON list of their source ids}, appended after the writes; the servers'
    item caches drop those rows (serving/item_cache.py)."""
    return f"loopfm:{project}:items-written"

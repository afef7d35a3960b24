"""The loop's online writes, in Feast's Redis layout (serving/feast_layout.py), so that
`get_online_features` and `/score` read them unchanged.

Feast's own writer is not used: it reads the stored `_ts` and skips a write whose event
second is not newer (feast/infra/online_stores/redis.py, `online_write_batch`), so several
events of one user within a second would be lost. Each write here is idempotent instead:

- a user's running state lives in the user's own Feast hash (field `_loopfm:state`) and is
  written in the same HSET as the user's `fm_history` features, so both change together;
- `vm_click_history` (keyed by user and vertical) is rewritten from that state, an absolute
  value, whenever the user's events are applied or re-applied;
- an item's counts change in a script on the item's hash that skips every stream entry at or
  before the newest it applied from that entry's partition;
- new source ids get the next dense index from a script on one hash, once.

Every script touches one key, so all of it runs on Redis Cluster.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from loopfm.contract.names import (
    FM_HISTORY,
    FM_HISTORY_FEATURES,
    ITEM_ACTIVITY,
    ITEM_COUNT_FEATURES,
    ITEM_FEATURES,
    ITEM_FEATURES_VIEW,
    ITEM_KEY,
    USER_KEY,
    VERTICAL_KEY,
    VM_CLICK_HISTORY,
    VM_COUNT_FEATURES,
    VM_HISTORY_FEATURE,
)
from loopfm.stream.state import UserState
from serving.feast_layout import encode_bytes, encode_int64, entity_key, feature_field, timestamp_field

STATE_FIELD = b"_loopfm:state"
ITEM_IMPRESSIONS, ITEM_CLICKS = b"_loopfm:n", b"_loopfm:k"  # an item's counts as plain integers

# KEYS[1]: an item's hash. ARGV: watermark field, impressions field, clicks field, _ts field,
# _ts value, then one (ms, seq, label) triple per event of this item, in stream order.
ITEM_COUNTS_SCRIPT = """
local function varint(n)
  local out = {}
  while n >= 128 do out[#out + 1] = string.char(n % 128 + 128); n = math.floor(n / 128) end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
local w = redis.call('HGET', KEYS[1], ARGV[1])
local wms, wseq = -1, -1
if w then
  local dash = string.find(w, '-', 1, true)
  wms, wseq = tonumber(string.sub(w, 1, dash - 1)), tonumber(string.sub(w, dash + 1))
end
local n = tonumber(redis.call('HGET', KEYS[1], '_loopfm:n') or '0')
local k = tonumber(redis.call('HGET', KEYS[1], '_loopfm:k') or '0')
local last = nil
for i = 6, #ARGV, 3 do
  local ms, seq = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if ms > wms or (ms == wms and seq > wseq) then
    n, k = n + 1, k + tonumber(ARGV[i + 2])
    wms, wseq, last = ms, seq, ARGV[i] .. '-' .. ARGV[i + 1]
  end
end
if last then
  -- int64 Feast values: protobuf field 4 (int64_val), wire type 0 -> tag byte 32
  redis.call('HSET', KEYS[1], '_loopfm:n', n, '_loopfm:k', k, ARGV[1], last,
             ARGV[2], '\\32' .. varint(n), ARGV[3], '\\32' .. varint(k), ARGV[4], ARGV[5])
end
return {n, k}
"""

# KEYS[1]: one entity's hash of new ids. ARGV: "id:" .. source id, the run's id-map size. The
# first call's size is kept (`_base`): `features build` grows the id maps on disk with these
# ids, and a worker started after that must go on from the same base, not from the grown size.
NEW_ID_SCRIPT = """
local d = redis.call('HGET', KEYS[1], ARGV[1])
if d then return tonumber(d) end
redis.call('HSETNX', KEYS[1], '_base', ARGV[2])
d = redis.call('HINCRBY', KEYS[1], '_next', 1) - 1 + tonumber(redis.call('HGET', KEYS[1], '_base'))
redis.call('HSET', KEYS[1], ARGV[1], d)
return d
"""


def timestamp_value(unix_us: int) -> bytes:
    """A Feast `_ts:<view>` value: a protobuf Timestamp."""
    ts = Timestamp(seconds=unix_us // 1_000_000, nanos=(unix_us % 1_000_000) * 1000)
    return ts.SerializeToString()


def user_key(project: str, user: int | str) -> bytes:
    return entity_key((USER_KEY,), (user,), project)


def item_key(project: str, item: int | str) -> bytes:
    return entity_key((ITEM_KEY,), (item,), project)


def user_vertical_key(project: str, user: int | str, vertical: str) -> bytes:
    return entity_key((USER_KEY, VERTICAL_KEY), (user, vertical), project)


def user_fields(state: UserState, write_us: int) -> dict[bytes, bytes]:
    """The user's hash fields: its running state and its `fm_history` features."""
    codes, newest, until = FM_HISTORY_FEATURES
    return {
        STATE_FIELD: state.to_bytes(),
        feature_field(FM_HISTORY, codes): encode_bytes(b"".join(bytes.fromhex(c) for c in state.fm_codes)),
        feature_field(FM_HISTORY, newest): encode_int64(state.fm_newest_available_us),
        feature_field(FM_HISTORY, until): encode_int64(state.fm_trained_until_us),
        timestamp_field(FM_HISTORY): timestamp_value(write_us),
    }


def vm_history_fields(state: UserState, vertical: str, write_us: int) -> dict[bytes, bytes]:
    """The (user, vertical) hash's `vm_click_history` features, from the state."""
    impressions, clicks = state.counts(vertical, include_at=True)
    items = np.asarray(state.vm_clicks.get(vertical, []), dtype="<i4").tobytes()
    n_field, k_field = VM_COUNT_FEATURES
    return {
        feature_field(VM_CLICK_HISTORY, VM_HISTORY_FEATURE): encode_bytes(items),
        feature_field(VM_CLICK_HISTORY, n_field): encode_int64(impressions),
        feature_field(VM_CLICK_HISTORY, k_field): encode_int64(clicks),
        timestamp_field(VM_CLICK_HISTORY): timestamp_value(write_us),
    }


def item_count_args(partition: int, entries: Sequence[tuple[str, int]], write_us: int) -> list:
    """ARGV of ITEM_COUNTS_SCRIPT for one item's events [(entry id, label)] of one partition."""
    n_field, k_field = ITEM_COUNT_FEATURES
    args: list = [f"_loopfm:applied:{partition}", feature_field(ITEM_ACTIVITY, n_field),
                  feature_field(ITEM_ACTIVITY, k_field), timestamp_field(ITEM_ACTIVITY), timestamp_value(write_us)]  # fmt: skip
    for entry_id, label in entries:
        ms, _, seq = entry_id.partition("-")
        args += [ms, seq or "0", label]
    return args


def item_feature_fields(dense: int, category: int, brand: int, price_bucket: int, write_us: int) -> dict[bytes, bytes]:
    """A catalog upsert's `item_features`: the item's dense index and attributes."""
    values = dict(zip(ITEM_FEATURES, (dense, category, brand, price_bucket)))
    return {**{feature_field(ITEM_FEATURES_VIEW, f): encode_int64(v) for f, v in values.items()},
            timestamp_field(ITEM_FEATURES_VIEW): timestamp_value(write_us)}  # fmt: skip


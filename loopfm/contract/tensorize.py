"""Feature rows -> model input arrays. The one tensorization that training and serving share.

NumPy only (the server imports it). Training feeds it the columns of a
`get_historical_features` frame; the server feeds it the values it read from Redis.
Missing values (unknown user, unknown item, empty history) become index 0 or an empty,
masked history, never an error. Every categorical index is shifted by one so 0 means
"unknown"; values outside the vocabulary also map to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from loopfm.contract.codec import code_bytes, decode_codes, unpack_int4
from loopfm.contract.names import (
    FM_HISTORY_FEATURE,
    ITEM_COUNT_FEATURES,
    ITEM_FEATURES,
    N_AGE_BUCKETS,
    N_COUNT_BUCKETS,
    N_GENDERS,
    N_HOURS,
    N_PRICE_BUCKETS,
    N_RATE_BUCKETS,
    RATE_LOGIT_BIN,
    RATE_LOGIT_LOW,
    USER_FEATURES,
    VM_COUNT_FEATURES,
    VM_HISTORY_FEATURE,
)


@dataclass(frozen=True)
class TensorSpec:
    """Shapes and vocabularies the model was trained with (saved beside the model)."""

    history_length: int
    code_dim: int
    n_items: int
    n_categories: int
    n_brands: int
    n_price_buckets: int = N_PRICE_BUCKETS
    n_age_buckets: int = N_AGE_BUCKETS
    n_genders: int = N_GENDERS
    code_format: str = "int4"  # int4 | fp32 (loopfm/contract/codec.py)
    item_activity: bool = False  # candidates carry the item's click-rate and count buckets (vm.item_activity)

    @property
    def user_context_vocab(self) -> tuple[int, ...]:
        """age, gender, hour, click-rate bucket, impression-count bucket (each +1; 0 = unknown)."""
        return (self.n_age_buckets + 1, self.n_genders + 1, N_HOURS + 1, N_RATE_BUCKETS + 1, N_COUNT_BUCKETS + 1)

    @property
    def candidate_vocab(self) -> tuple[int, ...]:
        """item index, category, brand, price bucket, then (item_activity) the item's click-rate
        and impression-count buckets (each +1; 0 = unknown)."""
        ids = (self.n_items + 1, self.n_categories + 1, self.n_brands + 1, self.n_price_buckets + 1)
        return (*ids, N_RATE_BUCKETS + 1, N_COUNT_BUCKETS + 1) if self.item_activity else ids


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _as_int(v: Any) -> int:
    """-1 (unknown) for missing values and for values of the wrong kind (a corrupt store)."""
    if _missing(v) or isinstance(v, (str, bytes)):
        return -1
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return -1


def _id_matrix(columns: Sequence[Sequence[Any]], vocab: Sequence[int],
               counts: tuple[Sequence[Any], Sequence[Any]] | None = None) -> np.ndarray:  # fmt: skip
    """Categorical columns of U values each -> [U, len(columns)] int64 indices, shifted by one
    (missing, malformed or outside the column's vocabulary in `vocab` -> 0); with `counts`
    (impressions, clicks), then their two activity bucket columns -> [U, len(columns) + 2].
    One array and one range check for every column, not one per column and a stack: a request
    has one user, and a NumPy call costs more than its few values."""
    ids = np.array([[_as_int(v) for v in column] for column in columns], dtype=np.int64).T + 1
    ids[(ids < 0) | (ids >= np.asarray(vocab))] = 0
    if counts is None:
        return np.ascontiguousarray(ids)
    out = np.empty((len(ids), len(columns) + 2), dtype=np.int64)
    out[:, : len(columns)] = ids
    out[:, len(columns)], out[:, len(columns) + 1] = activity_buckets(*counts)
    return out


def activity_buckets(impressions: Sequence[Any], clicks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """A user's counts so far -> (click-rate bucket, impression-count bucket) [U] each, +1 shifted.

    Rate: Laplace-smoothed (clicks + 1) / (impressions + 2), so a new user sits at 0.5 and the
    count bucket says how little that rests on, in N_RATE_BUCKETS bins of RATE_LOGIT_BIN in
    log-odds from RATE_LOGIT_LOW (equal bins in the rate put every user of a 1% CTR log in the
    first bin; measured in docs/training.md); count:
    floor(log2(impressions + 1)) capped at N_COUNT_BUCKETS - 1. Missing or inconsistent counts
    (clicks outside 0..impressions) -> 0, unknown."""
    n = np.array([_as_int(v) for v in impressions], dtype=np.int64)
    k = np.array([_as_int(v) for v in clicks], dtype=np.int64)
    return activity_bucket_arrays(n, k)


def activity_bucket_arrays(n: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`activity_buckets` of int64 arrays [U] of impressions `n` and clicks `k` (-1: missing)."""
    valid = (n >= 0) & (k >= 0) & (k <= n)
    log_odds = np.log(np.maximum(k, 0) + 1.0) - np.log(np.maximum(n - k, 0) + 1.0)
    rate = np.floor((log_odds - RATE_LOGIT_LOW) / RATE_LOGIT_BIN)
    rate_bucket = np.minimum(np.maximum(rate, 0), N_RATE_BUCKETS - 1).astype(np.int64) + 1  # np.clip without its Python wrapper
    count_bucket = np.minimum(np.log2(np.maximum(n, 0) + 1).astype(np.int64), N_COUNT_BUCKETS - 1) + 1
    return np.where(valid, rate_bucket, 0), np.where(valid, count_bucket, 0)


def rate_bucket_log_odds() -> np.ndarray:
    """[N_RATE_BUCKETS + 1] float32: the log-odds at the centre of each click-rate bucket of
    `activity_bucket_arrays`, 0 for bucket 0 (unknown). A model's wide part multiplies it by a
    learned weight, so a click rate so far enters the logit linearly, as in a logistic
    regression on it (measured in docs/training.md, "Click rates so far")."""
    centres = RATE_LOGIT_LOW + (np.arange(N_RATE_BUCKETS) + 0.5) * RATE_LOGIT_BIN
    return np.concatenate([[0.0], centres]).astype(np.float32)


def _unpack_sequences(blobs: Sequence[Any], length: int, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed per-user sequences (oldest first) -> right-aligned rows [U, length, row_bytes]
    keeping the newest `length`, and a mask [U, length] of the positions that hold a row."""
    out = np.zeros((len(blobs), length, row_bytes), dtype=np.uint8)
    counts = np.zeros(len(blobs), dtype=np.int64)
    for u, blob in enumerate(blobs):
        if not isinstance(blob, (bytes, bytearray)) or not blob:  # missing, or not a packed sequence
            continue
        rows = np.frombuffer(blob, dtype=np.uint8)
        rows = rows[: rows.size - rows.size % row_bytes].reshape(-1, row_bytes)[-length:]
        counts[u] = len(rows)
        if counts[u]:
            out[u, length - counts[u] :] = rows
    mask = np.arange(length)[None, :] >= (length - counts)[:, None]
    return out, mask


def decode_item_history(blobs: Sequence[Any], length: int, n_items: int) -> np.ndarray:
    """int32 item-id sequences -> [U, length] indices (item id + 1; 0 = padding or unknown)."""
    packed, mask = _unpack_sequences(blobs, length, 4)
    ids = np.where(mask, packed.view("<i4")[..., 0].astype(np.int64) + 1, 0)
    ids[(ids < 0) | (ids > n_items)] = 0
    return ids


def decode_fm_history(
    blobs: Sequence[Any], length: int, code_dim: int, code_format: str = "int4"
) -> tuple[np.ndarray, np.ndarray]:
    """Code sequences -> codes [U, length, code_dim] float32 and mask [U, length] float32."""
    packed, mask = _unpack_sequences(blobs, length, code_bytes(code_dim, code_format))
    mask = mask.astype(np.float32)
    if code_format == "int4":
        codes = _INT4_CODES[packed].reshape(*packed.shape[:-1], code_dim)
    else:
        codes = decode_codes(packed, code_format)
    return codes * mask[:, :, None], mask


# [256, 2] float32: the two codes of every int4 byte (codec.unpack_int4), so decoding a history is
# one gather instead of unpack_int4's shifts, stack and casts.
_INT4_CODES = unpack_int4(np.arange(256, dtype=np.uint8)[:, None])


def request_tensors(
    users: Mapping[str, Sequence[Any]], hours: Sequence[Any], spec: TensorSpec
) -> dict[str, np.ndarray]:
    """Request-side inputs for U users: context ids (profile, hour, activity buckets), own click
    history, FM code history."""
    age_vocab, gender_vocab, hour_vocab, _, _ = spec.user_context_vocab
    age, gender = USER_FEATURES
    user_context = _id_matrix(
        [users[age], users[gender], hours], (age_vocab, gender_vocab, hour_vocab), tuple(users[f] for f in VM_COUNT_FEATURES)
    )
    tensors = {
        "user_context": user_context,
        "vm_history": decode_item_history(users[VM_HISTORY_FEATURE], spec.history_length, spec.n_items),
    }
    if FM_HISTORY_FEATURE in users:
        tensors["fm_codes"], tensors["fm_mask"] = decode_fm_history(
            users[FM_HISTORY_FEATURE], spec.history_length, spec.code_dim, spec.code_format
        )
    return tensors


def model_inputs(
    users: Mapping[str, Sequence[Any]], hours: Sequence[Any], candidates: np.ndarray, spec: TensorSpec,
    candidate_user: np.ndarray | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every model input: U users' request-side tensors (request_tensors), the candidates
    [C, 4 or 6] (candidate_tensors) and, when given (training), candidate_user [C], the user
    row of each candidate. Without it there is one user (a request; the exported graph)."""
    tensors = request_tensors(users, hours, spec)
    tensors["candidates"] = candidates
    if candidate_user is not None:
        tensors["candidate_user"] = candidate_user
    return tensors


def one_request_inputs(
    user: Mapping[str, Sequence[Any]], hour: int, items: Mapping[str, Sequence[Any]], spec: TensorSpec
) -> dict[str, np.ndarray]:
    """All model inputs of one request (one user row, many candidates) from plain feature values."""
    return model_inputs(user, [hour], candidate_tensors(items, spec), spec)


def candidate_tensors(items: Mapping[str, Sequence[Any]], spec: TensorSpec) -> np.ndarray:
    """Candidate-side input [C, 4 or 6] from the item features (ITEM_FEATURES, C values each): the
    item's dense index (the `item_index` feature, not the source id), category, brand, price
    bucket (each +1; 0 = unknown, e.g. an item without stored features); with
    `spec.item_activity`, then the item's click-rate and count buckets from its counts
    so far (ITEM_COUNT_FEATURES, as `activity_buckets`; 0 where they are missing)."""
    counts = tuple(items[f] for f in ITEM_COUNT_FEATURES) if spec.item_activity else None
    return _id_matrix([items[f] for f in ITEM_FEATURES], spec.candidate_vocab[: len(ITEM_FEATURES)], counts)

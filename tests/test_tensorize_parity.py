"""Train/serve parity of the shared tensorization at the sizes each side uses it.

Training tensorizes many users and candidates in one call; the server one user and C
candidates per request, the candidates' rows partly from its item cache (rows tensorized for
earlier requests). Both must give byte-identical inputs: same values, dtypes, shapes and
C-contiguous layout, on a built run's real feature rows and on malformed ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from loopfm.contract.codec import code_bytes, encode_codes, unpack_int4
from loopfm.contract.names import (
    CANDIDATE_FEATURES,
    FM_HISTORY_FEATURE,
    USER_FEATURES,
    VM_COUNT_FEATURES,
    VM_HISTORY_FEATURE,
)
from loopfm.contract.tensorize import TensorSpec, candidate_tensors, decode_fm_history, model_inputs, request_tensors
from loopfm.core.config import RunConfig

USER_SIDE = (*USER_FEATURES, *VM_COUNT_FEATURES, VM_HISTORY_FEATURE, FM_HISTORY_FEATURE)
UNKNOWN = 10**9  # an id no run has
CANDIDATE_COUNTS = (1, 10, 100, 1000)


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert (x.dtype, x.shape, x.flags.c_contiguous) == (y.dtype, y.shape, y.flags.c_contiguous), name
        assert x.tobytes() == y.tobytes(), name


def one_user(users: dict[str, list[Any]], u: int) -> dict[str, list[Any]]:
    """User `u`'s row as the Scorer holds it: one value per feature."""
    return {f: [values[u]] for f, values in users.items()}


def assert_serving_equals_training(users: dict[str, list[Any]], hours: list[int], items: dict[str, list[Any]], spec: TensorSpec) -> None:
    """Each user alone (a request, its candidates' rows gathered from ones tensorized earlier, as
    the item cache does) == that user's row of the batch (training), for every candidate count."""
    batch = request_tensors(users, hours, spec)
    catalog = candidate_tensors(items, spec)
    n_items = len(catalog)
    rng = np.random.default_rng(0)
    for u in range(len(hours)):
        chosen = rng.integers(0, n_items, CANDIDATE_COUNTS[u % len(CANDIDATE_COUNTS)])
        fresh = candidate_tensors({f: [items[f][i] for i in chosen] for f in items}, spec)
        assert_identical({"candidates": fresh}, {"candidates": catalog[chosen]})
        served = model_inputs(one_user(users, u), [hours[u]], catalog[chosen], spec)
        expected = {name: t[u : u + 1] for name, t in batch.items()}
        assert_identical(served, {**{k: np.ascontiguousarray(v) for k, v in expected.items()}, "candidates": catalog[chosen]})


def newest(path: Path, keys: list[str]) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    return frame.sort_values("event_timestamp").groupby(keys).tail(1).set_index(keys)


def column(frame: pd.DataFrame, feature: str, ids: list[int]) -> list[Any]:
    """Stored values of `ids` as the online reader returns them: Python scalars or bytes, None
    for an entity without a row."""
    values = frame[feature]
    return [(values.at[i].item() if hasattr(values.at[i], "item") else values.at[i]) if i in values.index else None for i in ids]


def test_one_user_requests_equal_the_training_batch_on_a_built_runs_rows(built_run: Path, run_config: RunConfig):
    features = built_run / "features"
    fm_config, length = run_config.fm, run_config.vm.history_length
    spec = TensorSpec(history_length=length, code_dim=fm_config.code_dim, code_format=fm_config.code_format,
                      n_items=10_000, n_categories=100, n_brands=1_000, item_activity=True)  # fmt: skip
    history = newest(features / "vm_click_history.parquet", ["user_id", "vertical"])
    history = history.xs(history.index.get_level_values("vertical")[0], level="vertical")
    profile = newest(features / "user_profile.parquet", ["user_id"])
    fm = newest(features / "fm_history.parquet", ["user_id"])
    user_ids = sorted(set(profile.index))[:150] + [UNKNOWN]
    users = {f: column(profile, f, user_ids) for f in USER_FEATURES}
    users |= {f: column(history, f, user_ids) for f in (*VM_COUNT_FEATURES, VM_HISTORY_FEATURE)}
    users[FM_HISTORY_FEATURE] = column(fm, FM_HISTORY_FEATURE, user_ids)
    assert any(b == b"" for b in users[VM_HISTORY_FEATURE]) or None in users[VM_HISTORY_FEATURE]  # empty histories
    item_frames = [newest(features / f"{name}.parquet", ["item_id"]) for name in ("item_features", "item_activity")]
    item_ids = sorted(item_frames[0].index) + [UNKNOWN, UNKNOWN + 1]
    items = {f: column(next(fr for fr in item_frames if f in fr), f, item_ids) for f in CANDIDATE_FEATURES}
    hours = [u % 24 for u in range(len(user_ids))]
    assert_serving_equals_training(users, hours, items, spec)
    short = dataclasses.replace(spec, history_length=3)  # most histories longer than kept: truncated to the newest
    assert any(isinstance(b, bytes) and len(b) > 3 * code_bytes(spec.code_dim, spec.code_format) for b in users[FM_HISTORY_FEATURE])
    assert_serving_equals_training(users, hours, items, short)


@pytest.mark.parametrize("code_format", ["int4", "fp32"])
@pytest.mark.parametrize("item_activity", [False, True])
def test_one_user_requests_equal_the_training_batch_on_malformed_and_edge_rows(code_format: str, item_activity: bool):
    spec = TensorSpec(history_length=8, code_dim=4, n_items=50, n_categories=5, n_brands=7, code_format=code_format, item_activity=item_activity)
    rng = np.random.default_rng(1)
    odd = [None, float("nan"), "x", b"\x01", float("inf"), -3, 10**6]
    n_users = 60

    def value(k: int, high: int) -> Any:
        return odd[k % len(odd)] if k % 3 == 0 else int(rng.integers(0, high))

    def history(k: int, rows: np.ndarray) -> Any:
        if k % 7 == 0:
            return [None, b"", "text", b"\x01\x02\x03"][k // 7 % 4]
        n = int(rng.integers(1, 20))
        return rows[:n].tobytes() + (b"\x09" if k % 5 == 0 else b"")  # a trailing partial row is dropped

    codes = encode_codes(rng.uniform(-1, 1, (20, 4)), code_format)
    item_rows = rng.integers(-2, 60, 20).astype("<i4")
    users = {
        "age_bucket": [value(k, 9) for k in range(n_users)],
        "gender": [value(k + 1, 4) for k in range(n_users)],
        "impressions": [value(k + 2, 1000) for k in range(n_users)],
        "clicks": [value(k + 4, 50) for k in range(n_users)],
        VM_HISTORY_FEATURE: [history(k, item_rows) for k in range(n_users)],
        FM_HISTORY_FEATURE: [history(k + 3, codes) for k in range(n_users)],
    }
    items = {f: [value(k + j, 70) for k in range(40)] for j, f in enumerate(CANDIDATE_FEATURES)}
    hours = [int(h) for h in rng.integers(-1, 26, n_users)]
    assert_serving_equals_training(users, hours, items, spec)
    without_fm = {f: v for f, v in users.items() if f != FM_HISTORY_FEATURE}
    assert_serving_equals_training(without_fm, hours, items, spec)  # a model without FM codes


def test_int4_histories_decode_every_byte_as_the_codec_does():
    every_byte = np.arange(256, dtype=np.uint8)
    codes, mask = decode_fm_history([every_byte.tobytes()], 128, 4)
    assert mask.all()
    np.testing.assert_array_equal(codes[0], unpack_int4(every_byte.reshape(128, 2)))
    assert codes.dtype == np.float32 and codes.flags.c_contiguous

"""`loopfm ingest`: fresh impressions reach /score through the offline FM log and Feast's push
API, a run killed midway and re-run loses and duplicates nothing, and bad files are refused."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pandas as pd
import pytest

from conftest import LOOPFM, loopfm
from loopfm.io import RunPaths, read_parquet
from loopfm.server_process import start_server, stop_server

USER = 3
BODY = {"user_id": USER, "candidate_item_ids": [801, 802, 850], "context": {"hour": 9}}


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def fresh_events(run: Path, n: int = 5) -> pd.DataFrame:
    """n clicks of USER on shop items, stamped in the last minutes (the world itself is older)."""
    paths = RunPaths(run)
    imp = read_parquet(paths.table("impressions"))
    shop = read_parquet(paths.table("items")).query("vertical == 'shop'")["item_id"].to_numpy()[:n]
    now = pd.Timestamp.now(tz="UTC").floor("s")
    return pd.DataFrame({
        "impression_id": imp["impression_id"].max() + 1 + pd.RangeIndex(n),
        "user_id": USER, "item_id": shop, "vertical": "shop",
        "event_timestamp": [now - pd.Timedelta(minutes=10 - i) for i in range(n)], "label": 1,
    })  # fmt: skip


def digest(*files: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_a_killed_ingest_rerun_adds_each_event_once_and_score_sees_the_new_history(run, private_redis, tmp_path):
    paths = RunPaths(run)
    events = fresh_events(run)
    events.to_parquet(tmp_path / "batch.parquet")
    n_imp, n_log = len(read_parquet(paths.table("impressions"))), len(read_parquet(paths.fm_log))
    proc, url = start_server(paths.vm / "loopfm_kd" / "onnx", private_redis.url, tmp_path / "server.log")
    try:
        before = httpx.post(f"{url}/score", json=BODY).json()
        assert before["feature_age_s"]["fm_history"] > 86400  # the world ended weeks ago

        args = [LOOPFM, "ingest", "--run-dir", str(run), "--events", str(tmp_path / "batch.parquet"),
                "--redis-url", private_redis.url]  # fmt: skip
        killed = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        for line in killed.stdout:
            if line.startswith("[2/4]"):  # impressions appended, FM logging under way
                killed.send_signal(signal.SIGKILL)
                break
        killed.wait()
        assert killed.returncode == -signal.SIGKILL
        assert len(read_parquet(paths.table("impressions"))) == n_imp + 5  # every file still reads whole

        loopfm("ingest", "--run-dir", str(run), "--events", str(tmp_path / "batch.parquet"), "--redis-url", private_redis.url)
        state = digest(paths.table("impressions"), paths.fm_log, paths.features / "fm_history.parquet")
        again = loopfm("ingest", "--run-dir", str(run), "--events", str(tmp_path / "batch.parquet"),
                       "--redis-url", private_redis.url).stdout  # fmt: skip
        assert "'new_impressions': 0, 'newly_logged': 0" in again
        assert digest(paths.table("impressions"), paths.fm_log, paths.features / "fm_history.parquet") == state

        log = read_parquet(paths.fm_log)
        assert len(log) == n_log + 5 and log["impression_id"].is_unique
        assert (log["impression_id"].to_numpy() == read_parquet(paths.table("impressions"))["impression_id"].to_numpy()).all()
        newest = read_parquet(paths.features / "fm_history.parquet").query("user_id == @USER").iloc[-1]
        batch_codes = log.set_index("impression_id").loc[events["impression_id"], "fm_code"]
        assert newest["fm_codes"].endswith(b"".join(batch_codes))  # the history ends with the batch, in order

        after = httpx.post(f"{url}/score", json=BODY).json()
        assert after["feature_age_s"]["fm_history"] < 3600 and after["feature_age_s"]["vm_click_history"] < 3600
        assert after["scores"] != before["scores"]
    finally:
        stop_server(proc)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda df: df.drop(columns="label"), "missing column(s) ['label']"),
        (lambda df: df.astype({"user_id": object}).assign(user_id=[3, 3, "x", 3, 3]), "column 'user_id', row 3: not an integer"),
        (lambda df: df.assign(item_id=[801, 10**9, 802, 803, 804]), "column 'item_id', row 2: item not in"),
        (lambda df: df.assign(label=[1, 0, 2, 1, 1]), "column 'label', row 3: labels must be 0 or 1"),
        (lambda df: df.assign(user_id=10**7), "column 'user_id', row 1: user unknown to the FM"),
        (lambda df: df.assign(vertical="cars"), "column 'vertical', row 1: vertical not in"),
    ],
)
def test_a_bad_events_file_is_refused_by_name_and_nothing_is_written(run, private_redis, tmp_path, change, message):
    paths = RunPaths(run)
    bad = tmp_path / "bad.csv"
    change(fresh_events(run)).to_csv(bad, index=False)
    state = digest(paths.table("impressions"), paths.fm_log)
    result = loopfm("ingest", "--run-dir", str(run), "--events", str(bad), "--redis-url", private_redis.url, check=False)
    assert result.returncode == 2 and str(bad) in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert digest(paths.table("impressions"), paths.fm_log) == state

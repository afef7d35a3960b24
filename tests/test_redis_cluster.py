"""The Redis Cluster profile: a real three-master Valkey cluster on loopback, filled by the
real `feast materialize` through Feast's redis_cluster online store, read by the server's
reader and by a real uvicorn /score, selected only by a redis+cluster:// URL."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from conftest import LOOPFM, copy_keys, loopfm
from loopfm.contract.names import PROJECT
from loopfm.features.store import feast_connection_string, open_store
from loopfm.pipeline.services import local_redis, local_redis_cluster, start_server, stop_server
from loopfm.stream.keys import StreamKeys
from loopfm.contract.redis_url import cluster_node_url
from serving.redis_client import async_client
from test_online_reader import reader_agrees_with_feast


@pytest.fixture(scope="module")
def cluster_url():
    with local_redis_cluster(3) as url:
        yield url


@pytest.fixture(scope="module")
def cluster_run(trained_run: Path, cluster_url: str, tmp_path_factory) -> Path:
    """A copy of the trained run (its own registry) applied and materialized into the cluster."""
    run = tmp_path_factory.mktemp("cluster") / "run"
    shutil.copytree(trained_run, run)
    loopfm("features", "apply", "--run-dir", str(run), "--redis-url", cluster_url)
    return run


def test_materialize_spreads_the_keys_over_every_master(cluster_run: Path, cluster_url: str):
    cluster = redis.RedisCluster.from_url(cluster_node_url(cluster_url))
    masters = cluster.get_primaries()
    assert len(masters) == 3
    sizes = [cluster.get_redis_connection(node).dbsize() for node in masters]
    assert all(size > 0 for size in sizes), sizes
    assert sum(sizes) > 500  # users (profile, histories) and 1,200 items


def test_reader_on_the_cluster_equals_get_online_features(cluster_run: Path, cluster_url: str):
    store = open_store(cluster_run, cluster_url)
    assert store.config.online_store.redis_type.value == "redis_cluster"
    reader_agrees_with_feast(lambda: async_client(cluster_url, timeout_s=2.0), store, [0, 1, 2, 3, 17, 499, 10**9])


def _copy_to_one_node(cluster_url: str, single_url: str) -> int:
    """DUMP/RESTORE every key of every master into one server: the same bytes, one node."""
    cluster, target = redis.RedisCluster.from_url(cluster_node_url(cluster_url)), redis.Redis.from_url(single_url)
    for node in cluster.get_primaries():
        copy_keys(cluster.get_redis_connection(node), target)
    return target.dbsize()


def test_uvicorn_on_the_cluster_scores_like_a_single_node_server_on_the_same_keys(cluster_run: Path, cluster_url: str):
    model_dir = cluster_run / "vm" / "loopfm_kd" / "onnx"
    with contextlib.ExitStack() as stack:
        single_url = stack.enter_context(local_redis())
        assert _copy_to_one_node(cluster_url, single_url) > 500
        bases = []
        for i, url in enumerate((cluster_url, single_url)):
            proc, base = start_server(model_dir, url, cluster_run / f"server-{i}.log")
            stack.callback(stop_server, proc)
            bases.append(base)
        on_cluster, single = bases
        assert httpx.get(f"{on_cluster}/readyz").json()["redis"] is True
        for user in (0, 3, 42, 499, 10**12):
            body = {"user_id": user, "candidate_item_ids": [801, 802, 850, 900, 1000, 5, 10**9], "context": {"hour": 9}}
            got, want = (httpx.post(f"{base}/score", json=body, timeout=10) for base in (on_cluster, single))
            assert got.status_code == want.status_code == 200, got.text
            assert got.json()["scores"] == want.json()["scores"]
            assert got.json()["user_known"] == want.json()["user_known"] == (user < 10**12)


def test_cluster_urls_reach_feast_as_a_startup_node_and_refuse_a_database():
    assert feast_connection_string("redis+cluster://:pw@10.0.0.1:7000") == "10.0.0.1:7000,password=pw"
    assert feast_connection_string("rediss+cluster://10.0.0.1:7000") == "10.0.0.1:7000,ssl=true"
    with pytest.raises(ValueError, match="REDIS_URL"):
        cluster_node_url("redis+cluster://10.0.0.1:7000/2")


def test_two_stream_workers_on_the_cluster_share_the_partitions_and_write_what_a_single_node_would(cluster_run: Path, cluster_url: str):
    from test_stream import assert_online_equals_batch, events_of, publish, set_partitions, touched

    set_partitions(cluster_run, 4)
    messages = events_of(cluster_run, 600, seed=11)
    cluster = redis.RedisCluster.from_url(cluster_node_url(cluster_url))
    keys = StreamKeys(PROJECT, 4)
    assert len({cluster.keyslot(keys.events(p)) // 5462 for p in range(4)}) > 1, "the stream keys spread over the masters"
    procs = [subprocess.Popen([LOOPFM, "stream", "--run-dir", str(cluster_run), "--redis-url", cluster_url, "--name", name,
                               "--until-idle", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]  # fmt: skip
    deadline = time.monotonic() + 120
    while {cluster.get(keys.lease(p)) for p in range(4)} != {b"a", b"b"} and time.monotonic() < deadline:
        time.sleep(0.1)  # until each holds a share of the partitions
    publish(cluster_run, cluster_url, messages)
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(o["applied"] for o in outputs) == 600
    assert all(o["applied"] > 0 for o in outputs), "each worker applied a share"
    users, items = touched(messages)
    assert_online_equals_batch(cluster_run, cluster_url, users, items)

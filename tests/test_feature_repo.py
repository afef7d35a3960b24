"""feature_repo/ is an ordinary Feast repo: the README's by-hand commands work from it."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from loopfm.features.store import FEATURE_REPO, feast_env
from loopfm.redis_server import local_redis


def test_feast_cli_by_hand_applies_and_materializes_incrementally_into_a_fresh_redis(copy_of_run, monkeypatch):
    with local_redis() as fresh:
        _apply_and_check(copy_of_run, fresh, monkeypatch)


def _apply_and_check(copy_of_run, fresh_db, monkeypatch):
    env = {**os.environ, **feast_env(copy_of_run, fresh_db)}
    (copy_of_run / "registry.db").unlink(missing_ok=True)
    feast = str(Path(sys.executable).with_name("feast"))
    for args in (["apply"], ["materialize-incremental", pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S")]):
        result = subprocess.run([feast, *args], cwd=FEATURE_REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    listed = subprocess.run([feast, "feature-services", "list"], cwd=FEATURE_REPO, env=env, capture_output=True, text=True)
    for service in ("vm_base", "vm_kd", "vm_loopfm", "vm_loopfm_kd"):
        assert service in listed.stdout
    users = pd.read_parquet(copy_of_run / "features" / "fm_history.parquet")
    newest = users.sort_values("event_timestamp").groupby("user_id").tail(1).head(5)

    from feast import FeatureStore

    for key, value in feast_env(copy_of_run, fresh_db).items():
        monkeypatch.setenv(key, value)
    store = FeatureStore(repo_path=str(FEATURE_REPO))
    online = store.get_online_features(
        features=["fm_history:fm_codes"], entity_rows=[{"user_id": int(u)} for u in newest.user_id]
    ).to_dict()
    assert online["fm_codes"] == newest["fm_codes"].tolist()  # the newest snapshot per user reached Redis

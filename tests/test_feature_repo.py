"""feature_repo/ is an ordinary Feast repo: the by-hand commands of docs/getting-started.md work from it."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from loopfm.pipeline.cli import main
from loopfm.features.store import FEATURE_REPO, feast_env, feast_executable
from loopfm.pipeline.services import local_redis
from conftest import loopfm


def test_feast_cli_by_hand_applies_and_materializes_incrementally_into_a_fresh_redis(copy_of_run, monkeypatch):
    with local_redis() as fresh:
        _apply_and_check(copy_of_run, fresh, monkeypatch)


def _apply_and_check(copy_of_run, fresh_db, monkeypatch):
    env = {**os.environ, **feast_env(copy_of_run, fresh_db)}
    (copy_of_run / "registry.db").unlink(missing_ok=True)
    feast = feast_executable()
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


def test_the_registry_goes_where_LOOPFM_REGISTRY_says_and_the_run_is_only_read(copy_of_run, tmp_path, monkeypatch):
    """docker-compose.yml's materialize job: the run is mounted read-only, the registry is the job's."""
    (copy_of_run / "registry.db").unlink(missing_ok=True)
    before = {p: p.stat().st_mtime_ns for p in copy_of_run.rglob("*")}
    monkeypatch.setenv("LOOPFM_REGISTRY", str(tmp_path / "registry.db"))
    with local_redis() as url:
        loopfm("features", "apply", "--run-dir", str(copy_of_run), "--redis-url", url)
    assert (tmp_path / "registry.db").stat().st_size > 0
    assert {p: p.stat().st_mtime_ns for p in copy_of_run.rglob("*")} == before


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_feast_is_found_next_to_the_interpreter_or_else_on_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "usr-local-bin"))
    on_path = _executable(tmp_path / "usr-local-bin" / "feast")  # Debian's system pip: scripts elsewhere
    assert feast_executable() == str(on_path)
    in_venv = _executable(tmp_path / "venv" / "bin" / "feast")
    assert feast_executable() == str(in_venv)


def test_a_missing_feast_cli_is_named_without_a_stack_trace(copy_of_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"the Feast CLI `feast` is neither in .* nor on PATH"):
        feast_executable()
    assert main(["features", "apply", "--run-dir", str(copy_of_run), "--redis-url", "redis://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "loopfm: error: the Feast CLI `feast`" in err and "pip install 'loopfm[train]'" in err
    assert "Traceback" not in err

"""The serving install as the Dockerfile builds it: only the files its build stage copies
(the contract package and serving/), `pip install .` without extras into a fresh venv, then
a real /score from that venv. No torch, no Feast SDK, no training code gets installed."""

import shutil
import subprocess
import venv
from pathlib import Path

import httpx

from loopfm.core.rundir import RunPaths
from loopfm.pipeline.services import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_sources() -> list[str]:
    """The paths the Dockerfile's build stage copies from the build context."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--from"):
            sources += words[1:-1]
    return sources


def test_dockerfile_copies_the_contract_package_whole_and_no_other_training_code():
    assert dockerfile_sources() == ["pyproject.toml", "README.md", "loopfm/__init__.py", "loopfm/contract/", "serving/"]


def test_a_fresh_pip_install_without_extras_serves_a_request(trained_run, redis_url, tmp_path):
    src = tmp_path / "src"
    for name in dockerfile_sources():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(src)], check=True, capture_output=True)  # pip's cache: fast
    installed = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in ('torch', 'feast', 'pandas') "
                                "if u.find_spec(m)], u.find_spec('loopfm.features'))"],  # fmt: skip
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout  # fmt: skip
    assert installed.strip() == "[] None"

    model_dir = RunPaths(trained_run).vm / "loopfm_kd" / "onnx"
    # PYTHONSAFEPATH: `python -m uvicorn` must not put the working directory (this checkout) on sys.path
    proc, url = start_server(model_dir, redis_url, tmp_path / "server.log", env={"PYTHONSAFEPATH": "1"}, python=python)
    try:
        r = httpx.post(f"{url}/score", json={"user_id": 3, "candidate_item_ids": [801, 802, 10**9], "context": {"hour": 9}})
    finally:
        stop_server(proc)
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 3 and r.json()["unknown_candidates"] == [10**9]

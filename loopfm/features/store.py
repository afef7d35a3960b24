"""The Feast feature store of a run: environment, CLI calls and historical retrieval.

`feature_repo/` is the one set of definitions; a run points it at its own sources,
registry and Redis through LOOPFM_RUN_DIR, LOOPFM_REGISTRY and REDIS_CONNECTION_STRING.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd
import redis
import redis.cluster

from loopfm.contract.names import ID_INT64, ID_STRING, ITEM_KEY, PROJECT, USER_KEY, ready_marker
from loopfm.contract.redis_url import cluster_node_url
from loopfm.core.children import dies_with_this_process, held_fds

FEATURE_REPO = Path(__file__).resolve().parents[2] / "feature_repo"
OFFLINE_ONLY = "redis://127.0.0.1:6379"  # placeholder: offline retrieval never contacts Redis


def feast_connection_string(redis_url: str) -> str:
    """redis://[:password@]host:port[/db] or rediss://... -> Feast's "host:port,password=..,ssl=true";
    a redis+cluster:// URL gives its startup node the same way."""
    u = urlparse(cluster_node_url(redis_url) or redis_url)
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        raise ValueError(f"REDIS_URL must look like redis://host:port or redis+cluster://host:port, got {redis_url!r}")
    parts = [f"{u.hostname}:{u.port or 6379}"]
    if u.password:
        parts.append(f"password={unquote(u.password)}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    if u.path.strip("/"):
        parts.append(f"db={u.path.strip('/')}")
    return ",".join(parts)


def feature_store_yaml(redis_url: str) -> Path:
    """The profile: feature_store.cluster.yaml (Feast's redis_cluster online store) for a
    redis+cluster:// URL, feature_store.ray.yaml (the exact Ray offline store) when
    LOOPFM_OFFLINE_STORE=ray, else feature_store.yaml. All share features.py."""
    offline = os.environ.get("LOOPFM_OFFLINE_STORE", "duckdb")
    if offline not in ("duckdb", "ray"):
        raise ValueError(f"LOOPFM_OFFLINE_STORE must be duckdb or ray, got {offline!r}")
    if offline == "ray" and cluster_node_url(redis_url):
        raise ValueError("LOOPFM_OFFLINE_STORE=ray has no profile with a redis+cluster:// REDIS_URL (not built)")
    if offline == "ray":
        return FEATURE_REPO / "feature_store.ray.yaml"
    return FEATURE_REPO / ("feature_store.cluster.yaml" if cluster_node_url(redis_url) else "feature_store.yaml")


def registry_path(run_dir: Path, registry: Path | None = None) -> Path:
    """The Feast registry file: `registry`, else $LOOPFM_REGISTRY (a job that may not write
    into the run directory), else RUN_DIR/registry.db."""
    return (registry or Path(os.environ.get("LOOPFM_REGISTRY") or run_dir / "registry.db")).resolve()


def feast_env(run_dir: Path, redis_url: str, registry: Path | None = None) -> dict[str, str]:
    """The variables feature_store.yaml reads (registry: registry_path)."""
    return {
        "LOOPFM_RUN_DIR": str(run_dir.resolve()),
        "LOOPFM_REGISTRY": str(registry_path(run_dir, registry)),
        "REDIS_CONNECTION_STRING": feast_connection_string(redis_url),
        "FEAST_FS_YAML_FILE_PATH": str(feature_store_yaml(redis_url)),  # read by the feast CLI
    }


def feast_executable() -> str:
    """The Feast CLI next to this interpreter (a venv used without activating it), else on PATH."""
    here = Path(sys.executable).parent
    found = shutil.which("feast", path=os.pathsep.join([str(here), os.environ.get("PATH", "")]))
    if found is None:
        raise FileNotFoundError(
            f"the Feast CLI `feast` is neither in {here} nor on PATH: install the train extra (pip install 'loopfm[train]')"
        )
    return found


# Runs `feast ARGS` for each ARGS of argv[1] (JSON) in this one process, stopping at the first
# that fails: what the `feast` script does for one (`sys.exit(cli())`), without a new start-up
# (importing Feast) per command.
_FEAST_COMMANDS = """
import json, sys
from feast.cli.cli import cli
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args=args, prog_name="feast")
    except SystemExit as exit:
        if exit.code not in (0, None):
            print(f"`feast {' '.join(args)}` exited with {exit.code}", file=sys.stderr)
            raise
"""


def _script_interpreter(script: str) -> str | None:
    """The interpreter on the `#!` line of a console script, if it names one as a plain path
    to a file (a pip-installed `feast`); else None."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096).decode(errors="replace").strip()
    except OSError:
        return None
    words = first[2:].split() if first.startswith("#!") else []
    return words[0] if len(words) == 1 and Path(words[0]).is_absolute() and Path(words[0]).is_file() else None


def feast_cli(args: list[str], run_dir: Path, redis_url: str, registry: Path | None = None) -> str:
    """Run the real `feast` CLI in the feature repo; raise with its output on failure."""
    return feast_cli_commands([args], run_dir, redis_url, registry)


def feast_cli_commands(commands: list[list[str]], run_dir: Path, redis_url: str, registry: Path | None = None) -> str:
    """`feast ARGS` for each ARGS of `commands` in turn, in the feature repo, stopping at the
    first that fails (RuntimeError with the output). Several run in one process of the
    `feast` script's own interpreter when its `#!` line names one (Feast's CLI code, imported
    once), else one `feast` process each."""
    feast = feast_executable()
    interpreter = _script_interpreter(feast) if len(commands) > 1 else None
    if interpreter is None:
        return "".join(_run_feast([feast, *args], f"feast {' '.join(args)}", run_dir, redis_url, registry) for args in commands)
    described = " && ".join(f"feast {' '.join(args)}" for args in commands)
    return _run_feast([interpreter, "-c", _FEAST_COMMANDS, json.dumps(commands)], described, run_dir, redis_url, registry)


def _run_feast(argv: list[str], described: str, run_dir: Path, redis_url: str, registry: Path | None) -> str:
    result = subprocess.run(
        argv,
        cwd=FEATURE_REPO,
        env={**os.environ, **feast_env(run_dir, redis_url, registry)},
        capture_output=True,
        text=True,
        preexec_fn=dies_with_this_process(),  # a killed loopfm leaves no feast writing its registry or store,
        pass_fds=held_fds(),  # and the run locked until feast has exited
    )
    if result.returncode != 0:
        raise RuntimeError(f"`{described}` failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def apply_and_materialize(
    run_dir: Path, redis_url: str, start: pd.Timestamp, end: pd.Timestamp, registry: Path | None = None
) -> None:
    """`feast apply`, then `feast materialize START END` over an explicit window: unlike
    materialize-incremental it also fills a fresh Redis after an earlier run. The registry
    written is registry_path(run_dir, registry). One process for both (feast_cli_commands)."""
    fmt = "%Y-%m-%dT%H:%M:%S"
    commands = [["apply"], ["materialize", start.strftime(fmt), end.strftime(fmt)]]
    feast_cli_commands(commands, run_dir, redis_url, registry)
    mark_materialized(redis_url)


def mark_materialized(redis_url: str, by: str = "feast materialize") -> None:
    """Set the project's marker (loopfm.contract.names.ready_marker), a hash like Feast's own
    keys, after its features were written: the server's /readyz is 503 on a store without
    it. A constant value: materializing again leaves the store as it was."""
    with contextlib.closing(sync_client(redis_url)) as client:
        client.hset(ready_marker(PROJECT), "by", by)


def sync_client(url: str, timeout_s: float = 5.0) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking client of either kind (loopfm/contract/redis_url.py), for the batch jobs
    (materialize, ingest)."""
    node = cluster_node_url(url)
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if node is None:
        return redis.Redis.from_url(url, **timeouts)
    return redis.cluster.RedisCluster.from_url(node, **timeouts)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_store(run_dir: Path, redis_url: str = OFFLINE_ONLY):
    """A FeatureStore on this run's registry, sources and Redis. feature_store.yaml is read
    (with its ${VARS} expanded) when the store is built, so the environment is set only then."""
    from feast import FeatureStore

    # Importing feast switches DeprecationWarnings back on process-wide ("once"); its
    # dependencies' deprecations are nothing a loopfm user can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with _environment(feast_env(run_dir, redis_url)):
        return FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=feature_store_yaml(redis_url))


def entity_types(store) -> dict[str, str]:
    """{join key: ID_INT64 | ID_STRING} of the user and item entities in the Feast registry: the
    id types an exported model's requests must carry (model.json `entity_types`)."""
    from feast import ValueType

    names = {ValueType.INT64: ID_INT64, ValueType.STRING: ID_STRING}
    return {e.join_key: names[e.value_type] for e in store.list_entities() if e.join_key in (USER_KEY, ITEM_KEY)}


def historical_features(store, entity_df: pd.DataFrame, service: str) -> pd.DataFrame:
    """Point-in-time join through the variant's feature service, in entity-row order."""
    df = entity_df.assign(_row=range(len(entity_df)))
    out = store.get_historical_features(entity_df=df, features=store.get_feature_service(service)).to_df()
    if len(out) != len(df):
        raise RuntimeError(f"get_historical_features returned {len(out)} rows for {len(df)} entity rows")
    return out.sort_values("_row").drop(columns="_row").reset_index(drop=True)

"""What each `loopfm` command needs, checked before it starts anything or writes anything
(docs/getting-started.md, "What each command checks first"): the earlier stages' outputs,
the input files, a reachable Redis, a free port, a writable output folder, a model the run
can serve. A check that fails raises ConfigError (or the FileNotFoundError or ValueError of
a shared helper) naming the flag, file or stage to run: the CLI prints `loopfm: error: ...`
and exits 2. Flag values are checked by their argparse types (loopfm/pipeline/cli.py),
--set values by RunConfig.validate.

The checks only read: a run's artifacts, the file system, one PING, one bind."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from pathlib import Path

from loopfm.core.config import SERVED_VARIANT, ConfigError, RunConfig
from loopfm.core.rundir import RunPaths, unwritable


def need(path: Path, command: str, why: str = "") -> None:
    """ConfigError naming `path` and the command that writes it, unless it exists."""
    if not path.exists():
        raise ConfigError(f"{path} not found: run `{command}` first{why}")


def data_written(run_dir: Path) -> RunConfig:
    """The run's config, its canonical tables and vocab.json (`loopfm data synth|import`)."""
    cfg = RunConfig.load(run_dir)
    paths = RunPaths(run_dir)
    for path in (paths.table("impressions"), paths.data / "vocab.json"):
        need(path, f"loopfm data synth|import --run-dir {run_dir}")
    return cfg


def fm_trained(run_dir: Path) -> None:
    from loopfm.fm.train import checkpoint_path

    cfg = data_written(run_dir)
    need(checkpoint_path(RunPaths(run_dir), cfg.world.n_days), f"loopfm fm train --run-dir {run_dir}",
         " (its last checkpoint: a training that did not finish leaves none)")  # fmt: skip


def fm_logged(run_dir: Path) -> None:
    data_written(run_dir)
    need(RunPaths(run_dir).fm_log, f"loopfm fm log --run-dir {run_dir}")


def features_built(run_dir: Path) -> None:
    data_written(run_dir)
    features = RunPaths(run_dir).features
    for name in ("vm_train_entities", "vm_eval_entities", "item_features"):
        need(features / f"{name}.parquet", f"loopfm features build --run-dir {run_dir}")


def features_applied(run_dir: Path) -> None:
    """Built, and `feast apply` wrote the registry every feature service is read through."""
    from loopfm.features.store import registry_path

    features_built(run_dir)
    need(registry_path(run_dir), f"loopfm features apply --run-dir {run_dir}", " (Feast's registry of the feature services)")


def existing(path: Path, flag: str, kind: str = "file or folder") -> None:
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no such {kind}")


def redis_answers(url: str, flag: str) -> None:
    """ConfigError naming `flag` unless a Redis-protocol server answers PING at `url`."""
    import redis

    from loopfm.features.store import sync_client

    try:
        with contextlib.closing(sync_client(url, timeout_s=3.0)) as client:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach Redis at {url}: {' '.join(str(exc).split())} (given by {flag})") from None


def port_free(port: int, flag: str = "--port") -> None:
    """ConfigError unless 127.0.0.1:`port` can be bound as the server will bind it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed socket's TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"{flag} {port}: 127.0.0.1:{port} is in use or not allowed ({exc.strerror}); "
                              "choose another port or stop what holds it") from None  # fmt: skip


def writable(folder: Path, flag: str) -> None:
    """ConfigError naming `flag` unless this user can write `folder` (or create it)."""
    blocked = unwritable(folder)
    if blocked is not None:
        raise ConfigError(f"{flag} {folder}: {blocked} is not writable by this user (uid {os.getuid()}); choose another folder")


def redis_url(args: argparse.Namespace) -> str:
    """--redis-url, else $REDIS_URL; ConfigError if neither is given."""
    url = args.redis_url or os.environ.get("REDIS_URL")
    if not url:
        raise ConfigError("no Redis: pass --redis-url redis://host:port or set REDIS_URL")
    return url


def redis_url_given(args: argparse.Namespace) -> None:
    redis_answers(redis_url(args), "--redis-url" if args.redis_url else "REDIS_URL")


def env_redis_answers() -> None:
    """A Redis at $REDIS_URL, if set, answers (a command then uses it instead of its own Valkey)."""
    if os.environ.get("REDIS_URL"):
        redis_answers(os.environ["REDIS_URL"], "REDIS_URL")


# One function per command (cli.preconditions maps the commands to them).


def data_import(args: argparse.Namespace) -> None:
    from loopfm.data.importers import FORMATS

    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: one of {', '.join(FORMATS)}")
    existing(args.data, "--data")
    if args.map_file is not None:
        existing(args.map_file, "--map-file", "file")


def run(args: argparse.Namespace) -> None:
    data_import(args)
    env_redis_answers()


def fm_train(args: argparse.Namespace) -> None:
    data_written(args.run_dir)


def fm_log(args: argparse.Namespace) -> None:
    fm_trained(args.run_dir)


def features_build(args: argparse.Namespace) -> None:
    """The embedding log, and no ingest half applied (its rows would train as if whole)."""
    from loopfm.pipeline.ingest import unfinished

    fm_logged(args.run_dir)
    why = unfinished(RunPaths(args.run_dir))
    if why is not None:
        raise ConfigError(why)


def fm_import_log(args: argparse.Namespace) -> None:
    """The run's data (--embeddings is read, and named if absent, before anything is written)."""
    data_written(args.run_dir)


def features_apply(args: argparse.Namespace) -> None:
    """The feature tables, a writable registry, the Feast CLI and the Redis it writes."""
    from loopfm.features.store import feast_executable, registry_path

    features_built(args.run_dir)
    registry = registry_path(args.run_dir)
    if not registry.is_relative_to(args.run_dir.resolve()):  # inside the run, the run's own check covers it
        writable(registry.parent, "LOOPFM_REGISTRY")
    feast_executable()  # FileNotFoundError naming the install otherwise
    redis_url_given(args)


def vm_train(args: argparse.Namespace) -> None:
    """The feature services (features apply), and the base VM's predictions: every
    comparison of the quality table is against it, so it trains now or has trained before."""
    features_applied(args.run_dir)
    base = RunPaths(args.run_dir).vm / "base" / "eval_predictions.parquet"
    if args.variant and "base" not in args.variant and not base.exists():
        raise ConfigError(f"{base} not found: the quality table compares every variant with the base VM; "
                          f"add --variant base (or run `loopfm vm train --variant base --run-dir {args.run_dir}` first)")  # fmt: skip


def vm_export(args: argparse.Namespace) -> None:
    features_applied(args.run_dir)
    for variant in args.variant or [SERVED_VARIANT]:
        need(RunPaths(args.run_dir).vm / variant / "model.pt", f"loopfm vm train --variant {variant} --run-dir {args.run_dir}")


def serve(args: argparse.Namespace) -> None:
    from loopfm.pipeline.stages import served_model_dir

    port_free(args.port)
    served_model_dir(args.run_dir, args.variant)
    if args.redis_url or os.environ.get("REDIS_URL"):
        redis_url_given(args)
    else:
        features_built(args.run_dir)  # materialized into a Valkey of its own


def loadtest(args: argparse.Namespace) -> None:
    from loopfm.bench.loadtest import check_loopback
    from loopfm.pipeline.stages import served_model_dir

    features_built(args.run_dir)  # the users and items the requests draw from
    if args.url:
        check_loopback(args.url)
    else:
        served_model_dir(args.run_dir, args.variant)
        env_redis_answers()
    if args.out is not None:
        writable(args.out, "--out")


def bench_serving(args: argparse.Namespace) -> None:
    from loopfm.bench.serving import configurations
    from loopfm.pipeline.stages import served_model_dir

    configurations(sorted(os.sched_getaffinity(0)))  # ValueError with fewer than two cores
    served_model_dir(args.run_dir, args.variant)
    features_built(args.run_dir)  # materialized, and the users and items the requests draw from
    env_redis_answers()
    writable(args.out, "--out")


def demo(args: argparse.Namespace) -> None:
    env_redis_answers()


def experiment_sources(args: argparse.Namespace) -> dict:
    """experiment-real's named sources (plan.Source): a --suite of experiments.yaml, or --data
    and --format with one --dataset NAME=COLUMN=VALUE per vertical; ConfigError naming the flag."""
    from loopfm.experiments.plan import Source, real_sources

    if args.suite:
        if args.data or args.format or args.dataset:
            raise ConfigError(f"--suite {args.suite} names its data: drop --data, --format and --dataset")
        return real_sources(args.suite)
    if not (args.data and args.format and args.dataset):
        raise ConfigError("experiment-real needs --suite NAME, or --data, --format and at least one --dataset")
    sources = {}
    for entry in args.dataset:
        name, sep, rule = entry.partition("=")
        if not sep or not name or "=" not in rule:
            raise ConfigError(f"--dataset {entry!r}: expected NAME=COLUMN=VALUE, e.g. comedy=genre=Comedy")
        sources[name] = Source(args.data, args.format, rule)
    return sources


def experiment_real(args: argparse.Namespace) -> None:
    """Every source's data is on disk (a suite's file named with its source)."""
    for name, source in experiment_sources(args).items():
        existing(source.data, f"--suite {args.suite}: source {name}:" if args.suite else "--data")


def ingest(args: argparse.Namespace) -> None:
    existing(args.events, "--events", "file")
    redis_url_given(args)


def publish(args: argparse.Namespace) -> None:
    """events publish, items upsert: the file, and the Redis it goes to."""
    existing(args.file, "FILE", "file")
    redis_url_given(args)


def stream(args: argparse.Namespace) -> None:
    """A worker: the Redis it reads (not for `stream compact`), a free --metrics-port."""
    if args.action != "compact":
        redis_url_given(args)
    if args.metrics_port is not None:
        port_free(args.metrics_port, "--metrics-port")

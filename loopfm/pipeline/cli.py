"""`loopfm` command line: one subcommand per pipeline stage, plus `serve` and `demo`.

Heavy modules (torch, Feast) are imported inside each command, so `loopfm serve` starts
without them and a wrong flag is reported before anything slow happens.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import multiprocessing
import os
import signal
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from loopfm.core.config import SERVED_VARIANT, VARIANTS, ConfigError, RunConfig, setting_value

DEFAULT_RUN_DIR = Path("runs/demo")
TIME_UNITS = ("s", "ms", "us", "ns")  # loopfm.data.parse.TIME_UNITS, without importing pandas for every command
ENGINES = ("local", "ray")
ENGINE_HELP = "ray: the same functions as Ray Data jobs (local Ray, or the cluster at RAY_ADDRESS)"


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan, inf and 1e400 are refused, naming the value)."""
    value = float(text)  # argparse reports its ValueError as "invalid finite_float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag and the value otherwise)."""
    value = int(text)  # argparse reports its ValueError as "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not >= 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not > 0")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not >= 0")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1]")
    return value


def rates(text: str) -> list[float]:
    """An argparse type: comma-separated numbers > 0, e.g. 100,200,400."""
    return [positive_float(rate) for rate in text.split(",")]


def port(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return value


def cmd_synth(args: argparse.Namespace) -> None:
    from loopfm.core.rundir import RunPaths
    from loopfm.data.synth import simulate, write_tables
    from loopfm.data.vocab import check_vm_windows
    from loopfm.pipeline.stages import clear_built_stages

    cfg = RunConfig()
    overrides = {k: v for k, v in vars(args).items() if k in ("seed", "n_users", "n_days") and v is not None}
    if args.impressions_per_user_day is not None:
        overrides["impressions_per_user_day"] = args.impressions_per_user_day
    if args.fm_signal_noise is not None:
        overrides["fm_signal_noise"] = args.fm_signal_noise
    cfg.world = replace(cfg.world, **overrides)
    for assignment in args.set or []:
        cfg.override(assignment)
    cfg.validate()
    tables = simulate(cfg.world)  # in memory: checked before anything is written or removed
    check_vm_windows(tables["impressions"], cfg, "--set fm.warmup_days=N / vm.eval_days=N / vm.target_vertical=NAME, "
                     "or more impressions (--users, --impressions-per-user-day, --days)")  # fmt: skip
    clear_built_stages(args.run_dir)
    counts = write_tables(tables, cfg.world, RunPaths(args.run_dir))
    cfg.save(args.run_dir)  # last: a refused or failed synth leaves no config behind
    print(counts)


def _import_options(args: argparse.Namespace):
    from loopfm.data.importers import ImportOptions
    from loopfm.data.importers.canonical import VerticalRule
    from loopfm.data.importers.mapped import parse_map

    roles = parse_map(args.map or [], args.map_file)
    if roles and args.format != "csv":
        raise ConfigError(f"--map and --map-file apply to --format csv only (the {args.format} columns are known)")
    if args.time_unit and args.format != "csv":
        raise ConfigError(f"--time-unit applies to --format csv only (the {args.format} time unit is known)")
    return ImportOptions(args.format, VerticalRule.parse(args.vertical), roles, args.click_threshold, args.days, args.time_unit)


def _config_with_overrides(args: argparse.Namespace) -> tuple[RunConfig, set[str]]:
    """Defaults plus --set overrides, and the keys the user set (an import fits the others to the data)."""
    cfg = RunConfig()
    for assignment in args.set or []:
        cfg.override(assignment)
    return cfg, {assignment.partition("=")[0] for assignment in args.set or []}


def cmd_data_import(args: argparse.Namespace) -> None:
    from loopfm.pipeline.run import import_run

    cfg, explicit = _config_with_overrides(args)
    import_run(args.run_dir, cfg, args.data, _import_options(args), explicit)


def cmd_run(args: argparse.Namespace) -> None:
    from loopfm.pipeline.run import run_on_data

    cfg, explicit = _config_with_overrides(args)
    run_on_data(args.run_dir, cfg, args.data, _import_options(args), explicit)


def cmd_fm_train(args: argparse.Namespace) -> None:
    from loopfm.core.rundir import RunPaths
    from loopfm.fm.train import train_fm

    if args.nproc is not None:
        from loopfm.distributed.fm_train import launch

        launch(args.run_dir, args.nproc)  # a missing run or stage was named by checks.fm_train, not by every rank
        return
    summary = train_fm(RunPaths(args.run_dir), RunConfig.load(args.run_dir))
    print(f"trained on {summary['events']} events in {summary['seconds']:.1f} s")


def cmd_fm_log(args: argparse.Namespace) -> None:
    from loopfm.core.rundir import RunPaths
    from loopfm.fm.log import log_embeddings
    from loopfm.pipeline.stages import engine_named

    cfg = RunConfig.load(args.run_dir)
    if args.scheme:
        cfg.fm = replace(cfg.fm, checkpoint_scheme=args.scheme)
    if args.delay_s is not None:
        cfg.fm = replace(cfg.fm, logging_delay_s=args.delay_s)
    log = log_embeddings(RunPaths(args.run_dir), cfg.validate(), engine=engine_named(args.engine))
    cfg.save(args.run_dir)  # only once the log it describes exists
    print(f"logged {len(log)} events to {RunPaths(args.run_dir).fm_log}")


def cmd_fm_import_log(args: argparse.Namespace) -> None:
    from loopfm.core.rundir import RunPaths
    from loopfm.fm.imported import import_embedding_log

    summary = import_embedding_log(RunPaths(args.run_dir), RunConfig.load(args.run_dir), args.embeddings)
    print(f"imported {summary['rows']} embeddings of width {summary['width']} as {summary['code']} codes; compressor "
          f"fitted on the {summary['compressor_rows']} available before {summary['vm_window_start']}; "
          f"KD label: {summary['kd_label']}; log in {RunPaths(args.run_dir).fm_log}")  # fmt: skip


def cmd_features_build(args: argparse.Namespace) -> None:
    from loopfm.core.rundir import RunPaths
    from loopfm.features.build import build_feature_tables
    from loopfm.pipeline.stages import engine_named

    print(build_feature_tables(RunPaths(args.run_dir), RunConfig.load(args.run_dir), engine=engine_named(args.engine)))


def cmd_features_apply(args: argparse.Namespace) -> None:
    from loopfm.features.store import feast_env
    from loopfm.pipeline.checks import redis_url
    from loopfm.pipeline.stages import materialize

    url = redis_url(args)
    materialize(args.run_dir, url)
    env = " ".join(f"{k}={v}" for k, v in feast_env(args.run_dir, url).items())
    print(f"applied and materialized. To run feast by hand: cd feature_repo && {env} feast ...")


def cmd_vm_train(args: argparse.Namespace) -> None:
    from loopfm.pipeline.stages import train_variants

    train_variants(args.run_dir, args.variant or list(VARIANTS))


def cmd_vm_export(args: argparse.Namespace) -> None:
    from loopfm.core.rundir import RunPaths
    from loopfm.features.store import open_store
    from loopfm.vm.export import export_variant

    paths, cfg, store = RunPaths(args.run_dir), RunConfig.load(args.run_dir), open_store(args.run_dir)
    for variant in dict.fromkeys(args.variant or [SERVED_VARIANT]):  # named twice, exported once
        meta = export_variant(paths, cfg, store, variant)
        print(f"exported {meta['model_version']}; parity {meta['parity']}")


def cmd_serve(args: argparse.Namespace) -> None:
    from loopfm.pipeline.stages import running_server

    redis_url = args.redis_url or os.environ.get("REDIS_URL")
    with running_server(args.run_dir, args.variant, None, redis_url, args.port, args.workers) as url:
        print(f"serving {args.variant} at {url} with {args.workers} worker(s)  (POST /score, GET /readyz, GET /metrics); "
              "Ctrl-C or SIGTERM stops",
              flush=True)  # fmt: skip
        while True:
            signal.pause()  # until SIGINT or SIGTERM raises Stopped (see main)


def cmd_loadtest(args: argparse.Namespace) -> None:
    from loopfm.bench.loadtest import LoadSpec, require_success, run_load, sweep, warm_up, write_report
    from loopfm.bench.serving import request_pool
    from loopfm.core.files import write_text
    from loopfm.pipeline.stages import running_server

    spec = LoadSpec(rate=args.rate, duration_s=args.duration, candidates=args.candidates, arrival=args.arrival,
                    hot_fraction=args.hot_fraction, timeout_s=args.timeout)  # fmt: skip
    pool = request_pool(args.run_dir)
    out = args.out or args.run_dir / "results" / "loadtest"
    with running_server(args.run_dir, args.variant, args.url, os.environ.get("REDIS_URL")) as url:
        require_success(warm_up(url, pool, candidates=args.candidates, rate=args.rate, api_key=args.api_key), "warm-up")
        if args.sweep:
            result = sweep(url, spec, pool, args.sweep, args.p99_bound_ms, api_key=args.api_key)
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "sweep.json", json.dumps(result, indent=2))
            print(f"highest rate with p99 <= {args.p99_bound_ms} ms: {result['best_rate']} req/s ({out / 'sweep.json'})")
            return
        report, records = run_load(url, spec, pool, api_key=args.api_key)
    write_report(report, records, out, f"{args.candidates} candidates, {args.rate:.0f} req/s {args.arrival}")
    print(json.dumps({k: v for k, v in report.items() if k != "spec"}, indent=2))
    print(f"written to {out}/loadtest.json and loadtest.png")
    require_success(report, f"the load test ({out / 'loadtest.json'})")


def cmd_ingest(args: argparse.Namespace) -> None:
    from loopfm.pipeline.checks import redis_url
    from loopfm.pipeline.ingest import ingest

    ingest(args.run_dir, args.events, redis_url(args), time_unit=args.time_unit)


def cmd_events_publish(args: argparse.Namespace) -> None:
    from loopfm.pipeline.checks import redis_url
    from loopfm.stream.producer import publish_file

    publish_file(args.run_dir, args.file, redis_url(args), "events", args.time_unit)


def cmd_items_upsert(args: argparse.Namespace) -> None:
    from loopfm.pipeline.checks import redis_url
    from loopfm.stream.producer import publish_file

    publish_file(args.run_dir, args.file, redis_url(args), "items")


def cmd_stream(args: argparse.Namespace) -> None:
    from loopfm.pipeline.checks import redis_url
    from loopfm.stream.worker import run_worker

    if args.action == "compact":
        from loopfm.core.rundir import RunPaths
        from loopfm.data.streamed import compact_now

        lease_s = RunConfig.load(args.run_dir).stream.lease_ms / 1000
        compact_now(RunPaths(args.run_dir), lease_s if args.older_than_s is None else args.older_than_s)
        return
    summary = run_worker(args.run_dir, redis_url(args), args.name, idle_exit_s=args.until_idle, max_events=args.max_events,
                         progress_s=args.progress_s, metrics_port=args.metrics_port)  # fmt: skip
    print(json.dumps(summary))


def cmd_bench_serving(args: argparse.Namespace) -> None:
    from loopfm.bench.serving import run_serving_bench
    from loopfm.bench.serving_report import markdown, plot_summary
    from loopfm.core.files import write_text

    summary = run_serving_bench(args.run_dir, args.variant, args.out, args.duration, api_key=args.api_key)
    plot_summary(summary, args.out / "benchmarks" / "serving.png")
    write_text(args.out / "benchmarks.md", markdown(summary))
    print(markdown(summary))


def cmd_bench_stream(args: argparse.Namespace) -> None:
    from loopfm.bench.stream import StreamBenchSpec, run_stream_bench
    from loopfm.bench.stream_report import markdown, plot
    from loopfm.core.files import write_text

    spec = StreamBenchSpec()
    if args.duration is not None:
        spec = replace(spec, duration_s=args.duration, cost_duration_s=min(args.duration, spec.cost_duration_s),
                       serving_duration_s=min(args.duration, spec.serving_duration_s))  # fmt: skip
    for name, value in (("rates", args.rates), ("workers", args.workers)):
        if value is not None:
            spec = replace(spec, **{name: tuple(value)})
    if args.history_events is not None:
        spec = replace(spec, history_events=args.history_events)
    summary = run_stream_bench(args.run_dir, args.out, spec)
    plot(summary, args.out / "benchmarks-stream" / "freshness.png")
    write_text(args.out / "benchmarks-stream.md", markdown(summary))
    print(markdown(summary))


def cmd_demo(args: argparse.Namespace) -> None:
    from loopfm.pipeline.demo import run_demo

    cfg = RunConfig()
    for assignment in args.set or []:
        cfg.override(assignment)
    run_demo(args.run_dir, cfg, requests=args.requests)


def cmd_experiment(args: argparse.Namespace) -> None:
    from loopfm.experiments.main import run_experiments

    overrides = tuple((assignment.partition("=")[0], setting_value(assignment)) for assignment in args.set or [])
    names = tuple(n.strip() for n in args.experiments.split(",") if n.strip())
    run_experiments(args.out, args.docs or args.out, args.seeds, args.jobs, names, overrides, " ".join(["loopfm", *sys.argv[1:]]))


def cmd_experiment_real(args: argparse.Namespace) -> None:
    from loopfm.experiments.main import run_real
    from loopfm.pipeline.checks import experiment_sources

    if args.seeds < 2:
        raise ConfigError("--seeds must be at least 2 (the claims are paired tests over seeds)")
    overrides = tuple((assignment.partition("=")[0], setting_value(assignment)) for assignment in args.set or [])
    run_real(experiment_sources(args), args.seeds, args.out, args.docs or args.out, overrides, args.jobs,
             " ".join(["loopfm", *sys.argv[1:]]))  # fmt: skip


def event_file_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """A file of impressions (`name`: "--events" or the positional "file"), the Redis URL and the time unit."""
    p.add_argument(name, type=Path, **({"required": True} if name.startswith("--") else {}),
                   help="parquet, or CSV / TSV by name (.csv, .tsv, also .gz): impression_id, user_id, item_id, "
                   "vertical, event_timestamp, label (loopfm/data/event_files.py: EVENT_COLUMNS)")  # fmt: skip
    p.add_argument("--redis-url", help="the online store's server (default: $REDIS_URL)")
    p.add_argument("--time-unit", choices=TIME_UNITS, help="unit of numeric event_timestamp values "
                   "(default: inferred from their size, refused when it cannot be told)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopfm", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)

    def command(subparsers, name: str, func, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help)
        p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="run directory (default: runs/demo)")
        p.set_defaults(func=func)
        return p

    data = sub.add_parser("data", help="canonical tables").add_subparsers(dest="cmd", required=True)
    p = command(data, "synth", cmd_synth, "write the synthetic world")
    p.add_argument("--seed", type=int)
    p.add_argument("--users", dest="n_users", type=positive_int)
    p.add_argument("--days", dest="n_days", type=positive_int)
    p.add_argument("--impressions-per-user-day", type=positive_float)
    p.add_argument("--fm-signal-noise", type=non_negative_float, help="noise on the FM-only signal (smaller = bigger FM-VM gap)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="any config value, e.g. fm.code_dim=16")

    def import_arguments(p: argparse.ArgumentParser) -> None:
        p.set_defaults(run_dir=Path("runs/data"))
        p.add_argument("--data", type=Path, required=True, help="the dataset's folder (one file for --format csv)")
        p.add_argument("--format", required=True, help="taobao | bars-taobao | bars-kuaivideo | bars-amazon | movielens | csv")
        p.add_argument("--vertical", required=True, metavar="COLUMN=VALUE[,VALUE...]",
                       help="rows forming the VM's vertical, e.g. pid=430548_1007, cate_id=6261, genre=Comedy")  # fmt: skip
        p.add_argument("--map", action="append", metavar="ROLE=COLUMN",
                       help="csv: user_id, item_id, label required; timestamp|order, category, brand, price, age, "
                            "age_level, gender optional")  # fmt: skip
        p.add_argument("--map-file", type=Path, help="csv: a JSON or YAML file of {role: column}")
        p.add_argument("--click-threshold", type=finite_float, help="label = value >= threshold (movielens default: 4)")
        p.add_argument("--days", type=positive_int, default=10, help="data without absolute times is spread over this many days")
        p.add_argument("--time-unit", choices=TIME_UNITS, help="csv: unit of a numeric timestamp column "
                       "(default: inferred from its size, refused when it cannot be told)")  # fmt: skip
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="any config value, e.g. vm.epochs=2")

    p = command(data, "import", cmd_data_import, "import a dataset on disk into the canonical tables")
    import_arguments(p)
    p = command(sub, "run", cmd_run, "import a dataset on disk and run every training stage on it")
    import_arguments(p)

    fm = sub.add_parser("fm", help="foundation model").add_subparsers(dest="cmd", required=True)
    p = command(fm, "train", cmd_fm_train, "stream-train the FM day by day")
    p.add_argument("--nproc", type=positive_int, help="data-parallel over N local processes (torchrun, gloo)")
    p = command(fm, "log", cmd_fm_log, "write the embedding log (codes + logits)")
    p.add_argument("--scheme", choices=("frozen", "rolling"))
    p.add_argument("--delay-s", type=int, help="logging delay: available_at = event time + delay")
    p.add_argument("--engine", choices=ENGINES, default="local", help=ENGINE_HELP)
    p = command(fm, "import-log", cmd_fm_import_log, "an embedding log from another FM -> compressor -> the embedding log")
    p.add_argument("--embeddings", type=Path, required=True, metavar="FILE",
                   help="parquet: impression_id, embedding (list of float32), optional fm_logit and available_at")  # fmt: skip

    feats = sub.add_parser("features", help="structuring and Feast").add_subparsers(dest="cmd", required=True)
    p = command(feats, "build", cmd_features_build, "write Feast sources and entity frames")
    p.add_argument("--engine", choices=ENGINES, default="local", help=ENGINE_HELP)
    p = command(feats, "apply", cmd_features_apply, "feast apply + feast materialize into Redis")
    p.add_argument("--redis-url")

    vm = sub.add_parser("vm", help="vertical models").add_subparsers(dest="cmd", required=True)
    p = command(vm, "train", cmd_vm_train, "train variants and write the quality table")
    p.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable; default: all four")
    p = command(vm, "export", cmd_vm_export, "export variants to ONNX (with parity check)")
    p.add_argument("--variant", action="append", choices=VARIANTS, help=f"repeatable; default: {SERVED_VARIANT}")

    p = command(sub, "serve", cmd_serve, "serve /score (starts a local Redis and materializes if no REDIS_URL)")
    p.add_argument("--variant", choices=VARIANTS, default=SERVED_VARIANT)
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--redis-url")
    p.add_argument("--workers", type=positive_int, default=os.environ.get("LOOPFM_WORKERS", "1"),
                   help="worker processes sharing the port, one per core (default: $LOOPFM_WORKERS or 1)")

    p = command(sub, "loadtest", cmd_loadtest, "open-loop load test of /score (loopback only)")
    p.add_argument("--url", help="a running server on loopback; default: start one for the run")
    p.add_argument("--variant", choices=VARIANTS, default=SERVED_VARIANT)
    p.add_argument("--rate", type=positive_float, default=200.0, help="offered requests per second")
    p.add_argument("--duration", type=positive_float, default=20.0, help="seconds of sending (bounded)")
    p.add_argument("--candidates", type=positive_int, default=100)
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--hot-fraction", type=fraction, default=0.8, help="share of requests for 100 hot users")
    p.add_argument("--timeout", type=positive_float, default=2.0, help="per-request client timeout, seconds")
    p.add_argument("--sweep", type=rates, help="comma-separated rates: find the highest whose p99 stays under --p99-bound-ms")
    p.add_argument("--p99-bound-ms", type=positive_float, default=10.0)
    p.add_argument("--api-key", default=os.environ.get("LOOPFM_API_KEY"),
                   help="sent as `Authorization: Bearer KEY` (default: $LOOPFM_API_KEY, the server's own)")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default: RUN/results/loadtest)")

    p = command(sub, "ingest", cmd_ingest, "a file of impressions into the live loop: check, publish, apply (a worker), "
                "return; a re-run adds nothing")  # fmt: skip
    event_file_arguments(p, "--events")
    events = sub.add_parser("events", help="the live loop's producers").add_subparsers(dest="cmd", required=True)
    p = command(events, "publish", cmd_events_publish, "check a file of impressions, then publish it to the event stream")
    event_file_arguments(p, "file")
    items = sub.add_parser("items", help="the item catalog").add_subparsers(dest="cmd", required=True)
    p = command(items, "upsert", cmd_items_upsert, "check a catalog file, then publish its items to the event stream")
    p.add_argument("file", type=Path, help="parquet, or CSV / TSV by name (.csv, .tsv, also .gz): item_id, category, brand, price_bucket")
    p.add_argument("--redis-url", help="the online store's server (default: $REDIS_URL)")
    p = command(sub, "stream", cmd_stream, "a worker of the live loop: events -> FM codes -> online store + offline files; "
                "`stream compact`: merge its small offline files")  # fmt: skip
    p.add_argument("action", nargs="?", choices=["compact"], help="compact: merge stream/*/ files into one per day, then exit")
    p.add_argument("--older-than-s", type=float, metavar="S",
                   help="compact: only files written more than S seconds ago (default: stream.lease_ms)")  # fmt: skip
    p.add_argument("--redis-url", help="the online store's server (default: $REDIS_URL)")
    p.add_argument("--name", help="consumer name in the group (default: host-pid)")
    p.add_argument("--until-idle", type=positive_float, metavar="S", help="exit after S seconds with nothing to read")
    p.add_argument("--max-events", type=positive_int, help="exit after handling this many messages")
    p.add_argument("--progress-s", type=positive_float, default=5.0, help="seconds between progress lines")
    p.add_argument("--metrics-port", type=port, help="serve Prometheus metrics on 127.0.0.1:PORT")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    p = command(bench, "serving", cmd_bench_serving, "open loop, /healthz floor, capacity, wrk; 1 and 2 workers, pinned cores")
    p.add_argument("--variant", choices=VARIANTS, default=SERVED_VARIANT)
    p.add_argument("--out", type=Path, default=Path("docs"), help="writes benchmarks.md/json and benchmarks/ plots")
    p.add_argument("--duration", type=positive_float, default=30.0,
                   help="seconds per open-loop point (a third of it per /healthz, sweep, wrk and four-path point); ~10 min at 30")
    p.add_argument("--api-key", default=os.environ.get("LOOPFM_API_KEY"),
                   help="the bench's servers require it and every request carries it (default: $LOOPFM_API_KEY)")  # fmt: skip

    p = bench.add_parser("stream", help="the live loop: freshness and throughput open loop (1 and 2 workers), CPU per "
                         "event against the stored history, /score beside a worker; pinned cores")  # fmt: skip
    p.set_defaults(func=cmd_bench_stream)
    p.add_argument("--run-dir", type=Path, default=Path("runs/bench-stream"),
                   help="the bench's own world, built there if missing (default: runs/bench-stream)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("docs"), help="writes benchmarks-stream.md/json and benchmarks-stream/ plots")
    p.add_argument("--duration", type=positive_float, help="seconds per freshness point (default 60; at most 20 per "
                   "history-cost point and 30 per /score point); ~25 min at 60")  # fmt: skip
    p.add_argument("--rates", type=positive_float, nargs="+", help="offered events/s (default 500 1000 2000 5000 10000)")
    p.add_argument("--workers", type=int, nargs="+", choices=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--history-events", type=positive_int, help="the grown store's stored events (default 10,000,000)")

    p = command(sub, "demo", cmd_demo, "every stage end to end on the embedded defaults")
    p.add_argument("--requests", type=positive_int, default=300, help="requests sent to the server for the latency sample")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a default, e.g. world.n_users=4000")

    from loopfm.experiments.plan import EXPERIMENTS

    p = sub.add_parser("experiment", help="seeded experiments and ablations -> results.md/json (resumable)")
    p.set_defaults(func=cmd_experiment)
    p.add_argument("--out", type=Path, default=Path("runs/results"), help="run directories, one per seed and world; "
                   "an existing one is resumed (finished cells are reused)")  # fmt: skip
    p.add_argument("--docs", type=Path, help="writes results.md, results.json, results/*.png (default: the --out "
                   "folder, so a partial or overridden run never replaces the committed tables; make results passes docs)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="worker processes (each torch thread-limited to 1)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override the bench config (7,600 users, Matryoshka dims 8,16), e.g. world.n_users=2000")  # fmt: skip

    from loopfm.experiments.plan import DEFAULT

    p = sub.add_parser("experiment-real", help="the main table with baselines on data on disk, several seeds "
                       "-> results-real.md/json (resumable)")  # fmt: skip
    p.set_defaults(func=cmd_experiment_real)
    p.add_argument("--suite", choices=list(DEFAULT["real"]["suites"]),
                   help="a named set of sources of loopfm/experiments/experiments.yaml (instead of --data, --format, --dataset)")  # fmt: skip
    p.add_argument("--data", type=Path, help="the dataset's folder or file, as for `loopfm run`")
    p.add_argument("--format", help="as for `loopfm run`")
    p.add_argument("--dataset", action="append", metavar="NAME=COLUMN=VALUE",
                   help="a named vertical rule (repeatable), e.g. comedy=genre=Comedy")  # fmt: skip
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one (seed, source) at a time each (each torch "
                   "thread-limited to 1 when more than one)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/results-real"), help="run directories; an existing one is resumed")
    p.add_argument("--docs", type=Path, help="writes results-real.md, results-real.json, results-real/*.png "
                   "(default: the --out folder; make results-real passes docs)")  # fmt: skip
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a default for every run")
    return parser


# Commands that write their run directory: one at a time per directory (loopfm.core.rundir.run_dir_lock),
# refused before any work on a directory this user cannot write. serve only reads its run;
# features apply and loadtest write it unless told to write elsewhere (written_dir). ingest and
# stream only append new files under stream/ (loopfm/data/streamed.py), beside each other;
# bench stream builds its world through these commands, each taking the lock itself.
WRITERS = (cmd_synth, cmd_data_import, cmd_run, cmd_fm_train, cmd_fm_log, cmd_fm_import_log, cmd_features_build,
           cmd_vm_train, cmd_vm_export, cmd_bench_serving, cmd_demo)  # fmt: skip
ELSEWHERE = {  # how a command that can also just read its run is told to write elsewhere
    cmd_features_apply: ", or set LOOPFM_REGISTRY to a writable file outside the run (Feast's registry; the run is then only read)",
    cmd_loadtest: ", or pass --out to write the report outside the run",
}


def preconditions(args: argparse.Namespace) -> None:
    """What the command needs, checked before it starts anything (loopfm/pipeline/checks.py);
    ConfigError naming the flag, file or stage otherwise."""
    from loopfm.pipeline import checks

    needs = {
        cmd_data_import: checks.data_import, cmd_run: checks.run,
        cmd_fm_train: checks.fm_train, cmd_fm_log: checks.fm_log, cmd_fm_import_log: checks.fm_import_log,
        cmd_features_build: checks.features_build,
        cmd_features_apply: checks.features_apply, cmd_vm_train: checks.vm_train, cmd_vm_export: checks.vm_export,
        cmd_serve: checks.serve, cmd_loadtest: checks.loadtest, cmd_bench_serving: checks.bench_serving,
        cmd_ingest: checks.ingest, cmd_events_publish: checks.publish, cmd_items_upsert: checks.publish, cmd_stream: checks.stream,
        cmd_demo: checks.demo, cmd_experiment_real: checks.experiment_real,
    }  # fmt: skip
    if args.func in needs:
        needs[args.func](args)


def written_dir(args: argparse.Namespace) -> Path | None:
    """The folder this command writes (and locks), or None for a command that only reads its run."""
    if args.func in (cmd_experiment, cmd_experiment_real):
        return args.out
    if args.func is cmd_features_apply:
        from loopfm.features.store import registry_path

        return args.run_dir if registry_path(args.run_dir).is_relative_to(args.run_dir.resolve()) else None
    if args.func is cmd_loadtest:
        return args.run_dir if args.out is None else None
    return args.run_dir if args.func in WRITERS else None


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT: unwinds the command so every `finally` stops its children."""


def _stop(signum: int, frame) -> None:
    """First SIGTERM/SIGINT: stop the multiprocessing workers (and what they started: a
    worker killed by a signal cannot stop its own children) and unwind the main thread, whose
    `finally` blocks stop the servers. Later signals are ignored, so they cannot interrupt
    that clean-up."""
    from loopfm.pipeline.services import descendants

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    for child in multiprocessing.active_children():
        for pid in [*descendants(child.pid), child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    from loopfm.core.files import NO_ROOM
    from loopfm.core.rundir import run_dir_lock

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # library deprecations are not the user's concern
    for sig in (signal.SIGTERM, signal.SIGINT):  # process managers stop with SIGTERM, a terminal with SIGINT
        signal.signal(sig, _stop)
    command = " ".join(["loopfm", *(sys.argv[1:] if argv is None else argv)])
    try:
        target = written_dir(args)
        with run_dir_lock(target, command, ELSEWHERE.get(args.func, "")) if target is not None else contextlib.nullcontext():
            preconditions(args)  # under the lock: no other writer changes what was checked
            args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"loopfm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused a write (loopfm.core.files.atomic_write names the file)
        if exc.errno not in NO_ROOM:
            raise
        print(f"loopfm: error: cannot write {exc.filename or 'a file'} ({os.strerror(exc.errno)}; it keeps its previous "
              "content): make room there, or write elsewhere, and run this again", file=sys.stderr)  # fmt: skip
        return 2
    except Stopped as stop:
        print(f"loopfm: stopped by {signal.Signals(stop.args[0]).name}", file=sys.stderr)
        return 128 + stop.args[0]
    except KeyboardInterrupt:
        return 130
    return 0


def entry() -> None:
    """The `loopfm` command: main(), then atexit handlers (Ray, servers, temp folders), then
    exit without the interpreter's module teardown, where pyarrow's thread pool can abort a
    process that has already finished its work (apache/arrow#34314: "terminate called
    without an active exception", seen here on a loaded machine)."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()

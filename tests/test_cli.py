"""CLI errors name the file, flag or key, and never print a stack trace."""

import json
import os
import threading
from pathlib import Path

import pytest

from conftest import loopfm, refusal
from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION


def test_a_stage_run_before_its_inputs_exist_names_the_missing_file(tmp_path):
    r = loopfm("fm", "train", "--run-dir", str(tmp_path / "nowhere"), check=False)
    assert r.returncode == 2
    assert "config.json" in r.stderr and "loopfm data synth" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_config_keys_are_named(tmp_path):
    r = refusal("data", "synth", "--run-dir", str(tmp_path), "--set", "fm.cod_dim=8")
    assert r.returncode == 2 and "fm.cod_dim" in r.stderr and "fm.code_dim" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text(json.dumps({FORMAT_KEY: FORMAT_VERSION, "world": {"n_userz": 3}}))
    r = refusal("fm", "train", "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "n_userz" in r.stderr and "config.json" in r.stderr


def test_a_config_of_another_format_version_is_refused_naming_what_to_re_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"world": {"n_users": 3}}))  # no format_version: an older loopfm
    r = refusal("fm", "train", "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"reads version {FORMAT_VERSION}" in r.stderr and "loopfm data synth|import" in r.stderr


def test_wrongly_typed_values_and_unknown_variants_are_refused(tmp_path):
    r = refusal("data", "synth", "--run-dir", str(tmp_path), "--set", "fm.code_dim=big")
    assert r.returncode == 2 and "fm.code_dim must be of type int" in r.stderr
    r = refusal("vm", "train", "--run-dir", str(tmp_path), "--variant", "huge")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not (tmp_path / "config.json").exists()  # nothing half-written by a refused command


def test_a_synth_refused_for_an_inconsistent_world_leaves_nothing_behind(tmp_path):
    r = refusal("data", "synth", "--run-dir", str(tmp_path), "--set", "world.vertical_mix=[1.0]")
    assert r.returncode == 2 and "vertical_mix" in r.stderr
    assert not any(tmp_path.iterdir())


def test_an_odd_code_dim_is_refused_naming_the_rule(tmp_path):
    r = refusal("data", "synth", "--run-dir", str(tmp_path), "--set", "fm.code_dim=7")
    assert r.returncode == 2 and "fm.code_dim must be a positive even number" in r.stderr


def test_an_unknown_encoder_is_refused_before_anything_trains_naming_the_valid_ones(tmp_path):
    r = refusal("data", "synth", "--run-dir", str(tmp_path), "--set", "vm.encoder=transformer")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "vm.encoder must be one of" in r.stderr and "dot_mlp" in r.stderr
    assert not any(tmp_path.iterdir())


def test_a_negative_recency_decay_is_refused_naming_the_rule():
    from loopfm.core.config import ConfigError, RunConfig

    cfg = RunConfig()
    cfg.override("vm.recency_decay=-0.1")  # --set refuses NaN itself
    with pytest.raises(ConfigError, match="vm.recency_decay must be a number >= 0"):
        cfg.validate()


def test_a_half_life_of_zero_events_for_the_fm_rate_lately_is_refused_naming_the_rule(tmp_path):
    r = refusal("data", "synth", "--run-dir", str(tmp_path), "--set", "fm.recent_half_life=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fm.recent_half_life must be positive (events)" in r.stderr
    assert not any(tmp_path.iterdir())


def test_a_second_writer_of_a_run_directory_stops_at_once_naming_the_holder(tmp_path):
    """Every writing command takes the run directory's lock (loopfm.core.rundir.run_dir_lock); the
    holder here is this test, as a training or a build would be. The first writer is another
    process; the others run in this one, where the lock (flock on a file descriptor of its
    own) refuses them alike."""
    from loopfm.core.rundir import run_dir_lock

    run = tmp_path / "run"
    with run_dir_lock(run, "loopfm vm train --variant base"):
        writers = [lambda *a: loopfm(*a, check=False), refusal, refusal, refusal]
        for writer, args in zip(writers, (("features", "build"), ("fm", "log"), ("data", "synth"), ("vm", "export"))):
            r = writer(*args, "--run-dir", str(run))
            assert r.returncode == 2 and "Traceback" not in r.stderr
            assert f"{run} is being written by pid {os.getpid()} (`loopfm vm train --variant base`" in r.stderr
    r = refusal("fm", "log", "--run-dir", str(run))  # released: now the usual message
    assert r.returncode == 2 and "config.json" in r.stderr


def test_a_writer_refused_before_the_holder_names_itself_waits_for_the_name(tmp_path):
    """The holder writes `<lock>.holder` just after taking the lock: a writer refused in between
    waits for the name (here written 0.2 s late) instead of saying "another loopfm process"."""
    from filelock import FileLock

    from loopfm.core.rundir import RunDirBusy, lock_path, run_dir_lock

    run = tmp_path / "run"
    lock = lock_path(run)
    holder = lock.with_name(lock.name + ".holder")
    with FileLock(lock):
        late = threading.Timer(0.2, lambda: holder.write_text("pid 4242 (`loopfm vm train --variant base`, since now)"))
        late.start()
        with pytest.raises(RunDirBusy, match=r"being written by pid 4242 \(`loopfm vm train"):
            run_dir_lock(run, "loopfm features build").__enter__()
        late.join()


def test_a_lock_released_while_a_writer_waits_for_the_name_is_taken(tmp_path):
    from filelock import FileLock

    from loopfm.core.rundir import lock_path, run_dir_lock

    run = tmp_path / "run"
    lock = FileLock(lock_path(run), thread_local=False)  # released by the timer's thread
    lock.acquire()
    threading.Timer(0.2, lock.release).start()
    with run_dir_lock(run, "loopfm features build"):  # no holder name ever appears; the lock frees
        assert "pid" in lock_path(run).with_name(f".{run.name}.lock.holder").read_text()


def test_atomically_written_files_get_the_umask_s_mode_not_a_private_one(tmp_path):
    from loopfm.core.files import atomic_write, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "model.json", "{}")
        atomic_write(tmp_path / "model.onnx", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"model.json": "0o644", "model.onnx": "0o644"}


@pytest.mark.parametrize(
    "args, flag",
    [
        (("serve", "--workers", "0"), "--workers"),
        (("serve", "--workers", "two"), "--workers"),
        (("bench", "serving", "--duration", "0"), "--duration"),
        (("bench", "serving", "--duration", "nan"), "--duration"),
    ],
)
def test_a_worker_count_or_bench_duration_out_of_range_is_refused_naming_the_flag(tmp_path, args, flag):
    r = refusal(*args, "--run-dir", str(tmp_path))
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr


def test_a_saved_config_carries_the_format_version_and_reads_back_equal(tmp_path):
    from loopfm.core.config import RunConfig

    cfg = RunConfig()
    cfg.override("fm.extract_layer=hidden1,hidden2")
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[FORMAT_KEY] == FORMAT_VERSION
    assert RunConfig.load(tmp_path) == cfg


def test_experiments_write_their_tables_into_their_out_folder_unless_given_docs():
    """A partial or overridden experiment run (`--set`, `--experiments main,length`) once
    replaced the committed docs/results.md with its own tables by default."""
    from loopfm.pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["experiment", "--out", "runs/x"]).docs is None
    assert parser.parse_args(["experiment-real", "--data", "d", "--format", "movielens", "--dataset", "a=b=c"]).docs is None
    make = (Path(__file__).parents[1] / "Makefile").read_text()
    assert parser.parse_args(["experiment-real", "--suite", "results-real"]).docs is None
    assert "--out runs/results --docs docs" in make and "--seeds 5 --docs docs" in make  # make results / results-real

"""`loopfm fm import-log`: an embedding log from another model enters at the compression stage,
the compressor learns only from what was available before the VM's training window, the
rest of the pipeline runs unchanged, and every row it cannot use is named with nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SMALL_WORLD, loopfm
from loopfm.core.config import RunConfig
from loopfm.fm.imported import import_embedding_log
from loopfm.core.rundir import RunPaths
from loopfm.core.timeunits import US_PER_DAY, unix_us
from loopfm.pipeline.cli import main

LOG_COLUMNS = ["impression_id", "user_id", "event_timestamp", "available_at", "fm_code", "fm_logit", "fm_trained_until"]
WIDTH = 12


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    """A small synthetic world: tables and config only, no FM."""
    run = tmp_path_factory.mktemp("imported") / "run"
    loopfm("data", "synth", "--run-dir", str(run), *SMALL_WORLD)
    return run


@pytest.fixture
def run(data_run: Path, tmp_path: Path) -> Path:
    """A private copy of the data-only run, for tests that import into it."""
    return Path(shutil.copytree(data_run, tmp_path / "run"))


def embedding_table(run: Path, seed: int = 0) -> pd.DataFrame:
    """One row per impression: a random vector per user and per item, the true click logit
    (the synthetic world's truth) plus noise in the first dimension, and an fm_logit."""
    rng = np.random.default_rng(seed)
    imp = pd.read_parquet(RunPaths(run).table("impressions"))
    truth = pd.read_parquet(RunPaths(run).table("truth")).set_index("impression_id").loc[imp["impression_id"], "p_true"]
    true_logit = np.log(truth.to_numpy() / (1 - truth.to_numpy()))
    users = rng.normal(size=(imp["user_id"].max() + 1, WIDTH // 2 - 1))
    items = rng.normal(size=(imp["item_id"].max() + 1, WIDTH // 2))
    x = np.concatenate([(true_logit + 0.3 * rng.normal(size=len(imp)))[:, None], users[imp["user_id"]], items[imp["item_id"]]], axis=1)
    return pd.DataFrame({"impression_id": imp["impression_id"], "embedding": list(x.astype(np.float32)),
                         "fm_logit": (true_logit + rng.normal(size=len(imp))).astype(np.float32)})  # fmt: skip


def write(df: pd.DataFrame, path: Path, fixed_size: bool = False) -> Path:
    table = pa.Table.from_pandas(df, preserve_index=False)
    if fixed_size:
        flat = pa.array(np.concatenate(df["embedding"].to_numpy()), type=pa.float32())
        table = table.set_column(table.column_names.index("embedding"), "embedding", pa.FixedSizeListArray.from_arrays(flat, WIDTH))
    pq.write_table(table, path)
    return path


def quick_config(run: Path) -> RunConfig:
    """The run's config with a compressor fit of at most 4 epochs (what is tested holds for any)."""
    cfg = RunConfig.load(run)
    cfg.override("fm.warmup_epochs=4")
    return cfg


def window_start_us(cfg: RunConfig) -> int:
    return pd.Timestamp(cfg.world.start_date, tz="UTC").value // 1000 + cfg.fm.warmup_days * US_PER_DAY


def test_an_imported_log_is_the_standard_log_that_features_build_and_vm_train_accept(run: Path, redis_url: str):
    emb = embedding_table(run)
    path = write(emb, run.parent / "embeddings.parquet", fixed_size=True)
    loopfm("fm", "import-log", "--run-dir", str(run), "--embeddings", str(path))
    paths, cfg = RunPaths(run), RunConfig.load(run)
    log = pd.read_parquet(paths.fm_log)
    assert list(log.columns) == LOG_COLUMNS
    assert {len(code) for code in log["fm_code"]} == {cfg.fm.code_dim // 2}  # int4, two dims a byte
    assert np.array_equal(log["fm_logit"].to_numpy(), emb["fm_logit"].to_numpy())  # the KD label as given
    delay = pd.Timedelta(seconds=cfg.fm.logging_delay_s)
    assert (log["available_at"] == log["event_timestamp"] + delay).all()  # the default availability
    assert (unix_us(log["fm_trained_until"]) == window_start_us(cfg)).all()

    loopfm("features", "build", "--run-dir", str(run))
    loopfm("features", "apply", "--run-dir", str(run), "--redis-url", redis_url)
    loopfm("vm", "train", "--run-dir", str(run), "--variant", "base", "--variant", "loopfm_kd")
    models = json.loads((paths.results / "quality.json").read_text())["models"]
    assert {"fm", "base", "loopfm_kd"} <= set(models) and 0.5 < models["loopfm_kd"]["auc"] < 1
    train = pd.read_parquet(paths.features / "vm_train_entities.parquet")
    assert np.array_equal(train["fm_logit"].to_numpy(), emb.set_index("impression_id").loc[train["impression_id"], "fm_logit"].to_numpy())


def test_the_compressor_learns_only_from_embeddings_available_before_the_vm_window(run: Path):
    """Rows available at or after the window start may hold anything: the compressor, and the
    codes of every earlier row, come out bit-identical. A row whose event is early but whose
    embedding arrived late does not train it either."""
    paths, cfg = RunPaths(run), quick_config(run)
    emb = embedding_table(run)
    event_us = unix_us(pd.read_parquet(paths.table("impressions"))["event_timestamp"]).to_numpy()
    available = event_us + 3_600 * 10**6
    available[::7] += 20 * US_PER_DAY  # every 7th embedding logged 20 days late
    emb["available_at"] = pd.to_datetime(available, unit="us", utc=True)
    early = available < window_start_us(cfg)
    assert early.sum() > 1000 and (~early & (event_us < window_start_us(cfg))).sum() > 100

    summary = import_embedding_log(paths, cfg, write(emb, run.parent / "a.parquet"))
    codes = pd.read_parquet(paths.fm_log)["fm_code"]
    assert summary["compressor_rows"] == early.sum()
    assert pd.Timestamp(summary["compressor_newest_available_at"]).value // 1000 == available[early].max()

    late = ~early
    noise = np.random.default_rng(1).normal(scale=100.0, size=(late.sum(), WIDTH)).astype(np.float32)
    emb.loc[late, "embedding"] = pd.Series(list(noise), index=emb.index[late])
    again = import_embedding_log(paths, cfg, write(emb, run.parent / "b.parquet"))
    assert again["compressor"] == summary["compressor"]  # the same epochs and validation losses
    recoded = pd.read_parquet(paths.fm_log)["fm_code"]
    assert (recoded[early] == codes[early]).all() and not (recoded[late] == codes[late]).all()


def test_without_fm_logit_the_kd_label_is_a_probe_fitted_before_the_window(run: Path):
    paths, cfg = RunPaths(run), quick_config(run)
    emb = embedding_table(run).drop(columns="fm_logit")
    summary = import_embedding_log(paths, cfg, write(emb, run.parent / "e.parquet"))
    assert summary["kd_label"].startswith("logistic regression on the embedding")
    logit = pd.read_parquet(paths.fm_log)["fm_logit"].to_numpy()
    true_logit = np.stack(emb["embedding"].to_numpy())[:, 0]  # the first dimension carries the truth
    assert np.corrcoef(logit, true_logit)[0, 1] > 0.9


def _drop_first_impression(df):
    return df.iloc[1:]


def _unknown_id(df):
    return df.assign(impression_id=df["impression_id"].replace({5: 10**9}))


def _duplicate(df):
    return pd.concat([df, df.iloc[[3]]])


def _with_embedding(df, position: int, value):
    embeddings = list(df["embedding"])
    embeddings[position] = value
    return df.assign(embedding=pd.Series(embeddings, index=df.index, dtype=object))


def _nan(df):
    return _with_embedding(df, 4, np.array([np.nan] + [0.0] * (WIDTH - 1), np.float32))


def _short(df):
    return _with_embedding(df, 6, np.zeros(WIDTH - 1, np.float32))


def _null_embedding(df):
    return _with_embedding(df, 2, None)


def _null_id(df):
    return df.assign(impression_id=df["impression_id"].astype("Int64").mask(df.index == 8))


def _logit_inf(df):
    return df.assign(fm_logit=df["fm_logit"].mask(df.index == 9, np.inf))


def _early(df):
    return df.assign(available_at=pd.Timestamp("2000-01-01", tz="UTC"))


BAD = {
    "impressions without an embedding": (_drop_first_impression, "'impression_id': 1 impression(s) of the run have no embedding, impression id(s) [0]"),
    "unknown ids": (_unknown_id, "'impression_id': ids that are no impression of the run in 1 row(s), impression id(s) [1000000000]"),
    "duplicate ids": (_duplicate, "'impression_id': ids given more than once in 2 row(s), impression id(s) [3, 3]"),
    "null impression id": (_null_id, "'impression_id': missing in 1 row(s), row(s) [9]"),
    "NaN in an embedding": (_nan, "'embedding': NaN, infinite or null values in 1 row(s), impression id(s) [4]"),
    "wrong width": (_short, f"'embedding': widths differ ({WIDTH} ("),
    "null embedding": (_null_embedding, "'embedding': missing embedding in 1 row(s), impression id(s) [2]"),
    "infinite fm_logit": (_logit_inf, "'fm_logit': NaN, infinite or null values in 1 row(s), impression id(s) [9]"),
    "available before the event": (_early, "'available_at': before the impression's event time in"),
    "an embedding of text": (lambda df: df.assign(embedding="x"), "'embedding': expected a list or fixed-size list of float32, got string"),
    "missing column": (lambda df: df.drop(columns="embedding"), "missing column(s) ['embedding']"),
    "unknown column": (lambda df: df.assign(fm_logits=0.0), "unknown column(s) ['fm_logits']; expected ['impression_id', 'embedding']"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_a_row_it_cannot_use_is_named_and_nothing_is_written(data_run: Path, tmp_path: Path, capsys, case: str):
    change, message = BAD[case]
    path = write(change(embedding_table(data_run)), tmp_path / "bad.parquet")
    assert main(["fm", "import-log", "--run-dir", str(data_run), "--embeddings", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loopfm: error: {path}: ") and message in err and "Traceback" not in err
    assert not RunPaths(data_run).fm.exists()  # no log, no summary


def test_a_file_that_is_no_parquet_or_absent_is_named(data_run: Path, tmp_path: Path, capsys):
    text = tmp_path / "embeddings.parquet"
    text.write_text("impression_id,embedding\n")
    for path, message in ((text, "not a readable parquet file"), (tmp_path / "absent.parquet", "no such file")):
        assert main(["fm", "import-log", "--run-dir", str(data_run), "--embeddings", str(path)]) == 2
        assert f"loopfm: error: {path}: {message}" in capsys.readouterr().err
    assert not RunPaths(data_run).fm.exists()


def test_embeddings_all_available_after_the_window_start_are_refused(data_run: Path, tmp_path: Path, capsys):
    emb = embedding_table(data_run).assign(available_at=pd.Timestamp("2026-12-31", tz="UTC"))
    path = write(emb, tmp_path / "late.parquet")
    assert main(["fm", "import-log", "--run-dir", str(data_run), "--embeddings", str(path)]) == 2
    assert "0 embedding(s) available before the VM's training window" in capsys.readouterr().err
    assert not RunPaths(data_run).fm.exists()


def test_the_worked_example_s_mf_embeddings_import_as_the_fm_log(run: Path, tmp_path: Path):
    """docs/your-data.md's worked example: examples/mf_embeddings.py, then `loopfm fm import-log`."""
    out = tmp_path / "mf.parquet"
    example = Path(__file__).parents[1] / "examples" / "mf_embeddings.py"
    subprocess.run([sys.executable, str(example), "--run-dir", str(run), "--out", str(out), "--dim", "4", "--steps", "5"],
                   check=True, capture_output=True)  # fmt: skip
    loopfm("fm", "import-log", "--run-dir", str(run), "--embeddings", str(out))
    assert (RunPaths(run).fm / "fm_event_embeddings.parquet").exists() and (RunPaths(run).fm / "import_summary.json").exists()

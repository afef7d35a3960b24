"""Importers: files a user has on disk -> the canonical tables of a run (`loopfm data import`,
`loopfm run`). One module per format family; `canonical` holds what they share."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from loopfm.core.config import ConfigError, RunConfig
from loopfm.data.importers.bars import ROLE_MAPS, read_bars
from loopfm.data.importers.canonical import TARGET, DataFormatError, Span, VerticalRule, canonical
from loopfm.data.importers.mapped import read_mapped
from loopfm.data.importers.movielens import read_movielens
from loopfm.data.importers.taobao import read_taobao
from loopfm.data.run_data import replace_data
from loopfm.data.vocab import Vocab, check_vm_windows

FORMATS = ("taobao", *ROLE_MAPS, "movielens", "csv")
MIN_DAYS = 3  # FM warm-up, VM training and a held-out window need a day each at least


@dataclass(frozen=True)
class ImportOptions:
    fmt: str
    rule: VerticalRule
    roles: dict[str, str] = field(default_factory=dict)  # csv only: role -> column
    click_threshold: float | None = None  # label = value >= threshold (MovieLens default: 4)
    days: int = 10  # data without absolute times is spread over this many days
    time_unit: str | None = None  # csv: unit of a numeric timestamp column (s, ms, us, ns); None infers it


@dataclass(frozen=True)
class Imported:
    tables: dict[str, pd.DataFrame]
    span: Span
    vocab: Vocab


def read_source(path: Path, opts: ImportOptions) -> pd.DataFrame:
    """The format's impressions with canonical columns (see canonical.py), all files checked."""
    if opts.fmt == "csv":
        if not path.is_file():
            raise DataFormatError(f"{path}: --format csv needs one CSV or parquet file")
        return read_mapped([path], opts.roles, integer_ids=False, click_threshold=opts.click_threshold, time_unit=opts.time_unit)
    if not path.is_dir():
        raise DataFormatError(f"{path}: --format {opts.fmt} needs the folder holding the dataset's files")
    if opts.fmt == "taobao":
        return read_taobao(path)
    if opts.fmt == "movielens":
        return read_movielens(path, 4.0 if opts.click_threshold is None else opts.click_threshold)
    if opts.fmt in ROLE_MAPS:
        return read_bars(path, opts.fmt)
    raise DataFormatError(f"--format {opts.fmt!r}: one of {', '.join(FORMATS)}")


def import_data(path: Path, opts: ImportOptions) -> Imported:
    """Read, check and convert everything in memory; nothing is written here."""
    tables, span = canonical(read_source(path, opts), opts.rule, opts.days)
    return Imported(tables, span, Vocab.from_tables(tables["users"], tables["items"]))


def configure(cfg: RunConfig, imported: Imported, explicit: set[str]) -> RunConfig:
    """The run's world becomes the data's span and sizes (imported data has no FM-only signal);
    the FM warm-up and the held-out window default to 30% and 20% of the days unless set."""
    span, vocab = imported.span, imported.vocab
    if span.n_days < MIN_DAYS:
        raise ConfigError(f"the data spans {span.n_days} day(s) from {span.start_date}; the pipeline needs at least "
                          f"{MIN_DAYS} (FM warm-up, VM training, held-out window); data without times: raise --days")  # fmt: skip
    cfg.world = replace(
        cfg.world, start_date=span.start_date, n_days=span.n_days, verticals=span.verticals,
        vertical_mix=span.vertical_mix, n_users=vocab.n_users, n_categories=vocab.n_categories,
        n_brands=vocab.n_brands, latent_dim=0,
    )  # fmt: skip
    cfg.vm = replace(cfg.vm, target_vertical=TARGET)
    if "vm.eval_days" not in explicit:
        cfg.vm = replace(cfg.vm, eval_days=max(1, round(span.n_days * 0.2)))
    if "fm.warmup_days" not in explicit:
        cfg.fm = replace(cfg.fm, warmup_days=max(1, min(round(span.n_days * 0.3), span.n_days - cfg.vm.eval_days - 1)))
    check_vm_windows(imported.tables["impressions"], cfg.validate(), "choose another --vertical or --set fm.warmup_days=N / vm.eval_days=N")
    return cfg


def write_imported(run_dir: Path, imported: Imported, cfg: RunConfig) -> None:
    """Write the tables and vocab.json into a fresh folder, then swap it for `data/` and save
    the config: an import that fails leaves the run directory as it was."""
    replace_data(run_dir, imported.tables, imported.vocab)
    cfg.save(run_dir)

"""What `loopfm experiment` and `loopfm experiment-real` run: worlds, VM cells, and the
comparisons each experiment reports, read from the named configurations of experiments.yaml.

A *world* is one run directory whose single Feast retrieval many VM cells share. Its `data`
names imported data on disk ("" = the synthetic world). Its `scale` overrides set the
population (the number of users): worlds of one data and scale share their impressions and
labels, so their cells pair, and each has its own base VM and FM (its *home* world). Its `fm`
overrides need an FM of their own; its `log` overrides only re-log and re-structure from that
FM's checkpoints. A *cell* is one VM trained in a world, with `vm` overrides applied at training
time only. Every experiment point is a set of cells, one per seed. The synthetic main table and
the length sweep run on the bench world; the other sweeps on the smaller sweep world
(docs/experiments.md, "The two worlds").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loopfm.core.config import ConfigError, RunConfig

Overrides = tuple[tuple[str, object], ...]
CONFIG = Path(__file__).with_name("experiments.yaml")


def slug(overrides: Overrides) -> str:
    """A readable, filesystem-safe name for a set of overrides ("default" when empty)."""
    text = "_".join(f"{k.split('.')[-1]}={json.dumps(v, separators=(',', ''))}" for k, v in overrides)
    return re.sub(r"[^A-Za-z0-9=.,_-]", "", text) or "default"


@dataclass(frozen=True)
class World:
    fm: Overrides = ()
    log: Overrides = ()
    scale: Overrides = ()  # world.n_users: () = the bench world's
    data: str = ""  # a named data set on disk (Source); "" = the synthetic world

    @property
    def path(self) -> str:
        """Relative to the seed directory: derived worlds live inside their FM's root world,
        root worlds of another scale or data inside a folder of their own."""
        root = f"fm-{slug(self.fm)}"
        root = f"{slug(self.scale)}/{root}" if self.scale else root
        root = f"{self.data}/{root}" if self.data else root
        return f"{root}/log-{slug(self.log)}" if self.log else root

    @property
    def root(self) -> "World":
        """The world that trains this world's FM."""
        return World(self.fm, scale=self.scale, data=self.data)

    @property
    def home(self) -> "World":
        """The world of this data and scale with the default FM and log: the eval rows, base VM
        and (synthetic) Bayes ceiling every world of it is read against."""
        return World(scale=self.scale, data=self.data)

    @property
    def overrides(self) -> tuple[Overrides, ...]:
        return (self.scale, self.fm, self.log)


MAIN = World()


@dataclass(frozen=True)
class Cell:
    world: World
    variant: str
    vm: Overrides = ()
    latency: bool = False  # also export to ONNX and time it at 100 and 1,000 candidates

    @property
    def path(self) -> str:
        return f"{self.world.path}/cells/{self.variant}__{slug(self.vm)}"


@dataclass(frozen=True)
class Point:
    """One row of an experiment table: named cells (e.g. kd, loopfm_kd) at a sweep value."""

    label: str
    x: object
    cells: dict[str, Cell]


@dataclass(frozen=True)
class Claim:
    """`better` is claimed to beat `worse` (both named cells of the experiment's points)."""

    label: str
    better: Cell
    worse: Cell


@dataclass
class Experiment:
    name: str
    title: str
    points: list[Point] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    on_sweep_world: bool = False
    goals: tuple[str, ...] = ()  # report.GOALS keys
    columns: str = ""  # render.COLUMNS key: what the table shows beside the cells
    plot: object = ()  # render: metrics of a sweep plot, or a render.PLOTS key
    note: str = ""


@dataclass(frozen=True)
class Source:
    """A named vertical of data on disk: what `loopfm run` takes (loopfm/data/importers)."""

    data: Path
    format: str
    vertical: str
    map: tuple[tuple[str, str], ...] = ()
    click_threshold: float | None = None
    time_unit: str | None = None

    def options(self):
        from loopfm.data.importers import ImportOptions
        from loopfm.data.importers.canonical import VerticalRule

        return ImportOptions(self.format, VerticalRule.parse(self.vertical), dict(self.map), self.click_threshold,
                             time_unit=self.time_unit)  # fmt: skip


def load_config(path: Path = CONFIG) -> dict:
    """experiments.yaml (or a file of the same shape); ConfigError naming the file otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the experiments file: {exc}") from None
    if not isinstance(raw, dict) or not {"bench", "sweep_share", "experiments", "real"} <= set(raw):
        raise ConfigError(f"{path}: expected the keys bench, sweep_share, experiments and real (as loopfm/experiments/experiments.yaml)")
    return raw


def bench_overrides(config: dict) -> Overrides:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config["bench"].items())


DEFAULT = load_config()
EXPERIMENTS = tuple(DEFAULT["experiments"])


def sweep_scale(bench_users: int, share: float = DEFAULT["sweep_share"]) -> Overrides:
    """The sweep world's scale: `share` of the bench world's users (at least 1)."""
    return (("world.n_users", max(1, round(bench_users * share))),)


def _differing(cfg: RunConfig, overrides: dict | None) -> Overrides:
    """The overrides (SECTION.KEY: value) whose value is not `cfg`'s already, in their order."""
    out = []
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not hasattr(getattr(cfg, section, None), name):
            raise ConfigError(f"experiments.yaml: {key!r} is no config key (section.key, as --set takes)")
        current = getattr(getattr(cfg, section), name)
        if (list(current) if isinstance(current, tuple) else current) != value:
            out.append((key, tuple(value) if isinstance(value, list) else value))
    return tuple(out)


def _cell(cfg: RunConfig, home: World, variant: str, spec: dict, latency: bool) -> Cell:
    """A cell of `variant` with a point's fm/log/vm overrides (those equal to `cfg` dropped); a VM
    history longer than the world stores moves to the log overrides (the world must store it)."""
    fm, log, vm = (_differing(cfg, spec.get(kind)) for kind in ("fm", "log", "vm"))
    longer = tuple((k, v) for k, v in vm if k == "vm.history_length" and v > cfg.vm.history_length)
    vm = tuple(kv for kv in vm if kv not in longer)
    return Cell(World(fm, log + longer, home.scale, home.data), variant, vm, latency)


def build_experiments(names: tuple[str, ...], cfg: RunConfig, config: dict | None = None) -> list[Experiment]:
    """The named experiments of `config` (experiments.yaml) on the world `cfg` configures
    (the bench world; sweeps on SWEEP_SHARE of its users), in the file's order."""
    config = config or DEFAULT
    declared = config["experiments"]
    sweep = World(scale=sweep_scale(cfg.world.n_users, config["sweep_share"]))
    out = []
    for name in (n for n in declared if n in names):
        spec = declared[name]
        home = sweep if spec.get("world") == "sweep" else MAIN
        points = []
        for p in spec["points"]:
            vary = p.get("vary", spec.get("vary", spec["cells"]))
            cells = {v: _cell(cfg, home, v, p if v in vary else {}, bool(spec.get("latency"))) for v in spec["cells"]}
            points.append(Point(str(p["label"]), p.get("x"), cells))
        by_label = {p.label: p for p in points}

        def named(ref: str) -> Cell:
            label, _, variant = ref.rpartition("/")
            if label not in by_label or variant not in by_label[label].cells:
                raise ConfigError(f"experiments.yaml: {name}: claim names {ref!r}, not a `point label/cell` of it")
            return by_label[label].cells[variant]

        claims = [Claim(f"{p.label}: LoopFM+KD vs KD", p.cells["loopfm_kd"], p.cells["kd"]) for p in points] if spec.get("gains") else []
        claims += [Claim(label, named(a), named(b)) for label, a, b in spec.get("claims", [])]
        out.append(Experiment(name, spec["title"], points, claims, home != MAIN, tuple(spec.get("goals", ())),
                              spec.get("columns", ""), spec.get("plot", ()), spec.get("note", "")))  # fmt: skip
    return out


def real_sources(suite: str, config: dict | None = None) -> dict[str, Source]:
    """The named verticals of a suite of experiments.yaml's `real` section; ConfigError naming
    --suite when it has no such suite."""
    suites = (config or DEFAULT)["real"]["suites"]
    if suite not in suites:
        raise ConfigError(f"--suite {suite!r}: not in experiments.yaml; choose from {', '.join(suites)}")
    return {name: Source(Path(s["data"]), s["format"], s["vertical"], tuple((s.get("map") or {}).items()),
                         s.get("click_threshold"), s.get("time_unit")) for name, s in suites[suite].items()}  # fmt: skip


def real_experiment(sources: dict[str, Source], config: dict | None = None) -> list[Experiment]:
    """The main experiment's cells on every named source: one experiment per source, named by it."""
    main = (config or DEFAULT)["experiments"]["main"]
    return [Experiment(name, name, [Point(name, None, {v: Cell(World(data=name), v) for v in main["cells"]})]) for name in sources]


def cells_of(experiments: list[Experiment]) -> list[Cell]:
    """Every distinct cell, in a stable order; the base VM of every home world is included
    (every TR of that world needs it)."""
    seen: dict[str, Cell] = {}
    for e in experiments:
        for p in e.points:
            for c in p.cells.values():
                base = Cell(c.world.home, "base")
                seen.setdefault(base.path, base)
                # a cell timed for latency anywhere is timed
                seen[c.path] = c if c.latency or c.path not in seen else seen[c.path]
    return list(seen.values())

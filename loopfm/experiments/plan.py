"""What `loopfm experiment` runs: worlds, VM cells, and the comparisons each experiment reports.

A *world* is one run directory whose single Feast retrieval many VM cells share. Its `scale`
overrides set the population (the number of users): worlds of one scale share their
impressions and labels, so their cells pair, and each scale has its own base VM and FM (its
*home* world). Its `fm` overrides need an FM of their own (a new world or FM config); its
`log` overrides only re-log and re-structure from that FM's checkpoints (checkpoint scheme,
logging delay, code format or prefix, stored history length). A *cell* is one VM trained in
a world, with `vm` overrides applied at training time only (encoder, size, a history length
up to the world's). Every experiment point is a set of cells, one per seed.

The main table and the length sweep (the goals) run on the bench world (>= 1M impressions);
the other sweeps on a smaller *sweep world* (SWEEP_SHARE of the bench users), where each
point costs about half as much. Half is the smallest share at which VM + LoopFM + KD still
trains past its first epochs and separates from VM + KD; on much smaller worlds early
stopping keeps an epoch where the two score alike (docs/experiments.md, "The two worlds").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from loopfm.core.config import VARIANTS, FMConfig, VMConfig

Overrides = tuple[tuple[str, object], ...]

# The sweeps are cut to what shows each effect, so that 5 seeds of all of them take about an hour on 2 cores.
EXPERIMENTS = ("main", "gap", "length", "encoder", "compression", "freshness", "layer", "vm_size")
BENCH: Overrides = (("world.n_users", 7600), ("fm.matryoshka_dims", (8, 16)))  # >= 1M impressions
ON_BENCH = ("main", "length")  # the others run on the sweep world
SWEEP_SHARE = 0.5  # sweep world users / bench world users (see the module doc)
GAP_NOISE = (0.2, 0.7, 8.0)  # fm_signal_noise: small = the FM knows much more than the VM
LENGTHS = (5, 10, 25, 50, 100)
CODES = (("fp32", 32), ("int4", 32), ("int4", 8))  # (format, logged dims)
DELAYS_S = (0, 60, 86400)
SCHEMES = ("frozen", "rolling")  # fm.checkpoint_scheme
LAYERS = ("embedding", "hidden1")
ENCODER_SWEEP = ("sum", "mean", "dot_mlp", "din")  # of ENCODERS: dot is dot_mlp without its two small MLPs
VM_SIZES = (("small", 4, (16,)), ("default", 8, (64, 32)), ("large", 16, (256, 128)))


def slug(overrides: Overrides) -> str:
    """A readable, filesystem-safe name for a set of overrides ("default" when empty)."""
    text = "_".join(f"{k.split('.')[-1]}={json.dumps(v, separators=(',', ''))}" for k, v in overrides)
    return re.sub(r"[^A-Za-z0-9=.,_-]", "", text) or "default"


@dataclass(frozen=True)
class World:
    fm: Overrides = ()
    log: Overrides = ()
    scale: Overrides = ()  # world.n_users: () = the bench world's

    @property
    def path(self) -> str:
        """Relative to the seed directory: derived worlds live inside their FM's root world,
        root worlds of another scale inside a folder of their own."""
        root = f"fm-{slug(self.fm)}"
        root = f"{slug(self.scale)}/{root}" if self.scale else root
        return f"{root}/log-{slug(self.log)}" if self.log else root

    @property
    def root(self) -> "World":
        """The world that trains this world's FM."""
        return World(self.fm, scale=self.scale)

    @property
    def home(self) -> "World":
        """The world of this scale with the default FM and log: the eval rows, base VM and
        Bayes ceiling every world of the scale is read against."""
        return World(scale=self.scale)

    @property
    def overrides(self) -> tuple[Overrides, ...]:
        return (self.scale, self.fm, self.log)


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


MAIN = World()


def _kd_pair(world: World, vm: Overrides = (), latency: bool = False) -> dict[str, Cell]:
    return {"kd": Cell(world, "kd", vm, latency), "loopfm_kd": Cell(world, "loopfm_kd", vm, latency)}


def _gain_claims(points: list[Point]) -> list[Claim]:
    return [Claim(f"{p.label}: LoopFM+KD vs KD", p.cells["loopfm_kd"], p.cells["kd"]) for p in points]


def sweep_scale(bench_users: int) -> Overrides:
    """The sweep world's scale: SWEEP_SHARE of the bench world's users (at least 1)."""
    return (("world.n_users", max(1, round(bench_users * SWEEP_SHARE))),)


def build_experiments(names: tuple[str, ...], base_length: int, bench_users: int) -> list[Experiment]:
    """The experiments to run; `base_length` is the worlds' default history length L and
    `bench_users` the bench world's number of users (the sweep world takes SWEEP_SHARE of them)."""
    out = []
    main = {v: Cell(MAIN, v) for v in VARIANTS}
    scale = sweep_scale(bench_users)
    home = World(scale=scale)
    sweep = {v: Cell(home, v) for v in ("kd", "loopfm_kd")}  # the sweeps' defaults, on the sweep world

    def world(fm: Overrides = (), log: Overrides = ()) -> World:
        return World(fm, log, scale)

    if "main" in names:
        out.append(Experiment("main", "Main table", [Point("main", None, main)], [
            Claim("LoopFM+KD vs KD (the goal)", main["loopfm_kd"], main["kd"]),
            Claim("KD vs base", main["kd"], main["base"]),
            Claim("LoopFM vs base", main["loopfm"], main["base"]),
            Claim("LoopFM+KD vs LoopFM", main["loopfm_kd"], main["loopfm"]),
        ]))  # fmt: skip
    if "gap" in names:
        pts = [Point(f"noise {n}", n, _kd_pair(home if n == 0.7 else world((("world.fm_signal_noise", n),)))) for n in GAP_NOISE]
        out.append(Experiment("gap", "Feature gap (world.fm_signal_noise; smaller = FM knows more)", pts, _gain_claims(pts)))
    if "length" in names:
        longest = World(log=(("vm.history_length", max(LENGTHS)),)) if max(LENGTHS) > base_length else MAIN
        pts = [
            Point(f"L={n}", n, _kd_pair(MAIN if n == base_length else longest if n > base_length else MAIN,
                                        () if n in (base_length, max(LENGTHS)) else (("vm.history_length", n),)))
            for n in LENGTHS
        ]  # fmt: skip
        steps = [Claim(f"{b.label} vs {a.label} (LoopFM+KD)", b.cells["loopfm_kd"], a.cells["loopfm_kd"]) for a, b in zip(pts, pts[1:])]
        out.append(Experiment("length", "Sequence length L (own and FM history)", pts, _gain_claims(pts) + steps))
    if "encoder" in names:
        default = VMConfig().encoder  # its cells are the sweep world's defaults
        pts = [Point(e, e, _kd_pair(home, () if e == default else (("vm.encoder", e),), latency=True)) for e in ENCODER_SWEEP]
        out.append(Experiment("encoder", "Sequence encoder: quality and ONNX latency", pts, _gain_claims(pts)))
    if "compression" in names:
        pts = []
        for fmt, dims in CODES:
            log = tuple(kv for kv in (("fm.code_format", fmt), ("fm.code_dim", dims)) if kv not in (("fm.code_format", "int4"), ("fm.code_dim", 32)))
            pts.append(Point(f"{fmt} x {dims}", dims, {"kd": sweep["kd"], "loopfm_kd": Cell(world(log=log), "loopfm_kd")}))
        claims = [Claim(f"{p.label} vs fp32 x 32", p.cells["loopfm_kd"], pts[0].cells["loopfm_kd"]) for p in pts[1:]]
        out.append(Experiment("compression", "Compression: code format and Matryoshka prefix vs bytes per user", pts,
                              claims + _gain_claims(pts)))  # fmt: skip
    if "freshness" in names:
        pts = [Point(f"delay {d} s", d, {"kd": sweep["kd"], "loopfm_kd": Cell(home if d == 60 else world(log=(("fm.logging_delay_s", d),)), "loopfm_kd")})
               for d in DELAYS_S]  # fmt: skip
        scheme = {s: home if s == FMConfig().checkpoint_scheme else world(log=(("fm.checkpoint_scheme", s),)) for s in SCHEMES}
        pts += [Point(f"{s} checkpoint", s, _kd_pair(scheme[s])) for s in SCHEMES]
        claims = [Claim(f"delay 0 s vs {p.label}", pts[0].cells["loopfm_kd"], p.cells["loopfm_kd"]) for p in pts[1:len(DELAYS_S)]]
        claims.append(Claim("rolling vs frozen (LoopFM+KD)", pts[-1].cells["loopfm_kd"], pts[-2].cells["loopfm_kd"]))
        out.append(Experiment("freshness", "Freshness: logging delay and checkpoint scheme", pts, claims))
    if "layer" in names:
        default = FMConfig().extract_layer
        pts = [Point(layer, layer, {"kd": sweep["kd"], "loopfm_kd": Cell(home if layer == default else world((("fm.extract_layer", layer),)), "loopfm_kd")})
               for layer in LAYERS]  # fmt: skip
        home_point = next(p for p in pts if p.x == default)
        claims = [Claim(f"{p.label} vs {default}", p.cells["loopfm_kd"], home_point.cells["loopfm_kd"]) for p in pts if p.x != default]
        out.append(Experiment("layer", "Which FM layer is extracted", pts, claims + _gain_claims(pts)))
    if "vm_size" in names:
        pts = [Point(name, e, _kd_pair(home, () if name == "default" else (("vm.embedding_dim", e), ("vm.hidden", h))))
               for name, e, h in VM_SIZES]  # fmt: skip
        out.append(Experiment("vm_size", "VM size", pts, _gain_claims(pts)))
    return out


def cells_of(experiments: list[Experiment]) -> list[Cell]:
    """Every distinct cell, in a stable order; the base VM of every scale is included (every
    TR of that scale needs it)."""
    seen: dict[str, Cell] = {Cell(MAIN, "base").path: Cell(MAIN, "base")}
    for e in experiments:
        for p in e.points:
            for c in p.cells.values():
                base = Cell(c.world.home, "base")
                seen.setdefault(base.path, base)
                # a cell timed for latency anywhere is timed
                seen[c.path] = c if c.latency or c.path not in seen else seen[c.path]
    return list(seen.values())

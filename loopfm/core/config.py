"""Run configuration: one dataclass per stage, saved as `config.json` in the run directory.

Every stage reads the run directory's config, so a run can be resumed stage by stage from
the CLI and its numbers can be traced back to the knobs that produced them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from loopfm.contract.codec import CODE_FORMATS
from loopfm.contract.names import feature_service
from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION, FormatError, check_format

DEFAULT_FM_MODEL = "loopfm.fm.model:FoundationModel"  # the FM interface: loopfm/fm/plugin.py

@dataclass(frozen=True)
class Variant:
    """A VM variant: whether it reads the FM history (LoopFM) and learns from the FM's logged
    prediction (KD); the Feast feature service it reads through."""

    name: str
    fm_history: bool
    kd: bool

    @property
    def feature_service(self) -> str:
        return feature_service(self.name)


_VARIANTS = (Variant("base", False, False), Variant("kd", False, True), Variant("loopfm", True, False),
             Variant("loopfm_kd", True, True))  # fmt: skip
VARIANTS = tuple(v.name for v in _VARIANTS)  # names, in the results table's order
SERVED_VARIANT = "loopfm_kd"  # what the demo serves and the commands export, serve and load-test by default
ENCODERS = ("sum", "mean", "dot", "dot_mlp", "din")  # how a VM pools a history (loopfm/vm/model.py)
HISTORY_EVENTS = ("clicks", "impressions")  # whose codes the FM history holds (loopfm/features/build.py)


def variant_named(name: str) -> Variant:
    """The variant of a name; ValueError naming the valid ones otherwise."""
    for v in _VARIANTS:
        if v.name == name:
            return v
    raise ValueError(f"--variant must be one of {VARIANTS}, got {name!r}")


@dataclass
class DataConfig:
    """The run's data, the `world` section of config.json (`--set world.KEY=...`): its span
    (start_date, n_days), verticals and sizes, which every stage reads. `loopfm data synth`
    draws a synthetic multi-vertical world of these sizes with the physics below
    (loopfm/data/synth.py); an import sets span, verticals and sizes from the data
    (loopfm/data/importers: configure) and leaves the physics unused (latent_dim 0)."""

    seed: int = 0  # the synthetic draw; also seeds FM and compressor training
    n_users: int = 5000
    n_items_per_vertical: int = 400  # synthetic only
    n_categories: int = 24
    n_brands: int = 60
    n_days: int = 30
    impressions_per_user_day: float = 4.0  # synthetic only
    verticals: tuple[str, ...] = ("feed", "video", "shop")
    vertical_mix: tuple[float, ...] = (0.5, 0.3, 0.2)
    latent_dim: int = 8  # synthetic only: the interest vectors' size
    interest_drift: float = 0.2  # synthetic only: share of the daily interest vector that is renewed
    fm_signal_noise: float = 0.7  # synthetic only: noise on the FM-only intent signal, the feature-gap knob
    start_date: str = "2026-09-01"  # the synthetic world's first day (a value of the data, not history); an import sets its own


@dataclass
class FMConfig:
    """Foundation model, its compressor and its logging."""

    model: str = DEFAULT_FM_MODEL  # package.module:factory of any module following loopfm/fm/plugin.py
    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dot_logit: bool = True  # add the user and item towers' inner product to the logit (fm/model.py); docs/training.md ("Earlier intents")
    raw_history_length: int = 20  # the FM's own raw-ID history (all verticals)
    recent_half_life: float = 10.0  # events: the user's click rate lately (fm/inputs.py: _activity); docs/training.md ("The user's click rate lately")
    intent_half_lives: tuple[float, ...] = (1.0, 4.0)  # days; each adds the user's earlier FM-only signals, averaged with that half-life (fm/inputs.py: _intent); docs/training.md ("Earlier intents")
    code_dim: int = 32  # logged dims: a prefix of the checkpoint's code when smaller than it
    code_format: str = "int4"  # int4 | fp32: how each logged code is stored
    matryoshka_dims: tuple[int, ...] = ()  # nested prefixes the compressor must also reconstruct from
    extract_layer: str = "embedding"  # a layer the FM returns (built-in: embedding | hidden1 | hidden2), or several comma-separated; docs/training.md ("Which FM layer")
    batch_size: int = 512
    lr: float = 5e-4  # docs/training.md ("... the FM's learning rate"): 2e-3 overfit the warm-up by epoch 2
    weight_decay: float = 0.0  # AdamW
    wide_lr_multiplier: float = 20.0  # the wide parameters (module.wide_parameter_prefixes: loopfm's FM's rate weights and per-vertical deep weights) learn this much faster; docs/training.md ("Click rates so far")
    id_dropout: float = 0.25  # share of training events whose user and item ids read as unknown; docs/training.md ("The FM's id dropout")
    warmup_days: int = 10  # VM examples start after this many days of FM training
    warmup_epochs: int = 20  # the most; early stopping on the warm-up's newest days picks the epoch
    validation_fraction: float = 0.1
    patience: int = 2
    passes_per_day: int = 1  # streaming after the warm-up: each day is seen this many times, in day order
    checkpoint_scheme: str = "rolling"  # rolling | frozen; measured in docs/training.md ("FM checkpoint scheme")
    logging_delay_s: int = 60
    history_events: str = "impressions"  # clicks | impressions: whose logged codes form the FM history; docs/training.md

    def __post_init__(self) -> None:
        if isinstance(self.extract_layer, (list, tuple)):  # config.json may hold a list of layers
            self.extract_layer = ",".join(self.extract_layer)

    @property
    def layers(self) -> tuple[str, ...]:
        """The extracted layers, in the order their activations are concatenated."""
        return tuple(name.strip() for name in self.extract_layer.split(","))


@dataclass
class VMConfig:
    """Vertical model training and evaluation."""

    target_vertical: str = "shop"
    history_length: int = 50
    embedding_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    encoder: str = "dot_mlp"  # sum | mean | dot | dot_mlp | din (loopfm/vm/model.py); measured in docs/training.md
    epochs: int = 30  # the most; early stopping on validation log loss picks the epoch kept
    patience: int = 3  # epochs without a better validation log loss before stopping
    validation_fraction: float = 0.1  # the newest share of the training window, by event time
    refit: bool = True  # then train afresh on the whole window for the chosen number of epochs
    average_epochs: float = 0.0  # validate and keep an exponential moving average of the weights over about this many epochs (0 = off)
    batch_size: int = 512  # measured in docs/training.md ("VM encoder and batch size")
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW
    wide_lr_multiplier: float = 20.0  # the wide part (candidate biases, rate weights) learns this much faster than the rest
    dropout: float = 0.5  # after each hidden layer of the MLP
    history_product: bool = True  # feed pooled history * candidate query to the MLP as well
    item_activity: bool = True  # candidates carry the item's click rate and impressions so far (Feast view item_activity); docs/training.md
    short_window: int = 0  # also pool each history's newest this many positions (0 = off; at most L); docs/training.md
    recency_decay: float = 0.07  # recency log-weights start at -this per position back (sum, mean, softmax: half weight 10 back); docs/training.md
    recency_slope: bool = True  # also learn one slope per history on the recency log-weights (vm/model.py); docs/training.md
    kd_weight: float = 0.5
    kd_ramp_epochs: int = 3  # the KD weight rises linearly from 0 (epoch 1) to kd_weight (epoch 1 + this)
    eval_days: int = 6
    seed: int = 0


@dataclass
class StreamConfig:
    """The live loop (loopfm/stream/): how events are partitioned and how a worker reads them."""

    partitions: int = 8  # stream keys; a user's events all go to partition crc32(user id) % partitions
    batch_size: int = 500  # the most events a worker reads per micro-batch
    max_wait_ms: int = 5  # the longest a blocking read waits for a first entry
    linger_ms: int = 20  # a micro-batch collects the entries of up to this long after its oldest (Kafka's linger.ms)
    lease_ms: int = 10_000  # a partition is another worker's this long after its owner stops renewing it
    future_skew_s: float = 300.0  # an event timestamp further than this into the future is a dead letter
    dedup_window: int = 64  # impression ids each user remembers: a re-sent event within it changes nothing
    max_len: int = 1_000_000  # entries a partition's stream keeps (XADD MAXLEN ~): bounds the server's memory; entries trimmed before a worker read them are lost


@dataclass
class RunConfig:
    world: DataConfig = field(default_factory=DataConfig)
    fm: FMConfig = field(default_factory=FMConfig)
    vm: VMConfig = field(default_factory=VMConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def validate(self) -> "RunConfig":
        """Refuse combinations that would fail later, deep inside a stage."""
        w, fm, vm, st = self.world, self.fm, self.vm, self.stream
        checks = [
            (len(w.verticals) == len(w.vertical_mix), "world.verticals and world.vertical_mix differ in length"),
            (vm.target_vertical in w.verticals, f"vm.target_vertical {vm.target_vertical!r} not in world.verticals"),
            (fm.code_dim > 0 and fm.code_dim % 2 == 0, "fm.code_dim must be a positive even number (int4 packs pairs)"),
            (0 < fm.warmup_days < w.n_days - vm.eval_days, "need 0 < fm.warmup_days < world.n_days - vm.eval_days"),
            (vm.eval_days > 0 and vm.history_length > 0, "vm.eval_days and vm.history_length must be positive"),
            (0 < vm.validation_fraction < 1, "vm.validation_fraction must lie in (0, 1)"),
            (vm.epochs > 0 and vm.patience > 0, "vm.epochs and vm.patience must be positive"),
            (vm.kd_ramp_epochs >= 0, "vm.kd_ramp_epochs must be >= 0"),
            (vm.average_epochs >= 0, "vm.average_epochs must be a number >= 0 (0 = no weight average)"),
            (vm.short_window >= 0, "vm.short_window must be >= 0"),
            (vm.recency_decay >= 0, "vm.recency_decay must be a number >= 0 (0 = no recency prior)"),  # a NaN read from config.json fails too
            (0 <= vm.dropout < 1 and vm.weight_decay >= 0, "vm.dropout must lie in [0, 1) and vm.weight_decay be >= 0"),
            (0 < fm.validation_fraction < 1 and fm.warmup_epochs > 0 and fm.patience > 0,
             "fm.validation_fraction must lie in (0, 1), fm.warmup_epochs and fm.patience be positive"),
            (0 <= fm.id_dropout < 1 and fm.weight_decay >= 0, "fm.id_dropout must lie in [0, 1) and fm.weight_decay be >= 0"),
            (fm.wide_lr_multiplier > 0 and vm.wide_lr_multiplier > 0, "fm.wide_lr_multiplier and vm.wide_lr_multiplier must be positive"),
            (vm.encoder in ENCODERS, f"vm.encoder must be one of {ENCODERS}"),
            (fm.checkpoint_scheme in ("frozen", "rolling"), "fm.checkpoint_scheme must be frozen or rolling"),
            (all(fm.layers), "fm.extract_layer must name a layer, or several comma-separated"),
            (":" in fm.model, f"fm.model must be package.module:factory, e.g. {DEFAULT_FM_MODEL}"),
            (fm.logging_delay_s >= 0, "fm.logging_delay_s must be >= 0"),
            (fm.history_events in HISTORY_EVENTS, f"fm.history_events must be one of {HISTORY_EVENTS}"),
            (fm.code_format in CODE_FORMATS, f"fm.code_format must be one of {CODE_FORMATS}"),
            (all(k > 0 and k % 2 == 0 for k in fm.matryoshka_dims), "fm.matryoshka_dims must be positive and even"),
            (all(h > 0 for h in fm.intent_half_lives), "fm.intent_half_lives must be positive (days)"),
            (fm.recent_half_life > 0, "fm.recent_half_life must be positive (events)"),
            (st.partitions > 0 and st.batch_size > 0 and st.max_len > 0 and st.max_wait_ms >= 0 and st.linger_ms >= 0
             and st.lease_ms >= 1000, "stream.partitions, stream.batch_size and stream.max_len must be positive, "
             "stream.max_wait_ms and stream.linger_ms >= 0, stream.lease_ms >= 1000"),
            (st.future_skew_s >= 0 and st.dedup_window >= 0, "stream.future_skew_s and stream.dedup_window must be >= 0"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self

    def save(self, run_dir: Path) -> None:
        from loopfm.core.files import write_text  # pandas: not for every importer of the config

        self.validate()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.json", json.dumps({FORMAT_KEY: FORMAT_VERSION, **asdict(self)}, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> "RunConfig":
        path = run_dir / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} not found: run `loopfm data synth --run-dir {run_dir}` first")
        raw = json.loads(path.read_text())
        try:
            check_format(raw, path, "make the run again (`loopfm data synth|import` or `loopfm run`, then the stages)")
        except FormatError as exc:
            raise ConfigError(str(exc)) from None
        cfg = cls(**{f.name: _section(f.type, raw.get(f.name, {}), path) for f in fields(cls)})
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


    def override(self, assignment: str) -> None:
        """Apply one `section.key=value` override (value parsed as JSON, else kept as text)."""
        name, sep, value = assignment.partition("=")
        section_name, dot, key = name.partition(".")
        section = getattr(self, section_name, None) if dot and sep else None
        if section is None or key not in {f.name for f in fields(section)}:
            valid = ", ".join(f"{s.name}.{f.name}" for s in fields(self) for f in fields(getattr(self, s.name)))
            raise ConfigError(f"--set {assignment!r}: expected section.key=value with a key among: {valid}")
        parsed = setting_value(assignment)
        current = getattr(section, key)
        expected = list if isinstance(current, tuple) else type(current)
        if not isinstance(parsed, expected) and not (expected is float and isinstance(parsed, int)):
            raise ConfigError(f"--set {assignment!r}: {name} must be of type {expected.__name__}, got {value!r}")
        setattr(section, key, tuple(parsed) if expected is list else parsed)


def setting_value(assignment: str):
    """The value of a `key=value` setting: JSON if it parses, else the text. Raises
    ConfigError for a number that is not finite (NaN, Infinity, 1e400)."""
    value = assignment.partition("=")[2]

    def finite(text: str) -> float:
        if not math.isfinite(float(text)):
            raise ConfigError(f"--set {assignment!r}: {text} is not a finite number")
        return float(text)

    try:
        return json.loads(value, parse_float=finite, parse_constant=finite)
    except json.JSONDecodeError:
        return value


class ConfigError(ValueError):
    """A config file or flag is wrong; the message names the file and key."""


_SECTIONS = {"DataConfig": DataConfig, "FMConfig": FMConfig, "VMConfig": VMConfig, "StreamConfig": StreamConfig}


def _section(type_name: str, values: dict, path: Path):
    section = _SECTIONS[type_name]
    known = {f.name: f for f in fields(section)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in section {type_name}")
    # JSON has no tuples; restore them so configs compare equal after a round trip.
    return section(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

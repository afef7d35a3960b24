"""The FM interface: loopfm stream-trains, checkpoints and logs any PyTorch module that follows it.

`fm.model = "package.module:factory"` (config.json or `--set`) names the module; the default,
`loopfm.fm.model:FoundationModel`, is one implementation like any other. The module must be
importable by the `loopfm` process (installed, or on PYTHONPATH).

- `factory(shapes: FMShapes) -> torch.nn.Module`; `shapes` holds the vocabulary sizes and
  the `fm.*` widths (loopfm/fm/model.py).
- `module(batch) -> (logit, activations)`: `batch` is a dict of tensors, one row per event:
  `user_id`, `item_id` [B] int64 dense ids, -1 = unknown (an id the checkpoint never trained
  on, or hidden by `fm.id_dropout` in training); `category`, `brand`, `vertical_id`, `hour`,
  `age_bucket`, `gender`, `price_bucket` [B] int64; `raw_history` [B, fm.raw_history_length]
  int64, the user's last clicked item ids + 1 in every vertical strictly before the event
  (0 = padding or unknown), and `raw_declined`, the same of the items it was shown and did not
  click; `rate_all`, `count_all`, `rate_vertical`, `count_vertical` [B] int64, the user's
  click-rate and impression-count buckets so far over every vertical and in the event's own,
  `rate_recent`, `count_recent` [B] int64, the same of the user's events weighted by recency
  (`fm.recent_half_life`), and `rate_item`, `count_item` [B] int64, the item's by every user
  (contract/tensorize.activity_bucket_arrays; 0 = unknown); `intent` [B, k] float32 (the synthetic world's FM-only signal
  of the event's day, then one block per `fm.intent_half_lives` entry of the user's earlier
  days' signals, averaged: k = latent_dim * (1 + len(fm.intent_half_lives)); k = 0 on
  imported data). It returns `logit` [B] (the click logit: trained with binary
  cross-entropy, logged as the KD label) and `activations`, a dict {layer name: [B, d]}.
- `fm.extract_layer` names the logged layer, or several comma-separated (a list in
  config.json): their activations are concatenated in that order (the LoopFM paper
  concatenates layers), [B, sum of d], and compressed into one code.

- Optional: `module.wide_parameter_prefixes`, a tuple of parameter-name prefixes (as
  `named_parameters` gives them) of the parameters to train `fm.wide_lr_multiplier` times faster
  than the rest (`wide_parameters`): loopfm's FM names its rate weights and its per-vertical
  weights on the deep part.

loopfm trains the module with the same scheme as its own FM (warm-up with early stopping,
then day by day; docs/training.md) and the compressor beside it on the detached
concatenation (stop-gradient).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from loopfm.core.config import DEFAULT_FM_MODEL, ConfigError


def resolve(spec: str) -> Callable[..., nn.Module]:
    """The factory that `fm.model` names ("package.module:attribute"). Raises ConfigError
    naming the setting when the text has no ':', the module cannot be imported, or the
    attribute is missing or not callable."""
    module_name, sep, attribute = spec.partition(":")
    if not (sep and module_name and attribute):
        raise ConfigError(f"fm.model {spec!r}: expected package.module:factory, e.g. {DEFAULT_FM_MODEL}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"fm.model {spec!r}: cannot import module {module_name!r} ({exc}); "
                          "install it or put its folder on PYTHONPATH") from None  # fmt: skip
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"fm.model {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return factory


def build(spec: str, shapes) -> nn.Module:
    """factory(shapes) of the factory `spec` names; ConfigError naming fm.model when it fails
    or returns something other than a torch.nn.Module."""
    factory = resolve(spec)
    try:
        fm = factory(shapes)
    except Exception as exc:  # the user's code: any failure is a configuration problem to name
        raise ConfigError(f"fm.model {spec!r}: factory(shapes) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(fm, nn.Module):
        raise ConfigError(f"fm.model {spec!r}: factory(shapes) returned {type(fm).__name__}, not a torch.nn.Module")
    return fm


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in `tensors` holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def wide_parameters(fm: nn.Module) -> list[nn.Parameter]:
    """The parameters named by `fm.wide_parameter_prefixes` (none if it has no such attribute)."""
    prefixes = tuple(getattr(fm, "wide_parameter_prefixes", ()))
    return [p for name, p in fm.named_parameters() if name.startswith(prefixes)]


def extract(activations: dict[str, torch.Tensor], layers: tuple[str, ...]) -> torch.Tensor:
    """The named layers' activations concatenated in order: [B, sum of their widths]."""
    if len(layers) == 1:
        return activations[layers[0]]
    return torch.cat([activations[name] for name in layers], dim=1)


def activation_width(fm: nn.Module, batch: dict[str, torch.Tensor], spec: str, layers: tuple[str, ...]) -> int:
    """Call `fm` on a sample `batch` of B events and check that it follows the interface
    (module docstring) and gives finite values; return the width of the extracted activation
    (sum of the layers' d). Raises ConfigError naming fm.model or fm.extract_layer otherwise."""
    n = len(batch["user_id"])
    fm.eval()
    try:
        with torch.no_grad():
            out = fm(batch)
    except Exception as exc:  # the user's code
        raise ConfigError(f"fm.model {spec!r}: forward(batch) raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise ConfigError(f"fm.model {spec!r}: forward(batch) must return (logit [B], {{layer: activations [B, d]}}), "
                          f"got {type(out).__name__}")  # fmt: skip
    logit, activations = out
    if not (isinstance(logit, torch.Tensor) and logit.is_floating_point() and tuple(logit.shape) == (n,)):
        got = tuple(logit.shape) if isinstance(logit, torch.Tensor) else type(logit).__name__
        raise ConfigError(f"fm.model {spec!r}: the logit must be a float tensor of shape [B] = ({n},), got {got}")
    missing = [name for name in layers if name not in activations]
    if missing:
        raise ConfigError(f"fm.extract_layer {','.join(layers)!r}: fm.model {spec!r} returns no layer {missing}; "
                          f"its layers: {sorted(activations)}")  # fmt: skip
    for name in layers:
        a = activations[name]
        if not (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 2 and a.shape[0] == n):
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ConfigError(f"fm.model {spec!r}: layer {name!r} must be a float tensor of shape [B, d] with B = {n}, got {got}")
    bad = nonfinite({"the logit": logit, **{f"layer {name!r}": activations[name] for name in layers}})
    if bad:
        raise ConfigError(f"fm.model {spec!r}: NaN or infinite values in {' and '.join(bad)} on a sample of {n} events "
                          "before any training: a code cannot be made of them")  # fmt: skip
    return sum(int(activations[name].shape[1]) for name in layers)

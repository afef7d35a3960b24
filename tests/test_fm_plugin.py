"""The FM interface (loopfm/fm/plugin.py): `fm.model` names any PyTorch module; loopfm trains,
checkpoints and logs it as it does its own FM, and refuses a factory that does not follow
the interface, naming the setting."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import SMALL_WORLD, loopfm, refusal
from loopfm.core.config import ConfigError, RunConfig
from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION
from loopfm.fm import plugin
from loopfm.fm.model import FMShapes, FoundationModel
from loopfm.fm.inputs import ACTIVITY_COLUMNS
from loopfm.core.rundir import RunPaths

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTS = Path(__file__).resolve().parent
SHAPES = FMShapes(n_users=10, n_items=20, n_categories=3, n_brands=4, n_verticals=2, intent_dim=0,
                  embedding_dim=8, hidden=(16, 12), code_dim=8, extract_layer="hidden1")  # fmt: skip


def events(n: int = 5) -> dict[str, torch.Tensor]:
    """A batch of n events as loopfm passes them to an FM (unknown user and item ids included)."""
    columns = ("category", "brand", "vertical_id", "hour", "age_bucket", "gender", "price_bucket", *ACTIVITY_COLUMNS)
    ids = {k: torch.zeros(n, dtype=torch.int64) for k in columns}
    return {**ids, "user_id": torch.tensor([-1, 0, 3, 9, 2][:n]), "item_id": torch.tensor([5, -1, 19, 0, 7][:n]),
            "raw_history": torch.tensor([[0, 0, 3]] * n), "raw_declined": torch.tensor([[0, 5, 4]] * n), "intent": torch.zeros(n, 0)}  # fmt: skip


# Factories that break the interface, each in its own way (named by tests through "test_fm_plugin:...").
class _WrongLogit(nn.Module):
    def forward(self, batch):
        n = len(batch["user_id"])
        return torch.zeros(n, 1), {"hidden1": torch.zeros(n, 4)}


class _NoTuple(nn.Module):
    def forward(self, batch):
        return torch.zeros(len(batch["user_id"]))


class _FlatLayer(nn.Module):
    def forward(self, batch):
        n = len(batch["user_id"])
        return torch.zeros(n), {"hidden1": torch.zeros(n)}


class _Crashes(nn.Module):
    def forward(self, batch):
        return batch["no_such_input"], {}


def wrong_logit(shapes):
    return _WrongLogit()


def no_tuple(shapes):
    return _NoTuple()


def flat_layer(shapes):
    return _FlatLayer()


def crashes(shapes):
    return _Crashes()


def not_a_module(shapes):
    return "a string"


def raises(shapes):
    raise TypeError("needs more arguments")


class _NaNLayer(nn.Module):
    """The built-in FM with a NaN extracted layer; only while training when `in_training`."""

    def __init__(self, shapes, in_training: bool):
        super().__init__()
        self.fm, self.in_training = FoundationModel(shapes), in_training

    def forward(self, batch):
        logit, acts = self.fm(batch)
        if self.training or not self.in_training:
            acts = {**acts, "hidden1": torch.full_like(acts["hidden1"], float("nan"))}
        return logit, acts


def nan_layer(shapes):
    return _NaNLayer(shapes, in_training=False)


def nan_in_training(shapes):
    return _NaNLayer(shapes, in_training=True)


NOT_CALLABLE = 3


def test_the_built_in_fm_is_the_default_implementation_of_the_interface():
    assert RunConfig().fm.model == "loopfm.fm.model:FoundationModel"
    fm = plugin.build(RunConfig().fm.model, SHAPES)
    assert plugin.activation_width(fm, events(), "loopfm.fm.model:FoundationModel", ("hidden1",)) == 16


def test_several_layers_are_concatenated_in_order_with_the_summed_width():
    fm = plugin.build("loopfm.fm.model:FoundationModel", SHAPES)
    layers = ("hidden2", "embedding", "hidden1")
    width = plugin.activation_width(fm, events(), "x:y", layers)
    assert width == 12 + fm.embedding_width + 16
    _, acts = fm(events())
    joined = plugin.extract(acts, layers)
    assert joined.shape == (5, width)
    assert torch.equal(joined[:, :12], acts["hidden2"]) and torch.equal(joined[:, -16:], acts["hidden1"])


def test_extract_layer_takes_a_comma_separated_text_or_a_list_in_config_json(tmp_path: Path):
    cfg = RunConfig()
    cfg.override("fm.extract_layer=hidden2, hidden1")
    assert cfg.fm.layers == ("hidden2", "hidden1")
    (tmp_path / "config.json").write_text(json.dumps({FORMAT_KEY: FORMAT_VERSION, "fm": {"extract_layer": ["embedding", "hidden2"]}}))
    assert RunConfig.load(tmp_path).fm.layers == ("embedding", "hidden2")
    cfg.override("fm.extract_layer=hidden1,")
    with pytest.raises(ConfigError, match="fm.extract_layer must name a layer"):
        cfg.validate()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("loopfm.fm.model", "expected package.module:factory"),
        ("no_such_package.fm:build", "cannot import module 'no_such_package.fm'"),
        ("test_fm_plugin:no_such_factory", "has no callable 'no_such_factory'"),
        ("test_fm_plugin:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
        ("test_fm_plugin:raises", "factory(shapes) raised TypeError: needs more arguments"),
        ("test_fm_plugin:not_a_module", "returned str, not a torch.nn.Module"),
        ("test_fm_plugin:wrong_logit", "the logit must be a float tensor of shape [B] = (5,), got (5, 1)"),
        ("test_fm_plugin:no_tuple", "must return (logit [B], {layer: activations [B, d]}), got Tensor"),
        ("test_fm_plugin:flat_layer", "layer 'hidden1' must be a float tensor of shape [B, d] with B = 5, got (5,)"),
        ("test_fm_plugin:crashes", "forward(batch) raised KeyError: 'no_such_input'"),
        ("test_fm_plugin:nan_layer", "NaN or infinite values in layer 'hidden1' on a sample of 5 events"),
    ],
)
def test_a_factory_that_breaks_the_interface_is_a_config_error_naming_the_setting(spec: str, message: str):
    with pytest.raises(ConfigError) as refused:
        plugin.activation_width(plugin.build(spec, SHAPES), events(), spec, ("hidden1",))
    assert str(refused.value).startswith(f"fm.model {spec!r}: ")
    assert message in str(refused.value)


def test_a_layer_the_fm_does_not_return_is_named_with_the_layers_it_has():
    fm = plugin.build("loopfm.fm.model:FoundationModel", SHAPES)
    with pytest.raises(ConfigError, match=r"fm.extract_layer 'hidden1,hidden7': .* no layer \['hidden7'\]; its layers: "
                                          r"\['embedding', 'hidden1', 'hidden2'\]"):  # fmt: skip
        plugin.activation_width(fm, events(), "loopfm.fm.model:FoundationModel", ("hidden1", "hidden7"))


def plug_ins_on_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/ (tiny_fm) and tests/ (this module's factories) on the commands' PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(EXAMPLES), str(TESTS), os.environ.get("PYTHONPATH")))))


@pytest.fixture(scope="module")
def plug_in_world(tmp_path_factory) -> Path:
    """A small synthetic world whose config names examples/tiny_fm.py, two of its layers
    extracted; ten days and two warm-up epochs: the interface is the subject, not the FM."""
    run = tmp_path_factory.mktemp("plug_in") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        plug_ins_on_the_path(monkeypatch)
        loopfm("data", "synth", "--run-dir", str(run), *SMALL_WORLD, "--days", "10", "--set", "fm.model=tiny_fm:build",
               "--set", "fm.extract_layer=user_tower,item_tower", "--set", "fm.warmup_epochs=2")  # fmt: skip
    return run


@pytest.fixture
def plug_in_run(plug_in_world: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of that world, for a test that trains or edits it."""
    plug_ins_on_the_path(monkeypatch)
    return Path(shutil.copytree(plug_in_world, tmp_path / "run"))


def test_a_plug_in_fm_trains_and_logs_through_the_same_commands(plug_in_run: Path):
    loopfm("fm", "train", "--run-dir", str(plug_in_run))
    loopfm("fm", "log", "--run-dir", str(plug_in_run))
    paths, cfg = RunPaths(plug_in_run), RunConfig.load(plug_in_run)
    state = torch.load(paths.fm / "checkpoints" / f"ckpt_{cfg.fm.warmup_days:03d}.pt", weights_only=False)
    assert state["model"] == "tiny_fm:build" and state["layers"] == ["user_tower", "item_tower"]
    assert state["compressor"]["encoder.weight"].shape == (cfg.fm.code_dim, 2 * cfg.fm.embedding_dim)  # two towers
    assert any(k.startswith("user_tower.") for k in state["fm"])  # the plug-in's own parameters
    log = pd.read_parquet(paths.fm_log)
    imp = pd.read_parquet(paths.table("impressions"))
    assert (log["impression_id"].to_numpy() == imp["impression_id"].to_numpy()).all()
    assert {len(code) for code in log["fm_code"]} == {cfg.fm.code_dim // 2}
    assert np.isfinite(log["fm_logit"]).all() and log["fm_logit"].std() > 0
    loopfm("features", "build", "--run-dir", str(plug_in_run))  # the log is the standard one


def test_fm_train_with_a_broken_factory_stops_before_training_and_writes_no_checkpoint(plug_in_run: Path):
    config = plug_in_run / "config.json"
    config.write_text(config.read_text().replace("tiny_fm:build", "test_fm_plugin:wrong_logit"))
    r = refusal("fm", "train", "--run-dir", str(plug_in_run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fm.model 'test_fm_plugin:wrong_logit': the logit must be a float tensor of shape [B]" in r.stderr
    assert not (RunPaths(plug_in_run).fm / "checkpoints").exists()
    r = refusal("data", "synth", "--run-dir", str(plug_in_run.parent / "other"), "--set", "fm.model=tiny_fm")
    assert r.returncode == 2 and "fm.model must be package.module:factory" in r.stderr


def test_fm_train_stops_when_the_extracted_layer_turns_nan_in_training_and_names_where(plug_in_run: Path):
    """A layer finite on the sample but NaN in training: stopped at its first batch, not logged as one code."""
    config = plug_in_run / "config.json"
    settings = json.loads(config.read_text())
    settings["fm"].update(model="test_fm_plugin:nan_in_training", extract_layer=["hidden1"])
    config.write_text(json.dumps(settings))
    r = refusal("fm", "train", "--run-dir", str(plug_in_run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fm train stopped in warm-up epoch 1: NaN or infinite values in the reconstruction loss (layers hidden1)" in r.stderr
    assert not (RunPaths(plug_in_run).fm / "checkpoints").exists()


def test_encoding_refuses_nan_activations_naming_the_layer():
    """fm log and loopfm stream share encode: a NaN layer is an error, never a constant code."""
    from loopfm.fm.model import Compressor
    from loopfm.fm.log import encode

    fm = nan_layer(SHAPES).eval()
    with pytest.raises(ValueError, match=r"fm.model _NaNLayer: NaN or infinite values in layer 'hidden1' on 5 events"):
        encode(fm, Compressor(16, RunConfig().fm.code_dim), ("hidden1",), events(), RunConfig())


def test_fm_log_refuses_a_checkpoint_with_nan_weights_and_keeps_the_old_log(copy_of_run: Path):
    paths, cfg = RunPaths(copy_of_run), RunConfig.load(copy_of_run)
    ckpt = paths.fm / "checkpoints" / f"ckpt_{cfg.fm.warmup_days:03d}.pt"
    state = torch.load(ckpt, weights_only=False)
    name = next(iter(state["fm"]))
    state["fm"][name] = state["fm"][name].float().fill_(float("nan"))
    torch.save(state, ckpt)
    before = paths.fm_log.read_bytes()
    r = refusal("fm", "log", "--run-dir", str(copy_of_run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{ckpt}: NaN or infinite values in parameters {name}" in r.stderr
    assert paths.fm_log.read_bytes() == before

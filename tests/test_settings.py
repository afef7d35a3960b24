"""Server settings come from the environment and a wrong value stops the start with its name."""

import os
from pathlib import Path

import pytest

from serving.settings import Settings, parse_models


def test_several_models_are_named_in_order_and_the_first_is_the_default():
    assert list(parse_models("shop=/m/shop, video=/m/video")) == ["shop", "video"]
    assert parse_models("shop=/m/shop")["shop"] == Path("/m/shop")


@pytest.mark.parametrize("spec", ["shop", "=/m", "shop=", "sh op=/m", "a=/m,a=/n"])
def test_a_malformed_model_list_is_refused_with_the_entry(spec):
    with pytest.raises(ValueError, match="LOOPFM_MODELS entry"):
        parse_models(spec)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("LOOPFM_MAX_CANDIDATES", "abc", "expected an integer"),
        ("LOOPFM_MAX_CANDIDATES", "5000", "must be in [1, 1000]"),
        ("LOOPFM_REQUEST_TIMEOUT_S", "soon", "expected a number"),
        ("LOOPFM_ITEM_CACHE_SIZE", "-1", "must be in [0, inf]"),
        ("LOOPFM_WORKERS", "0", "must be in [1, inf]"),
        ("LOOPFM_WORKERS", "two", "expected an integer"),
    ],
)
def test_a_malformed_number_names_its_variable(monkeypatch, name, value, message):
    monkeypatch.setenv("LOOPFM_MODEL_DIR", "/models/shop")
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=f"{name}='{value}'") as error:
        Settings.from_env()
    assert message in str(error.value)


def test_without_a_model_the_server_says_which_variables_to_set(monkeypatch):
    monkeypatch.delenv("LOOPFM_MODEL_DIR", raising=False)
    monkeypatch.delenv("LOOPFM_MODELS", raising=False)
    with pytest.raises(RuntimeError, match="LOOPFM_MODEL_DIR .* LOOPFM_MODELS"):
        Settings.from_env()


def test_onnx_runtime_takes_no_more_threads_than_each_worker_has_cores(monkeypatch):
    monkeypatch.setenv("LOOPFM_MODEL_DIR", "/models/shop")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert Settings.from_env().workers == 1 and Settings.from_env().ort_threads_large == 2
    monkeypatch.setenv("LOOPFM_WORKERS", "2")
    assert Settings.from_env().workers == 2 and Settings.from_env().ort_threads_large == 1
    monkeypatch.setenv("LOOPFM_ORT_THREADS_LARGE", "2")
    assert Settings.from_env().ort_threads_large == 2


def test_a_server_pinned_to_one_core_takes_one_onnx_runtime_thread(monkeypatch):
    monkeypatch.setenv("LOOPFM_MODEL_DIR", "/models/shop")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert Settings.from_env().workers == 1 and Settings.from_env().ort_threads_large == 1

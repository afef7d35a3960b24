"""The models one server hosts, by name, and their checked, atomic replacement.

One FM serves many VMs: a server can host one VM per vertical, each under its own name,
all reading the same FM history view. A deploy writes a new version folder, points the
model's configured path at it (a symlink flip), then calls
`POST /admin/models/{name}/reload`. The new model is loaded and checked off the event
loop; only a model that passes every check replaces the old one, by one reference
assignment, so a request in flight finishes on the model it started with and none fails.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from loopfm.contract.names import CANDIDATE_FEATURES, ID_INT64, ID_STRING, ITEM_KEY, USER_KEY
from loopfm.contract.tensorize import candidate_tensors, model_inputs
from serving.scorer import Scorer


class ModelRefused(ValueError):
    """A model folder that must not serve; the message says why and what to do."""


def feature_contract(scorer: Scorer) -> dict:
    """What a model reads from the online store and the ids it takes: replacing a model may not change it."""
    return {"project": scorer.meta["project"], "feature_service": scorer.meta.get("feature_service"),
            "features": scorer.meta["features"], "entity_types": scorer.entity_types}  # fmt: skip


def check_model(scorer: Scorer, serving: Scorer | None) -> None:
    """Refuse a model whose graph does not take what the tensorization gives it, whose id
    types are not recorded, or whose features differ from those of the model it would replace."""
    graph_inputs = {i.name for i in scorer.session.get_inputs()}
    declared = set(scorer.meta.get("inputs", []))
    if graph_inputs != declared:
        raise ModelRefused(f"model.onnx takes inputs {sorted(graph_inputs)} but model.json declares {sorted(declared)}: "
                           "the two files come from different exports")  # fmt: skip
    types = scorer.entity_types
    if sorted(types) != sorted((USER_KEY, ITEM_KEY)) or not set(types.values()) <= {ID_INT64, ID_STRING}:
        raise ModelRefused(f"model.json's entity_types {types} must give {USER_KEY} and {ITEM_KEY} as {ID_INT64} or "
                           f"{ID_STRING}: export it again (`loopfm vm export`)")  # fmt: skip
    user_features = {f for _, views in scorer.user_groups for features in views.values() for f in features}
    candidates = candidate_tensors({f: [None, None] for f in CANDIDATE_FEATURES}, scorer.spec)
    tensors = model_inputs({f: [None] for f in user_features}, [0], candidates, scorer.spec)
    unfed = graph_inputs - set(tensors)
    if unfed:
        raise ModelRefused(f"the model needs inputs {sorted(unfed)} that its features {sorted(user_features)} do not give")
    try:
        (scores,) = scorer.session.run(None, {name: tensors[name] for name in graph_inputs})
    except Exception as exc:  # ONNX Runtime reports shape/type mismatches as its own exceptions
        raise ModelRefused(f"a dry run with the model's tensor spec failed: {exc}") from None
    if scores.shape != (2,) or not np.isfinite(scores).all():
        raise ModelRefused(f"a dry run gave scores of shape {scores.shape}, expected one finite score per candidate")
    if serving is not None and feature_contract(scorer) != feature_contract(serving):
        raise ModelRefused(f"the new model reads {feature_contract(scorer)}, the serving one {feature_contract(serving)}: "
                           "a model that changes its features needs its own name or a restart")  # fmt: skip


@dataclass
class HostedModel:
    path: Path  # the configured folder; a symlink is re-resolved at every reload
    scorer: Scorer


class ModelRegistry:
    """Hosted models by name; the first is the default of `POST /score`."""

    def __init__(self, paths: dict[str, Path], load: Callable[[Path], Scorer]):
        if not paths:
            raise ModelRefused("no model configured: set LOOPFM_MODEL_DIR or LOOPFM_MODELS")
        self._load = load
        self.models = {name: HostedModel(path, self._checked(path, None)) for name, path in paths.items()}
        self.default = next(iter(paths))
        self._reloading = asyncio.Lock()

    def _checked(self, path: Path, serving: Scorer | None) -> Scorer:
        try:
            scorer = self._load(path.resolve())  # one version folder, even if the link flips meanwhile
        except Exception as exc:  # missing file, bad JSON, a graph ONNX Runtime rejects: all refusals
            raise ModelRefused(f"{path}: cannot load: {exc}") from None
        try:
            check_model(scorer, serving)
        except ModelRefused as exc:
            raise ModelRefused(f"{path}: {exc}") from None
        return scorer

    def scorer(self, name: str | None = None) -> Scorer:
        hosted = self.models.get(name or self.default)
        if hosted is None:
            raise KeyError(name)
        return hosted.scorer

    async def reload(self, name: str) -> tuple[str, str]:
        """Load, check and swap in the model now at `name`'s path; return (old, new) versions.
        Raises ModelRefused, leaving the serving model in place."""
        hosted = self.models[name]
        async with self._reloading:  # two concurrent reloads of one name would race on the swap
            new = await asyncio.to_thread(self._checked, hosted.path, hosted.scorer)
            old, hosted.scorer = hosted.scorer, new
        return old.version, new.version

    def describe(self) -> dict[str, dict]:
        return {
            name: {"model_version": h.scorer.version, "path": str(h.path), "default": name == self.default,
                   "feature_service": h.scorer.meta.get("feature_service"), "entity_types": h.scorer.entity_types}  # fmt: skip
            for name, h in self.models.items()
        }

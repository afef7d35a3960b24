"""Export a trained VM to ONNX with the metadata the server needs, and check parity.

The ONNX graph scores one request: request-side inputs for its one user (first dimension 1)
and candidate-side inputs once per candidate (see loopfm/vm/model.py), so a request's history
is encoded once, not once per candidate. `model.json` names the Feast feature views and
features to read per entity and the tensor spec, so the server needs neither the Feast
registry nor any training code.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from loopfm.contract.names import PROJECT, USER_SIDE_INPUTS, VERTICAL_KEY, input_names
from loopfm.contract.version import FORMAT_KEY, FORMAT_VERSION
from loopfm.core.config import RunConfig, variant_named
from loopfm.core.files import atomic_write, read_parquet, write_text
from loopfm.core.rundir import RunPaths
from loopfm.features.store import entity_types, historical_features
from loopfm.vm.model import ServingHead, VerticalModel
from loopfm.vm.train import frame_tensors, load_variant

PARITY_TOLERANCE = 1e-5
OPTIMIZED_GRAPH = "model.optimized.onnx"
# EXTENDED, not ALL: ALL adds layout optimisations, and ONNX Runtime's docs ("Graph
# Optimizations", online/offline mode) say a graph saved with them runs only on CPUs compatible
# with the one that saved it. EXTENDED's fusions run on any CPU execution provider.
EXPORT_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def _feature_refs(store, service: str) -> dict[str, dict[str, list[str]]]:
    """{join keys ("user_id", "user_id,vertical", "item_id"): {feature view: [features]}} of a
    feature service, from the Feast registry."""
    refs: dict[str, dict[str, list[str]]] = {}
    for projection in store.get_feature_service(service).feature_view_projections:
        view = store.get_feature_view(projection.name)
        refs.setdefault(",".join(view.join_keys), {})[projection.name] = [f.name for f in projection.features]
    return refs


def export_variant(paths: RunPaths, cfg: RunConfig, store, variant: str, out_dir: Path | None = None) -> dict:
    """Write model.onnx + model.json for a variant; return its metadata (incl. parity)."""
    model, spec = load_variant(paths, variant)
    names = input_names(model.shapes.use_fm_history)
    out_dir = out_dir or paths.vm / variant / "onnx"
    out_dir.mkdir(parents=True, exist_ok=True)

    service = variant_named(variant).feature_service
    eval_df = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), service)
    tensors = frame_tensors(eval_df, spec)
    blob = onnx_bytes(model, tensors)
    optimized = optimized_graph(blob)
    inputs = {n: tensors[n] for n in names}
    parity = parity_check(model, blob, inputs)
    optimized_parity = parity_check(model, optimized, inputs, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for graph, check in (("model.onnx", parity), (OPTIMIZED_GRAPH, optimized_parity)):
        if check["max_abs_diff"] > PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX/PyTorch parity failed for {variant}'s {graph}: {check}")
    meta = {
        FORMAT_KEY: FORMAT_VERSION,
        "model_version": f"{variant}-{hashlib.sha256(blob).hexdigest()[:12]}",
        "variant": variant,
        "feature_service": service,
        "project": PROJECT,
        "features": _feature_refs(store, service),
        "entity_values": {VERTICAL_KEY: cfg.vm.target_vertical},  # the VM's own rows
        "entity_types": entity_types(store),  # the id types /score takes (source ids: int64 or string)
        "inputs": names,
        "spec": asdict(spec),
        "parity": parity,
        # what the server loads, with graph optimisation disabled (serving/scorer.py)
        "optimized_graph": {"file": OPTIMIZED_GRAPH, "level": "extended", "onnxruntime": ort.__version__,
                            "parity": optimized_parity},  # fmt: skip
    }
    atomic_write(out_dir / "model.onnx", lambda tmp: tmp.write_bytes(blob))
    atomic_write(out_dir / OPTIMIZED_GRAPH, lambda tmp: tmp.write_bytes(optimized))
    write_text(out_dir / "model.json", json.dumps(meta, indent=2))
    return meta


def onnx_bytes(model: VerticalModel, tensors: dict[str, np.ndarray]) -> bytes:
    """The serving head as an ONNX graph of one request (user-side inputs [1, ...], candidates
    [C, ...]), traced on the first user and the first 8 candidates of `tensors`."""
    names = input_names(model.shapes.use_fm_history)
    sample = tuple(torch.from_numpy(tensors[n][:1] if n in USER_SIDE_INPUTS else tensors[n][:8]) for n in names)
    axes = {n: {0: "candidates"} for n in names if n not in USER_SIDE_INPUTS} | {"score": {0: "candidates"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exact for this small graph; export_variant's
        # parity check guards the result either way.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            ServingHead(model).eval(), sample, buffer, input_names=names, output_names=["score"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    return buffer.getvalue()


def optimized_graph(graph: bytes) -> bytes:
    """`graph` after ONNX Runtime's EXPORT_OPTIMIZATION (constant folding, node eliminations and
    fusions), as ONNX bytes: ORT's offline mode (`SessionOptions.optimized_model_filepath`), so a
    server can load it with optimisation disabled. The bytes hold ORT's own operators (domain
    com.microsoft, e.g. FusedMatMul): ONNX Runtime runs them, other ONNX runtimes may not."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = EXPORT_OPTIMIZATION
        options.optimized_model_filepath = str(Path(tmp) / OPTIMIZED_GRAPH)
        ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return (Path(tmp) / OPTIMIZED_GRAPH).read_bytes()


def parity_check(
    model: VerticalModel, onnx_blob: bytes, tensors: dict[str, np.ndarray],
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, rows: int = 256,
) -> dict:  # fmt: skip
    """Max |ONNX - PyTorch| between the serving graph (one user per request) and the PyTorch
    model in the training layout (`tensors`: one user row per candidate): each of the first
    `rows` rows as its own one-candidate request, then the first row's user against every row's
    candidate (PyTorch's per-candidate gathers with candidate_user = 0). ONNX Runtime optimises
    the graph at `optimization` when it loads it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    session = ort.InferenceSession(onnx_blob, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    n, c = min(rows, len(tensors["candidates"])), len(tensors["candidates"])
    one_user = {k: tensors[k][:1] if k in USER_SIDE_INPUTS else tensors[k] for k in names}
    onnx_rows = np.concatenate([session.run(None, {k: tensors[k][i : i + 1] for k in names})[0] for i in range(n)])
    onnx_one_user = session.run(None, one_user)[0]
    model.eval()
    with torch.no_grad():
        as_torch = lambda feeds: {k: torch.from_numpy(v) for k, v in feeds.items()}  # noqa: E731
        torch_rows = model(**as_torch({k: tensors[k][:n] for k in names}), candidate_user=torch.arange(n))[0]
        torch_one_user = model(**as_torch(one_user), candidate_user=torch.zeros(c, dtype=torch.int64))[0]
    diff = max(np.abs(onnx_rows - torch.sigmoid(torch_rows).numpy()).max(),
               np.abs(onnx_one_user - torch.sigmoid(torch_one_user).numpy()).max())  # fmt: skip
    return {"requests": n, "candidates": c, "max_abs_diff": float(diff)}

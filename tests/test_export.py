"""ONNX export: ONNX Runtime agrees with PyTorch, and a request's history is passed once."""

import json

import numpy as np
import onnxruntime as ort

from loopfm.features.store import historical_features
from loopfm.io import RunPaths, read_parquet
from loopfm.vm.export import PARITY_TOLERANCE, parity_check
from loopfm.vm.train import frame_tensors, load_variant


def test_onnx_matches_pytorch_on_at_least_1000_real_rows(trained_run, store):
    paths = RunPaths(trained_run)
    for variant in ("base", "loopfm_kd"):
        model, spec = load_variant(paths, variant)
        meta = json.loads((paths.vm / variant / "onnx" / "model.json").read_text())
        rows = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), f"vm_{variant}")
        tensors = frame_tensors(rows, spec)
        parity = parity_check(model, (paths.vm / variant / "onnx" / "model.onnx").read_bytes(),
                              {n: tensors[n] for n in meta["inputs"]})  # fmt: skip
        assert parity["rows"] >= 1000
        assert parity["max_abs_diff"] <= PARITY_TOLERANCE


def test_one_user_many_candidates_scores_like_one_row_per_candidate(trained_run, store):
    paths = RunPaths(trained_run)
    onnx_dir = paths.vm / "loopfm_kd" / "onnx"
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"))
    _, spec = load_variant(paths, "loopfm_kd")
    rows = historical_features(store, read_parquet(paths.features / "vm_eval_entities.parquet"), "vm_loopfm_kd")
    user_rows = rows[rows.user_id == rows.loc[rows.fm_codes.notna(), "user_id"].iloc[0]].head(1)
    per_row = frame_tensors(rows.head(40).assign(**{c: [user_rows[c].iloc[0]] * 40 for c in
                            ("age_bucket", "gender", "item_ids", "fm_codes", "hour")}), spec)  # fmt: skip
    expected = session.run(None, {i.name: per_row[i.name] for i in session.get_inputs()})[0]
    shared = {k: v[:1] for k, v in per_row.items() if k in ("user_context", "vm_history", "fm_codes", "fm_mask")}
    shared |= {"candidates": per_row["candidates"], "candidate_user": np.zeros(40, dtype=np.int64)}
    got = session.run(None, shared)[0]
    assert shared["fm_codes"].shape[0] == 1
    np.testing.assert_allclose(got, expected, atol=1e-6)

"""`loopfm bench stream`: the report's schema from a short real run (real Valkey, real
`loopfm stream` workers, a real uvicorn), and that every event it offered was applied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loopfm.bench.stream import StreamBenchSpec, run_stream_bench
from loopfm.bench.stream_report import markdown, plot


def test_a_short_bench_applies_every_offered_event_and_writes_the_issue_schema(trained_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    spec = StreamBenchSpec(rates=(300,), workers=(1,), duration_s=1.0, history_events=200_000, cost_rate=300,
                           cost_duration_s=1.0, serving_rate=50, serving_stream_eps=200, serving_duration_s=1.0, warmup_s=0.5)  # fmt: skip
    summary = run_stream_bench(run, tmp_path / "docs", spec, log=lambda *_: None)
    plot(summary, tmp_path / "docs" / "benchmarks-stream" / "freshness.png")  # as `loopfm bench stream` does
    written = json.loads((tmp_path / "docs" / "benchmarks-stream.json").read_text())
    assert written == json.loads(json.dumps(summary))
    (point,) = written["points"]
    assert point["workers"] == 1 and point["offered_eps"] > 0 and point["achieved_eps"] > 0
    assert point["dead_letters"] == 0 and point["lag_at_end"] >= 0
    assert point["freshness_ms"]["samples"] > 0 and point["freshness_ms"]["not_applied_within_drain"] == 0
    assert {"p50", "p99"} <= set(point["freshness_ms"]) and point["freshness_ms"]["p50"] > 0
    assert point["events"] == round(300 * 1.0)  # every offered event acked by the group
    history = written["history_cost"]
    assert history["stored_events"][0] < history["stored_events"][1] and history["users"][0] < history["users"][1]
    assert all(c > 0 for c in history["cpu_us_per_event"])
    serving = written["beside_serving"]
    assert serving["score_p99_ms_alone"] > 0 and serving["score_p99_ms_streaming"] > 0
    assert serving["score_errors"] == {"alone": {}, "streaming": {}}
    assert (tmp_path / "docs" / "benchmarks-stream" / "freshness.png").stat().st_size > 0
    text = markdown(written)
    assert "## Freshness and throughput" in text and "## Cost per event against the stored history" in text
    assert not (run / "stream").exists(), "the bench leaves no streamed rows in its world"

"""The synthetic world: deterministic, multi-vertical, with a documented click model."""

import numpy as np
import pandas as pd
import pytest

from loopfm.core.config import DataConfig
from loopfm.data.synth import simulate

SMALL = DataConfig(n_users=300, n_days=30, seed=3)


def test_same_seed_gives_identical_tables_and_another_seed_does_not():
    a, b, c = simulate(SMALL), simulate(SMALL), simulate(DataConfig(n_users=300, n_days=30, seed=4))
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    assert not a["impressions"]["label"].equals(c["impressions"]["label"])


def test_default_world_has_three_verticals_thirty_days_and_item_attributes():
    cfg = DataConfig()
    assert len(cfg.verticals) >= 3 and cfg.n_days >= 30
    t = simulate(SMALL)
    imp = t["impressions"]
    assert set(imp["vertical"]) == set(SMALL.verticals)
    span = imp["event_timestamp"].max() - imp["event_timestamp"].min()
    assert span > pd.Timedelta(days=29)
    assert {"category", "brand", "price"} <= set(t["items"].columns)


def test_labels_follow_the_true_click_probability_kept_aside():
    t = simulate(SMALL)
    assert "p_true" not in t["impressions"].columns  # the Bayes ceiling is for evaluation only
    p = t["truth"].set_index("impression_id").loc[t["impressions"]["impression_id"], "p_true"].to_numpy()
    y = t["impressions"]["label"].to_numpy()
    assert abs(y.mean() - p.mean()) < 0.01
    high, low = y[p > np.quantile(p, 0.9)].mean(), y[p < np.quantile(p, 0.1)].mean()
    assert high > 3 * low


def test_fm_only_signal_tracks_a_persistent_interest_more_tightly_with_less_noise():
    def corr(noise: float) -> float:
        cfg = DataConfig(n_users=300, n_days=5, fm_signal_noise=noise, seed=1)
        t = simulate(cfg)
        intents = t["fm_user_signals"].filter(like="intent_").to_numpy()
        # The same user's intent on consecutive days is correlated through the latent interest.
        per_user = intents.reshape(cfg.n_users, cfg.n_days, -1)
        return float(np.corrcoef(per_user[:, 0].ravel(), per_user[:, 1].ravel())[0, 1])

    assert corr(0.1) > corr(2.0) > 0


def test_new_tables_that_fail_half_written_leave_the_previous_data_whole(tmp_path, monkeypatch):
    """A synth (or import) stopped while writing never leaves some new tables beside some old
    ones: the tables go to a fresh folder that replaces data/ only once all are written."""
    import hashlib

    import loopfm.data.run_data
    from loopfm.data.synth import write_tables
    from loopfm.core.rundir import RunPaths

    paths = RunPaths(tmp_path / "run")
    write_tables(simulate(SMALL), SMALL, paths)
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in paths.data.iterdir()}
    write = loopfm.data.run_data.write_parquet
    written = []

    def fails_at_the_third(df, path):
        if len(written) == 2:
            raise OSError(28, "No space left on device", str(path))
        write(df, path)
        written.append(path)

    monkeypatch.setattr(loopfm.data.run_data, "write_parquet", fails_at_the_third)
    other = DataConfig(n_users=300, n_days=30, seed=4)
    with pytest.raises(OSError):
        write_tables(simulate(other), other, paths)
    assert len(written) == 2
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in paths.data.iterdir()} == before
    assert sorted(p.name for p in paths.root.iterdir()) == ["data"]  # no staging folder left

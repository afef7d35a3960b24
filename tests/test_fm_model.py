"""loopfm's own FM (loopfm/fm/model.py): what its wide part can express, and what its logged layer keeps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from loopfm.core.config import RunConfig
from loopfm.contract.names import N_COUNT_BUCKETS, N_RATE_BUCKETS
from loopfm.contract.tensorize import rate_bucket_log_odds
from loopfm.fm.inputs import ACTIVITY_COLUMNS
from loopfm.fm.log import encode
from loopfm.fm.model import WIDE_RATES, Compressor, FMShapes, FoundationModel

SHAPES = FMShapes(n_users=10, n_items=20, n_categories=3, n_brands=4, n_verticals=2, intent_dim=0,
                  embedding_dim=8, hidden=(16,), code_dim=8, extract_layer="embedding", dot_logit=False)  # fmt: skip


def random_events(n: int) -> dict[str, torch.Tensor]:
    """`n` events of SHAPES' vocabularies, every input drawn at random (seed 0)."""
    rng = np.random.default_rng(0)
    batch = {k: torch.from_numpy(rng.integers(0, 2, n)) for k in ("category", "brand", "hour", "age_bucket", "gender",
                                                                   "price_bucket", "vertical_id")}  # fmt: skip
    batch.update({k: torch.from_numpy(rng.integers(0, (N_RATE_BUCKETS if k.startswith("rate") else N_COUNT_BUCKETS) + 1, n))
                  for k in ACTIVITY_COLUMNS})  # fmt: skip
    batch.update(user_id=torch.from_numpy(rng.integers(0, 10, n)), item_id=torch.from_numpy(rng.integers(0, 20, n)),
                 raw_history=torch.from_numpy(rng.integers(0, 21, (n, 3))),
                 raw_declined=torch.from_numpy(rng.integers(0, 21, (n, 3))), intent=torch.zeros(n, 0))  # fmt: skip
    return batch


def test_each_vertical_weighs_the_users_click_rate_its_own_way():
    """Where a user's rate in the vertical says "click" in one vertical and "no click" in the
    other, the wide part alone (the MLP's output held at zero, ids unknown) ranks both
    verticals right: one rate weight shared by every vertical could rank only one of them."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n = 4000
    vertical = rng.integers(0, 2, n)
    rate = rng.integers(1, N_RATE_BUCKETS + 1, n)
    sign = np.where(vertical == 0, 1.0, -1.0)
    label = rng.random(n) < 1 / (1 + np.exp(-sign * rate_bucket_log_odds()[rate]))
    batch = {k: torch.zeros(n, dtype=torch.int64) for k in ("category", "brand", "hour", "age_bucket", "gender",
                                                             "price_bucket", *ACTIVITY_COLUMNS)}  # fmt: skip
    batch.update(user_id=torch.full((n,), -1), item_id=torch.full((n,), -1), vertical_id=torch.from_numpy(vertical),
                 rate_vertical=torch.from_numpy(rate), raw_history=torch.zeros(n, 3, dtype=torch.int64),
                 raw_declined=torch.zeros(n, 3, dtype=torch.int64), intent=torch.zeros(n, 0))  # fmt: skip
    fm = FoundationModel(SHAPES)
    nn.init.zeros_(fm.head.weight)
    fm.head.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in fm.parameters() if p.requires_grad], lr=0.05)
    target = torch.from_numpy(label.astype(np.float32))
    for _ in range(200):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(fm(batch)[0], target).backward()
        opt.step()
    with torch.no_grad():
        score = fm(batch)[0].numpy()
    for v in (0, 1):
        assert roc_auc_score(label[vertical == v], score[vertical == v]) > 0.75


def test_a_code_of_the_embedding_layer_keeps_the_click_rates_the_logit_reads():
    """The compressor's code of the `embedding` layer gives back each wide rate's log-odds by a
    linear read (R^2 > 0.9), even from an FM whose rate embeddings say nothing of the rate:
    the layer holds the log-odds themselves, not only the buckets' embeddings."""
    torch.manual_seed(0)
    n = 3000
    batch = random_events(n)
    with torch.no_grad():
        layer = FoundationModel(SHAPES)(batch)[1]["embedding"]
    compressor = Compressor(layer.shape[1], SHAPES.code_dim)
    opt = torch.optim.Adam(compressor.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        compressor.reconstruction_loss(layer).backward()
        opt.step()
    with torch.no_grad():
        code = compressor.encode(layer).numpy()
    half = n // 2
    for name in WIDE_RATES:
        log_odds = rate_bucket_log_odds()[batch[name].numpy()]
        fit = LinearRegression().fit(code[:half], log_odds[:half])
        assert fit.score(code[half:], log_odds[half:]) > 0.9, name


def test_a_checkpoint_whose_compressor_reads_another_width_is_refused_naming_the_fix():
    """A checkpoint saved before the FM's logged layer changed (its compressor 4 dims narrower,
    as before the wide rates entered it) is refused by name, not with a matrix-shape error."""
    cfg = RunConfig()
    cfg = replace(cfg, fm=replace(cfg.fm, code_dim=SHAPES.code_dim))
    fm = FoundationModel(SHAPES).eval()
    old = Compressor(fm.embedding_width - len(WIDE_RATES), SHAPES.code_dim)
    with pytest.raises(ValueError, match=r"reads \d+ dims.*re-run `loopfm fm train`"):
        encode(fm, old, ("embedding",), random_events(5), cfg)
    assert encode(fm, Compressor(fm.embedding_width, SHAPES.code_dim), ("embedding",), random_events(5), cfg)[1].shape[0] == 5


def test_each_vertical_weighs_the_deep_part_its_own_way():
    """Where the deep part (the MLP's head and the towers' product) adds to the wide terms in one
    vertical and nothing in the other, training the per-vertical weights alone keeps the first
    vertical's weight on the deep part near 1 and takes the second's near 0, while the wide
    terms keep counting in both."""
    torch.manual_seed(0)
    n = 4000
    batch = random_events(n)
    fm = FoundationModel(replace(SHAPES, dot_logit=True))
    rate_log_odds = rate_bucket_log_odds()[np.stack([batch[name].numpy() for name in WIDE_RATES], axis=1)]

    def wide_and_deep() -> tuple[np.ndarray, np.ndarray]:
        """The logit's wide terms (the rates; the id biases are 0) and the rest, at weights 1."""
        wide = rate_log_odds @ fm.rate_weight.detach().numpy()
        with torch.no_grad():
            return wide, fm(batch)[0].numpy() - wide

    with torch.no_grad():
        for zeroed in (fm.user_bias.weight, fm.item_bias.weight, fm.head.bias):
            zeroed.zero_()
        fm.rate_weight.fill_(0.3)  # wide terms of std ~2
        fm.head.weight *= 3 / float(np.std(wide_and_deep()[1]))  # a deep part of std ~2 (~0.002 at init)
    wide, deep = wide_and_deep()
    vertical = batch["vertical_id"].numpy()
    p = 1 / (1 + np.exp(-(wide + np.where(vertical == 0, deep, 0.0))))
    target = torch.from_numpy((np.random.default_rng(1).random(n) < p).astype(np.float32))
    opt = torch.optim.Adam([fm.vertical_deep_weight], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(fm(batch)[0], target).backward()
        opt.step()
    weight = 1 + fm.vertical_deep_weight.detach().numpy()
    assert abs(weight[0] - 1) < 0.25 and abs(weight[1]) < 0.25, weight
    with torch.no_grad():
        second = fm(batch)[0].numpy()[vertical == 1]
    assert np.corrcoef(second, wide[vertical == 1])[0, 1] > 0.95  # the second vertical's logit: its wide terms

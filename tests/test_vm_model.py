"""The VM: every encoder runs in both layouts, and an empty history contributes nothing."""

import numpy as np
import pytest
import torch

from loopfm.core.config import ENCODERS
from loopfm.contract.tensorize import rate_bucket_log_odds
from loopfm.vm.model import VerticalModel, VMShapes, attention_scorer, masked_pool


def _model(encoder: str, use_fm: bool = True, short_window: int = 0) -> VerticalModel:
    shapes = VMShapes(user_context_vocab=(7, 3, 25, 21, 13), candidate_vocab=(51, 11, 21, 11), code_dim=4,
                      embedding_dim=8, hidden=(16,), use_fm_history=use_fm, encoder=encoder, history_length=6,
                      history_product=True, short_window=short_window)  # fmt: skip
    return VerticalModel(shapes).eval()


def _inputs(users: int, candidates: int, length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "user_context": torch.randint(0, 3, (users, 5), generator=g),
        "vm_history": torch.randint(0, 51, (users, length), generator=g),
        "fm_codes": torch.rand((users, length, 4), generator=g) * 2 - 1,
        "fm_mask": (torch.rand((users, length), generator=g) > 0.3).float(),
        "candidates": torch.randint(0, 11, (candidates, 4), generator=g),
        "candidate_user": torch.randint(0, users, (candidates,), generator=g),
    }


@pytest.mark.parametrize("short_window", [0, 2])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_one_user_row_per_request_scores_like_one_user_row_per_candidate(encoder, short_window):
    """Three layouts, one function: candidate_user = 0 (gathers), the user's row repeated per
    candidate (training), and candidate_user None (matrix products: the serving graph)."""
    model, x = _model(encoder, short_window=short_window), _inputs(users=1, candidates=9)
    with torch.no_grad():
        model.rate_weight.fill_(0.5)
    shared, _ = model(**x)
    repeated = {k: (v.expand(9, *v.shape[1:]) if k in ("user_context", "vm_history", "fm_codes", "fm_mask") else v)
                for k, v in x.items()}  # fmt: skip
    repeated["candidate_user"] = torch.arange(9)
    per_row, _ = model(**repeated)
    served, _ = model(**(x | {"candidate_user": None}))
    torch.testing.assert_close(shared, per_row)
    torch.testing.assert_close(served, per_row)
    assert served.std() > 1e-3  # the candidates score differently


@pytest.mark.parametrize("encoder", ENCODERS)
def test_an_all_padding_history_pools_to_zero(encoder):
    keys, query = torch.randn(2, 5, 8), torch.randn(3, 8)
    mask = torch.tensor([[0.0] * 5, [1.0] * 5])
    pooled = masked_pool(keys, mask, query, torch.tensor([0, 1, 0]), encoder, attention_scorer(encoder, 8))
    assert pooled.shape == (3, 8)
    assert torch.all(pooled[[0, 2]] == 0) and torch.any(pooled[1] != 0)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_recency_weights_can_drop_old_positions_so_a_longer_history_pools_like_a_shorter_one(encoder):
    keys, query, users = torch.randn(2, 6, 8), torch.randn(3, 8), torch.tensor([0, 1, 0])
    scorer = attention_scorer(encoder, 8)
    mask = torch.ones(2, 6)
    drop_oldest_four = torch.tensor([-60.0] * 4 + [0.0] * 2)
    long = masked_pool(keys, mask, query, users, encoder, scorer, drop_oldest_four)
    short = masked_pool(keys[:, 4:], mask[:, 4:], query, users, encoder, scorer, torch.zeros(2))
    torch.testing.assert_close(long, short)
    assert not torch.allclose(masked_pool(keys, mask, query, users, encoder, scorer), short)  # without recency it differs


def test_recency_weights_start_at_a_decay_prior_newest_first_and_at_zero_without_one():
    shapes = dict(user_context_vocab=(7, 3, 25, 21, 13), candidate_vocab=(51, 11, 21, 11), code_dim=4, embedding_dim=8,
                  hidden=(16,), use_fm_history=True, encoder="dot_mlp", history_length=6)  # fmt: skip
    decayed = VerticalModel(VMShapes(**shapes, recency_decay=0.5))
    for r in (decayed.own_recency, decayed.fm_recency):
        assert r[-1] == 0 and torch.all(r[1:] > r[:-1])  # right-aligned: the newest position is the last
        torch.testing.assert_close(r[0], torch.tensor(-2.5))  # 5 positions back
    plain = VerticalModel(VMShapes(**shapes))
    assert torch.all(plain.own_recency == 0) and torch.all(plain.fm_recency == 0)


def test_a_learned_recency_slope_discounts_each_position_by_its_steps_back_and_starts_at_zero():
    """recency_slope adds one scalar per history: log-weight = per-position weight - slope x
    steps back. It starts at 0 (the prior alone), gets a gradient, and a steep slope leaves
    only the newest position, as a history of length 1 would pool."""
    shapes = dict(user_context_vocab=(7, 3, 25, 21, 13), candidate_vocab=(51, 11, 21, 11), code_dim=4, embedding_dim=8,
                  hidden=(16,), use_fm_history=True, encoder="dot_mlp", history_length=6, recency_decay=0.5)  # fmt: skip
    model = VerticalModel(VMShapes(**shapes, recency_slope=True))
    torch.testing.assert_close(model.recency("fm"), model.fm_recency)  # slope 0: the decay prior alone
    model(**_inputs(users=2, candidates=5))[0].sum().backward()
    assert model.own_slope.grad != 0 and model.fm_slope.grad != 0
    with torch.no_grad():
        model.fm_slope.fill_(0.25)
    torch.testing.assert_close(model.recency("fm") - model.fm_recency, -0.25 * torch.arange(5, -1, -1.0))
    keys, query, users = torch.randn(2, 6, 8), torch.randn(3, 8), torch.tensor([0, 1, 0])
    with torch.no_grad():
        model.fm_slope.fill_(60.0)
        steep = masked_pool(keys, torch.ones(2, 6), query, users, "dot_mlp", model.fm_attention, model.recency("fm"))
        newest = masked_pool(keys[:, 5:], torch.ones(2, 1), query, users, "dot_mlp", model.fm_attention, torch.zeros(1))
    torch.testing.assert_close(steep, newest)
    assert VerticalModel(VMShapes(**shapes)).fm_slope is None  # off by default


@pytest.mark.parametrize("encoder", ENCODERS)
def test_the_short_window_pools_the_newest_positions_of_each_history_and_nothing_older(encoder):
    """With short_window = w a second pooled vector per history reads only its newest w
    positions: changing anything older moves the full-history pool, never the short one."""
    model = _model(encoder, short_window=2)
    x = _inputs(users=2, candidates=5)
    older = dict(x, vm_history=x["vm_history"].clone(), fm_codes=x["fm_codes"].clone())
    older["vm_history"][:, :4] = (older["vm_history"][:, :4] + 7) % 51
    older["fm_codes"][:, :4] = -older["fm_codes"][:, :4]
    own = model.candidate[0](x["vm_history"]), model.candidate[0](older["vm_history"])
    query = model.target(torch.cat([emb(x["candidates"][:, i]) for i, emb in enumerate(model.candidate)], dim=1))
    mask = (x["vm_history"] > 0).float()
    pools = [model._pools(keys, mask, query, x["candidate_user"], model.own_attention, model.own_recency) for keys in own]
    assert len(pools[0]) == 2
    torch.testing.assert_close(pools[0][1], pools[1][1])  # the newest 2 positions are the same
    assert not torch.allclose(pools[0][0], pools[1][0])  # the whole history is not
    assert not torch.allclose(model(**x)[0], model(**older)[0])


def test_a_short_window_model_exports_to_onnx_with_parity():
    import numpy as np

    from loopfm.vm.export import onnx_bytes, parity_check

    model = _model("dot_mlp", short_window=2)
    tensors = {k: v.numpy() for k, v in _inputs(users=12, candidates=12).items()}
    tensors["candidate_user"] = np.arange(12)
    check = parity_check(model, onnx_bytes(model, tensors), tensors)
    assert check["requests"] == check["candidates"] == 12 and check["max_abs_diff"] < 1e-5


def _rate_model(item_activity: bool) -> VerticalModel:
    candidate_vocab = (51, 11, 21, 11, 49, 13) if item_activity else (51, 11, 21, 11)
    shapes = VMShapes(user_context_vocab=(7, 3, 25, 49, 13), candidate_vocab=candidate_vocab, code_dim=4,
                      embedding_dim=8, hidden=(16,), use_fm_history=False, encoder="mean", history_length=6,
                      item_bias=not item_activity)  # fmt: skip
    return VerticalModel(shapes)


def test_with_the_item_s_rate_so_far_there_is_no_item_id_count_or_rate_bucket_bias_and_without_it_the_bias_starts_at_popularity():
    g = np.random.default_rng(0)
    n = 400
    candidates = np.stack([g.integers(0, 51, n), g.integers(0, 11, n), g.integers(0, 21, n), g.integers(0, 11, n),
                           g.integers(20, 40, n), g.integers(0, 13, n)], axis=1)  # fmt: skip
    label = (candidates[:, 0] < 25).astype(np.float32)  # the first half of the items is always clicked
    with_rate = _rate_model(item_activity=True)
    with_rate.init_biases(candidates, label)
    assert with_rate.bias_columns == [1, 2, 3]  # no item-id and no item-count bias (both fit the training days), no rate-bucket bias (the rate is linear)
    assert with_rate.rate_weight.tolist() == [0.0, 0.0]  # user and item rate weights, learned from 0
    without = _rate_model(item_activity=False)
    without.init_biases(candidates[:, :4], label)
    assert without.rate_weight.shape == (1,) and without.bias_columns == [0, 1, 2, 3]
    bias = without.candidate_bias[0].weight[:, 0]
    assert bias[:25].min() > 0 > bias[25:].max()  # each item's shrunk click rate relative to the overall one


def test_the_training_defaults_build_a_vm_without_item_count_or_rate_bucket_biases_and_with_the_recency_prior():
    """What `loopfm vm train` builds (vm/train.shapes_for), not a hand-made VMShapes."""
    from loopfm.core.config import RunConfig
    from loopfm.contract.tensorize import TensorSpec
    from loopfm.vm.model import ITEM_COUNT_COLUMN, ITEM_RATE_COLUMN
    from loopfm.vm.train import shapes_for

    cfg = RunConfig()
    spec = TensorSpec(history_length=cfg.vm.history_length, code_dim=8, n_items=50, n_categories=10, n_brands=20, item_activity=True)
    model = VerticalModel(shapes_for(cfg, spec, "loopfm_kd"))
    assert not {0, ITEM_COUNT_COLUMN, ITEM_RATE_COLUMN} & set(model.bias_columns)
    newest_first = torch.flip(model.recency("fm").detach(), [0])
    torch.testing.assert_close(newest_first[:3], torch.tensor([0.0, -1.0, -2.0]) * cfg.vm.recency_decay)
    assert cfg.vm.recency_decay > 0 and model.fm_slope is not None and model.own_slope is not None


def test_the_item_s_click_rate_so_far_moves_the_score_through_the_wide_part():
    model = _rate_model(item_activity=True).eval()
    with torch.no_grad():
        model.rate_weight.copy_(torch.tensor([0.0, 1.0]))
    x = _inputs(users=1, candidates=2)
    x["candidates"] = torch.tensor([[5, 1, 1, 1, 10, 3], [5, 1, 1, 1, 40, 3]])
    low, high = model(**{k: v for k, v in x.items() if not k.startswith("fm_")})[0].tolist()
    centres = rate_bucket_log_odds()
    assert high - low > 0.5 * (centres[40] - centres[10])  # the deep part is small at init; the wide term is not

"""The foundation model (FM) and the compressor that turns its activations into codes.

`FoundationModel` is loopfm's own implementation of the FM interface (loopfm/fm/plugin.py:
`fm.model` names any module with the same `forward`); it is the default `fm.model`. It sees
every vertical, the user's ID, its raw histories of clicked and of declined items across all
verticals and the FM-only intent signal; no vertical model sees those. The compressor is an
autoencoder trained beside the FM on detached activations (stop-gradient: it never changes
the FM), with a tanh-bounded code so that int4 quantisation has a fixed range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loopfm.contract.names import N_AGE_BUCKETS, N_COUNT_BUCKETS, N_GENDERS, N_HOURS, N_PRICE_BUCKETS, N_RATE_BUCKETS
from loopfm.contract.tensorize import rate_bucket_log_odds

EMBEDDING_INIT_STD = 0.01  # as the VM's: N(0, 1) rows of ids the FM rarely saw were noise in its codes
# The per-vertical rate weights enter the logit scaled by this: under Adam, a quarter of the wide
# group's step. At the full step they cost the FM 0.0017 AUC on MovieLens Comedy, at a quarter
# 0.0010, keeping most of Ciao 10's gain (docs/training.md, "Rate weights per vertical, and the
# items a user declined").
VERTICAL_RATE_SCALE = 0.25
WIDE_RATES = ("rate_all", "rate_vertical", "rate_recent", "rate_item")  # the click-rate buckets the logit reads linearly


@dataclass
class FMShapes:
    """Vocabulary sizes and widths the FM is built for (derived from the world and the fm.*
    config); what an `fm.model` factory receives. `extract_layer` is fm.extract_layer as
    written (one name or several comma-separated)."""

    n_users: int
    n_items: int
    n_categories: int
    n_brands: int
    n_verticals: int
    intent_dim: int
    embedding_dim: int
    hidden: tuple[int, ...]
    code_dim: int
    extract_layer: str
    dot_logit: bool = False  # fm.dot_logit


class FoundationModel(nn.Module):
    """loopfm's FM: returns the logit [B] (the wide terms: id biases and rates, plus each
    vertical's weight times the deep part: the MLP's head and the towers' product) and the
    layers `embedding` (the MLP's concatenated inputs, then the wide rates' log-odds),
    `hidden1`, `hidden2`, ... (one per fm.hidden width)."""

    # The rate weights and the per-vertical deep weights train fm.wide_lr_multiplier times faster
    # (loopfm/fm/plugin.py: wide_parameters): from 0 at fm.lr the rate weights barely move in a
    # warm-up of a few hundred steps. The id biases train at fm.lr: faster, they overfit Ciao's
    # items, most rated once (docs/training.md, "Click rates so far").
    wide_parameter_prefixes = ("rate_weight", "vertical_rate_weight", "vertical_deep_weight")

    def __init__(self, s: FMShapes):
        super().__init__()
        e = s.embedding_dim
        # Ids are shifted by one: row 0 is the unknown id (a user or item the checkpoint never
        # trained on, or history padding) and stays the zero vector.
        self.user = nn.Embedding(s.n_users + 1, e, padding_idx=0)
        self.item = nn.Embedding(s.n_items + 1, e, padding_idx=0)
        self.user_bias = nn.Embedding(s.n_users + 1, 1, padding_idx=0)  # first-order terms, as in DeepFM
        self.item_bias = nn.Embedding(s.n_items + 1, 1, padding_idx=0)
        self.category = nn.Embedding(s.n_categories, e // 2)
        self.brand = nn.Embedding(s.n_brands, e // 2)
        self.vertical = nn.Embedding(s.n_verticals, 4)
        self.hour = nn.Embedding(N_HOURS, 4)
        self.age = nn.Embedding(N_AGE_BUCKETS, 4)
        self.gender = nn.Embedding(N_GENDERS, 2)
        self.price = nn.Embedding(N_PRICE_BUCKETS, 4)
        # The user's click rate and impression count so far, over all verticals and in the event's
        # own (fm/inputs.py: _activity): a propensity even for users the checkpoint never saw.
        # The same buckets of its click rate lately (fm.recent_half_life) share these tables.
        self.rate = nn.Embedding(N_RATE_BUCKETS + 1, 4)
        self.count = nn.Embedding(N_COUNT_BUCKETS + 1, 4)
        activity = 6 * 4
        # The item's click rate and impression count so far, by every user (fm/inputs.py: _activity).
        self.item_rate = nn.Embedding(N_RATE_BUCKETS + 1, 4)
        self.item_count = nn.Embedding(N_COUNT_BUCKETS + 1, 4)
        item_activity = 2 * 4
        # The four click rates so far also enter the logit linearly (user over every vertical,
        # user in the event's vertical, user lately, item): a logistic regression on the other
        # three alone beat the FM on MovieLens (docs/training.md, "Click rates so far"), and
        # one with the fourth too gains 0.8% to 1.0% AUC there ("The user's click rate lately").
        self.register_buffer("rate_log_odds", torch.from_numpy(rate_bucket_log_odds()), persistent=False)
        self.rate_weight = nn.Parameter(torch.zeros(len(WIDE_RATES)))
        # Each vertical's own offsets to those weights: how much a user's rate in the event's
        # vertical says differs by vertical (Ciao category 10 against the other 27 merged), and
        # shared weights fitted mostly on the larger verticals lost to `lr_rates` there.
        self.vertical_rate_weight = nn.Parameter(torch.zeros(s.n_verticals, len(WIDE_RATES)))
        # Each vertical's weight on the deep part of the logit (the MLP's head and the towers'
        # product): 1 + this offset, learned in the fast wide group. The stream trains on events
        # that no checkpoint has trained on yet, so the offset follows how well the deep part
        # predicts each vertical's new events: where it does worse than the rates alone (Ciao
        # category 10) the weight falls below 1 (docs/training.md, "A weight per vertical on the
        # deep part").
        self.vertical_deep_weight = nn.Parameter(torch.zeros(s.n_verticals))
        self.dot_logit = s.dot_logit
        # Two towers whose product is an explicit user-item interaction (as in DeepFM/DCN):
        # an MLP on concatenated embeddings learns such products poorly.
        self.user_tower = nn.Linear(3 * e + s.intent_dim + activity, e)
        self.item_tower = nn.Linear(e + e // 2 + item_activity, e)
        width = 4 * e + 2 * (e // 2) + 4 + 4 + 4 + 2 + 4 + s.intent_dim + activity + item_activity + 3 * e
        # The logged `embedding` layer is the MLP's input followed by the wide rates' log-odds: the
        # rate embeddings carry a rate in a form the compressor's code keeps poorly (a linear read
        # of the user's rate over every vertical from the MLP's input: R^2 0.38 on Ciao 10;
        # docs/training.md, "The wide rates in the logged layer").
        self.embedding_width = width + len(WIDE_RATES)
        self.hidden = nn.ModuleList()
        for h in s.hidden:
            self.hidden.append(nn.Linear(width, h))
            width = h
        self.head = nn.Linear(width, 1)
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=EMBEDDING_INIT_STD)
                if module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])

    def forward(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """b: per-event tensors [B] (ids; user_id and item_id -1 = unknown; activity buckets, 0 =
        unknown) plus intent [B, k], raw_history and raw_declined [B, H] (item id + 1, 0 =
        padding or unknown) -> logit [B], activations by layer."""
        user_index, item_index = b["user_id"] + 1, b["item_id"] + 1
        user, item, category = self.user(user_index), self.item(item_index), self.category(b["category"])
        hist_mean, declined_mean = self._mean_item(b["raw_history"]), self._mean_item(b["raw_declined"])  # [B, e]
        activity = torch.cat([self.rate(b["rate_all"]), self.count(b["count_all"]),
                              self.rate(b["rate_vertical"]), self.count(b["count_vertical"]),
                              self.rate(b["rate_recent"]), self.count(b["count_recent"])], dim=1)  # fmt: skip
        user_vec = self.user_tower(torch.cat([user, hist_mean, declined_mean, b["intent"], activity], dim=1))
        item_activity = torch.cat([self.item_rate(b["rate_item"]), self.item_count(b["count_item"])], dim=1)
        item_vec = self.item_tower(torch.cat([item, category, item_activity], dim=1))
        rate_log_odds = self.rate_log_odds[torch.stack([b[name] for name in WIDE_RATES], dim=1)]  # [B, 4]
        x = torch.cat(
            [
                user,
                item,
                hist_mean,
                declined_mean,
                category,
                self.brand(b["brand"]),
                self.vertical(b["vertical_id"]),
                self.hour(b["hour"]),
                self.age(b["age_bucket"]),
                self.gender(b["gender"]),
                self.price(b["price_bucket"]),
                b["intent"],
                activity,
                item_activity,
                user_vec,
                item_vec,
                user_vec * item_vec,
            ],
            dim=1,
        )
        activations = {"embedding": torch.cat([x, rate_log_odds], dim=1)}
        for i, layer in enumerate(self.hidden, start=1):
            x = torch.relu(layer(x))
            activations[f"hidden{i}"] = x
        wide = (self.user_bias(user_index) + self.item_bias(item_index)).squeeze(1)  # [B]
        weights = self.rate_weight + VERTICAL_RATE_SCALE * self.vertical_rate_weight[b["vertical_id"]]  # [B, 4]
        wide = wide + (rate_log_odds * weights).sum(1)
        deep = self.head(x).squeeze(1)  # [B]
        if self.dot_logit:  # the towers' inner product itself, as a factorization machine's pairwise term
            deep = deep + (user_vec * item_vec).sum(1)
        return wide + (1 + self.vertical_deep_weight[b["vertical_id"]]) * deep, activations

    def _mean_item(self, history: torch.Tensor) -> torch.Tensor:
        """[B, H] item ids + 1 (0 = padding) -> the mean of their embeddings [B, e] (0 if none)."""
        n = (history > 0).sum(1, keepdim=True).clamp(min=1)
        return self.item(history).sum(1) / n


class Compressor(nn.Module):
    """Autoencoder on one FM layer: activation [B, A] -> code z in (-1, 1)^d -> reconstruction."""

    def __init__(self, activation_dim: int, code_dim: int):
        super().__init__()
        self.encoder = nn.Linear(activation_dim, code_dim)
        self.decoder = nn.Linear(code_dim, activation_dim)

    def encode(self, activation: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(activation))

    def reconstruction_loss(self, activation: torch.Tensor, prefixes: tuple[int, ...] = ()) -> torch.Tensor:
        """MSE of reconstructing the activation from the full code, averaged with the MSE from
        each nested prefix z[:, :k] (Matryoshka): then a logged prefix is a code of its own."""
        z = self.encode(activation)
        d = z.shape[1]
        losses = [
            nn.functional.mse_loss(self.decoder(z * (torch.arange(d) < k)), activation)
            for k in sorted({min(k, d) for k in prefixes} | {d})
        ]
        return torch.stack(losses).mean()


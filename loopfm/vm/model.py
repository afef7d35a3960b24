"""The vertical model (VM): a small CTR model; one class for every variant.

Inputs follow serving's shape: request-side tensors once per user, candidate-side tensors
once per candidate, and `candidate_user` saying which user row each candidate belongs to.
At serving time there is one user and many candidates, so the user's history is passed and
encoded once per request; in training every row is its own user (candidate_user = arange).
The serving graph (ServingHead) is traced for one user: no candidate_user input, and its
history attention is matrix products rather than per-candidate gathers.

    user_context   [U, 5]     int64  age, gender, hour, click-rate and impression-count buckets (+1; 0 = unknown)
    vm_history     [U, L]     int64  own-vertical clicked item ids (+1; 0 = padding), newest last
    fm_codes       [U, L, d]  float  FM codes of the user's last L events (fm.history_events; LoopFM variants)
    fm_mask        [U, L]     float  1 where fm_codes holds a code
    candidates     [C, 4|6]   int64  item id, category, brand, price bucket, then (vm.item_activity) the
                                     item's click-rate and impression-count buckets so far (+1; 0 = unknown)
    candidate_user [C]        int64  row of the user each candidate is scored for (training; not a graph input)
    -> logit [C] (serving head), kd_logit [C] (auxiliary distillation head, training only)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import numpy as np
from torch import nn

from loopfm.contract.tensorize import rate_bucket_log_odds
from loopfm.core.config import ENCODERS
from loopfm.core.training import shrunk_rate

EMBEDDING_INIT_STD = 0.01  # measured: N(0, 1) embeddings left the VM below an item-id LR on MovieLens
USER_RATE_COLUMN, ITEM_RATE_COLUMN = 3, 4  # of user_context and candidates: the click-rate buckets
ITEM_COUNT_COLUMN = 5  # of candidates (vm.item_activity): the item's impression-count bucket
WIDE_PARAMETER_PREFIXES = ("candidate_bias.", "rate_weight")  # trained vm.wide_lr_multiplier times faster


@dataclass
class VMShapes:
    user_context_vocab: tuple[int, ...]
    candidate_vocab: tuple[int, ...]
    code_dim: int
    embedding_dim: int
    hidden: tuple[int, ...]
    use_fm_history: bool
    encoder: str
    history_length: int
    dropout: float = 0.0
    history_product: bool = False  # the MLP also reads each pooled history times the candidate's query
    short_window: int = 0  # also pool the newest this many positions of each history (0 = off)
    item_bias: bool = True  # a learned bias per item id; off when candidates carry the item's rate so far
    recency_decay: float = 0.0  # recency log-weights start at -this per position back from the newest
    recency_slope: bool = False  # also learn one slope per history on those log-weights


class DinScorer(nn.Module):
    """DIN's attention MLP on [k, q, k*q, k-q], its first layer split by input block:
    W [k, q, k*q, k-q] = A k + B q + P (k*q). The key part runs once per user, the query part
    once per candidate; only the product runs per (candidate, position). Same function class
    as the concatenated layer, without building a [C, L, 4e] tensor."""

    def __init__(self, e: int, hidden: int = 16):
        super().__init__()
        self.key = nn.Linear(e, hidden)
        self.query = nn.Linear(e, hidden, bias=False)
        self.product = nn.Linear(e, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, keys: torch.Tensor, query: torch.Tensor, candidate_user: torch.Tensor | None) -> torch.Tensor:
        """keys [U, L, e], query [C, e] -> attention logits [C, L] (candidate_user None: U = 1)."""
        per_user = self.key(keys)  # [U, L, hidden], once per user
        if candidate_user is not None:  # else U = 1, broadcast over the candidates
            per_user, keys = per_user[candidate_user], keys[candidate_user]  # [C, L, .]
        per_pair = self.product(keys * query.unsqueeze(1))  # [C, L, hidden]
        return self.out(torch.relu(per_user + per_pair + self.query(query).unsqueeze(1))).squeeze(-1)


class DotMlpScorer(nn.Module):
    """Target attention whose only per-(candidate, position) work is one dot product: DIN's
    per-pair MLP (Zhou et al. 2018) moved to the two sides. A per-user MLP maps each history
    item to a key (once per user and position), a per-candidate MLP maps the candidate's query
    to a query (once per candidate); the logit is their scaled dot product q·k / sqrt(d)
    (Vaswani et al. 2017). The pooled values are the history items themselves: a linear value
    projection would only repeat the VM's first MLP layer, which already reads the pooled vector.
    Per candidate this costs L·d multiply-adds where DIN's split scorer costs about L·e·hidden."""

    def __init__(self, e: int, d: int = 8, hidden: int = 16):
        super().__init__()
        self.key = nn.Sequential(nn.Linear(e, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.query = nn.Sequential(nn.Linear(e, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.scale = d**-0.5

    def forward(self, keys: torch.Tensor, query: torch.Tensor, candidate_user: torch.Tensor | None) -> torch.Tensor:
        """keys [U, L, e], query [C, e] -> attention logits [C, L] (candidate_user None: U = 1)."""
        k = self.key(keys)  # [U, L, d], once per user
        q = self.query(query) * self.scale  # [C, d], once per candidate
        return dot_scores(k, q, candidate_user)


def dot_scores(keys: torch.Tensor, query: torch.Tensor, candidate_user: torch.Tensor | None) -> torch.Tensor:
    """keys [U, L, d], query [C, d] -> [C, L], each candidate's query dotted with its user's keys.
    candidate_user None means one user (U = 1): one [C, d] x [d, L] product, no [C, L, d] gather."""
    if candidate_user is None:
        return query @ keys[0].T
    return torch.bmm(keys[candidate_user], query.unsqueeze(-1)).squeeze(-1)


def attention_scorer(encoder: str, e: int) -> nn.Module | None:
    """The learned attention-logit module of an encoder over e-dim items (None for sum, mean, dot)."""
    return DinScorer(e) if encoder == "din" else DotMlpScorer(e) if encoder == "dot_mlp" else None


def masked_pool(
    keys: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, candidate_user: torch.Tensor | None,
    encoder: str, scorer: nn.Module | None, recency: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Pool each candidate's user history keys [U, L, h] under mask [U, L] (1 = present) with
    target query [C, h] -> [C, h]. An all-padding history pools to zeros for every encoder.
    `scorer`: the encoder's `attention_scorer` (din, dot_mlp), None otherwise. candidate_user
    None: one user (U = 1) for every candidate, computed with matrix products instead of
    [C, L, h] gathers (the serving graph; the same function).

    recency [L]: a learned log-weight per position (histories are right-aligned, position
    L - 1 the newest), added to every encoder's weights in its own terms: a factor exp(r) for
    sum and mean, a logit offset for dot, dot_mlp and din. At r = 0 each encoder is the plain one;
    a very negative r drops a position, so a longer history can always be weighted like a shorter one."""
    one_user = candidate_user is None
    mask = mask if one_user else mask[candidate_user]  # [1 or C, L]
    r = torch.zeros(keys.shape[1]) if recency is None else recency  # [L]

    def pool(weights: torch.Tensor) -> torch.Tensor:  # [1 or C, L] -> [1 or C, h]
        return weights @ keys[0] if one_user else torch.bmm(weights.unsqueeze(1), keys[candidate_user]).squeeze(1)

    if encoder in ("sum", "mean"):
        weights = mask * torch.exp(r)
        pooled = pool(weights)
        pooled = pooled / weights.sum(1, keepdim=True).clamp(min=1e-6) if encoder == "mean" else pooled
        return pooled.expand(query.shape[0], -1)
    if encoder in ("dot", "dot_mlp"):  # scaled dot-product target attention, softmax over present positions
        if encoder == "dot":
            scores = dot_scores(keys, query, candidate_user) / keys.shape[-1] ** 0.5
        else:
            scores = scorer(keys, query, candidate_user)
        weights = torch.softmax((scores + r).masked_fill(mask == 0, -1e9), dim=1) * mask
    else:  # din: un-normalised (sigmoid) weights, as in DIN
        weights = torch.sigmoid(scorer(keys, query, candidate_user) + r) * mask
    return pool(weights)


class VerticalModel(nn.Module):
    def __init__(self, s: VMShapes):
        super().__init__()
        if s.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {s.encoder!r}")
        self.shapes = s
        e = s.embedding_dim
        self.context = nn.ModuleList(nn.Embedding(v, e) for v in s.user_context_vocab)
        self.candidate = nn.ModuleList(nn.Embedding(v, e) for v in s.candidate_vocab)
        cand_width = e * len(s.candidate_vocab)
        self.target = nn.Linear(cand_width, e)  # candidate -> query for the history encoders
        # pooled vector (+ its product with the query), once over the whole history and once
        # over its newest `short_window` positions when set
        per_history = (2 * e if s.history_product else e) * (2 if s.short_window else 1)
        width = e * len(s.user_context_vocab) + cand_width + per_history  # + own-history pooling
        self.own_attention = attention_scorer(s.encoder, e)
        # per-position log-weights (see masked_pool), started at a decay prior: 0 at the newest
        # position, -recency_decay per position older, learned from there (docs/training.md, "Recency prior")
        steps_back = torch.arange(s.history_length - 1, -1, -1, dtype=torch.float32)  # [L], 0 at the newest
        prior = -s.recency_decay * steps_back
        self.own_recency = nn.Parameter(prior.clone())
        self.fm_recency = nn.Parameter(prior.clone()) if s.use_fm_history else None
        # recency_slope: one learned scalar per history, log-weight -= slope * steps back. Adam moves
        # a parameter by about lr per step whatever its gradient, so the per-position weights need
        # thousands of steps to discount position 40 by a few units; a slope that every position
        # informs gets there in a hundred (docs/training.md, "A learned recency slope").
        self.register_buffer("steps_back", steps_back, persistent=False)
        self.own_slope = nn.Parameter(torch.zeros(())) if s.recency_slope else None
        self.fm_slope = nn.Parameter(torch.zeros(())) if s.recency_slope and s.use_fm_history else None
        self.fm_attention = attention_scorer(s.encoder, e) if s.use_fm_history else None
        if s.use_fm_history:
            self.code_proj = nn.Linear(s.code_dim, e)
            width += per_history
        layers: list[nn.Module] = []
        for h in s.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(s.dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.kd_head = nn.Linear(width, 1)
        # First-order ("wide") terms of the serving head: one learned bias per candidate
        # feature value, as in Wide & Deep / DeepFM, so item popularity is a bias rather than
        # something the MLP rebuilds from an embedding. Context values get none (an hour bias
        # fits the training window's few sessions). With the item's click rate so far among the
        # candidates there is no item-id bias: fitted on the whole training window it knows each
        # item's rate there better than the causal rate does. The item's impression-count bucket
        # never gets one: that count grows with time, so its bias would fit the training days,
        # not later ones. Nor does its click-rate bucket: the rate enters linearly (below), and a
        # bias per bucket fits each bucket's few training rows. docs/training.md, "Click rates so
        # far" and "The item-count bias".
        self.bias_columns = [i for i in range(len(s.candidate_vocab))
                             if (s.item_bias or i != 0) and i not in (ITEM_COUNT_COLUMN, ITEM_RATE_COLUMN)]  # fmt: skip
        self.candidate_bias = nn.ModuleList(nn.Embedding(s.candidate_vocab[i], 1) for i in self.bias_columns)
        # The user's click rate so far (and the item's, when candidates carry it) also enter the
        # logit linearly, log-odds times a learned weight: a logistic regression on the two rates
        # is a strong baseline the model must contain (docs/training.md, "Click rates so far").
        self.register_buffer("rate_log_odds", torch.from_numpy(rate_bucket_log_odds()), persistent=False)
        self.rate_weight = nn.Parameter(torch.zeros(2 if len(s.candidate_vocab) > ITEM_RATE_COLUMN else 1))
        for module in self.modules():
            if isinstance(module, nn.Embedding):  # small init: N(0, 1) rows are noise the MLP must unlearn
                nn.init.normal_(module.weight, std=EMBEDDING_INIT_STD)

    @torch.no_grad()
    def init_biases(self, candidates: np.ndarray, label: np.ndarray) -> None:
        """Start the serving head at the popularity baseline of its training rows (candidates
        [N, 4|6] as the model reads them, label [N] 0/1): the head's bias at the click rate's
        log-odds and, with `item_bias`, each item's bias at its shrunk click rate's log-odds
        relative to it. The output-bias init of "init well" extended to the first-order item
        term; training refines it. The rate weights start at 0: started at a logistic
        regression on the rates, epoch 0 validated better than the first epochs of the deep
        part, and early stopping kept it (docs/training.md, "Click rates so far")."""
        rate = float(np.clip(label.mean(), 1e-4, 1 - 1e-4))
        logit = lambda q: np.log(q / (1 - q))  # noqa: E731
        self.head.bias.fill_(logit(rate))
        if self.shapes.item_bias:
            item_index, n = candidates[:, 0], self.candidate_bias[0].num_embeddings
            item_rate = shrunk_rate(np.bincount(item_index, weights=label, minlength=n), np.bincount(item_index, minlength=n), rate)
            self.candidate_bias[0].weight.copy_(torch.from_numpy(logit(item_rate) - logit(rate)).float().unsqueeze(1))

    def forward(
        self,
        user_context: torch.Tensor,
        vm_history: torch.Tensor,
        candidates: torch.Tensor,
        candidate_user: torch.Tensor | None,
        fm_codes: torch.Tensor | None = None,
        fm_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logit [C], kd_logit [C]). candidate_user None: one user (U = 1), every candidate
        theirs; the serving graph is traced that way (ServingHead)."""
        s = self.shapes

        def per_candidate(t: torch.Tensor) -> torch.Tensor:  # [U, ...] -> [C, ...], each candidate's user's row
            return t.expand(candidates.shape[0], *[-1] * (t.dim() - 1)) if candidate_user is None else t[candidate_user]

        ctx = torch.cat([emb(user_context[:, i]) for i, emb in enumerate(self.context)], dim=1)  # [U, 5e]
        cand = torch.cat([emb(candidates[:, i]) for i, emb in enumerate(self.candidate)], dim=1)  # [C, 4e or 6e]
        query = self.target(cand)  # [C, e]
        own = self.candidate[0](vm_history)  # [U, L, e] item-id embeddings shared with candidates
        own_mask = (vm_history > 0).float()
        pooled = self._pools(own, own_mask, query, candidate_user, self.own_attention, self.recency("own"))
        if s.use_fm_history:
            keys = self.code_proj(fm_codes)  # [U, L, e], once per user
            pooled += self._pools(keys, fm_mask, query, candidate_user, self.fm_attention, self.recency("fm"))
        parts = [per_candidate(ctx), cand, *pooled]
        if s.history_product:  # [C, e] each: the user-candidate affinity as an explicit product
            parts += [h * query for h in pooled]
        x = self.mlp(torch.cat(parts, dim=1))
        wide = sum(b(candidates[:, i]) for i, b in zip(self.bias_columns, self.candidate_bias))  # [C, 1]
        # [C, 1 or 2] rate buckets: the candidate's user's and, when candidates carry it, the item's
        rates = torch.cat([per_candidate(user_context[:, USER_RATE_COLUMN : USER_RATE_COLUMN + 1]),
                           candidates[:, ITEM_RATE_COLUMN : ITEM_RATE_COLUMN + 1]], dim=1)  # fmt: skip
        wide = wide + (self.rate_log_odds[rates] * self.rate_weight).sum(1, keepdim=True)
        return (self.head(x) + wide).squeeze(1), self.kd_head(x).squeeze(1)

    def recency(self, history: str) -> torch.Tensor:
        """[L] log-weights of history "own" or "fm" (masked_pool's `recency`): the per-position
        weights, minus the learned slope times the steps back when recency_slope is on."""
        weights, slope = getattr(self, f"{history}_recency"), getattr(self, f"{history}_slope")
        return weights if slope is None else weights - slope * self.steps_back

    def _pools(self, keys, mask, query, candidate_user, scorer, recency) -> list[torch.Tensor]:
        """[C, e] pooled vectors of one history: the whole of it, then (short_window > 0) its
        newest short_window positions (histories are right-aligned), with the same scorer."""
        s = self.shapes
        out = [masked_pool(keys, mask, query, candidate_user, s.encoder, scorer, recency)]
        if s.short_window:
            w = s.short_window
            out.append(masked_pool(keys[:, -w:], mask[:, -w:], query, candidate_user, s.encoder, scorer, recency[-w:]))
        return out


class ServingHead(nn.Module):
    """What ONNX exports: the serving score (probability [C]) of one request, one user (U = 1)
    and C candidates, with exactly the inputs the variant uses. No candidate_user: with one user
    the history attention is two matrix products per history, not gathers of [C, L, e]."""

    def __init__(self, vm: VerticalModel):
        super().__init__()
        self.vm = vm

    def forward(self, user_context, vm_history, candidates, fm_codes=None, fm_mask=None):
        return torch.sigmoid(self.vm(user_context, vm_history, candidates, None, fm_codes, fm_mask)[0])

"""The vertical model (VM): a small CTR model; one class for every variant.

Inputs follow serving's shape: request-side tensors once per user, candidate-side tensors
once per candidate, and `candidate_user` saying which user row each candidate belongs to.
At serving time there is one user and many candidates, so the user's history is passed and
encoded once per request; in training every row is its own user (candidate_user = arange).

    user_context   [U, 3]     int64  age, gender, hour (+1; 0 = unknown)
    vm_history     [U, L]     int64  own-vertical clicked item ids (+1; 0 = padding)
    fm_codes       [U, L, d]  float  FM codes of the user's last L clicks (LoopFM variants)
    fm_mask        [U, L]     float  1 where fm_codes holds a code
    candidates     [C, 4]     int64  item id, category, brand, price bucket (+1; 0 = unknown)
    candidate_user [C]        int64  row of the user each candidate is scored for
    -> logit [C] (serving head), kd_logit [C] (auxiliary distillation head, training only)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ENCODERS = ("sum", "mean", "dot", "din")


@dataclass
class VMShapes:
    user_context_vocab: tuple[int, ...]
    candidate_vocab: tuple[int, ...]
    code_dim: int
    embedding_dim: int
    hidden: tuple[int, ...]
    use_fm_history: bool
    encoder: str


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

    def forward(self, keys: torch.Tensor, query: torch.Tensor, candidate_user: torch.Tensor) -> torch.Tensor:
        """keys [U, L, e], query [C, e] -> attention logits [C, L]."""
        per_user = self.key(keys)[candidate_user]  # [C, L, hidden]
        per_pair = self.product(keys[candidate_user] * query.unsqueeze(1))  # [C, L, hidden]
        return self.out(torch.relu(per_user + per_pair + self.query(query).unsqueeze(1))).squeeze(-1)


def masked_pool(
    keys: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, candidate_user: torch.Tensor,
    encoder: str, din: DinScorer | None,
) -> torch.Tensor:  # fmt: skip
    """Pool each candidate's user history keys [U, L, h] under mask [U, L] (1 = present) with
    target query [C, h] -> [C, h]. An all-padding history pools to zeros for every encoder."""
    mask = mask[candidate_user]  # [C, L]
    if encoder in ("sum", "mean"):
        pooled = torch.bmm(mask.unsqueeze(1), keys[candidate_user]).squeeze(1)
        return pooled / mask.sum(1, keepdim=True).clamp(min=1) if encoder == "mean" else pooled
    if encoder == "dot":  # scaled dot-product target attention, softmax over present positions
        scores = torch.bmm(keys[candidate_user], query.unsqueeze(-1)).squeeze(-1) / keys.shape[-1] ** 0.5
        weights = torch.softmax(scores.masked_fill(mask == 0, -1e9), dim=1) * mask
    else:  # din: un-normalised (sigmoid) weights, as in DIN
        weights = torch.sigmoid(din(keys, query, candidate_user)) * mask
    return torch.bmm(weights.unsqueeze(1), keys[candidate_user]).squeeze(1)


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
        width = e * len(s.user_context_vocab) + cand_width + e  # + own-history pooling
        self.own_din = DinScorer(e) if s.encoder == "din" else None
        self.fm_din = DinScorer(e) if s.encoder == "din" and s.use_fm_history else None
        if s.use_fm_history:
            self.code_proj = nn.Linear(s.code_dim, e)
            width += e
        layers: list[nn.Module] = []
        for h in s.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.kd_head = nn.Linear(width, 1)

    def forward(
        self,
        user_context: torch.Tensor,
        vm_history: torch.Tensor,
        candidates: torch.Tensor,
        candidate_user: torch.Tensor,
        fm_codes: torch.Tensor | None = None,
        fm_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shapes
        ctx = torch.cat([emb(user_context[:, i]) for i, emb in enumerate(self.context)], dim=1)  # [U, 3e]
        cand = torch.cat([emb(candidates[:, i]) for i, emb in enumerate(self.candidate)], dim=1)  # [C, 4e]
        query = self.target(cand)  # [C, e]
        own = self.candidate[0](vm_history)  # [U, L, e] item-id embeddings shared with candidates
        own_mask = (vm_history > 0).float()
        parts = [ctx[candidate_user], cand]
        parts.append(masked_pool(own, own_mask, query, candidate_user, s.encoder, self.own_din))
        if s.use_fm_history:
            keys = self.code_proj(fm_codes)  # [U, L, e], once per user
            parts.append(masked_pool(keys, fm_mask, query, candidate_user, s.encoder, self.fm_din))
        x = self.mlp(torch.cat(parts, dim=1))
        return self.head(x).squeeze(1), self.kd_head(x).squeeze(1)


class ServingHead(nn.Module):
    """What ONNX exports: the serving logit only, with exactly the inputs the variant uses."""

    def __init__(self, vm: VerticalModel):
        super().__init__()
        self.vm = vm

    def forward(self, user_context, vm_history, candidates, candidate_user, fm_codes=None, fm_mask=None):
        return torch.sigmoid(self.vm(user_context, vm_history, candidates, candidate_user, fm_codes, fm_mask)[0])

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


def masked_pool(keys: torch.Tensor, mask: torch.Tensor, query: torch.Tensor, encoder: str, din: nn.Module | None):
    """Pool keys [C, L, h] under mask [C, L] (1 = present) with target query [C, h] -> [C, h].

    An all-padding history pools to zeros for every encoder."""
    if encoder in ("sum", "mean"):
        pooled = (keys * mask.unsqueeze(-1)).sum(1)
        return pooled / mask.sum(1, keepdim=True).clamp(min=1) if encoder == "mean" else pooled
    if encoder == "dot":  # scaled dot-product target attention, softmax over present positions
        scores = (keys * query.unsqueeze(1)).sum(-1) / keys.shape[-1] ** 0.5
        weights = torch.softmax(scores.masked_fill(mask == 0, -1e9), dim=1) * mask
    else:  # din: MLP on [k, q, k*q, k-q], un-normalised (sigmoid) weights as in DIN
        q = query.unsqueeze(1).expand_as(keys)
        weights = torch.sigmoid(din(torch.cat([keys, q, keys * q, keys - q], dim=-1)).squeeze(-1)) * mask
    return (weights.unsqueeze(-1) * keys).sum(1)


def _din_scorer(e: int) -> nn.Module:
    return nn.Sequential(nn.Linear(4 * e, 16), nn.ReLU(), nn.Linear(16, 1))


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
        self.own_din = _din_scorer(e) if s.encoder == "din" else None
        self.fm_din = _din_scorer(e) if s.encoder == "din" and s.use_fm_history else None
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
        parts.append(masked_pool(own[candidate_user], own_mask[candidate_user], query, s.encoder, self.own_din))
        if s.use_fm_history:
            keys = self.code_proj(fm_codes)  # [U, L, e], once per user
            parts.append(masked_pool(keys[candidate_user], fm_mask[candidate_user], query, s.encoder, self.fm_din))
        x = self.mlp(torch.cat(parts, dim=1))
        return self.head(x).squeeze(1), self.kd_head(x).squeeze(1)


class ServingHead(nn.Module):
    """What ONNX exports: the serving logit only, with exactly the inputs the variant uses."""

    def __init__(self, vm: VerticalModel):
        super().__init__()
        self.vm = vm

    def forward(self, user_context, vm_history, candidates, candidate_user, fm_codes=None, fm_mask=None):
        return torch.sigmoid(self.vm(user_context, vm_history, candidates, candidate_user, fm_codes, fm_mask)[0])

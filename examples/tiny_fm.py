"""A plug-in FM for loopfm: a two-tower model written outside loopfm.

Use it with `fm.model = "tiny_fm:build"` and this folder on PYTHONPATH, e.g.

    PYTHONPATH=examples loopfm run --data ... --set fm.model=tiny_fm:build --set fm.extract_layer=user_tower,item_tower

The interface it follows is loopfm/fm/plugin.py: `build(shapes)` returns a torch.nn.Module
whose `forward(batch)` returns the click logit [B] and named activations {layer: [B, d]}.
Here the layers are `user_tower` and `item_tower` ([B, shapes.embedding_dim] each) and their
element-wise product `interaction`.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyFM(nn.Module):
    """Two towers over ids, the category and the user's recent clicks; logit = <user, item> + bias."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, dim: int):
        super().__init__()
        # row 0 = an unknown id (loopfm passes -1) or history padding (0): shift ids by one
        self.user = nn.Embedding(n_users + 1, dim, padding_idx=0)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.category = nn.Embedding(n_categories, dim)
        self.user_tower = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        self.item_tower = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        history = batch["raw_history"]  # [B, H] clicked item id + 1, 0 = padding
        clicked = self.item(history).sum(1) / (history > 0).sum(1, keepdim=True).clamp(min=1)
        user = self.user_tower(torch.cat([self.user(batch["user_id"] + 1), clicked], dim=1))
        item = self.item_tower(torch.cat([self.item(batch["item_id"] + 1), self.category(batch["category"])], dim=1))
        interaction = user * item
        return interaction.sum(1) + self.bias, {"user_tower": user, "item_tower": item, "interaction": interaction}


def build(shapes) -> TinyFM:
    """The factory loopfm calls with its FMShapes (vocabulary sizes, fm.embedding_dim)."""
    return TinyFM(shapes.n_users, shapes.n_items, shapes.n_categories, shapes.embedding_dim)

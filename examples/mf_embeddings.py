"""Embeddings from a model outside loopfm, for `loopfm fm import-log` (docs/your-data.md, "Bring your own FM").

A logistic matrix factorisation (logit = b + b_user + b_item + <p_user, q_item>) fitted on the
run's impressions (`RUN/data/impressions.parquet`: every vertical, as an FM would see them)
and refitted every `--period-days` days. It stands for a team's own FM and logging; it
imports nothing from loopfm.

Causal: an impression at time t in period k is embedded by the model fitted on the events
before period k started (warm-started from the previous period's, so the space stays
consistent), plus the user's clicks strictly before t. Ids that model never saw are zero.
Each row is then available no earlier than its event, which is what `fm import-log` assumes
when `available_at` is left to its default (event time + fm.logging_delay_s).

Output parquet: impression_id, embedding (fixed-size list of float32: p_user, q_item,
p_user * q_item, mean q of the user's last --history clicks), fm_logit (the MF's logit).

    python examples/mf_embeddings.py --run-dir runs/ml-byo --out runs/ml-byo-mf.parquet
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

US_PER_DAY = 86_400 * 10**6


class LogisticMF(torch.nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__()
        self.p = torch.nn.Embedding(n_users, dim)
        self.q = torch.nn.Embedding(n_items, dim)
        self.user_bias = torch.nn.Embedding(n_users, 1)
        self.item_bias = torch.nn.Embedding(n_items, 1)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        for table in (self.p, self.q):
            torch.nn.init.normal_(table.weight, std=0.01)
        for table in (self.user_bias, self.item_bias):
            torch.nn.init.zeros_(table.weight)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        dot = (self.p(user) * self.q(item)).sum(1)
        return self.bias + self.user_bias(user).squeeze(1) + self.item_bias(item).squeeze(1) + dot


def fit(model: LogisticMF, user: np.ndarray, item: np.ndarray, label: np.ndarray, steps: int, l2: float) -> None:
    """Full-batch Adam on binary cross-entropy + l2 * mean squared factors of the batch's rows."""
    u, i, y = torch.from_numpy(user), torch.from_numpy(item), torch.from_numpy(label.astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(u, i), y)
        loss = loss + l2 * (model.p(u).pow(2).sum(1) + model.q(i).pow(2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def recent_clicks(user: np.ndarray, item: np.ndarray, label: np.ndarray, t: np.ndarray, n: int) -> list[list[int]]:
    """For each impression, the user's last n clicked items strictly before its time."""
    out: list[list[int]] = [[] for _ in user]
    order = np.lexsort((t, user))
    last: dict[int, deque] = {}
    pending: list[int] = []  # clicks at the current (user, time), added once the time moves on
    for pos, row in enumerate(order):
        u = user[row]
        if pos and (user[order[pos - 1]] != u or t[order[pos - 1]] != t[row]):
            for r in pending:
                last.setdefault(user[r], deque(maxlen=n)).append(item[r])
            pending = []
        out[row] = list(last.get(u, ()))
        if label[row] == 1:
            pending.append(row)
    return out


def embed(run_dir: Path, period_days: int, dim: int, history: int, steps: int, l2: float, seed: int) -> pa.Table:
    torch.manual_seed(seed)
    imp = pd.read_parquet(run_dir / "data" / "impressions.parquet")
    user, item = imp["user_id"].to_numpy(np.int64), imp["item_id"].to_numpy(np.int64)
    label = imp["label"].to_numpy()
    t = imp["event_timestamp"].astype("datetime64[us, UTC]").astype("int64").to_numpy()
    period = (t - t.min() // US_PER_DAY * US_PER_DAY) // (period_days * US_PER_DAY)
    model = LogisticMF(int(user.max()) + 1, int(item.max()) + 1, dim)
    clicks = recent_clicks(user, item, label, t, history)
    embedding = np.zeros((len(imp), 4 * dim), dtype=np.float32)
    logit = np.zeros(len(imp), dtype=np.float32)
    for k in np.unique(period):
        before = period < k
        if before.any():
            fit(model, user[before], item[before], label[before], steps, l2)
            print(f"period {k}: refitted on the {before.sum()} events before it", flush=True)
        seen_users, seen_items = np.zeros(model.p.num_embeddings, bool), np.zeros(model.q.num_embeddings, bool)
        seen_users[user[before]], seen_items[item[before]] = True, True
        rows = np.flatnonzero(period == k)
        with torch.no_grad():
            p = model.p.weight.numpy() * seen_users[:, None]
            q = model.q.weight.numpy() * seen_items[:, None]
            pu, qi = p[user[rows]], q[item[rows]]
            hist = np.stack([q[c].mean(0) if c else np.zeros(dim, np.float32) for c in (clicks[r] for r in rows)])
            embedding[rows] = np.concatenate([pu, qi, pu * qi, hist], axis=1)
            b = model.bias.item() + model.user_bias.weight.numpy()[:, 0] * seen_users
            logit[rows] = b[user[rows]] + model.item_bias.weight.numpy()[item[rows], 0] * seen_items[item[rows]] + (pu * qi).sum(1)
    values = pa.array(embedding.reshape(-1), type=pa.float32())
    return pa.table({
        "impression_id": pa.array(imp["impression_id"].to_numpy(np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(values, 4 * dim),
        "fm_logit": pa.array(logit),
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="a run after `loopfm data import` (or `data synth`)")
    parser.add_argument("--out", type=Path, required=True, help="the parquet file to write")
    parser.add_argument("--period-days", type=int, default=14, help="refit the MF every this many days")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--history", type=int, default=20, help="recent clicks averaged into the last part")
    parser.add_argument("--steps", type=int, default=30, help="full-batch Adam steps per refit (warm-started)")
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = embed(args.run_dir, args.period_days, args.dim, args.history, args.steps, args.l2, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    print(f"wrote {table.num_rows} embeddings of width {4 * args.dim} to {args.out}")


if __name__ == "__main__":
    main()

"""What FM and VM training share: a time-ordered validation split, early stopping, and the
shrinkage of an item's click rate (the popularity baseline and the VM's item-bias start).

The validation rows are the newest `fraction` of a training window (by event time), so
they are never drawn from a later held-out window and the model is selected on the data
closest to the time it will be used (as in FuxiCTR's trainer: validate every epoch, stop
after `patience` epochs without improvement, restore the best weights).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


PRIOR_IMPRESSIONS = 5.0  # pseudo-impressions at the overall click rate that shrink an item's own rate


def shrunk_rate(clicks, shown, overall: float):
    """An item's click rate shrunk toward the overall rate by PRIOR_IMPRESSIONS pseudo-
    impressions (arrays or Series of click and impression counts, same shape)."""
    return (clicks + PRIOR_IMPRESSIONS * overall) / (shown + PRIOR_IMPRESSIONS)


def time_split(event_us: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, validation) of a training window: validation = the newest
    `fraction` of rows by event time (ties keep row order). event_us [N] -> two index
    arrays whose union is arange(N). Raises ValueError when either part would be empty."""
    n = len(event_us)
    n_val = int(round(n * fraction))
    if not 0 < n_val < n:
        raise ValueError(f"validation fraction {fraction} of {n} rows leaves an empty fit or validation part")
    order = np.argsort(event_us, kind="stable")
    return np.sort(order[: n - n_val]), np.sort(order[n - n_val :])


class EarlyStopping:
    """Keeps the weights of the epoch with the lowest validation loss.

    `update(loss, model)` after each epoch returns True when `patience` epochs in a row
    did not improve on the best loss; `restore(model)` loads the best weights back. The first
    update is epoch `first`: 0 when the initial weights are validated too (they may win)."""

    def __init__(self, patience: int, first: int = 1):
        self.patience, self.first = patience, first
        self.best_loss = float("inf")
        self.best_epoch = first
        self.history: list[float] = []
        self._best_state: dict | None = None

    @property
    def epochs(self) -> int:
        """The number of the last epoch validated."""
        return self.first + len(self.history) - 1

    def update(self, loss: float, model: torch.nn.Module) -> bool:
        self.history.append(loss)
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, self.epochs
            self._best_state = copy.deepcopy(model.state_dict())
        return self.epochs - self.best_epoch >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        if self._best_state is not None:
            model.load_state_dict(self._best_state)

    def summary(self) -> dict:
        """Epochs run, the epoch restored and each epoch's validation loss (saved with the model)."""
        return {"epochs_run": self.epochs, "best_epoch": self.best_epoch, "best_val_logloss": self.best_loss,
                "val_logloss": self.history}  # fmt: skip

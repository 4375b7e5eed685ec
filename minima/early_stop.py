"""Early stopping on the held-out loss: the best evaluation so far and how many have passed without beating it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Tracks the best held-out loss; ``patience`` evaluations in a row without a lower one stop the run (0 = never).

    The state is a few numbers, saved in every checkpoint so that a resumed run counts on where it stood.
    """

    patience: int
    best_loss: float = math.inf
    best_step: int | None = None
    evals_since_best: int = 0
    stopped: bool = False

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation at ``step``; True when it is the best so far (strictly lower)."""
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            return True
        self.evals_since_best += 1
        self.stopped = self.patience > 0 and self.evals_since_best >= self.patience
        return False

    def __str__(self) -> str:
        return (
            f"{self.evals_since_best} evaluations without a lower held-out loss than step {self.best_step}'s"
            f" {self.best_loss:.4f} (patience {self.patience})"
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best_loss", "best_step", "evals_since_best", "stopped"):
            setattr(self, key, state[key])

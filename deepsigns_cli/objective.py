"""What a watermark scheme adds to the training loop (no torch import: verify stays light)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = ["Objective"]


class Objective:
    """A term added to cross-entropy. Subclasses override what they need.

    Per step the loop (1) asks every objective for extra samples to mix into the batch,
    (2) runs the model once on the whole batch, (3) adds every objective's loss.
    """

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Install hooks, move tensors; called once before training."""

    def teardown(self) -> None:
        """Remove hooks; called once after training, even on failure."""

    def parameters(self) -> list[torch.Tensor]:
        """Extra trainable tensors (e.g. class centres), optimised with the model."""
        return []

    def extra_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Samples of this objective's own to mix into the step (e.g. trigger or key inputs)."""
        return None

    def loss(self, logits: torch.Tensor, y: torch.Tensor, own: slice) -> torch.Tensor | None:
        """The term to add. Rows `own` of the batch are this objective's extra samples;
        rows before the first extra are the ordinary training batch."""
        return None

    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        """Return True to stop training early."""
        return False

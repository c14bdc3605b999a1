"""What a watermark scheme adds to the training loop (no torch import: verify stays light).

Per step the loop (1) asks every objective for rows of its own to mix into the batch (under
torchrun every process draws the same and keeps its `share`), (2)
runs the model once on the whole batch, (3) hands every objective the `training.Batch`
(inputs, targets, logits, its own rows, the unwrapped model) and adds the loss it returns,
(4) steps the optimiser, then calls `after_step`. After each epoch, `end_epoch` proposes an
early stop; the loop decides once for every process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from .training import Batch

__all__ = ["Objective"]


class Objective:
    """A term added to the training loss. Subclasses override what they need."""

    #: the loop makes the batch's inputs require grad, so `batch.input_grad()` works
    needs_input_grad: bool = False

    #: every tensor the objective trains or keeps (class centres, projections) lives in this
    #: module, as parameters and buffers: the loop moves it to the device, optimises its
    #: parameters with the model's, and a data-parallel wrapper keeps it in sync
    state: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        """Install hooks on the (unwrapped) model; called once before training, on its device."""

    def teardown(self) -> None:
        """Remove hooks; called once after training, even on failure."""

    def extra_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows of this objective's own to mix into the step (e.g. trigger or key inputs)."""
        return None

    def share(self, rows: tuple[torch.Tensor, torch.Tensor], rank: int,
              world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the rows `extra_batch` drew (every process draws the same
        under torchrun); override when the rows come in parts."""
        return rows[0][rank::world], rows[1][rank::world]

    def loss(self, batch: Batch) -> torch.Tensor | None:
        """The term to add. `batch.own` are this objective's rows; rows before
        `batch.n_train` are the ordinary training batch."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step (e.g. to project or clip a tensor)."""

    def end_epoch(self, model: nn.Module, epoch: int) -> bool:
        """Propose to stop training early (the loop agrees across processes)."""
        return False

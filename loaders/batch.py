"""The unit the data layer hands to training: one minibatch of anchor cells and their permutation partners."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PairedBatch:
    """Tensors for n anchor cells; rows of `x_partner_ng` are the reconstruction targets.

    `label_n` is -1 for unlabelled cells (their partner is themselves); `batch_n` is the batch code.
    Expression is already library-size normalised and log1p-transformed.
    """

    x_ng: torch.Tensor
    x_partner_ng: torch.Tensor
    label_n: torch.Tensor
    batch_n: torch.Tensor
    cell_n: torch.Tensor  # anchor positions in the source's obs (for tracing and tests)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairedBatch":
        return PairedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.label_n.shape[0])

"""Inference: latent and class probabilities of normalised cells, for validation, mapping and serving."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from scpermut_dist.model.module import ScPermutModule


@torch.no_grad()
def predict_proba(module: ScPermutModule | Sequence[ScPermutModule], x_ng: torch.Tensor, chunk: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(latent, probabilities) with encoders and classifiers in eval mode, in bounded-size chunks.

    An ensemble (a list of members) gives the first member's latent (the reference's embedding) and the
    members' mean probabilities.
    """
    members = [module] if isinstance(module, ScPermutModule) else list(module)
    parts = [m for member in members for m in (member.encoder, member.classifier)]
    modes = [m.training for m in parts]
    for m in parts:
        m.eval()
    device = next(members[0].parameters()).device
    zs, ps = [], []
    try:
        for start in range(0, x_ng.shape[0], chunk):
            x = x_ng[start:start + chunk].to(device)
            z = members[0].encoder(x)
            p = torch.softmax(members[0].classifier(z), dim=1)
            for member in members[1:]:
                p += torch.softmax(member.classifier(member.encoder(x)), dim=1)
            zs.append(z.cpu()), ps.append((p / len(members)).cpu())
    finally:
        for m, on in zip(parts, modes):
            m.train(on)
    return torch.cat(zs).numpy(), torch.cat(ps).numpy()

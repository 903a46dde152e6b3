"""The three loss terms and their weighted sum.

Focal loss class weights come from the class frequencies *as sampled* (`SamplingPlan.sampled_class_freq`):
with natural sampling that equals the authors' balanced weights n / (K n_c); with a class-balancing
sampler the weights tend to 1, so the imbalance correction is never applied twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from scpermut_dist.model.module import ModuleOutput


def balanced_alpha(sampled_class_freq: np.ndarray, max_weight: float | None = None) -> torch.Tensor:
    """alpha_c = 1 / (K q_c) over the K classes that are sampled at all; 0 for classes never sampled.

    The sampled mean weight sum_c q_c alpha_c is 1. `max_weight` caps any class at that multiple of it, the others
    unchanged: unbounded, a type at 1e-5 of an atlas of 900 types weighs 111 cells of the mean.
    """
    q = np.asarray(sampled_class_freq, dtype=np.float64)
    q = q / q.sum() if q.sum() > 0 else q
    present = q > 0
    alpha = np.zeros_like(q)
    alpha[present] = 1.0 / (present.sum() * q[present])
    if max_weight is not None:
        alpha = np.minimum(alpha, max_weight)
    return torch.as_tensor(alpha, dtype=torch.float32)


def focal_loss(logits_nc: torch.Tensor, label_n: torch.Tensor, gamma: float = 3.0,
               alpha_c: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over labelled cells of -alpha_y (1 - p_y)^gamma log p_y; label -1 cells are ignored.

    With one-hot targets the sum over classes keeps only the true class y. gamma=0 and alpha=1 give
    plain cross-entropy.
    """
    keep = label_n >= 0
    if not bool(keep.any()):
        return logits_nc.sum() * 0.0
    logits, y = logits_nc[keep], label_n[keep].long()
    logp_y = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    loss = -((1.0 - logp_y.exp()).clamp_min(0.0) ** gamma) * logp_y
    if alpha_c is not None:
        loss = alpha_c.to(loss.device)[y] * loss
    return loss.mean()


def cross_entropy(logits_nc: torch.Tensor, label_n: torch.Tensor, alpha_c: torch.Tensor | None = None) -> torch.Tensor:
    """Plain (optionally class-weighted) cross-entropy on labelled cells, as a per-cell mean."""
    return focal_loss(logits_nc, label_n, gamma=0.0, alpha_c=alpha_c)


@dataclass
class LossWeights:
    clas_w: float = 0.307
    dann_w: float = 0.0187
    rec_w: float = 0.0131
    classifier: str = "focal"
    focal_gamma: float = 3.0

    @classmethod
    def from_config(cls, loss_cfg) -> "LossWeights":
        return cls(loss_cfg.clas_w, loss_cfg.dann_w, loss_cfg.rec_w, loss_cfg.classifier, loss_cfg.focal_gamma)


def confusion_loss(logits_nb: torch.Tensor, batch_n: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the discriminator's output against the minibatch's batch frequencies: what a
    discriminator can do at best once batches are mixed, so its minimum is mixing, not swapping batches."""
    prior_b = torch.bincount(batch_n.long(), minlength=logits_nb.shape[1]).to(logits_nb.dtype) / len(batch_n)
    return -(F.log_softmax(logits_nb, dim=1) * prior_b).sum(dim=1).mean()


def total_loss(out: ModuleOutput, x_partner_ng: torch.Tensor, label_n: torch.Tensor, batch_n: torch.Tensor,
               terms: list[str], w: LossWeights, alpha_c: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """clas_w * focal(or CE) + dann_w * CE(batch) + rec_w * MSE(reconstruction, partner); returns parts too."""
    parts: dict[str, torch.Tensor] = {}
    total = out.latent.sum() * 0.0
    if "clas" in terms:
        if w.classifier == "focal":
            parts["clas"] = focal_loss(out.class_logits, label_n, w.focal_gamma, alpha_c)
        else:
            parts["clas"] = cross_entropy(out.class_logits, label_n, alpha_c)
        total = total + w.clas_w * parts["clas"]
    if "dann" in terms:
        parts["dann"] = F.cross_entropy(out.batch_logits, batch_n.long())
        total = total + w.dann_w * parts["dann"]
        if out.batch_logits_encoder is not None:
            parts["confusion"] = confusion_loss(out.batch_logits_encoder, batch_n)
            total = total + w.dann_w * parts["confusion"]
    if "rec" in terms:
        parts["rec"] = F.mse_loss(out.reconstruction, x_partner_ng)
        total = total + w.rec_w * parts["rec"]
    # Detached tensors, not floats: no device sync per step; the trainer sums them per epoch.
    return total, {k: v.detach() for k, v in parts.items()} | {"total": total.detach()}

"""The scPermut network: encoder, decoder, cell-type classifier and adversarial batch (DANN) head.

Plain `nn.Module`s with no data loading or Ray, so the same object trains on one CPU, under DDP, and
maps queries from a checkpoint. Differences from the original TensorFlow code (intended behaviour):
the 84-d bottleneck is linear (Linear + BatchNorm, no ReLU/dropout), and the decoder has no size factor.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

MODULE_NAMES = ("encoder", "decoder", "classifier", "dann")
DANN_OBJECTIVES = ("reversal", "confusion")


def _block(n_in: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(), nn.Dropout(dropout))


INPUT_NORMS = ("none", "standardize")


class Encoder(nn.Module):
    """G -> hidden blocks -> linear BatchNorm'd latent.

    input_norm="standardize" z-scores each gene with running reference statistics (a BatchNorm without affine
    weights, cumulative average, clipped at +-10) before the first layer, as linear annotators do: otherwise a few
    high-variance genes (e.g. an interferon response that differs between batches) dominate the first layer's
    features. The reconstruction target is unchanged (log-normalised), and the statistics travel in the weights.
    input_dropout zeroes that fraction of input genes per cell in training (a denoising autoencoder): the latent
    cannot lean on a few genes that a new condition or chemistry may shift.
    """

    def __init__(self, n_genes: int, hidden: Sequence[int], latent_dim: int, dropout: float,
                 input_norm: str = "none", input_dropout: float = 0.0) -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.input_norm = nn.BatchNorm1d(n_genes, affine=False, momentum=None) if input_norm == "standardize" else None
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else None
        sizes = [n_genes, *hidden]
        self.hidden = nn.Sequential(*[_block(a, b, dropout) for a, b in zip(sizes[:-1], sizes[1:])])
        self.bottleneck = nn.Sequential(nn.Linear(sizes[-1], latent_dim), nn.BatchNorm1d(latent_dim))

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x_ng = self.input_norm(x_ng).clamp(-10.0, 10.0)
        if self.input_dropout is not None:
            x_ng = self.input_dropout(x_ng)
        return self.bottleneck(self.hidden(x_ng))


class Decoder(nn.Module):
    """latent -> reversed hidden blocks -> G, with a ReLU output (targets are non-negative log1p values)."""

    def __init__(self, n_genes: int, hidden: Sequence[int], latent_dim: int, dropout: float) -> None:
        super().__init__()
        sizes = [latent_dim, *reversed(list(hidden))]
        self.hidden = nn.Sequential(*[_block(a, b, dropout) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nn.Sequential(nn.Linear(sizes[-1], n_genes), nn.ReLU())

    def forward(self, z_nl: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(z_nl))


class Head(nn.Module):
    """latent -> one hidden block -> logits (softmax is applied by the loss or at prediction time)."""

    def __init__(self, latent_dim: int, hidden: int, n_out: int, dropout: float) -> None:
        super().__init__()
        self.hidden = _block(latent_dim, hidden, dropout)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, z_nl: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(z_nl))


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


class GradientReversal(nn.Module):
    """Identity forward, gradient x (-lambda) backward: the encoder learns to fool the batch classifier."""

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = float(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGrad.apply(x, self.lam)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


class DannHead(nn.Module):
    """The batch discriminator. "reversal" (the authors'): one pass through a gradient-reversal layer, the encoder
    maximises the discriminator's loss, which it can also do by making it confidently *wrong* (batches swapped,
    not mixed). "confusion": the discriminator learns on the detached latent and the encoder pushes its output
    towards the batch prior through a frozen copy of it: bounded, and optimal only when batches are mixed."""

    def __init__(self, latent_dim: int, hidden: int, n_batches: int, dropout: float, lam: float,
                 objective: str = "reversal") -> None:
        super().__init__()
        if objective not in DANN_OBJECTIVES:
            raise ValueError(f"dann objective must be one of {DANN_OBJECTIVES}, got {objective!r}")
        self.objective = objective
        self.grl = GradientReversal(lam)
        self.head = Head(latent_dim, hidden, n_batches, dropout)

    def forward(self, z_nl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(discriminator logits, logits for the encoder's confusion loss or None)."""
        if self.objective == "reversal":
            return self.head(self.grl(z_nl)), None
        frozen = {n: p.detach() for n, p in self.head.named_parameters()}
        frozen |= {n: b.clone() for n, b in self.head.named_buffers()}  # BN stats updated once, by the first pass
        return self.head(z_nl.detach()), torch.func.functional_call(self.head, frozen, (z_nl,))


class ModuleOutput(NamedTuple):
    latent: torch.Tensor
    reconstruction: torch.Tensor | None
    class_logits: torch.Tensor | None
    batch_logits: torch.Tensor | None
    batch_logits_encoder: torch.Tensor | None = None  # "confusion" objective: the encoder's view of the adversary


class ScPermutModule(nn.Module):
    """The whole model; `forward` runs only the heads asked for (a stage's unused heads stay out of the graph)."""

    def __init__(self, n_genes: int, n_classes: int, n_batches: int, hidden_sizes: Sequence[int] = (1151, 235),
                 latent_dim: int = 84, dropout: float = 0.27, classifier_hidden: int = 64, dann_hidden: int = 64,
                 grl_lambda: float = 1.0, dann_objective: str = "reversal", input_norm: str = "none",
                 input_dropout: float = 0.0) -> None:
        super().__init__()
        self.dims = dict(n_genes=n_genes, n_classes=n_classes, n_batches=n_batches, hidden_sizes=list(hidden_sizes),
                         latent_dim=latent_dim, dropout=dropout, classifier_hidden=classifier_hidden,
                         dann_hidden=dann_hidden, grl_lambda=grl_lambda, dann_objective=dann_objective,
                         input_norm=input_norm, input_dropout=input_dropout)
        self.encoder = Encoder(n_genes, hidden_sizes, latent_dim, dropout, input_norm, input_dropout)
        self.decoder = Decoder(n_genes, hidden_sizes, latent_dim, dropout)
        self.classifier = Head(latent_dim, classifier_hidden, n_classes, dropout)
        self.dann = DannHead(latent_dim, dann_hidden, max(n_batches, 1), dropout, grl_lambda, dann_objective)

    @classmethod
    def from_config(cls, model_cfg, n_genes: int, n_classes: int, n_batches: int) -> "ScPermutModule":
        return cls(n_genes, n_classes, n_batches, model_cfg.hidden_sizes, model_cfg.latent_dim, model_cfg.dropout,
                   model_cfg.classifier_hidden, model_cfg.dann_hidden, model_cfg.grl_lambda, model_cfg.dann_objective,
                   model_cfg.input_norm, model_cfg.input_dropout)

    def forward(self, x_ng: torch.Tensor, heads: Sequence[str] = ("decoder", "classifier", "dann")) -> ModuleOutput:
        z = self.encoder(x_ng)
        batch_logits, batch_logits_encoder = self.dann(z) if "dann" in heads else (None, None)
        return ModuleOutput(
            latent=z,
            reconstruction=self.decoder(z) if "decoder" in heads else None,
            class_logits=self.classifier(z) if "classifier" in heads else None,
            batch_logits=batch_logits,
            batch_logits_encoder=batch_logits_encoder,
        )

    def set_trainable(self, trains: Sequence[str]) -> list[nn.Parameter]:
        """Freeze every module not in `trains` (requires_grad off AND eval mode, so BN stats do not drift)."""
        params: list[nn.Parameter] = []
        for name in MODULE_NAMES:
            module: nn.Module = getattr(self, name)
            on = name in trains
            module.train(on)
            for p in module.parameters():
                p.requires_grad_(on)
                if on:
                    params.append(p)
        return params

    @torch.no_grad()
    def predict(self, x_ng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, class probabilities) in eval mode; the caller restores the mode if needed."""
        self.eval()
        z = self.encoder(x_ng)
        return z, torch.softmax(self.classifier(z), dim=1)

"""Inference: latent and class probabilities of normalised cells, for validation, mapping and serving."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from scpermut_dist.errors import UsageError
from scpermut_dist.mapping.neighbors import DEFAULT_K, NeighborIndex
from scpermut_dist.mapping.neighbors import EXTRA as NEIGHBORS
from scpermut_dist.mapping.output import MappingResult
from scpermut_dist.mapping.unknown import (
    DEFAULT_QUANTILE,
    UNKNOWN_LABEL,
    ClassGaussians,
    UnknownRule,
    check_confidence,
    rule_from_extra,
)
from scpermut_dist.mapping.unknown import EXTRA as UNKNOWN
from scpermut_dist.model.module import ScPermutModule


def _members(module: ScPermutModule | Sequence[ScPermutModule]) -> list[ScPermutModule]:
    return [module] if isinstance(module, ScPermutModule) else list(module)


class _EvalMode:
    """Encoders and classifiers in eval mode for the block, their previous modes restored afterwards."""

    def __init__(self, members: list[ScPermutModule]) -> None:
        self.parts = [m for member in members for m in (member.encoder, member.classifier)]

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.parts]
        for m in self.parts:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, on in zip(self.parts, self.modes):
            m.train(on)


@torch.no_grad()
def predict_proba(module: ScPermutModule | Sequence[ScPermutModule], x_ng: torch.Tensor, chunk: int = 4096,
                  temperatures: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(latent, probabilities) with encoders and classifiers in eval mode, in bounded-size chunks.

    An ensemble (a list of members) gives the first member's latent (the reference's embedding) and the
    members' mean probabilities. `temperatures` (one per member, see mapping.calibration) divide each
    member's logits before its softmax: calibrated probabilities; None is T = 1 (raw).
    """
    members = _members(module)
    temps = [1.0] * len(members) if temperatures is None else [float(t) for t in temperatures]
    if len(temps) != len(members):
        raise ValueError(f"{len(temps)} temperatures for {len(members)} ensemble members")
    device = next(members[0].parameters()).device
    zs, ps = [], []
    with _EvalMode(members):
        for start in range(0, x_ng.shape[0], chunk):
            x = x_ng[start:start + chunk].to(device)
            z = members[0].encoder(x)
            p = torch.softmax(members[0].classifier(z) / temps[0], dim=1)
            for member, t in zip(members[1:], temps[1:]):
                p += torch.softmax(member.classifier(member.encoder(x)) / t, dim=1)
            zs.append(z.cpu()), ps.append((p / len(members)).cpu())
    if not zs:
        dims = members[0].dims
        return np.zeros((0, dims["latent_dim"]), np.float32), np.zeros((0, dims["n_classes"]), np.float32)
    return torch.cat(zs).numpy(), torch.cat(ps).numpy()


@torch.no_grad()
def predict_logits(member: ScPermutModule, x_ng: torch.Tensor, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(latent, class logits) of one member in eval mode: what temperature scaling is fitted on."""
    device = next(member.parameters()).device
    zs, ls = [], []
    with _EvalMode([member]):
        for start in range(0, x_ng.shape[0], chunk):
            z = member.encoder(x_ng[start:start + chunk].to(device))
            zs.append(z.cpu()), ls.append(member.classifier(z).cpu())
    if not zs:
        return np.zeros((0, member.dims["latent_dim"]), np.float32), np.zeros((0, member.dims["n_classes"]), np.float32)
    return torch.cat(zs).numpy(), torch.cat(ls).numpy()


@dataclass
class Predictor:
    """Everything applied to normalised query cells: calibrated ensemble probabilities, reference
    neighbours and the "unknown" rule, per chunk (each cell's outputs depend on that cell only)."""

    members: list[ScPermutModule]
    classes: list[str]
    temperatures: list[float] | None = None
    neighbors: NeighborIndex | None = None
    unknown: UnknownRule | None = None
    gaussians: ClassGaussians | None = None  # the unknown rule's distance to the reference types
    k: int = DEFAULT_K

    @classmethod
    def from_reference(cls, ref, unknown_confidence: float | None = None, unknown_quantile: float | None = None,
                       k: int | None = None) -> Predictor:
        """From a `Reference`'s members, metrics["calibration"], metrics["unknown"] and extras; the unknown
        thresholds fitted at training time are replaced by `unknown_confidence` / `unknown_quantile` if given."""
        cal = ref.metrics.get("calibration") or {}
        temps = cal.get("temperature")
        neighbors = NeighborIndex.from_extra(ref.extras[NEIGHBORS]) if NEIGHBORS in ref.extras else None
        k = int(k or (ref.metrics.get("neighbors") or {}).get("k") or DEFAULT_K)
        fitted = ref.metrics.get("unknown") or {}
        rule = gaussians = None
        if UNKNOWN in ref.extras:
            extra = ref.extras[UNKNOWN]
            gaussians = ClassGaussians.from_extra(extra)
            q = unknown_quantile if unknown_quantile is not None else fitted.get("quantile", DEFAULT_QUANTILE)
            c = unknown_confidence
            if c is None and unknown_quantile is None and "confidence" in fitted:
                c = fitted["confidence"]
            rule = rule_from_extra(extra if gaussians is not None else
                                   {n: a for n, a in extra.items() if n != "val_distance"}, q, confidence=c)
        elif unknown_quantile is not None:
            raise UsageError("this reference stores no validation distances (trained before 'unknown' support): "
                             "--unknown-quantile cannot apply; give --unknown-confidence only, or retrain")
        elif unknown_confidence is not None:
            rule = UnknownRule(confidence=check_confidence(unknown_confidence))
        return cls(list(ref.members), list(ref.classes), list(temps) if temps else None, neighbors, rule, gaussians, k)

    def predict(self, x_ng: torch.Tensor, obs_names, n_genes_found: int, n_genes_model: int, matched_by: str,
                chunk: int = 4096) -> MappingResult:
        """The `MappingResult` of normalised cells `x_ng` (model gene order)."""
        z, p = predict_proba(self.members, x_ng, chunk=chunk, temperatures=self.temperatures)
        names = np.asarray(self.classes, dtype=object)
        raw = names[p.argmax(axis=1)].astype(str) if len(p) else np.zeros(0, dtype=str)
        conf = p.max(axis=1) if len(p) else np.zeros(0, np.float32)
        vote = self.neighbors.vote(z, self.k) if self.neighbors is not None else None
        unknown = score = None
        labels = raw
        if self.unknown is not None:
            distance = self.gaussians.distance(z) if self.gaussians is not None else None
            unknown, score = self.unknown.flag(conf, distance), self.unknown.score(conf, distance)
            labels = np.where(unknown, UNKNOWN_LABEL, raw)
        return MappingResult(
            labels=labels, confidence=conf, probabilities=pd.DataFrame(p, index=list(obs_names), columns=self.classes),
            latent=z, n_genes_found=n_genes_found, n_genes_model=n_genes_model, matched_by=matched_by,
            labels_raw=raw, unknown=unknown, unknown_score=score,
            neighbor_label=None if vote is None else names[vote.label].astype(str),
            neighbor_agreement=None if vote is None else vote.agreement.astype(np.float32),
            thresholds=None if self.unknown is None else self.unknown.to_dict(),
            calibrated=self.temperatures is not None)

"""Calibrated confidence: temperature scaling fitted on held-out reference cells, and its measure (ECE).

A network trained to convergence is over-confident; dividing its logits by one scalar T > 1 (fitted by
minimising the validation NLL, Guo et al. 2017) fixes that without changing any argmax.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

ECE_BINS = 15
_LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]


def nll(logits_nc: np.ndarray, labels_n: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `labels_n` under softmax(logits / T)."""
    z = torch.as_tensor(logits_nc, dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(z, torch.as_tensor(labels_n, dtype=torch.long)))


def fit_temperature(logits_nc: np.ndarray, labels_n: np.ndarray) -> float:
    """The T minimising the NLL of softmax(logits / T) (1.0 without cells); searched on log T (bounded)."""
    labels_n = np.asarray(labels_n)
    if len(labels_n) == 0:
        return 1.0
    res = minimize_scalar(lambda log_t: nll(logits_nc, labels_n, float(np.exp(log_t))), bounds=_LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def softmax(logits_nc: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits_nc, dtype=torch.float64) / temperature, dim=1).numpy()


def expected_calibration_error(proba_nc: np.ndarray, labels_n: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the cell-weighted mean |accuracy - confidence| over `n_bins` equal-width bins of the max probability.

    Bins are (i/n, (i+1)/n], the first one closed at 0 (as in Guo et al. and torchmetrics).
    """
    proba_nc, labels_n = np.asarray(proba_nc), np.asarray(labels_n)
    if len(labels_n) == 0:
        return float("nan")
    return confidence_ece(proba_nc.max(axis=1), proba_nc.argmax(axis=1) == labels_n, n_bins)


def confidence_ece(confidence_n: np.ndarray, correct_n: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of any method's confidence in its own calls (e.g. CellTypist's, whose scores are not a distribution)."""
    conf = np.asarray(confidence_n, dtype=np.float64)
    if len(conf) == 0:
        return float("nan")
    correct = np.asarray(correct_n, dtype=np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap_b = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, conf, n_bins))  # per-bin sums
    return float(gap_b.sum() / len(conf))

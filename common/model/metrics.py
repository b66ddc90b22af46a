"""SMAPE and friends, as the challenge scores them (percent, 0..200)."""
from __future__ import annotations

import numpy as np


def smape(pred, true) -> float:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    denom = (np.abs(pred) + np.abs(true)) / 2
    return float(np.mean(np.where(denom == 0, 0.0, np.abs(pred - true) / np.where(denom == 0, 1, denom))) * 100)


def smape_per_row(pred, true) -> np.ndarray:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    return np.abs(pred - true) / ((np.abs(pred) + np.abs(true)) / 2) * 100


def mae_log(pred, true) -> float:
    return float(np.mean(np.abs(np.log(np.asarray(pred)) - np.log(np.asarray(true)))))

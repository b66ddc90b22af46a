"""The validation report: SMAPE overall and by price decile, log-price MAE, the median baseline, and two
pictures (predicted vs true on log axes; the error distribution), drawn with PIL to keep dependencies
to the project's list."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.fsio import write_json, write_text
from common.model.metrics import mae_log, smape, smape_per_row

W, H, PAD = 640, 640, 60


def price_text(price: float) -> str:
    """4 decimals for any price of a cent or more; below, 6 significant digits, since 4 decimals would write a
    positive price under 0.00005 (a sub-cent training median) as 0.0000."""
    return f"{price:.4f}" if price >= 0.01 else f"{price:.6g}"


def _axes(draw: ImageDraw.ImageDraw, title: str, xlabel: str, ylabel: str) -> None:
    draw.rectangle([PAD, PAD, W - PAD, H - PAD], outline="black")
    draw.text((PAD, 20), title, fill="black")
    draw.text((W // 2 - 40, H - 30), xlabel, fill="black")
    draw.text((5, PAD - 20), ylabel, fill="black")


def scatter_png(path: Path, pred: np.ndarray, true: np.ndarray) -> None:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo = math.floor(math.log10(max(1e-2, min(pred.min(), true.min()))))
    hi = math.ceil(math.log10(max(pred.max(), true.max())))
    hi = max(hi, lo + 1)

    def xy(p, t):
        fx = (math.log10(t) - lo) / (hi - lo)
        fy = (math.log10(p) - lo) / (hi - lo)
        return PAD + fx * (W - 2 * PAD), H - PAD - fy * (H - 2 * PAD)

    _axes(d, "predicted vs true price (log-log); diagonal = perfect", "true price", "predicted")
    for k in range(lo, hi + 1):
        x, y = xy(10 ** k, 10 ** k)
        d.line([x, H - PAD, x, H - PAD + 5], fill="black")
        d.text((x - 10, H - PAD + 8), f"{10 ** k:g}", fill="black")
        d.line([PAD - 5, y, PAD, y], fill="black")
        d.text((15, y - 6), f"{10 ** k:g}", fill="black")
    d.line([xy(10 ** lo, 10 ** lo), xy(10 ** hi, 10 ** hi)], fill=(200, 0, 0), width=1)
    for p, t in zip(pred, true):
        x, y = xy(p, t)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
    img.save(path)


def histogram_png(path: Path, errors: np.ndarray, bins: int = 40) -> None:
    """Histogram of log10(pred/true): 0 is exact, +-0.3 is a factor of two."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    _axes(d, "error distribution: log10(predicted / true)", "log10(pred/true)", "rows")
    edges = np.linspace(-1.5, 1.5, bins + 1)
    counts, _ = np.histogram(np.clip(errors, -1.5, 1.5), edges)
    top = max(1, counts.max())
    bw = (W - 2 * PAD) / bins
    for i, c in enumerate(counts):
        x0 = PAD + i * bw
        d.rectangle([x0 + 1, H - PAD - c / top * (H - 2 * PAD), x0 + bw - 1, H - PAD], fill=(30, 90, 200))
    for v in (-1, -0.3, 0, 0.3, 1):
        x = PAD + (v + 1.5) / 3 * (W - 2 * PAD)
        d.line([x, H - PAD, x, H - PAD + 5], fill="black")
        d.text((x - 10, H - PAD + 8), f"{v:g}", fill="black")
    d.text((W - PAD - 60, PAD + 5), f"max {top}", fill="black")
    img.save(path)


def write_report(out_dir: Path, rows, truth: dict[str, float], median: float) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [sid for sid, _, _ in rows]
    pred = np.array([p for _, p, _ in rows])
    true = np.array([truth[sid] for sid in ids])
    per_row = smape_per_row(pred, true)
    deciles = np.quantile(true, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(deciles, true, side="right") - 1, 0, 9)
    # 6 significant digits, not cents: sub-cent prices would all read 0.0.
    by_decile = [{"decile": k + 1, "price_from": float(f"{deciles[k]:.6g}"), "price_to": float(f"{deciles[k + 1]:.6g}"),
                  "rows": int((which == k).sum()), "smape": round(float(per_row[which == k].mean()), 2)
                  if (which == k).any() else None} for k in range(10)]
    fallbacks = sum(1 for _, _, r in rows if r != "ok")
    result = {"rows": len(rows), "smape": round(smape(pred, true), 3),
              "median_baseline_smape": round(smape(np.full_like(true, median), true), 3),
              "mae_log_price": round(mae_log(pred, true), 4), "fallbacks": fallbacks, "by_decile": by_decile}
    scatter_png(out_dir / "pred_vs_true.png", pred, true)
    histogram_png(out_dir / "error_hist.png", np.log10(pred / true))
    lines = ["# Validation report", "",
             "| metric | value |", "|---|---|",
             f"| rows | {result['rows']} |", f"| SMAPE | {result['smape']:.2f} |",
             f"| SMAPE of predicting the training median ({price_text(median)}) | "
             f"{result['median_baseline_smape']:.2f} |",
             f"| MAE of log price | {result['mae_log_price']:.4f} |", f"| fallbacks to the median | {fallbacks} |", "",
             "## SMAPE by true-price decile", "", "| decile | price range | rows | SMAPE |", "|---|---|---|---|"]
    lines += [f"| {b['decile']} | {price_text(b['price_from'])} - {price_text(b['price_to'])} | {b['rows']} | "
              f"{b['smape']} |" for b in by_decile]
    lines += ["", "## Pictures", "", "![predicted vs true](pred_vs_true.png)", "",
              "![error distribution](error_hist.png)", ""]
    write_text(out_dir / "report.md", "\n".join(lines))
    write_json(out_dir / "metrics.json", result)
    return result

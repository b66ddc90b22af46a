"""Building the chat JSONL rows (the seed's schema) and reading them back."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import PipelineError
from common.fsio import write_text
from common.prompt import build_messages


def split_validation(rows: pd.DataFrame, ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded random split that keeps file order inside each part."""
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(rows)) < ratio
    return rows[~is_val].reset_index(drop=True), rows[is_val].reset_index(drop=True)


def price_summary(prices: list[float]) -> dict:
    """What the price head needs of the training prices: the mean of log(1 + price) (its starting point) and the
    lowest price (the floor its predictions are clamped to)."""
    if not prices:
        return {"mean_log1p": 0.0, "min": 0.01, "max": None, "count": 0}
    return {"mean_log1p": float(np.mean(np.log1p(prices))), "min": float(min(prices)), "max": float(max(prices)),
            "count": len(prices)}


def train_prices(work_dir: Path) -> dict:
    """stage 3's price summary, or one computed from the train JSONL of a run written before stage 3 kept it."""
    from common import layout
    from common.fsio import read_json
    stats = read_json(layout.jsonl_dir(work_dir) / "stats.json")
    if "train_prices" in stats:
        return stats["train_prices"]
    return price_summary([r["price"] for r in read_jsonl(layout.jsonl_path(work_dir, "train"))])


def to_records(rows: pd.DataFrame, images: dict[str, str], with_price: bool) -> list[dict]:
    records = []
    for row in rows.itertuples(index=False):
        price = float(row.price) if with_price else None
        rec = {"sample_id": row.sample_id,
               "messages": build_messages(row.catalog_content, images.get(row.sample_id), price)}
        if with_price:
            rec["price"] = price
        records.append(rec)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class JsonlError(PipelineError, ValueError):
    pass


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a chat JSONL; a broken line fails with the file and line number."""
    if not Path(path).exists():
        raise JsonlError(f"{path}: not found (run 3_create_jsonl.py first)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "sample_id" not in rec or "messages" not in rec:
                    raise ValueError("missing sample_id or messages")
            except ValueError as err:
                raise JsonlError(f"{path}:{n}: broken JSONL row ({err})") from None
            rows.append(rec)
    return rows

"""How evenly two ranks' training steps cost under the length grouping, from the real catalog's token lengths.

Each rank reads its own share of the data; each of its loader workers sorts windows of batch x window samples
by length, cuts them into batches and shuffles the batches with a seed shared by all ranks
(common.model.training.LengthGroupedStream), so at a step the ranks run the same quantile of their own windows. A
step waits for the slower rank: balance = (the same batches run on one GPU) / (ranks x the steps' slowest).
Step cost = padded language-model tokens + a fixed vision share per image (the tower sees 1,024 patches per
448 px image whatever the text). CPU only:

    python bench/rank_balance.py --catalog bench/assets/real_catalog_2k.csv --tokenizer bench/assets/qwen-processor
"""
from __future__ import annotations

import argparse
import random

IMAGE_TOKENS, TEMPLATE_TOKENS = 256, 60
VISION_SHARE = 0.11  # of a 600-token sample's step: ~20 of ~180 TFLOP for a batch of 16 (frozen tower, forward only)


def step_cost(lengths: list[int]) -> float:
    return len(lengths) * (max(lengths) * (1 - VISION_SHARE) / 600 + VISION_SHARE)


def rank_steps(samples: list[int], workers: int, batch: int, window_batches: int, seed: int) -> list[list[int]]:
    streams = []
    for w in range(workers):
        mine, rng, out = samples[w::workers], random.Random(seed * 1000 + w), []
        for k in range(0, len(mine), batch * window_batches):
            window = sorted(mine[k:k + batch * window_batches])
            batches = [window[i:i + batch] for i in range(0, len(window), batch)]
            rng.shuffle(batches)
            out += batches
        streams.append(out)
    return [s[k] for k in range(max(map(len, streams))) for s in streams if k < len(s)]  # the loader's round robin


def balance(lengths: list[int], rows: int, ranks: int, workers: int, batch: int, window_batches: int,
            trials: int = 5) -> float:
    out = []
    for t in range(trials):
        rng = random.Random(t)
        data = [rng.choice(lengths) for _ in range(rows)]
        per_rank = [rank_steps(data[r::ranks], workers, batch, window_batches, 42) for r in range(ranks)]
        steps = min(map(len, per_rank))
        one = sum(step_cost(p[k]) for p in per_rank for k in range(steps))
        out.append(one / ranks / sum(max(step_cost(p[k]) for p in per_rank) for k in range(steps)))
    return sum(out) / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", default="bench/assets/real_catalog_2k.csv")
    ap.add_argument("--tokenizer", default="bench/assets/qwen-processor")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window-batches", type=int, default=16)
    a = ap.parse_args()
    import pandas as pd
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    texts = pd.read_csv(a.catalog)["catalog_content"].astype(str)
    lengths = [len(tok(t)["input_ids"]) + IMAGE_TOKENS + TEMPLATE_TOKENS for t in texts]
    print(f"{len(lengths)} catalog rows; 2 ranks, batch {a.batch}, windows of {a.window_batches} batches per worker")
    print("| rows | loader workers per rank | per-step balance |\n|---:|---:|---:|")
    for rows in (256, 1024, 75000):
        for workers in (2, 4):
            print(f"| {rows} | {workers} | {balance(lengths, rows, 2, workers, a.batch, a.window_batches):.3f} |")


if __name__ == "__main__":
    main()

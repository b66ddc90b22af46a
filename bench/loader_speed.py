"""Stage 6's loader from shards on local disk against the same shards over HTTP from a loopback server: samples/s
into training batches (ShardStream with uint8 patches, as stage 6 reads them, and the training collator).

    python bench/loader_speed.py --samples 512 --save

The samples: catalog text (bench/assets/real_catalog_2k.csv if present, else the demo's) with one 448x448 photo
each, encoded by stage 4's code (bench/assets/qwen-processor's tokenizer if present, else the tiny model's) and
packed by stage 5's. The server (common.demo.imageserver) serves the shard folder under /files/.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from torch.utils.data import DataLoader  # noqa: E402

from common.data.encode import ImageSpec, load_tokenizer  # noqa: E402
from common.data.preprocess import preprocess_split  # noqa: E402
from common.data.shards import ShardStream, pack_split  # noqa: E402
from common.demo.imageserver import ImageServer  # noqa: E402
from common.model.collate import for_tokenizer  # noqa: E402
from results import cpu_device, save, table  # noqa: E402
from shard_common import PIX, make_rows, model_source  # noqa: E402


def rate(source: str, spec, collate, workers: int, batch: int) -> tuple[float, int]:
    """(samples/s after the first batch, samples read) over one pass of the split."""
    loader = DataLoader(ShardStream(source, spec, normalize=False), batch_size=batch, num_workers=workers,
                        collate_fn=collate)
    it = iter(loader)
    seen = next(it)["input_ids"].shape[0]
    started, rest = time.perf_counter(), 0
    for b in it:
        rest += b["input_ids"].shape[0]
    return rest / (time.perf_counter() - started), seen + rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--samples-per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save", action="store_true", help="store the table in bench/runs/loader_speed.json")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="loader_speed."))
    try:
        model, _ = model_source(scratch)
        rows, _ = make_rows(scratch / "work", args.samples)
        preprocess_split(rows, scratch / "pre", "train", model, 4096, PIX, PIX, workers=1)
        pack_split(rows, scratch / "pre", scratch / "shards", "train", args.samples_per_shard)
        spec, collate = ImageSpec.from_model(model), for_tokenizer(load_tokenizer(model))
        with ImageServer(scratch) as server:
            sources = {"local disk": str(scratch / "shards"), "HTTP, loopback": server.url("/files/shards")}
            runs = {(name, w): [] for name in sources for w in args.workers}
            for _ in range(args.repeats):
                for (name, workers), got in runs.items():
                    speed, seen = rate(sources[name], spec, collate, workers, args.batch_size)
                    assert seen == args.samples, (name, workers, seen)
                    got.append(speed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    columns = ["loader workers"] + [f"{name}, samples/s" for name in sources]
    rows = [[w] + [round(statistics.median(runs[(name, w)]), 1) for name in sources] for w in args.workers]
    print(table(columns, rows))
    if args.save:
        save("loader_speed", "Stage 6's loader: shards on local disk against HTTP (loopback)", columns, rows,
             f"python bench/loader_speed.py --samples {args.samples}", cpu_device())


if __name__ == "__main__":
    main()

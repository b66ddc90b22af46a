"""Resizing a split's downloaded images in parallel processes, resumable, with a per-row manifest."""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from common.errors import PipelineError
from common.fsio import clean_temp_files, settle_params, write_bytes, write_text
from common.data.image_store import read_manifest
from common.data.images import ImageRejected, jpeg_bytes, load_resized
from common.workers import map_in_processes

FIELDS = ["sample_id", "status", "file", "width", "height"]


class ResizeError(PipelineError):
    """A resize that cannot start: no download manifest, other bounds without --force."""


def _resize_one(args) -> tuple[str, str, str, int, int]:
    sid, src, dst, min_pixels, max_pixels, max_image_pixels, use_draft, quality = args
    # a source downloaded again (its link changed) is newer than what was resized from the old one
    if os.path.exists(dst) and os.stat(dst).st_mtime_ns >= os.stat(src).st_mtime_ns:
        from PIL import Image
        try:
            with Image.open(dst) as img:
                img.load()  # a file cut short by a crash outside our rename is caught here
                return sid, "skipped", os.path.basename(dst), img.width, img.height
        except OSError:
            os.unlink(dst)
    try:
        img = load_resized(src, min_pixels, max_pixels, max_image_pixels, use_draft)
    except ImageRejected as err:
        return sid, err.reason, "", 0, 0
    write_bytes(dst, jpeg_bytes(img, quality))
    return sid, "ok", os.path.basename(dst), img.width, img.height


def check_params(out_dir: Path, params: dict, force: bool) -> None:
    """Refuse to mix images resized with other bounds into one folder, unless told to redo them. Called once
    resizing is about to start: it writes params.json (and the folder)."""
    if settle_params(out_dir, params, force, "resized", ResizeError):
        for p in out_dir.glob("*.jpg"):
            p.unlink()


def resize_split(images_dir: Path, out_dir: Path, params: dict, workers: int, part=None,
                 force: bool = False) -> dict[str, int]:
    """Resize the downloaded rows (those of `part` only, when given), with a manifest of their own. Nothing is
    written (not even the folder or params.json) until the download manifest and the bounds are checked."""
    from common.data.parts import Part
    part = part or Part()
    manifest = {sid: row for sid, row in read_manifest(images_dir).items() if part.has(sid)}
    if not manifest:
        raise ResizeError(f"{images_dir}/manifest.csv not found or empty: run 1_download.py first")
    check_params(out_dir, params, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out_dir, lambda name: name.rsplit(".", 1)[0] in manifest or name.endswith(part.suffix + ".csv"))
    jobs, results = [], {}
    for sid, row in manifest.items():
        if row["file"]:
            jobs.append((sid, str(images_dir / row["file"]), str(out_dir / f"{sid}.jpg"), params["min_pixels"],
                         params["max_pixels"], params["max_image_pixels"], params["use_draft"], params["quality"]))
        else:
            results[sid] = (sid, f"no_image:{row['status']}", "", 0, 0)
            (out_dir / f"{sid}.jpg").unlink(missing_ok=True)  # resized from a download that is gone
    for res in tqdm(map_in_processes(_resize_one, jobs, workers, start_method="fork"), total=len(jobs),
                    desc=f"resize {out_dir.name}", unit="img", mininterval=1):
        results[res[0]] = res
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for sid in manifest:
        writer.writerow(results[sid])
    write_text(out_dir / f"manifest{part.suffix}.csv", buf.getvalue())
    return dict(Counter(r[1] for r in results.values()))


def resized_files(out_dir: Path, images_dir: Path | None = None) -> dict[str, str]:
    """sample_id -> absolute path of its resized image, for rows that have one (every part's manifest). Given stage
    1's `images_dir`: downloads there without any stage 2 manifest here are an error (stage 2 was skipped), not
    "no images"; with no downloads either, the rows are text only (a run without images)."""
    if (images_dir is not None and not any(Path(out_dir).glob("manifest*.csv"))
            and any(Path(images_dir).glob("manifest*.csv"))):
        raise PipelineError(f"no resized images in {out_dir}, but downloads in {images_dir}: run 2_resize.py "
                            "first")
    files = {}
    for path in sorted(Path(out_dir).glob("manifest*.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            files.update((r["sample_id"], str((out_dir / r["file"]).resolve())) for r in csv.DictReader(fh)
                         if r["file"])
    return files

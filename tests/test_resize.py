"""Stage 2: sizes equal Qwen2-VL's own smart_resize, orientation/alpha/gray handled, bad files named, reruns.

The input folder is written by hand (as stage 1 would leave it) so that it can hold what a download
never lets through, such as a truncated JPEG.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import images as ours
from common.data.image_store import MANIFEST_FIELDS
from common.data.resize_store import ResizeError
from conftest import ROOT, load_stage, stage_options


def hf_smart_resize():
    """transformers' own smart_resize. Its torchvision module fails to import on the CPU machines (no
    torchvision); the PIL backend module carries the same function ("Copied from ...")."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    return smart_resize


MIN_PIXELS, MAX_PIXELS = ours.DEFAULT_MIN_PIXELS, ours.DEFAULT_MAX_PIXELS


def _jpeg(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kw)
    return out.getvalue()


def _pattern(size, seed=0) -> Image.Image:
    """A smooth but non-flat picture (flat colour would hide resampling and rotation errors)."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)),
                    np.full((h, w), 40 + seed * 30, np.float32)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def exif_rotated_jpeg() -> bytes:
    """Stored 560x280 (landscape) with a red block at the stored top-left, EXIF orientation 6 (rotate 90
    clockwise to display): displayed it is 280x560 (portrait) with the red block at the top-right."""
    img = Image.new("RGB", (560, 280), (40, 90, 200))
    img.paste((255, 0, 0), (0, 0, 140, 70))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(img, exif=exif.tobytes())


def alpha_png() -> bytes:
    """Left half fully transparent (its hidden colour black), right half opaque blue."""
    img = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (150, 0, 300, 200))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (200, 200), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.paste(1, (100, 0, 200, 200))
    out = io.BytesIO()
    img.save(out, "PNG", transparency=0)
    return out.getvalue()


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
    data = _jpeg(img)
    return data[: len(data) // 2]


# sample_id -> (file name or None, bytes or None, download status)
def _inputs() -> dict:
    return {
        "land": ("land.jpg", _jpeg(_pattern((640, 480))), "ok"),
        "port": ("port.jpg", _jpeg(_pattern((300, 900), 1)), "ok"),
        "tiny": ("tiny.jpg", _jpeg(_pattern((60, 45), 2)), "ok"),          # upscaled to min_pixels
        "big": ("big.jpg", _jpeg(_pattern((1600, 1200), 3)), "ok"),         # downscaled, JPEG draft path
        "wide": ("wide.jpg", _jpeg(_pattern((1024, 300), 4)), "ok"),
        "square": ("square.jpg", _jpeg(_pattern((500, 500), 5)), "skipped"),  # a rerun of stage 1's status
        "exif": ("exif.jpg", exif_rotated_jpeg(), "ok"),
        "alpha": ("alpha.png", alpha_png(), "ok"),
        "pal": ("pal.png", palette_png_with_transparency(), "ok"),
        "gray": ("gray.jpg", _jpeg(_pattern((400, 300)).convert("L")), "ok"),
        "trunc": ("trunc.jpg", truncated_jpeg(), "ok"),
        "text": ("text.jpg", b"<html>not an image</html>", "ok"),
        "gone": (None, None, "http_404"),
    }


DISPLAY_SIZE = {"land": (640, 480), "port": (300, 900), "tiny": (60, 45), "big": (1600, 1200),
                "wide": (1024, 300), "square": (500, 500), "exif": (280, 560), "alpha": (300, 200),
                "pal": (200, 200), "gray": (400, 300)}


def make_download_folder(work: Path) -> None:
    folder = work / "images" / "train"
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        for sid, (name, data, status) in _inputs().items():
            if name:
                (folder / name).write_bytes(data)
            writer.writerow({"sample_id": sid, "image_link": f"http://x/{sid}", "status": status,
                             "file": name or "", "bytes": len(data) if data else "", "attempts": 1,
                             "retryable": False})


def run_resize(work: Path, **kw):
    return load_stage("2_resize").main(stage_options("2_resize", work_dir=work, split="train",
                                                     **{"workers": 2, **kw}))


def resize_manifest(work: Path) -> dict[str, dict]:
    with open(work / "resized" / "train" / "manifest.csv", newline="", encoding="utf-8") as fh:
        return {r["sample_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    work = tmp_path_factory.mktemp("resize_work")
    make_download_folder(work)
    stats = run_resize(work)["train"]
    return work, stats, resize_manifest(work)


def _open(work: Path, sid: str) -> Image.Image:
    img = Image.open(work / "resized" / "train" / f"{sid}.jpg")
    img.load()
    return img


def test_statuses(resized):
    work, stats, manifest = resized
    status = {sid: r["status"] for sid, r in manifest.items()}
    assert list(status) == list(_inputs())  # one row per stage-1 row, same order
    assert status.pop("trunc") == "corrupt_image"
    assert status.pop("text") == "not_image"
    assert status.pop("gone") == "no_image:http_404"
    assert set(status.values()) == {"ok"}
    out = work / "resized" / "train"
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(f"{sid}.jpg" for sid in status)
    assert not any(p.name.startswith(".") for p in out.iterdir())
    saved = json.loads((out / "stats.json").read_text())
    assert saved["status_counts"] == stats["status_counts"] == {"ok": 10, "corrupt_image": 1, "not_image": 1,
                                                                "no_image:http_404": 1}


def test_sizes_are_the_processors_own(resized):
    work, _, manifest = resized
    smart_resize = hf_smart_resize()
    for sid, (w0, h0) in DISPLAY_SIZE.items():
        img = _open(work, sid)
        w, h = img.size
        assert (int(manifest[sid]["width"]), int(manifest[sid]["height"])) == (w, h)
        assert w % 28 == 0 and h % 28 == 0, sid
        assert MIN_PIXELS <= w * h <= MAX_PIXELS, sid
        assert (h, w) == smart_resize(h0, w0, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), sid
        assert img.mode == "RGB", sid


def test_smart_resize_matches_transformers_everywhere():
    smart_resize = hf_smart_resize()
    rng = random.Random(0)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(3000)]
    sizes += [(28, 28), (1, 199), (10, 2000), (4000, 3000), (56, 56)]
    for bounds in [(MIN_PIXELS, MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (3136, 12845056)]:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ours.ImageRejected):
                    ours.smart_resize(h, w, 28, *bounds)
                with pytest.raises(ValueError):
                    smart_resize(h, w, 28, *bounds)
                continue
            assert ours.smart_resize(h, w, 28, *bounds) == smart_resize(h, w, 28, *bounds), (h, w, bounds)


def test_processor_keeps_our_size(resized):
    """Qwen2-VL's PIL image processor, given our output and the same bounds, resizes nothing more."""
    pil_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    proc = pil_mod.Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    work, _, _ = resized
    for sid in ("land", "exif", "wide", "tiny"):
        img = _open(work, sid)
        out = proc(images=[img], return_tensors="np")
        assert [int(v) for v in out["image_grid_thw"][0]] == [1, img.height // 14, img.width // 14], sid


def test_exif_orientation_applied(resized):
    img = _open(resized[0], "exif")
    w, h = img.size
    assert h > w, "an EXIF-rotated landscape must come out as the portrait it displays as"
    arr = np.asarray(img).astype(int)
    top_right = arr[: h // 10, w - w // 10:].mean(axis=(0, 1))
    top_left = arr[: h // 10, : w // 10].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[2] < 60, top_right   # red
    assert top_left[2] > 150 and top_left[0] < 80, top_left        # blue background


def test_alpha_flattened_on_white(resized):
    for sid in ("alpha", "pal"):
        img = _open(resized[0], sid)
        assert img.mode == "RGB"
        arr = np.asarray(img).astype(int)
        w = arr.shape[1]
        assert (arr[:, : w // 4] > 240).all(axis=-1).mean() > 0.99, f"{sid}: transparent part is not white"
    blue = np.asarray(_open(resized[0], "alpha")).astype(int)[:, -10:].mean(axis=(0, 1))
    assert blue[2] > 230 and blue[0] < 30


def test_grayscale_becomes_rgb(resized):
    img = _open(resized[0], "gray")
    assert img.mode == "RGB" and len(img.getbands()) == 3
    arr = np.asarray(img).astype(int)
    assert np.abs(arr[..., 0] - arr[..., 1]).max() <= 3  # still gray, in three channels


def test_resized_pixels_close_to_a_full_decode(resized):
    """The JPEG draft shortcut must not change what the model sees beyond JPEG noise."""
    work = resized[0]
    src = Image.open(work / "images" / "train" / "big.jpg").convert("RGB")
    ref = src.resize(_open(work, "big").size, Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(_open(work, "big")).astype(int) - np.asarray(ref).astype(int))
    assert diff.mean() < 2.0


def test_rerun_skips_finished_images(resized, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(resized[0], work)
    out = work / "resized" / "train"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.jpg")}
    (out / ".land.jpg.x.tmp").write_bytes(b"left by a kill")
    (out / "port.jpg").write_bytes((out / "port.jpg").read_bytes()[:200])  # cut short outside our rename
    stats = run_resize(work)["train"]
    assert stats["status_counts"] == {"skipped": 9, "ok": 1, "corrupt_image": 1, "not_image": 1,
                                      "no_image:http_404": 1}
    assert resize_manifest(work)["port"]["status"] == "ok"  # the cut file was redone
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.jpg")}
    assert {k: v for k, v in after.items() if k != "port.jpg"} == {k: v for k, v in before.items()
                                                                  if k != "port.jpg"}
    assert after["port.jpg"][1] == before["port.jpg"][1]
    assert not (out / ".land.jpg.x.tmp").exists()


def test_changed_bounds_need_force(resized, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(resized[0], work)
    small_min, small_max = 64 * 28 * 28, 128 * 28 * 28
    with pytest.raises(ResizeError, match="--force"):
        run_resize(work, min_pixels=small_min, max_pixels=small_max)
    proc = subprocess.run([sys.executable, str(ROOT / "2_resize.py"), "--work-dir", str(work), "--split", "train",
                           "--min-pixels", str(small_min), "--max-pixels", str(small_max), "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--force" in proc.stderr
    # nothing was touched by the refused runs
    assert resize_manifest(work) == resized[2]

    stats = run_resize(work, min_pixels=small_min, max_pixels=small_max, force=True)["train"]
    assert stats["status_counts"]["ok"] == 10 and "skipped" not in stats["status_counts"]
    smart_resize = hf_smart_resize()
    for sid, (w0, h0) in DISPLAY_SIZE.items():
        w, h = _open(work, sid).size
        assert (h, w) == smart_resize(h0, w0, 28, small_min, small_max), sid
    params = json.loads((work / "resized" / "train" / "params.json").read_text())
    assert params["min_pixels"] == small_min and params["max_pixels"] == small_max


def test_missing_download_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ResizeError, match="1_download.py"):
        run_resize(tmp_path)


def test_bad_options_are_listed_together(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "2_resize.py"), "--work-dir", str(tmp_path),
                           "--min-pixels", "10", "--workers", "0", "--quality", "101"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    for flag in ("--min-pixels", "--workers", "--quality"):
        assert flag in proc.stderr


def test_e2e_resized_images_fit_the_bounds(small_demo_work):
    smart_resize = hf_smart_resize()
    for split in ("train", "test"):
        folder = small_demo_work.work_dir / "resized" / split
        with open(folder / "manifest.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == len(small_demo_work.demo.rows(split))
        for r in rows:
            if not r["file"]:
                assert r["status"].startswith("no_image:")
                continue
            src = small_demo_work.work_dir / "images" / split
            orig = next(p for p in src.iterdir() if p.name.rsplit(".", 1)[0] == r["sample_id"])
            with Image.open(orig) as im:
                w0, h0 = im.size
            w, h = int(r["width"]), int(r["height"])
            assert (h, w) == smart_resize(h0, w0, 28, MIN_PIXELS, MAX_PIXELS)
            assert os.path.getsize(folder / r["file"]) > 0

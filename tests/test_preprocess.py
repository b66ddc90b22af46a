"""Stage 4: what a reader gets back is exactly the HF processor's pixel_values; ids, grid and answer
agree; --max-length cuts only catalog text; text-only rows are valid; reruns skip finished samples;
and (optional) the real Qwen2.5 tokenizer gives Qwen's chat layout."""
from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.chat_jsonl import write_jsonl
from common.data.encode import Encoder, ImageSpec, SampleError, normalize_patches, validate
from common.data.images import load_resized
from common.data.encode import load_tokenizer
from common.data.preprocess import preprocess_split
from common.prompt import SYSTEM_PROMPT, build_messages, format_price, message_parts, user_text
from common.data.shards import IndexableWebDataset, ShardStream, decode, iter_shard, load_index, pack_split
from conftest import DEMO_PIXELS, REAL_CATALOG, REAL_PROCESSOR, run_stage4, run_stage5

PIX_448 = 448 * 448                 # = 256 * 28 * 28: a 448x448 image stays 448x448 (min = max)
MAX_BYTES_PER_SAMPLE = 1_300_000
# The real data's shape (Item Name, numbered bullets, description with HTML, Value/Unit), ~650 characters.
CATALOG = ("Item Name: Northwind Organic Whole Bean Coffee, Medium Roast, 12 Ounce Bag (Pack of 2)\n"
           "Bullet Point 1: SMOOTH & BALANCED: notes of milk chocolate, toasted almond and a hint of citrus\n"
           "Bullet Point 2: 100% ARABICA beans, grown at high altitude and roasted in small batches\n"
           "Bullet Point 3: FAIR TRADE certified – every bag supports the farmers who grow it\n"
           "Bullet Point 4: Resealable valve bag keeps the beans fresh for weeks after opening\n"
           "Product Description: Our medium roast is made for every brew method.<br><br>Grind just before "
           "brewing for the best cup. <b>Enjoy!</b>\n"
           "Value: 24.0\nUnit: Ounce\n")


# --------------------------------------------------------------------------------------------- helpers

def textured(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Gradients + noise: every pixel value and channel differs, unlike a flat demo picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), (x + y) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def chat_row(sample_id: str, catalog: str, image: Path | None, price: float | None) -> dict:
    row = {"sample_id": sample_id, "messages": build_messages(catalog, str(image) if image else None, price)}
    if price is not None:
        row["price"] = price
    return row


def write_split(work: Path, split: str, rows: list[dict]) -> None:
    write_jsonl(work / "jsonl" / f"{split}.jsonl", rows)


@functools.lru_cache(maxsize=None)
def hf_image_processor(model_dir: str):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil.from_pretrained(model_dir)


def hf_pixels(model_dir: Path, img: Image.Image, min_pixels: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """The HF processor's float32 pixel_values and image_grid_thw for one image."""
    out = hf_image_processor(str(model_dir))(images=[img], size={"shortest_edge": min_pixels,
                                                                "longest_edge": max_pixels}, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def read_back(folder: Path, spec: ImageSpec) -> dict[str, dict[str, dict]]:
    """reader name -> {sample_id: decoded sample}, through each of the three ways to read shards."""
    stream = {s["sample_id"]: s for s in ShardStream(folder, spec)}
    ds = IndexableWebDataset(folder, spec)
    indexed = {s["sample_id"]: s for s in (ds[i] for i in range(len(ds)))}
    raw = {}
    for shard in load_index(folder)["shards"]:
        for r in iter_shard(folder / shard["name"]):
            s = decode(r, spec)
            raw[s["sample_id"]] = s
    return {"ShardStream": stream, "IndexableWebDataset": indexed, "decode": raw}


def sample_dict(folder: Path) -> tuple[dict, dict]:
    """A stage-4 folder back as (sample for `validate`, meta)."""
    meta = json.loads((folder / "meta.json").read_text())
    has_pixels = (folder / "pixel_values.npy").exists()
    sample = {"input_ids": np.load(folder / "input_ids.npy"),
              "patches": np.load(folder / "pixel_values.npy") if has_pixels else None,
              "image_grid_thw": np.asarray(meta["image_grid_thw"]) if meta["image_grid_thw"] else None}
    return sample, meta


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


# --------------------------------------------------------------------------------------------- (a) exactness

def test_448px_pixels_read_back_equal_the_hf_processor(tiny_model_dir, tmp_path):
    """Stage 4 + 5 at 448x448 (min = max = 256*28*28): every reader gives the processor's float32
    pixel_values to 1e-6 and its grid; stored uint8 [1024, 588]; <= 1.3 MB a sample."""
    images = tmp_path / "images"
    images.mkdir()
    sources = {"png_rgb": ("png", "RGB", 1), "jpeg_rgb": ("jpg", "RGB", 2), "jpeg_gray": ("jpg", "L", 3)}
    rows = []
    for sid, (ext, mode, seed) in sources.items():
        path = images / f"{sid}.{ext}"
        textured(448, 448, seed, mode).save(path, quality=90) if ext == "jpg" else textured(448, 448, seed).save(path)
        rows.append(chat_row(sid, CATALOG, path, 12.5 + seed))
    work = tmp_path / "work"
    write_split(work, "train", rows)
    s4 = run_stage4(work, tiny_model_dir, split="train", min_pixels=PIX_448, max_pixels=PIX_448)["train"]
    assert s4["counts"] == {"skipped": 0, "ok": 3} and s4["notes"] == {}
    s5 = run_stage5(work, split="train", samples_per_shard=2)["train"]
    assert s5["samples"] == 3 and s5["shards"] == 2

    spec = ImageSpec.from_model(str(tiny_model_dir))
    got = read_back(work / "webdataset_train", spec)
    for row in rows:
        sid, path = row["sample_id"], Path(message_parts(row["messages"])[1])
        resized = load_resized(path, PIX_448, PIX_448)
        assert resized.size == (448, 448)
        want, want_grid = hf_pixels(tiny_model_dir, resized, PIX_448, PIX_448)
        assert want.dtype == np.float32 and want.shape == (1024, 1176) and want_grid.tolist() == [[1, 32, 32]]
        for reader, samples in got.items():
            s = samples[sid]
            pv = s["pixel_values"].numpy()
            assert pv.dtype == np.float32 and pv.shape == want.shape, (reader, sid)
            np.testing.assert_allclose(pv, want, rtol=1.3e-6, atol=1e-5, err_msg=f"{reader} {sid}")
            assert s["image_grid_thw"].tolist() == want_grid.tolist(), (reader, sid)
            assert s["price"] == row["price"]
        # Stage 4's folder: uint8 patches, 4x smaller than float32 [N, 1176] and lossless.
        folder = work / "preprocessed" / "train" / sid
        patches = np.load(folder / "pixel_values.npy")
        assert patches.dtype == np.uint8 and patches.shape == (1024, 588)
        np.testing.assert_allclose(normalize_patches(patches, spec), want, rtol=1.3e-6, atol=1e-5)
        sample, meta = sample_dict(folder)
        assert meta["pixel_values_shape"] == [1024, 1176] and meta["pixel_storage"] == "uint8_patches"
        assert meta["n_image_tokens"] == 256
        assert int((sample["input_ids"] == meta["image_token_id"]).sum()) == 256
        assert folder_bytes(folder) <= MAX_BYTES_PER_SAMPLE
    assert s5["bytes_per_sample"] <= MAX_BYTES_PER_SAMPLE
    stats = json.loads((work / "webdataset_train" / "stats.json").read_text())
    assert stats["bytes_per_sample"] == s5["bytes_per_sample"]
    for shard in load_index(work / "webdataset_train")["shards"]:
        assert shard["bytes"] / shard["samples"] <= MAX_BYTES_PER_SAMPLE, shard["name"]


def test_demo_pixels_read_back_equal_the_hf_processor(encoded_demo):
    """The demo's real stage-2 images (many sizes, grey and alpha sources) at the demo's pixel bounds."""
    spec = encoded_demo.spec()
    checked = 0
    for split in ("train", "validation", "test"):
        rows = {r["sample_id"]: r for r in encoded_demo.rows(split)}
        for s in ShardStream(encoded_demo.shards_dir(split), spec):
            image = message_parts(rows[s["sample_id"]]["messages"])[1]
            if image is None:
                assert s["pixel_values"] is None
                continue
            want, grid = hf_pixels(encoded_demo.model_path, load_resized(image, **DEMO_PIXELS), **DEMO_PIXELS)
            assert s["image_grid_thw"].tolist() == grid.tolist(), s["sample_id"]
            np.testing.assert_allclose(s["pixel_values"].numpy(), want, rtol=1.3e-6, atol=1e-5, err_msg=s["sample_id"])
            checked += 1
    assert checked >= 70


# --------------------------------------------------------------------------------------------- (b) validation

def test_validate_rejects_doctored_samples(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    spec = ImageSpec.from_model(str(tiny_model_dir))
    enc = Encoder(tok, spec, 2048, **DEMO_PIXELS)
    img = tmp_path / "p.jpg"
    textured(112, 112).save(img, quality=90)
    s = enc.encode(build_messages(CATALOG, str(img), 4.99))
    pad = enc.image_token_id
    assert s["image_grid_thw"].tolist() == [[1, 8, 8]] and s["n_image_tokens"] == 16
    validate(s, spec, pad)  # the real sample passes
    ids = s["input_ids"]
    k = int(np.flatnonzero(ids == pad)[0])
    wider = np.concatenate([s["patches"], s["patches"][:32]])  # 96 patches = grid [1, 8, 12]
    doctored = {
        "one image-pad token dropped": dict(s, input_ids=np.delete(ids, k)),
        "one image-pad token added": dict(s, input_ids=np.insert(ids, k, pad)),
        "grid changed, patches not": dict(s, image_grid_thw=np.array([[1, 8, 12]])),
        "grid and patches changed, tokens not": dict(s, image_grid_thw=np.array([[1, 8, 12]]), patches=wider),
        "patches cut": dict(s, patches=s["patches"][:-4]),
        "image removed, its tokens kept": dict(s, patches=None, image_grid_thw=None),
    }
    for what, bad in doctored.items():
        with pytest.raises(SampleError) as err:
            validate(bad, spec, pad)
        assert err.value.reason == "grid_mismatch", what
    text_only = enc.encode(build_messages(CATALOG, None, 4.99))
    validate(text_only, spec, pad)


# --------------------------------------------------------------------------------------------- (c) truncation

def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError("catalog tokens not found in the full encoding")


def test_max_length_cuts_only_catalog_text_and_counts_it(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    spec = ImageSpec.from_model(str(tiny_model_dir))
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    full_enc = Encoder(tok, spec, 10 ** 6, **DEMO_PIXELS)
    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    textured(112, 112, 1).save(small, quality=90)   # 64 patches, 16 image tokens
    textured(224, 112, 2).save(big, quality=90)     # 128 patches, 32 image tokens
    short_cat, price = "Item Name: Tea", 24.99
    cat_ids = tok(CATALOG.strip(), add_special_tokens=False)["input_ids"]

    def fixed(image, answer=True):  # tokens of everything but the catalog
        ids = full_enc.encode(build_messages(CATALOG, str(image) if image else None, price if answer else None))
        return len(ids["input_ids"]) - len(cat_ids)

    room = 8
    max_length = fixed(small) + room
    assert len(tok(short_cat, add_special_tokens=False)["input_ids"]) <= room < len(cat_ids)
    assert fixed(big) > max_length >= 64, "the big image must not fit, --max-length must be valid"
    assert fixed(None) + len(cat_ids) > max_length  # text only, the big row still needs a cut

    work = tmp_path / "work"
    write_split(work, "train", [chat_row("cut", CATALOG, small, price), chat_row("fits", short_cat, small, price),
                                chat_row("big", CATALOG, big, price)])
    write_split(work, "test", [chat_row("test_cut", CATALOG, small, None)])
    run_stage4(work, tiny_model_dir, split="train", max_length=max_length)
    run_stage4(work, tiny_model_dir, split="test", max_length=max_length)
    stats = json.loads((work / "preprocessed" / "train" / "stats.json").read_text())
    assert stats["counts"] == {"skipped": 0, "ok": 3}
    assert stats["notes"] == {"truncated": 2, "image_dropped:too_long": 1}
    assert stats["problem_ids"] == {"image_dropped:too_long": ["big"]}
    test_stats = json.loads((work / "preprocessed" / "test" / "stats.json").read_text())
    assert test_stats["counts"] == {"skipped": 0, "ok": 1} and test_stats["notes"] == {"truncated": 1}

    def check(split, sid, messages, expect_image_tokens):
        sample, meta = sample_dict(work / "preprocessed" / split / sid)
        validate(sample, spec, full_enc.image_token_id)
        got = sample["input_ids"].tolist()
        full = full_enc.encode(messages)["input_ids"].tolist()
        dropped = meta["catalog_tokens_dropped"]
        assert len(got) <= max_length and dropped == len(full) - len(got)
        assert got.count(full_enc.image_token_id) == expect_image_tokens == meta["n_image_tokens"]
        if dropped:  # got = pre + catalog[:-dropped] + post + answer: only the catalog's tail is gone
            assert len(got) == max_length
            cut = _find(full, cat_ids) + len(cat_ids) - dropped
            assert got == full[:cut] + full[cut + dropped:]
            assert full[cut:cut + dropped] == cat_ids[-dropped:]
        if meta["answer_start"] is not None:
            answer = got[meta["answer_start"]:meta["answer_end"]]
            assert meta["answer_end"] == len(got) and answer[-1] == end_id
            assert tok.decode(answer[:-1]) == format_price(price) and answer == full[-len(answer):]
        else:
            assert tok.decode(got).endswith("<|im_start|>assistant\n")
        return meta

    assert check("train", "cut", build_messages(CATALOG, str(small), price), 16)["catalog_tokens_dropped"] > 0
    assert check("train", "fits", build_messages(short_cat, str(small), price), 16)["catalog_tokens_dropped"] == 0
    meta = check("train", "big", build_messages(CATALOG, None, price), 0)  # fell back to text only, then cut
    assert meta["catalog_tokens_dropped"] > 0 and meta["pixel_values_shape"] is None
    assert not (work / "preprocessed" / "train" / "big" / "pixel_values.npy").exists()
    assert check("test", "test_cut", build_messages(CATALOG, str(small), None), 16)["catalog_tokens_dropped"] > 0

    # Too long even as text only with no catalog at all: the row fails, is counted and named, and
    # stage 5 counts it as missing rather than packing anything for it.
    rows = [chat_row("big", CATALOG, big, price), chat_row("text", CATALOG, None, price)]
    out = tmp_path / "too_long"
    result = preprocess_split(rows, out, "train", str(tiny_model_dir), fixed(None) - 1, workers=1, **DEMO_PIXELS)
    assert result["counts"] == {"skipped": 0, "failed": 2}
    assert sorted(result["problem_ids"]["too_long"]) == ["big", "text"]
    assert not (out / "big").exists() and not (out / "text").exists()
    packed = pack_split(rows, out, tmp_path / "too_long_shards", "train", 10)
    assert packed["samples"] == 0 and packed["missing_from_stage4"] == 2


# --------------------------------------------------------------------------------------------- (d) text-only

def test_text_only_samples_are_valid_and_carry_no_pixels(encoded_demo):
    spec = encoded_demo.spec()
    text_only = 0
    for split in ("train", "validation", "test"):
        rows = {r["sample_id"]: r for r in encoded_demo.rows(split)}
        no_image = {sid for sid, r in rows.items() if message_parts(r["messages"])[1] is None}
        for sid in no_image:
            folder = encoded_demo.pre_dir(split) / sid
            assert not (folder / "pixel_values.npy").exists(), sid
            sample, meta = sample_dict(folder)
            validate(sample, spec, meta["image_token_id"])
            assert meta["pixel_values_shape"] is None and meta["image_grid_thw"] is None
            assert meta["n_image_tokens"] == 0 and meta["image_token_id"] not in sample["input_ids"].tolist()
            assert (meta["answer_start"] is None) == (split == "test")
        for shard in load_index(encoded_demo.shards_dir(split))["shards"]:
            for raw in iter_shard(encoded_demo.shards_dir(split) / shard["name"]):
                s = decode(raw, spec)
                assert ("pixel_values.npy" in raw) == (s["sample_id"] not in no_image)
                if s["sample_id"] in no_image:
                    assert s["pixel_values"] is None and s["image_grid_thw"] is None
                    text_only += 1
    # every text-only row of stage 3 (failed downloads: the injected 404 / HTML / truncated ones and more)
    expected = encoded_demo.demo_work.stats["jsonl"]["text_only_rows"]
    failing = encoded_demo.demo_work.failing
    assert text_only == sum(expected.values()) >= len(failing["train"]) + len(failing["test"])


# --------------------------------------------------------------------------------------------- (e) rerun

def test_stage4_rerun_skips_finished_samples_and_redoes_partial_ones(encoded_demo, tmp_path):
    demo = encoded_demo.copy(tmp_path / "work")
    pre = demo.pre_dir("train")
    rows = demo.rows("train")
    before = {sid: {f.name: f.read_bytes() for f in (pre / sid).iterdir()} for sid in (r["sample_id"] for r in rows)}
    mtimes = {sid: os.stat(pre / sid / "meta.json").st_mtime_ns for sid in before}

    stats = run_stage4(demo.work_dir, demo.model_path, split="train")["train"]
    assert stats["counts"] == {"skipped": len(rows)} and stats["rows_in"] == len(rows)
    assert {sid: os.stat(pre / sid / "meta.json").st_mtime_ns for sid in before} == mtimes

    # A run killed mid-write leaves a temp folder; a deleted sample must be redone, byte for byte the same.
    gone = rows[4]["sample_id"]
    for f in (pre / gone).iterdir():
        f.unlink()
    (pre / gone).rmdir()
    partial = pre / f".{rows[5]['sample_id']}.abc123.tmp"
    partial.mkdir()
    (partial / "input_ids.npy").write_bytes(b"\x93NUMPY half")
    stats = run_stage4(demo.work_dir, demo.model_path, split="train")["train"]
    assert stats["counts"] == {"skipped": len(rows) - 1, "ok": 1}
    assert not partial.exists()
    assert {f.name: f.read_bytes() for f in (pre / gone).iterdir()} == before[gone]
    assert sorted(p.name for p in pre.iterdir() if p.is_dir()) == sorted(before)


# --------------------------------------------------------------------------------------------- (h) real tokenizer

def _real_catalog() -> tuple[str, float]:
    if REAL_CATALOG.exists():
        with open(REAL_CATALOG, newline="", encoding="utf-8") as fh:
            row = next(csv.DictReader(fh))
        return row["catalog_content"], float(row["price"])
    return CATALOG, 23.99


@pytest.mark.skipif(not REAL_PROCESSOR.is_dir(), reason="no copy of the real Qwen2.5-VL processor (QWEN_PROCESSOR_DIR)")
def test_real_qwen_tokenizer_chat_layout(tmp_path):
    tok = load_tokenizer(str(REAL_PROCESSOR))
    spec = ImageSpec.from_model(str(REAL_PROCESSOR))
    enc = Encoder(tok, spec, 4096, PIX_448, PIX_448)
    ids_of = tok.convert_tokens_to_ids
    pad, v_start, v_end, im_start, im_end = (ids_of(t) for t in ("<|image_pad|>", "<|vision_start|>",
                                                                "<|vision_end|>", "<|im_start|>", "<|im_end|>"))
    assert (pad, im_end) == (151655, 151645)
    catalog, price = _real_catalog()
    img = tmp_path / "p.jpg"
    textured(448, 448, 7).save(img, quality=90)

    s = enc.encode(build_messages(catalog, str(img), price))
    validate(s, spec, pad)
    ids = s["input_ids"].tolist()
    n_pad = ids.count(pad)
    assert n_pad == s["patches"].shape[0] // 4 == 256 and s["image_grid_thw"].tolist() == [[1, 32, 32]]
    first = ids.index(pad)
    assert ids[first - 1] == v_start and ids[first:first + n_pad] == [pad] * n_pad and ids[first + n_pad] == v_end
    assert ids.count(im_start) == 3 and ids.count(im_end) == 3
    prompt = tok.decode(ids[:s["answer_start"]])
    assert prompt == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                      + "<|image_pad|>" * 256 + f"<|vision_end|>{user_text(catalog)}<|im_end|>\n"
                      "<|im_start|>assistant\n")
    answer = ids[s["answer_start"]:s["answer_end"]]
    assert s["answer_end"] == len(ids) and answer[-1] == im_end == 151645
    assert tok.decode(answer[:-1]) == format_price(price)
    # Same ids as the plain way: the chat template on the whole text, image pads expanded, one tokenizer call.
    messages = build_messages(catalog, str(img), price)
    plain_text = tok.apply_chat_template(messages, tokenize=False).replace("<|image_pad|>", "<|image_pad|>" * 256)
    plain = tok(plain_text, add_special_tokens=False)["input_ids"]
    assert ids == plain[:len(ids)] and tok.decode(plain[len(ids):]).strip() == ""

    test = enc.encode(build_messages(catalog, str(img), None))
    assert test["answer_start"] is None and test["input_ids"].tolist() == ids[:s["answer_start"]]

"""Stage 3 after a real run of stages 1-2: every input row is accounted for, in the seed's chat schema."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.data.chat_jsonl import JsonlError, read_jsonl
from common.prompt import SYSTEM_PROMPT, format_price, message_parts, user_text
from conftest import load_stage, stage_options


def jsonl(work: Path, split: str) -> list[dict]:
    return read_jsonl(work / "jsonl" / f"{split}.jsonl")


@pytest.fixture(scope="module")
def out(small_demo_work):
    w = small_demo_work
    return {s: jsonl(w.work_dir, s) for s in ("train", "validation", "test")}


def test_every_input_row_is_accounted_for(small_demo_work, out):
    train_csv = small_demo_work.demo.rows("train")
    test_csv = small_demo_work.demo.rows("test")
    fit_ids = [r["sample_id"] for r in out["train"]]
    val_ids = [r["sample_id"] for r in out["validation"]]
    assert len(fit_ids) + len(val_ids) == len(train_csv)
    assert set(fit_ids).isdisjoint(val_ids)
    assert sorted(fit_ids + val_ids) == sorted(r["sample_id"] for r in train_csv)
    assert val_ids, "a 0.2 validation ratio on 60 rows must give some validation rows"
    order = [r["sample_id"] for r in train_csv]
    assert fit_ids == [s for s in order if s in set(fit_ids)]  # file order kept inside each part
    assert [r["sample_id"] for r in out["test"]] == [r["sample_id"] for r in test_csv]
    stats = small_demo_work.stats["jsonl"]
    saved = json.loads((small_demo_work.work_dir / "jsonl" / "stats.json").read_text())
    assert saved["rows"] == stats["rows"] == {"train": len(fit_ids), "validation": len(val_ids),
                                              "test": len(test_csv)}
    assert saved["input_rows"] == {"train": len(train_csv), "test": len(test_csv)}
    assert saved["skipped_train_rows"] == {}


def test_failed_images_become_text_only_rows(small_demo_work, out):
    failing = small_demo_work.failing
    assert len(failing["train"]) >= 3 and len(failing["test"]) >= 1
    text_only = {s: 0 for s in out}
    for split, records in out.items():
        expected_failing = failing["test" if split == "test" else "train"]
        for rec in records:
            _, image, _ = message_parts(rec["messages"])
            if rec["sample_id"] in expected_failing:
                assert image is None, rec["sample_id"]
                assert [p["type"] for p in rec["messages"][1]["content"]] == ["text"]
                text_only[split] += 1
            else:
                assert image is not None, rec["sample_id"]
                path = Path(image)
                assert path.is_absolute() and path.is_file()
                assert path.parent == (small_demo_work.work_dir / "resized" /
                                       ("test" if split == "test" else "train")).resolve()
                assert path.name == f"{rec['sample_id']}.jpg"
    assert small_demo_work.stats["jsonl"]["text_only_rows"] == text_only
    assert sum(text_only.values()) == len(failing["train"]) + len(failing["test"])


def test_chat_schema(small_demo_work, out):
    prices = {r["sample_id"]: float(r["price"]) for r in small_demo_work.demo.rows("train")}
    catalogs = {r["sample_id"]: r["catalog_content"] for s in ("train", "test")
                for r in small_demo_work.demo.rows(s)}
    for split, records in out.items():
        for rec in records:
            msgs = rec["messages"]
            roles = [m["role"] for m in msgs]
            text, image, answer = message_parts(msgs)
            assert msgs[0]["content"] == [{"type": "text", "text": SYSTEM_PROMPT}]
            assert text == user_text(catalogs[rec["sample_id"]])
            if image is not None:
                assert msgs[1]["content"][0] == {"type": "image", "image": image}  # image before text
            if split == "test":
                assert roles == ["system", "user"] and answer is None and "price" not in rec
            else:
                assert roles == ["system", "user", "assistant"]
                assert rec["price"] == prices[rec["sample_id"]]
                assert answer == format_price(prices[rec["sample_id"]])


def test_median_price_is_from_the_training_part(small_demo_work, out):
    import statistics
    assert small_demo_work.stats["jsonl"]["train_median_price"] == pytest.approx(
        statistics.median(r["price"] for r in out["train"]))


def test_lines_are_plain_utf8_json(small_demo_work):
    raw = b"".join((small_demo_work.work_dir / "jsonl" / f"{s}.jsonl").read_bytes()
                   for s in ("train", "validation"))
    assert raw.endswith(b"\n")
    text = raw.decode("utf-8")
    catalogs = "".join(r["catalog_content"] for r in small_demo_work.demo.rows("train"))
    non_ascii = {ch for ch in catalogs if ord(ch) > 127}
    assert non_ascii, "the demo's brand names should bring some non-ASCII text"
    assert non_ascii <= set(text), "non-ASCII text must be kept as is, not \\u-escaped"
    for line in text.splitlines():
        assert json.loads(line)["messages"]


def _rerun(small_demo_work, tmp_path, **kw) -> tuple[Path, dict]:
    work = tmp_path / "work"
    shutil.copytree(small_demo_work.work_dir / "resized", work / "resized")
    # the resized manifest names files relative to its folder, so the copy's JSONL points at the copy
    stats = load_stage("3_create_jsonl").main(stage_options(
        "3_create_jsonl", data_dir=small_demo_work.data_dir, work_dir=work,
        **{"validation_split_ratio": 0.2, **kw}))
    return work, stats


def test_rerun_gives_the_same_split(small_demo_work, out, tmp_path):
    work, _ = _rerun(small_demo_work, tmp_path)
    for split in out:
        assert [r["sample_id"] for r in jsonl(work, split)] == [r["sample_id"] for r in out[split]]
    work2, _ = _rerun(small_demo_work, tmp_path / "other_seed", seed=7)
    assert [r["sample_id"] for r in jsonl(work2, "validation")] != [r["sample_id"] for r in out["validation"]]


def test_skip_train_without_image(small_demo_work, out, tmp_path):
    work, stats = _rerun(small_demo_work, tmp_path, skip_train_without_image=True)
    failing = small_demo_work.failing
    kept = [r["sample_id"] for s in ("train", "validation") for r in jsonl(work, s)]
    assert set(kept) == {r["sample_id"] for r in small_demo_work.demo.rows("train")} - set(failing["train"])
    assert stats["skipped_train_rows"] == {"no_image": len(failing["train"])}
    assert sorted(stats["skipped_train_row_ids"]["no_image"]) == sorted(failing["train"])
    test = jsonl(work, "test")
    assert len(test) == len(out["test"])  # test rows are never dropped
    assert stats["text_only_rows"] == {"train": 0, "validation": 0, "test": len(failing["test"])}


def test_read_jsonl_names_the_broken_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"sample_id": "1", "messages": []}\n{"sample_id": "2", "messa\n')
    with pytest.raises(JsonlError, match=r"x.jsonl:2"):
        read_jsonl(path)
    path.write_text('{"sample_id": "1"}\n')
    with pytest.raises(JsonlError, match=r"x.jsonl:1.*messages"):
        read_jsonl(path)
    with pytest.raises(JsonlError, match="not found"):
        read_jsonl(tmp_path / "none.jsonl")


def test_stage_outputs_are_where_the_layout_says(small_demo_work):
    """The three stages' files exist where the layout says, with their stats."""
    w = small_demo_work.work_dir
    for split in ("train", "test"):
        assert (w / "images" / split / "manifest.csv").is_file()
        assert (w / "images" / split / "stats.json").is_file()
        assert (w / "resized" / split / "manifest.csv").is_file()
        assert (w / "resized" / split / "params.json").is_file()
    for split in ("train", "validation", "test"):
        assert (w / "jsonl" / f"{split}.jsonl").is_file()

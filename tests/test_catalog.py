"""Reading train.csv / test.csv: bad input fails early with the file and the rows named, or is counted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.catalog import MAX_LISTED, CatalogError, read_catalog
from common.fsio import is_safe_id
from conftest import load_stage, stage_options

HEADER = "sample_id,catalog_content,image_link,price\n"


def write(tmp_path: Path, text: str | bytes, name: str = "train.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def row(sid: str, price: str = "9.99", catalog: str = "Item Name: thing", link: str = "") -> str:
    return f'{sid},"{catalog}",{link},{price}\n'


def test_good_file_with_extra_columns_and_multiline_text(tmp_path):
    text = ("sample_id,extra,catalog_content,image_link,price,other\n"
            '1,x,"Item Name: A, B\nValue: 2.0\nUnit: Ounce",http://h/1.jpg, 12.50 ,y\n'
            '002,x,"Quote ""inside""",http://h/2.jpg,3,z\n')
    cat = read_catalog(write(tmp_path, text), "train")
    assert list(cat.rows.columns) == ["sample_id", "catalog_content", "image_link", "price"]
    assert cat.rows["sample_id"].tolist() == ["1", "002"]  # ids stay text: no leading zero lost
    assert cat.rows["price"].tolist() == [12.5, 3.0]
    assert cat.rows["catalog_content"][0] == "Item Name: A, B\nValue: 2.0\nUnit: Ounce"
    assert cat.rows["catalog_content"][1] == 'Quote "inside"'
    assert cat.n_input == 2 and cat.skipped == {}


def test_test_split_needs_no_price(tmp_path):
    path = write(tmp_path, "sample_id,catalog_content,image_link\n7,hello,\n", "test.csv")
    cat = read_catalog(path, "test")
    assert cat.rows["sample_id"].tolist() == ["7"] and "price" not in cat.rows


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="file not found"):
        read_catalog(tmp_path / "train.csv", "train")


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("\n\n", "empty file"),
    (HEADER, "no rows"),
    ("sample_id,catalog_content,price\n1,a,2\n", "missing column.*image_link"),
    ("id,text\n1,a\n", "missing column.*sample_id.*catalog_content.*image_link.*price"),
])
def test_unusable_files_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError, match=message) as err:
        read_catalog(path, "train")
    assert str(path) in str(err.value)


def test_not_utf8(tmp_path):
    path = write(tmp_path, HEADER.encode() + b'1,"caf\xe9 cr\xe8me",,2.0\n')
    with pytest.raises(CatalogError, match="not UTF-8") as err:
        read_catalog(path, "train")
    assert str(path) in str(err.value)


def test_broken_quoting(tmp_path):
    path = write(tmp_path, HEADER + '1,"never closed,,2\n2,b,,3\n')
    with pytest.raises(CatalogError) as err:
        read_catalog(path, "train")
    assert str(path) in str(err.value)


BAD_ROWS = {
    # sample_id -> (price, reason)
    "p_abc": ("abc", "price_not_a_number"),
    "p_neg": ("-3", "price_not_positive"),
    "p_zero": ("0", "price_not_positive"),
    "p_nan": ("NaN", "price_not_finite"),
    "p_inf": ("inf", "price_not_finite"),
    "p_huge": ("1e308", "price_too_large"),
    "p_comma": ("12,99", "price_not_a_number"),
    "p_empty": ("", "price_not_a_number"),
}
UNSAFE_IDS = ["../../etc/x", "a/b", ".hidden", "x..y", "a b", "~root", "é"]


def bad_file(tmp_path: Path) -> Path:
    lines = [HEADER, row("good1"), row("dup"), row("good2", "0.5")]
    for sid, (price, _) in BAD_ROWS.items():
        lines.append(f'{sid},text,,"{price}"\n')
    for sid in UNSAFE_IDS:
        lines.append(row(f'"{sid}"'))
    lines += [row("dup"), row('""'), row("good3", "1000000")]
    return write(tmp_path, "".join(lines))


def test_bad_rows_are_all_named_in_one_error(tmp_path):
    path = bad_file(tmp_path)
    with pytest.raises(CatalogError) as err:
        read_catalog(path, "train")
    msg = str(err.value)
    assert str(path) in msg and "--skip-bad-rows" in msg
    for sid, (_, reason) in BAD_ROWS.items():
        assert f"'{sid}'" in msg and reason in msg
    for sid in UNSAFE_IDS:
        assert repr(sid) in msg
    assert "unsafe_sample_id" in msg and "duplicate_sample_id" in msg and "empty_sample_id" in msg
    assert "row 2 (sample_id 'dup')" in msg  # both copies of a duplicate are named
    for good in ("good1", "good2", "good3"):
        assert good not in msg


def test_skip_bad_rows_keeps_the_good_ones_and_says_why(tmp_path):
    cat = read_catalog(bad_file(tmp_path), "train", skip_bad_rows=True)
    assert cat.rows["sample_id"].tolist() == ["good1", "good2", "good3"]
    assert cat.rows["price"].tolist() == [9.99, 0.5, 1_000_000.0]
    reasons = {reason: len(rows) for reason, rows in cat.skipped.items()}
    expected = {"unsafe_sample_id": len(UNSAFE_IDS), "duplicate_sample_id": 2, "empty_sample_id": 1}
    for _, reason in BAD_ROWS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert reasons == expected
    assert cat.n_input == 3 + len(BAD_ROWS) + len(UNSAFE_IDS) + 3


def test_test_rows_are_never_skipped(tmp_path):
    path = write(tmp_path, "sample_id,catalog_content,image_link\n1,a,\n1,b,\n../x,c,\n", "test.csv")
    with pytest.raises(CatalogError) as err:
        read_catalog(path, "test", skip_bad_rows=True)
    msg = str(err.value)
    assert "duplicate_sample_id" in msg and "'../x'" in msg and "--skip-bad-rows" not in msg


def test_long_lists_are_shortened(tmp_path):
    lines = [HEADER] + [row(f"r{i}", "abc") for i in range(MAX_LISTED + 15)]
    with pytest.raises(CatalogError) as err:
        read_catalog(write(tmp_path, "".join(lines)), "train")
    assert f"({MAX_LISTED + 15} in all)" in str(err.value)
    assert "'r0'" in str(err.value) and f"'r{MAX_LISTED + 14}'" not in str(err.value)


def test_safe_ids():
    for sid in ["1", "B00123", "a_b-c.d", "_x", "9" * 128]:
        assert is_safe_id(sid), sid
    for sid in ["", "../a", "a/b", "a\\b", ".x", "x..y", "a b", "9" * 129, "a\nb", "a:b"]:
        assert not is_safe_id(sid), sid


# ------------------------------------------------------------------------------ through the stages

def _stage_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    write(data, HEADER + row("ok1") + row("bad_price", "abc") + row('"../../etc/x"') + row("ok2", "12.99"))
    write(data, "sample_id,catalog_content,image_link\nt1,hello,\n", "test.csv")
    return data


def test_stage1_fails_on_bad_rows_unless_told_to_skip(tmp_path):
    data = _stage_data(tmp_path)
    stage = load_stage("1_download")
    with pytest.raises(CatalogError, match="bad_price"):
        stage.main(stage_options("1_download", data_dir=data, work_dir=tmp_path / "w", split="train"))
    stats = stage.main(stage_options("1_download", data_dir=data, work_dir=tmp_path / "w", split="train",
                                     skip_bad_rows=True))["train"]
    saved = json.loads((tmp_path / "w" / "images" / "train" / "stats.json").read_text())
    assert saved["rows_in"] == 4
    assert {k: len(v) for k, v in saved["rows_skipped_bad_input"].items()} == {"price_not_a_number": 1,
                                                                           "unsafe_sample_id": 1}
    assert saved["status_counts"] == stats["status_counts"] == {"no_link": 2}


def test_stage3_counts_skipped_rows(tmp_path):
    data = _stage_data(tmp_path)
    stage = load_stage("3_create_jsonl")
    with pytest.raises(CatalogError, match="etc/x"):
        stage.main(stage_options("3_create_jsonl", data_dir=data, work_dir=tmp_path / "w"))
    stats = stage.main(stage_options("3_create_jsonl", data_dir=data, work_dir=tmp_path / "w",
                                     skip_bad_rows=True, validation_split_ratio=0.0))
    saved = json.loads((tmp_path / "w" / "jsonl" / "stats.json").read_text())
    assert saved["skipped_train_rows"] == stats["skipped_train_rows"] == {"price_not_a_number": 1,
                                                                          "unsafe_sample_id": 1}
    assert saved["rows"] == {"train": 2, "validation": 0, "test": 1}
    assert saved["input_rows"] == {"train": 4, "test": 1}
    assert any("bad_price" in entry for entry in saved["skipped_train_row_ids"]["price_not_a_number"])

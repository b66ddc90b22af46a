"""Reading `train.csv` / `test.csv`: the columns, the ids and the prices are checked before any work.

Bad rows are listed by line and sample_id in one error, or, when the caller allows skipping (train only),
dropped and returned with their reasons so that the stage can count them in its stats.json.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from common.errors import PipelineError
from common.fsio import is_safe_id

REQUIRED = {"train": ["sample_id", "catalog_content", "image_link", "price"],
            "test": ["sample_id", "catalog_content", "image_link"]}
MAX_PRICE = 1_000_000.0  # above this a "price" is a data error (e.g. 1e308), not a product
MAX_LISTED = 20


class CatalogError(PipelineError, ValueError):
    """Input that cannot be used; the message names the file and the offending rows."""


@dataclass
class Catalog:
    split: str
    path: Path
    rows: pd.DataFrame                     # the usable rows, in file order, all columns as str (+ price float)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> sample_ids (or line labels)
    n_input: int = 0


def _describe(row: int, sid: str) -> str:
    return f"row {row} (sample_id {sid!r})"


def _price(text: str) -> tuple[float | None, str | None]:
    try:
        value = float(text)
    except ValueError:
        return None, "price_not_a_number"
    if not math.isfinite(value):
        return None, "price_not_finite"
    if value <= 0:
        return None, "price_not_positive"
    if value > MAX_PRICE:
        return None, "price_too_large"
    return value, None


def _check_field_counts(path: Path, text: str) -> None:
    """Every data row must have as many fields as the header: an unquoted comma in the catalog text shifts every
    column after it, which the parser would otherwise take silently (or read the extra field as an index).
    Rows are numbered as in the other errors (1-based data rows, blank lines not counted)."""
    try:
        records = [r for r in csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""), strict=True) if r]
    except csv.Error:
        return  # broken quoting: the CSV parser below names it
    if not records:
        return
    width = len(records[0])
    bad = [(n, len(r)) for n, r in enumerate(records[1:], 1) if len(r) != width]
    if not bad:
        return
    (first, got), rest = bad[0], bad[1:MAX_LISTED]
    more = "" if not rest else ("; also row(s) " + ", ".join(f"{n} ({k} fields)" for n, k in rest)
                               + (f", ... ({len(bad)} in all)" if len(bad) > MAX_LISTED else ""))
    raise CatalogError(f"{path}: row {first} has {got} fields, the header has {width} "
                       f"(an unquoted comma?){more}")


def read_catalog(path: Path | str, split: str, skip_bad_rows: bool = False) -> Catalog:
    """Read one split's CSV. Test rows are never skipped: a bad test row is always an error."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: file not found (expected the {split} catalog)")
    raw = path.read_bytes()
    if b"\x00" in raw:  # the CSV parser would silently cut a field at a NUL byte
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise CatalogError(f"{path}: NUL byte at line {line}; the file is binary or corrupt")
    try:
        _check_field_counts(path, raw.decode("utf-8"))
        # index_col=False: a row with one field too many must not turn its first field into an index
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, encoding="utf-8",
                         quoting=csv.QUOTE_MINIMAL, index_col=False)
    except UnicodeDecodeError as err:
        raise CatalogError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except pd.errors.EmptyDataError:
        raise CatalogError(f"{path}: empty file, expected a header {','.join(REQUIRED[split])}") from None
    except pd.errors.ParserError as err:
        raise CatalogError(f"{path}: not a valid CSV: {err}") from None
    missing = [c for c in REQUIRED[split] if c not in df.columns]
    if missing:
        raise CatalogError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise CatalogError(f"{path}: no rows")
    df = df[[c for c in REQUIRED[split]]].copy()  # extra columns are ignored
    df["line"] = range(1, len(df) + 1)  # 1-based data row (a cell may span several file lines)

    problems: dict[str, list[str]] = {}
    bad = pd.Series(False, index=df.index)

    def flag(mask: pd.Series, reason: str) -> None:
        nonlocal bad
        mask = mask & ~bad
        if mask.any():
            problems.setdefault(reason, []).extend(
                _describe(ln, sid) for ln, sid in zip(df.loc[mask, "line"], df.loc[mask, "sample_id"]))
            bad = bad | mask

    ids = df["sample_id"].str.strip()
    flag(ids == "", "empty_sample_id")
    flag(~ids.map(is_safe_id), "unsafe_sample_id")
    flag(ids.duplicated(keep=False), "duplicate_sample_id")
    df["sample_id"] = ids
    if split == "train":
        parsed = df["price"].str.strip().map(_price)
        df["price"] = [p for p, _ in parsed]
        for reason in ("price_not_a_number", "price_not_finite", "price_not_positive", "price_too_large"):
            flag(pd.Series([r == reason for _, r in parsed], index=df.index), reason)

    if problems and (split == "test" or not skip_bad_rows):
        lines = []
        for reason, rows in problems.items():
            shown = ", ".join(rows[:MAX_LISTED]) + (f", ... ({len(rows)} in all)" if len(rows) > MAX_LISTED else "")
            lines.append(f"  {reason}: {shown}")
        hint = "" if split == "test" else "\n(pass --skip-bad-rows to drop these train rows and count them)"
        raise CatalogError(f"{path}: {sum(map(len, problems.values()))} bad row(s):\n" + "\n".join(lines) + hint)
    rows = df[~bad].drop(columns=["line"]).reset_index(drop=True)
    return Catalog(split=split, path=path, rows=rows, skipped=problems, n_input=len(df))

"""The work folder's fixed names, shared by every stage (users and later stages rely on them)."""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "test")
JSONL_SPLITS = ("train", "validation", "test")


def images_dir(work: Path, split: str) -> Path:
    return Path(work) / "images" / split


def resized_dir(work: Path, split: str) -> Path:
    return Path(work) / "resized" / split


def jsonl_dir(work: Path) -> Path:
    return Path(work) / "jsonl"


def jsonl_path(work: Path, split: str) -> Path:
    return jsonl_dir(work) / f"{split}.jsonl"


def preprocessed_dir(work: Path, split: str) -> Path:
    return Path(work) / "preprocessed" / split


def shards_dir(work: Path, split: str) -> Path:
    return Path(work) / f"webdataset_{split}"


def models_dir(work: Path) -> Path:
    return Path(work) / "models"


def train_output_dir(work: Path) -> Path:
    return Path(work) / "train"


def test_out_path(work: Path) -> Path:
    return Path(work) / "test_out.csv"


def resolve_splits(value: str, choices=SPLITS) -> list[str]:
    return list(choices) if value == "all" else [value]

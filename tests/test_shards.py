"""Stage 5 and the shard readers: every JSONL row in exactly one shard, reruns reuse complete shards and
never pick up partial ones, ranks x dataloader workers read each sample once, doctored or damaged
shards are reported by name (or skipped when asked), and the map-style view agrees with the stream."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.data.sample_store import npy_bytes
from common.data.shards import (IndexableWebDataset, ShardError, ShardStream, decode, iter_shard, load_index,
                           pack_split, save_index, write_tar)
from conftest import run_stage5

SPLITS = ("train", "validation", "test")


def stream_ids(folder: Path, spec, **kw) -> list[str]:
    return [s["sample_id"] for s in ShardStream(folder, spec, **kw)]


def file_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------- (e) stages 4-5 flow

def test_every_row_is_in_exactly_one_shard_and_stats_account_for_all(encoded_demo):
    for split in SPLITS:
        rows = [r["sample_id"] for r in encoded_demo.rows(split)]
        s4 = json.loads((encoded_demo.pre_dir(split) / "stats.json").read_text())
        assert s4["rows_in"] == len(rows) and sum(s4["counts"].values()) == len(rows)
        assert s4["counts"].get("ok", 0) + s4["counts"].get("skipped", 0) == len(rows), s4["counts"]
        index = load_index(encoded_demo.shards_dir(split))
        in_shards = [sid for shard in index["shards"] for sid in shard["sample_ids"]]
        assert in_shards == rows, split  # exactly once each, in JSONL order
        assert index["samples"] == len(rows) == sum(s["samples"] for s in index["shards"])
        assert all(s["samples"] <= encoded_demo.samples_per_shard for s in index["shards"])
        s5 = json.loads((encoded_demo.shards_dir(split) / "stats.json").read_text())
        assert s5["rows_in"] == len(rows) == s5["samples"] + s5["missing_from_stage4"]
        assert s5["missing_from_stage4"] == 0 and s5["shards"] == len(index["shards"])
        assert s5["bytes"] == sum((encoded_demo.shards_dir(split) / s["name"]).stat().st_size for s in index["shards"])
        on_disk = sorted(p.name for p in encoded_demo.shards_dir(split).glob("*.tar"))
        assert on_disk == sorted(s["name"] for s in index["shards"])
        # what the shards hold is what the index says, shard by shard
        for shard in index["shards"]:
            got = [json.loads(r["metadata.json"])["sample_id"]
                   for r in iter_shard(encoded_demo.shards_dir(split) / shard["name"])]
            assert got == shard["sample_ids"]
    assert len(load_index(encoded_demo.shards_dir("train"))["shards"]) == 10  # 47 rows, 5 a shard


def test_stage5_rerun_reuses_complete_shards_and_never_partial_ones(encoded_demo, tmp_path):
    demo = encoded_demo.copy(tmp_path / "work")
    folder = demo.shards_dir("train")
    spec = demo.spec()
    expected = stream_ids(folder, spec)
    before = file_state(folder)
    shard_names = [s["name"] for s in load_index(folder)["shards"]]

    stats = run_stage5(demo.work_dir, split="train", samples_per_shard=5)["train"]
    assert stats["shards_reused"] == len(shard_names) and stats["shards_written"] == 0
    assert {k: v for k, v in file_state(folder).items() if k.endswith(".tar")} == \
        {k: v for k, v in before.items() if k.endswith(".tar")}

    # A run killed while writing shard 3 leaves its temp file (half a shard); another shard was deleted,
    # a third one truncated after the fact (a bad copy). The rerun rewrites those two and drops the temp.
    data = (folder / shard_names[3]).read_bytes()
    temp = folder / f".{shard_names[3]}.k1ll3d.tmp"
    temp.write_bytes(data[:len(data) // 2])
    (folder / shard_names[5]).unlink()
    truncated = folder / shard_names[7]
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    assert stream_ids(folder, spec, skip_corrupt=True) != expected  # the damage is real
    stats = run_stage5(demo.work_dir, split="train", samples_per_shard=5)["train"]
    assert stats["shards_written"] == 2 and stats["shards_reused"] == len(shard_names) - 2
    assert not temp.exists() and not list(folder.glob(".*"))
    assert stream_ids(folder, spec) == expected
    after = file_state(folder)
    assert {n: after[n] for n in shard_names if n not in (shard_names[5], shard_names[7])} == \
        {n: before[n] for n in shard_names if n not in (shard_names[5], shard_names[7])}

    # A different layout starts over rather than mixing two.
    stats = run_stage5(demo.work_dir, split="train", samples_per_shard=20)["train"]
    assert stats["shards"] == 3 and stats["shards_written"] == 3 and stats["shards_reused"] == 0
    assert sorted(p.name for p in folder.glob("*.tar")) == [s["name"] for s in load_index(folder)["shards"]]
    assert stream_ids(folder, spec) == expected


def test_a_partial_temp_shard_is_never_read(encoded_demo, tmp_path):
    demo = encoded_demo.copy(tmp_path / "work")
    folder = demo.shards_dir("validation")
    spec = demo.spec()
    expected = stream_ids(folder, spec)
    first = load_index(folder)["shards"][0]["name"]
    (folder / f".{first}.x.tmp").write_bytes((folder / first).read_bytes())      # a finished-looking temp
    (folder / ".validation-shard-000009.tar.y.tmp").write_bytes(b"\0" * 700)   # a partial one
    assert stream_ids(folder, spec) == expected
    ds = IndexableWebDataset(folder, spec)
    assert [ds[i]["sample_id"] for i in range(len(ds))] == expected


# --------------------------------------------------------------------------------------------- (b) doctored samples

def _doctor(raw: dict, **changes) -> dict:
    out = {k: v for k, v in raw.items() if not k.startswith("__")}
    out.update(changes)
    return out


def test_decode_rejects_doctored_samples_naming_the_shard(encoded_demo, tmp_path):
    spec = encoded_demo.spec()
    src = encoded_demo.shards_dir("train")
    raws = [r for s in load_index(src)["shards"] for r in iter_shard(src / s["name"])]
    raw = next(r for r in raws if "pixel_values.npy" in r)
    meta = json.loads(raw["metadata.json"])
    ids = np.load(io.BytesIO(raw["input_ids.npy"]))
    k = int(np.flatnonzero(ids == meta["image_token_id"])[0])
    patches = np.load(io.BytesIO(raw["pixel_values.npy"]))
    t, h, w = meta["image_grid_thw"][0]
    doctored = {
        "image-pad token dropped": _doctor(raw, **{"input_ids.npy": npy_bytes(np.delete(ids, k))}),
        "grid changed": _doctor(raw, **{"metadata.json": json.dumps(
            dict(meta, image_grid_thw=[[t, h, w + 2]])).encode()}),
        "patches cut": _doctor(raw, **{"pixel_values.npy": npy_bytes(patches[:-4])}),
        "metadata missing": {k2: v for k2, v in _doctor(raw).items() if k2 != "metadata.json"},
    }
    good = [(f"s{i:09d}", _doctor(r)) for i, r in enumerate(raws[:3])]
    for n, (what, bad) in enumerate(doctored.items()):
        folder = tmp_path / f"doctored{n}"
        name = "train-shard-000000.tar"
        size = write_tar(folder / name, good[:2] + [("s000000099", bad)] + good[2:])
        save_index(folder, {"split": "train", "samples": 4, "samples_per_shard": 4,
                            "shards": [{"name": name, "samples": 4, "bytes": size, "sample_ids": []}]})
        with pytest.raises(ShardError) as err:
            list(ShardStream(folder, spec))
        assert str(folder / name) in str(err.value), what
        with pytest.raises(ShardError) as err:
            IndexableWebDataset(folder, spec)[2]
        assert str(folder / name) in str(err.value), what
        with pytest.raises(ShardError) as err:
            decode(dict(bad, __url__=str(folder / name), __key__="s000000099"), spec)
        assert str(folder / name) in str(err.value) and "s000000099" in str(err.value), what
    decode(raw, spec)  # the undoctored sample decodes


# --------------------------------------------------------------------------------------------- (f) ranks x workers

def _read_as_rank(monkeypatch, folder: Path, spec, rank: int, world: int, workers: int, **kw) -> list[str]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = DataLoader(ShardStream(folder, spec, **kw), batch_size=3, num_workers=workers,
                        collate_fn=lambda batch: [s["sample_id"] for s in batch])
    return [sid for batch in loader for sid in batch]


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("per_shard", [5, 20], ids=["10_shards_4_slots", "3_shards_4_slots"])
def test_two_ranks_two_workers_read_every_sample_once(encoded_demo, monkeypatch, tmp_path, per_shard, shuffle):
    spec = encoded_demo.spec()
    rows = encoded_demo.rows("train")
    folder = encoded_demo.shards_dir("train")
    if per_shard != encoded_demo.samples_per_shard:
        folder = tmp_path / "shards"
        pack_split(rows, encoded_demo.pre_dir("train"), folder, "train", per_shard)
    n_shards = len(load_index(folder)["shards"])
    assert (n_shards > 4) if per_shard == 5 else (n_shards < 4)
    per_rank = [_read_as_rank(monkeypatch, folder, spec, rank, 2, 2, shuffle=shuffle, shuffle_buffer=4, seed=3)
                for rank in (0, 1)]
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == len(rows), "a sample read twice or never"
    assert set(seen) == {r["sample_id"] for r in rows}
    assert all(per_rank), "each rank gets samples"
    if n_shards % 2 == 0:  # shards are dealt to ranks first: here 5 each (dealt by slot: 6 and 4)
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= per_shard, [len(p) for p in per_rank]
    if shuffle:
        ordered = [_read_as_rank(monkeypatch, folder, spec, rank, 2, 2) for rank in (0, 1)]
        assert per_rank != ordered, "shuffle=True changed nothing"


# --------------------------------------------------------------------------------------------- (g) damaged shards

def _member_offsets(path: Path) -> list[int]:
    import tarfile
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("damage", ["cut_mid_member", "cut_between_samples", "garbage", "missing"])
def test_a_damaged_shard_is_named_or_skipped(encoded_demo, tmp_path, damage):
    spec = encoded_demo.spec()
    folder = tmp_path / "shards"
    shutil.copytree(encoded_demo.shards_dir("train"), folder)
    index = load_index(folder)
    victim = folder / index["shards"][2]["name"]
    data = victim.read_bytes()
    if damage == "cut_mid_member":
        victim.write_bytes(data[:len(data) // 2 + 100])
    elif damage == "cut_between_samples":  # a clean cut after two whole samples: tar reads it as shorter
        offsets = _member_offsets(victim)
        members_per_sample = len(offsets) // index["shards"][2]["samples"]
        victim.write_bytes(data[:offsets[2 * members_per_sample]])
    elif damage == "garbage":
        victim.write_bytes(os.urandom(len(data)))
    else:
        victim.unlink()

    with pytest.raises(ShardError) as err:
        list(ShardStream(folder, spec))
    assert str(victim) in str(err.value)
    with pytest.raises(ShardError) as err:
        IndexableWebDataset(folder, spec)
    assert str(victim) in str(err.value)

    stream = ShardStream(folder, spec, skip_corrupt=True)
    got = [s["sample_id"] for s in stream]
    assert stream.corrupt == [str(victim)]
    others = [sid for s in index["shards"] if s["name"] != victim.name for sid in s["sample_ids"]]
    assert len(got) == len(set(got)) and set(others) <= set(got) <= set(others) | set(index["shards"][2]["sample_ids"])


# --------------------------------------------------------------------------------------------- map-style view

def test_indexable_dataset_agrees_with_the_stream(encoded_demo):
    spec = encoded_demo.spec()
    for split in SPLITS:
        folder = encoded_demo.shards_dir(split)
        stream = list(ShardStream(folder, spec))
        ds = IndexableWebDataset(folder, spec)
        assert len(ds) == len(stream) == load_index(folder)["samples"] == len(encoded_demo.rows(split))
        for i, want in enumerate(stream):
            got = ds[i]
            assert want.pop("epoch") == 0  # the stream says which pass it is on; a map-style view has no passes
            assert got.keys() == want.keys()
            for key, value in want.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got[key], value), (split, i, key)
                else:
                    assert got[key] == value, (split, i, key)
        assert [s["original_index"] for s in stream] == list(range(len(stream)))
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_a_bad_sample_is_left_out_alone_when_ranks_share_a_shard(encoded_demo, monkeypatch, tmp_path):
    """With fewer shards than ranks, every rank reads every shard and keeps every n-th sample. A sample that
    fails to decode (skip_corrupt) is left out and every other sample is still read exactly once."""
    spec = encoded_demo.spec()
    rows = encoded_demo.rows("train")
    folder = tmp_path / "shards"
    pack_split(rows, encoded_demo.pre_dir("train"), folder, "train", 20)
    index = load_index(folder)
    assert len(index["shards"]) == 3
    victim = folder / index["shards"][0]["name"]
    samples = [dict(s) for s in iter_shard(victim)]
    bad = json.loads(samples[2]["metadata.json"])["sample_id"]
    samples[2]["input_ids.npy"] = b"not an array"
    index["shards"][0]["bytes"] = write_tar(victim, [(s.pop("__key__"), {k: v for k, v in s.items()
                                                                         if not k.startswith("__")}) for s in samples])
    save_index(folder, index)
    per_rank = [_read_as_rank(monkeypatch, folder, spec, rank, 4, 1, skip_corrupt=True) for rank in range(4)]
    seen = [sid for p in per_rank for sid in p]
    assert len(seen) == len(set(seen)), "a sample read twice"
    assert set(seen) == {r["sample_id"] for r in rows} - {bad}

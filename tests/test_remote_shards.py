"""Beyond one machine: shards read from URLs and patterns, the data stages split into parts, two torchrun nodes."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.demo.imageserver import ImageServer
from conftest import ROOT, load_stage, run_script, stage_options
from test_end_to_end import free_port

FAST = ["--global-batch-size", "4", "--workers", "1", "--eval-steps", "0", "--eval-samples", "4",
        "--logging-steps", "1", "--lora-r", "8", "--lora-alpha", "8", "--prefetch-factor", "1"]


@pytest.fixture
def shard_server(shard_work):
    """shard_work's folder served over HTTP from 127.0.0.1 (its shards under /files/webdataset_SPLIT/)."""
    with ImageServer(shard_work.work_dir) as srv:
        yield srv


def test_stage7_over_an_http_brace_pattern_writes_the_local_file(shard_work, shard_server, tmp_path):
    local, remote = shard_work.copy(tmp_path / "local"), shard_work.copy(tmp_path / "remote")
    base = ["--adapter", "none", "--model", "tiny", "--batch-size", "2", "--workers", "1"]
    r = run_script("7_infer.py", "--work-dir", str(local.work_dir), "--data-dir", str(local.data_dir), *base)
    assert r.returncode == 0, r.stderr[-3000:]
    count = len(json.loads((shard_work.work_dir / "webdataset_test" / "index.json").read_text())["shards"])
    pattern = shard_server.url("/files/webdataset_{split}/{split}-shard-{000000..%06d}.tar" % (count + 2))
    shutil.rmtree(remote.work_dir / "webdataset_test")  # nothing local to fall back on
    r = run_script("7_infer.py", "--work-dir", str(remote.work_dir), "--data-dir", str(remote.data_dir), *base,
                   "--shards", pattern)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (remote.work_dir / "test_out.csv").read_bytes() == (local.work_dir / "test_out.csv").read_bytes()
    assert shard_server.hits["/files/webdataset_test/index.json"] == 1


def test_a_missing_remote_shard_is_named_or_skipped_and_counted(shard_work, shard_server, tmp_path):
    from common.data.shards import ShardStream
    from common.data.shard_source import ShardError
    work = shard_work.copy(tmp_path / "w").work_dir
    with ImageServer(work) as srv:
        index = json.loads((work / "webdataset_test" / "index.json").read_text())
        victim = index["shards"][1]["name"]
        (work / "webdataset_test" / victim).unlink()
        url = srv.url("/files/webdataset_test")
        spec = shard_work_spec(shard_work)
        with pytest.raises(ShardError, match=f"cannot read shard {url}/{victim}"):
            list(ShardStream(url, spec))
        stream = ShardStream(url, spec, skip_corrupt=True)
        got = [s["sample_id"] for s in stream]
        assert stream.corrupt == [f"{url}/{victim}"]
        assert len(got) == index["samples"] - index["shards"][1]["samples"]
        with pytest.raises(ShardError, match="cannot read the shard index"):
            ShardStream(srv.url("/files/no_such_split"), spec)


@pytest.mark.parametrize("command, reason", [
    # the fetch's output ends before it exits: tarfile sees an empty stream first, the exit status is the cause
    ("exec >&-; sleep 1; exit 3", "cannot read shard .*: the command exited with status 3"),
    ("exit 0", "corrupt or truncated shard .*: empty file"),
    ("yes not-a-tar-archive | head -c 700", "corrupt or truncated shard .*: invalid header"),  # fixed bytes
])
def test_a_failed_fetch_is_told_apart_from_bad_bytes(command, reason):
    from common.data.shard_source import ShardError, iter_remote_shard
    with pytest.raises(ShardError, match=reason):
        list(iter_remote_shard(f"pipe:{command}"))


def test_a_server_that_never_answers_fails_the_fetch_instead_of_hanging(monkeypatch):
    """A server that accepts the connection and sends nothing: curl gives up after STALL_S without a byte, and the
    error names the shard and why, for the index and for a shard alike."""
    import socket
    import time

    from common.data import shard_source
    monkeypatch.setattr(shard_source, "STALL_S", 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes the handshake; nobody answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/webdataset_test"
        started = time.monotonic()
        with pytest.raises(shard_source.ShardError, match=r"cannot read shard .*shard-000000.tar: curl exited with "
                                                          r"status 28 \(no answer, or stalled for 1 s\)"):
            list(shard_source.iter_remote_shard(f"{url}/shard-000000.tar"))
        with pytest.raises(shard_source.ShardError, match=r"cannot read the shard index .*index.json: curl exited "
                                                          r"with status 28"):
            shard_source._fetch_index(f"{url}/index.json")
        assert time.monotonic() - started < 120


def shard_work_spec(shard_work):
    from common.data.encode import ImageSpec
    return ImageSpec.from_model(shard_work.model_path)


def _sample_hashes(folder: Path) -> list[str]:
    """Every sample of every shard the folder's index lists: its key and members, hashed; sorted."""
    from common.data.shards import iter_shard
    index = json.loads((folder / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        for raw in iter_shard(folder / shard["name"]):
            body = b"".join(k.encode() + raw[k] for k in sorted(raw) if not k.startswith("__"))
            out.append(hashlib.sha256(raw["__key__"].encode() + body).hexdigest())
    assert len(out) == index["samples"]
    return sorted(out)


def test_data_stages_in_two_parts_give_the_samples_of_one(make_demo, tmp_path, tiny_model_dir):
    demo = make_demo(30, 10)
    fast = dict(concurrency=4, timeout_s=2.0, retries=1, backoff_s=0.02, allow_private_hosts=True)
    s4 = {"model": str(tiny_model_dir), "workers": 1, "min_pixels": 12544, "max_pixels": 25088}

    def stages(work: Path, parts: int) -> None:
        for i in range(parts):
            part = f"{i}/{parts}"
            load_stage("1_download").main(stage_options("1_download", data_dir=demo.data_dir, work_dir=work, part=part,
                                                        **fast))
            load_stage("2_resize").main(stage_options("2_resize", work_dir=work, workers=1, part=part,
                                                      min_pixels=12544, max_pixels=25088))
        load_stage("3_create_jsonl").main(stage_options("3_create_jsonl", data_dir=demo.data_dir, work_dir=work,
                                                        validation_split_ratio=0.2))
        stage4, stage5 = load_stage("4_preprocess"), load_stage("5_convert")
        for i in range(parts):
            stage4.main(stage4.PreprocessOptions(work_dir=work, part=f"{i}/{parts}", **s4))
            stage5.main(stage5.ConvertOptions(work_dir=work, samples_per_shard=4, part=f"{i}/{parts}"))
        if parts > 1:
            stage5.main(stage5.ConvertOptions(work_dir=work, merge_parts=parts))

    stages(tmp_path / "one", 1)
    stages(tmp_path / "two", 2)
    for split in ("train", "validation", "test"):
        one, two = tmp_path / "one" / f"webdataset_{split}", tmp_path / "two" / f"webdataset_{split}"
        assert any("-part-1-of-2-" in p.name for p in two.glob("*.tar"))
        assert _sample_hashes(two) == _sample_hashes(one)
    manifests = sorted(p.name for p in (tmp_path / "two" / "images" / "train").glob("manifest*.csv"))
    assert manifests == ["manifest.part-0-of-2.csv", "manifest.part-1-of-2.csv"]


def _torchrun_node(node: int, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "--nproc_per_node", "1", str(ROOT / "6_train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=True)


def _first_epoch(path: Path) -> list[str]:
    """A rank's reads in the first epoch (its recording holds `sample_id<TAB>epoch` lines)."""
    return [line.split("\t")[0] for line in path.read_text().splitlines() if line.endswith("\t0")]


@pytest.mark.slow
def test_two_nodes_over_http_shards_train_what_one_node_trains_from_local_ones(shard_work, shard_server, tmp_path):
    steps = ["--max-steps", "14", "--save-steps", "100"]
    one = run_script("6_train.py", "--work-dir", str(shard_work.work_dir), "--output-dir", str(tmp_path / "one"),
                     *steps, *FAST, torchrun=2, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    seen, port = tmp_path / "seen", free_port()
    shards = shard_server.url("/files/webdataset_{split}")
    args = ["--work-dir", str(shard_work.work_dir), "--output-dir", str(tmp_path / "two"), "--shards", shards,
            "--record-samples", str(seen), *steps, *FAST]
    nodes = [_torchrun_node(n, port, *args) for n in (0, 1)]
    outs = [p.communicate(timeout=900) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-3000:] for o in outs]
    shares = [_first_epoch(seen / f"rank{r}-worker0.txt") for r in (0, 1)]
    train_ids = {s for shard in json.loads((shard_work.work_dir / "webdataset_train" / "index.json").read_text())
                 ["shards"] for s in shard["sample_ids"]}
    assert not set(shares[0]) & set(shares[1]) and set(shares[0]) | set(shares[1]) == train_ids
    from safetensors.torch import load_file
    import torch
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" /
                                                                                "adapter_model.safetensors")
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, msg=name)


@pytest.mark.slow
def test_a_killed_node_ends_the_other_with_one_line_and_both_resume(shard_work, shard_server, tmp_path):
    port, out = free_port(), tmp_path / "train"
    args = ["--work-dir", str(shard_work.work_dir), "--output-dir", str(out), "--max-steps", "300", "--save-steps",
            "5", "--shards", shard_server.url("/files/webdataset_{split}"), *FAST]
    nodes = [_torchrun_node(n, port, *args) for n in (0, 1)]
    deadline = time.time() + 600
    while time.time() < deadline and not list(out.glob("checkpoint-*/COMPLETE")):
        assert all(p.poll() is None for p in nodes), [p.stderr.read()[-2000:] for p in nodes]
        time.sleep(0.1)
    # the node dies: its torchrun agent and the workers the agent started in sessions of their own
    subprocess.run(["pkill", "-9", "-P", str(nodes[1].pid)], check=False)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    killed_at = time.time()
    _, err = nodes[0].communicate(timeout=120)
    assert time.time() - killed_at < 60 and nodes[0].returncode != 0
    ours = [line for line in err.splitlines() if "6_train.py: error:" in line]
    assert len(ours) == 1 and "another rank stopped" in ours[0], err[-3000:]
    nodes[1].communicate(timeout=60)
    port = free_port()
    nodes = [_torchrun_node(n, port, *args) for n in (0, 1)]
    outs = [p.communicate(timeout=900) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-3000:] for o in outs]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 300 and int(stats["resumed_from"].rsplit("-", 1)[1]) >= 5

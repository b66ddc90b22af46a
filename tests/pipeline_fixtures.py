"""Fixtures for stages 4-7: the small demo encoded with the tiny model and packed into small shards.

Import the fixture into a test module (`from pipeline_fixtures import shard_work`) to use it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, load_stage

DEMO_PIXELS = {"min_pixels": 12544, "max_pixels": 25088}


@dataclass
class ShardWork:
    work_dir: Path
    data_dir: Path
    model_path: str

    def copy(self, dest: Path) -> "ShardWork":
        shutil.copytree(self.work_dir, dest, symlinks=True)
        return ShardWork(dest, self.data_dir, self.model_path)


def run_stages_4_5(work_dir: Path, samples_per_shard: int = 8) -> None:
    pre = load_stage("4_preprocess")
    pre.main(pre.PreprocessOptions(work_dir=work_dir, model="tiny", workers=1, max_length=512, **DEMO_PIXELS))
    conv = load_stage("5_convert")
    conv.main(conv.ConvertOptions(work_dir=work_dir, samples_per_shard=samples_per_shard))


@pytest.fixture(scope="session")
def shard_work(small_demo_work, tmp_path_factory) -> ShardWork:
    """Stages 1-5 done on the small demo (60 train / 20 test rows, some failed images), 8 samples a shard."""
    work = tmp_path_factory.mktemp("shard_work") / "work"
    shutil.copytree(small_demo_work.work_dir, work)
    run_stages_4_5(work)
    return ShardWork(work, small_demo_work.data_dir, str(work / "models" / "tiny"))


def run_script(script: str, *args: str, env_extra: dict | None = None, timeout: int = 600,
               torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
                              if torchrun else []) + [str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

"""Shared fixtures: the demo catalog served by a real loopback ImageServer, a stage loader, and one
small end-to-end work folder (stages 1-3 run once per session) that later test files can reuse.

    load_stage("1_download")      the stage module (file names start with a digit, so no plain import)
    make_demo(train_rows=..)      a fresh demo catalog + running server, in its own temp folder
    demo                          a tiny demo (20 train / 8 test rows), one per test
    small_demo_work               stages 1-3 run on ~60 train / 20 test rows with injected failures
    tiny_model_dir                the tiny Qwen2.5-VL, built once per session
    encoded_demo                  stages 4-5 on small_demo_work's JSONL (tiny model, demo pixels, 5 a shard)
    run_stage4 / run_stage5       a stage's main() in this process with test-sized options
"""
from __future__ import annotations

import csv
import importlib.util
import io
import shutil
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Optional real assets where a maintainer has put a copy (gitignored; there is no model hub here): the real
# Qwen2.5-VL tokenizer and processor config, and real catalog rows. Tests that need them say so when they are absent.
ASSETS = ROOT / "bench" / "assets"
REAL_PROCESSOR = Path(os.environ.get("QWEN_PROCESSOR_DIR", ASSETS / "qwen-processor"))
REAL_CATALOG = Path(os.environ.get("REAL_CATALOG_CSV", ASSETS / "real_catalog_2k.csv"))

from common.demo.catalog import write_demo  # noqa: E402
from common.demo.imageserver import ImageServer  # noqa: E402

_STAGES: dict[str, object] = {}


def load_stage(name: str):
    """Import a stage file such as '1_download' (or '1_download.py') once and return its module."""
    name = name[:-3] if name.endswith(".py") else name
    if name not in _STAGES:
        path = ROOT / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        _STAGES[name] = module
    return _STAGES[name]


# --------------------------------------------------------------------------------------------- helpers

def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_csv_rows(path: Path, rows: list[dict], header: list[str] | None = None) -> None:
    header = header or list(rows[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    Path(path).write_text(buf.getvalue(), encoding="utf-8")


def small_jpeg(path: Path, size=(64, 48), colour=(40, 90, 200), quality: int = 90) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=quality)
    return path.read_bytes()


def stage_options(stage: str, **kw):
    """The stage's options dataclass with its defaults, overridden by kw (no argv parsing)."""
    mod = load_stage(stage)
    cls = {"1_download": "DownloadOptions", "2_resize": "ResizeOptions", "3_create_jsonl": "JsonlOptions"}[stage]
    cfg = getattr(mod, cls)(**kw)
    problems = cfg.problems()
    assert not problems, problems
    return cfg


def _cpu_plan():
    from common.model.plan import Plan
    return Plan("CPU", "hf", "16bit", "float32", 4, 1, 0, False, None, None)


CPU_PLAN = _cpu_plan()  # what stage 6 plans on a CPU: transformers + peft, fp32, no checkpointing

# torch.testing.assert_close's default (rtol, atol) per dtype, as its documentation lists them
DEFAULT_TOLERANCES = {"torch.float64": (1e-7, 1e-7), "torch.float32": (1.3e-6, 1e-5), "torch.bfloat16": (1.6e-2, 1e-5),
                      "torch.float16": (1e-3, 1e-5)}


def assert_close_at_scale(got, want, msg=None) -> None:
    """assert_close with its dtype's tolerances, the absolute one taken relative to the tensor's largest magnitude:
    two paths that add the same terms in another order differ by a few ulps of those terms, which for an output
    near zero (one logit among thousands) is far more than that output's own ulps."""
    import torch
    rtol, atol = DEFAULT_TOLERANCES[str(want.dtype)]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), msg=msg)


# Fast retry settings for tests: the fault routes still fail or pass as in production, only sooner.
FAST_DOWNLOAD = dict(concurrency=8, timeout_s=2.0, retries=2, backoff_s=0.02, allow_private_hosts=True)


def run_stages_1_to_3(data_dir: Path, work_dir: Path, download=None, resize=None, jsonl=None) -> dict:
    s1 = load_stage("1_download").main(stage_options("1_download", data_dir=data_dir, work_dir=work_dir,
                                                     **{**FAST_DOWNLOAD, **(download or {})}))
    s2 = load_stage("2_resize").main(stage_options("2_resize", work_dir=work_dir, **{"workers": 2, **(resize or {})}))
    s3 = load_stage("3_create_jsonl").main(stage_options("3_create_jsonl", data_dir=data_dir, work_dir=work_dir,
                                                         **{"validation_split_ratio": 0.2, **(jsonl or {})}))
    return {"download": s1, "resize": s2, "jsonl": s3}


# --------------------------------------------------------------------------------------------- demo

@dataclass
class Demo:
    data_dir: Path          # train.csv, test.csv, images/, test_truth.json, demo.json
    server: ImageServer
    info: dict
    changes: dict = field(default_factory=dict)  # what a fixture changed in the CSVs, for the tests to check

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    def url(self, path: str) -> str:
        return self.server.url(path)

    def rows(self, split: str) -> list[dict]:
        return read_csv_rows(self.data_dir / f"{split}.csv")


def _start_demo(folder: Path, train_rows: int, test_rows: int, seed: int = 0, latency_s: float = 0.0,
                slow_s: float = 5.0) -> Demo:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    server = ImageServer(folder / "images", port=0, latency_s=latency_s, slow_s=slow_s).start()
    info = write_demo(folder, server.base_url, train_rows=train_rows, test_rows=test_rows, seed=seed)
    return Demo(folder, server, info)


@pytest.fixture
def make_demo(tmp_path_factory):
    """Factory: make_demo(train_rows=20, test_rows=8, seed=0, latency_s=0, slow_s=5) -> Demo."""
    started: list[Demo] = []

    def make(train_rows: int = 20, test_rows: int = 8, **kw) -> Demo:
        d = _start_demo(tmp_path_factory.mktemp("demo"), train_rows, test_rows, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.server.stop()


@pytest.fixture
def demo(make_demo) -> Demo:
    return make_demo(20, 8)


# --------------------------------------------------------------------------------------------- one end-to-end run

@dataclass
class DemoWork:
    demo: Demo
    work_dir: Path
    stats: dict             # {"download": {split: stats}, "resize": {split: stats}, "jsonl": stats}
    failing: dict           # split -> {sample_id: expected download status}
    shared_url: tuple       # (url, [sample_ids sharing it])

    @property
    def data_dir(self) -> Path:
        return self.demo.data_dir


@pytest.fixture(scope="session")
def small_demo_work(tmp_path_factory) -> DemoWork:
    """Stages 1-3 on 60 train / 20 test demo rows, with failures and a shared URL put in on purpose.

    Train: one 404, one HTML page, one truncated body; test: one 404 (test rows are never dropped).
    Two train rows share one image URL (it must be fetched once). The demo's own failing links stay.
    """
    d = _start_demo(tmp_path_factory.mktemp("demo_e2e"), 60, 20, seed=0)
    base = d.server.base_url
    train, test = d.rows("train"), d.rows("test")
    failing = {"train": {}, "test": {}}
    demo_faults = {"/fault/500/": "http_5xx", "/fault/404/": "http_404", "/fault/notimage/": "not_image"}
    for split, rows in (("train", train), ("test", test)):
        for row in rows:  # the demo's own failing links stay
            for route, status in demo_faults.items():
                if route in row["image_link"]:
                    failing[split][row["sample_id"]] = status
    for i, route, status in [(3, "404", "http_404"), (5, "notimage", "not_image"), (9, "truncated", "truncated")]:
        sid = train[i]["sample_id"]
        name = train[i]["image_link"].rsplit("/", 1)[1]
        train[i]["image_link"] = f"{base}/fault/{route}/{name}"
        failing["train"][sid] = status
    test[2]["image_link"] = f"{base}/fault/404/{test[2]['sample_id']}.jpg"
    failing["test"][test[2]["sample_id"]] = "http_404"
    train[12]["image_link"] = train[11]["image_link"]
    shared = (train[11]["image_link"], [train[11]["sample_id"], train[12]["sample_id"]])
    write_csv_rows(d.data_dir / "train.csv", train)
    write_csv_rows(d.data_dir / "test.csv", test)
    work = tmp_path_factory.mktemp("work_e2e")
    try:
        stats = run_stages_1_to_3(d.data_dir, work)
        hits = dict(d.server.hits)
        yield DemoWork(d, work, {**stats, "hits": hits}, failing, shared)
    finally:
        d.server.stop()


# --------------------------------------------------------------------------------------------- stages 4-5

DEMO_PIXELS = {"min_pixels": 12544, "max_pixels": 25088}   # run.sh's demo sizes: tiny images, fast tests


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL (tokenizer, chat template, image-processor config), built once per session."""
    from common.demo.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny")


def run_stage4(work_dir: Path, model: Path | str, **kw) -> dict:
    """4_preprocess.main in this process (workers=1, demo pixel bounds unless kw says otherwise)."""
    mod = load_stage("4_preprocess")
    cfg = mod.PreprocessOptions(work_dir=Path(work_dir), model=str(model), **{"workers": 1, **DEMO_PIXELS, **kw})
    problems = cfg.problems()
    assert not problems, problems
    return mod.main(cfg)


def run_stage5(work_dir: Path, **kw) -> dict:
    mod = load_stage("5_convert")
    cfg = mod.ConvertOptions(work_dir=Path(work_dir), **kw)
    problems = cfg.problems()
    assert not problems, problems
    return mod.main(cfg)


@dataclass
class EncodedDemo:
    work_dir: Path          # jsonl/, preprocessed/{split}/, webdataset_{split}/
    model_path: Path
    stage4: dict            # split -> stage 4's stats
    stage5: dict            # split -> stage 5's stats
    samples_per_shard: int
    demo_work: "DemoWork"

    def rows(self, split: str) -> list[dict]:
        from common.data.chat_jsonl import read_jsonl
        return read_jsonl(self.work_dir / "jsonl" / f"{split}.jsonl")

    def pre_dir(self, split: str) -> Path:
        return self.work_dir / "preprocessed" / split

    def shards_dir(self, split: str) -> Path:
        return self.work_dir / f"webdataset_{split}"

    def spec(self):
        from common.data.encode import ImageSpec
        return ImageSpec.from_model(str(self.model_path))

    def copy(self, dest: Path) -> "EncodedDemo":
        """A private copy of the work folder, for tests that rerun stages or damage files."""
        shutil.copytree(self.work_dir, dest)
        return EncodedDemo(dest, self.model_path, self.stage4, self.stage5, self.samples_per_shard, self.demo_work)


@pytest.fixture(scope="session")
def encoded_demo(small_demo_work, tiny_model_dir, tmp_path_factory) -> EncodedDemo:
    """Stages 4-5 on small_demo_work's JSONL (47 train / 13 validation / 20 test rows, some text-only),
    tiny model, demo pixel bounds, 5 samples a shard. Treat as read-only: use .copy() to change it."""
    work = tmp_path_factory.mktemp("work_45") / "work"
    shutil.copytree(small_demo_work.work_dir / "jsonl", work / "jsonl")  # rows name the images by absolute path
    s4 = run_stage4(work, tiny_model_dir)
    s5 = run_stage5(work, samples_per_shard=5)
    return EncodedDemo(work, tiny_model_dir, s4, s5, 5, small_demo_work)


# --------------------------------------------------------------------------------------------- stages 4-7



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


def kill_script_when(script: str, *args: str, ready, timeout: float = 300) -> None:
    """Start a stage, and kill -9 it once `ready()` is true (or it has ended, or `timeout` has passed)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_script(script: str, *args: str, env_extra: dict | None = None, timeout: int = 600,
               torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
                              if torchrun else []) + [str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

"""The speed levers are fenced: each names the library code it re-implements or depends on, whose source must be
what it was written against, and outside the tested library versions the levers are off and the library's own
path runs."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import logging

import pytest
import torch

from common import speed
from conftest import CPU_PLAN, load_stage


def source_sha(ref: str) -> str:
    module, qualified = ref.split(":")
    obj = importlib.import_module(module)
    for part in qualified.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("lever", [name for name, lever in speed.LEVERS.items() if lever.replaces])
def test_the_library_code_each_lever_replaces_is_unchanged(lever):
    changed = [ref for ref in speed.LEVERS[lever].replaces if source_sha(ref) != speed.SOURCE_SHA256[ref]]
    assert not changed, (f"lever {lever}: the library changed {changed} since the lever was written; check the lever "
                         "against the new code, then record the new hashes in common/speed/__init__.py")


def test_every_lever_names_tested_libraries_and_the_installed_ones_are_tested():
    for lever in speed.LEVERS.values():
        assert lever.libraries and set(lever.libraries) <= set(speed.TESTED), lever.name
    assert all(speed.version_tested(library) for library in speed.TESTED)


def test_an_untested_transformers_turns_its_levers_off_with_one_warning(shard_work, tmp_path, monkeypatch, caplog):
    """Stage 6 in this process with transformers reported as 5.99: one warning, the levers that reach into
    transformers off, and training runs the library's path to the end."""
    from common import options
    real = speed.installed_version
    monkeypatch.setattr(speed, "installed_version", lambda lib: "5.99.0" if lib == "transformers" else real(lib))
    monkeypatch.setattr(speed, "_warned", set())
    stage = load_stage("6_train")
    cfg = options.parse(stage.TrainConfig, [
        "--work-dir", str(shard_work.work_dir), "--output-dir", str(tmp_path / "train"), "--max-steps", "2",
        "--batch-size", "2", "--grad-accum", "1", "--workers", "0", "--eval-steps", "0", "--eval-samples", "4"])
    with caplog.at_level(logging.WARNING, logger="speed"):
        speedups = speed.Speedups("hf", cuda=False)
        again = speed.Speedups("hf", cuda=False)
    warnings = [r for r in caplog.records if "transformers 5.99.0 is not a version" in r.getMessage()]
    assert len(warnings) == 1
    fenced = {n for n, lever in speed.LEVERS.items() if "transformers" in lever.libraries}
    assert not fenced & set(speedups.active()) and speedups.active() == again.active()
    stats = stage.main(cfg)
    assert stats["steps"] == 2 and not fenced & set(stats["speed_levers"])


def test_untested_levers_leave_the_model_as_the_library_built_it(tiny_model_dir, monkeypatch):
    from common.model.loading import LoraSettings, load_for_training
    from common.speed.setup import apply_for_training
    real = speed.installed_version
    monkeypatch.setattr(speed, "installed_version", lambda lib: "5.99.0" if lib == "transformers" else real(lib))
    model = load_for_training(str(tiny_model_dir), CPU_PLAN, LoraSettings(r=4, alpha=8), 0)
    get_image_features = model.base_model.model.model.get_image_features
    assert apply_for_training(model, speed.Speedups("hf", cuda=False)) is None  # no host-built ids
    assert model.base_model.model.model.visual.config._attn_implementation == "sdpa"
    assert model.base_model.model.model.get_image_features == get_image_features
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss)

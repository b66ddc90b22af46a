"""Does the demo model learn, and does it use the image? Validation SMAPE of the demo run beside the
training-median baseline and beside a text-only ablation trained the same way (same steps, same seed).

    PYTHON=.venv/bin/python ./run.sh --work-dir work          # the demo run (stages 1-7)
    .venv/bin/python bench/demo_learning.py --work-dir work [--write]

The ablation drops each sample's image and its tokens in training and in evaluation (6_train.py
--text-only, 7_infer.py through the same collator), so it sees exactly the text the full run sees.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_results import cpu_device, update_section  # noqa: E402


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("work"), help="a finished demo run of run.sh")
    ap.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = ap.parse_args()
    work = args.work_dir
    full_cfg = json.loads((work / "train" / "train_config.json").read_text())["options"]
    ablation = work / "train_text_only"
    train_args = ["--work-dir", str(work), "--output-dir", str(ablation), "--text-only"]
    for key in ("batch_size", "grad_accum", "epochs", "learning_rate", "lora_r", "lora_alpha", "seed", "workers"):
        train_args += [f"--{key.replace('_', '-')}", str(full_cfg[key])]
    started = time.time()
    run("6_train.py", *train_args, "--eval-steps", "0")
    minutes = (time.time() - started) / 60
    full = json.loads((work / "infer_validation" / "stats.json").read_text())["evaluation"]
    ablated = json.loads((ablation / "stats.json").read_text())["final_eval"]
    rows = [("predict the training median", full["median_baseline_smape"]),
            ("text + image (the demo run)", full["smape"]),
            ("text only (ablation, same schedule)", ablated["eval_smape"])]
    table = ["| model | validation SMAPE |", "|---|---|"] + [f"| {name} | {value:.2f} |" for name, value in rows]
    device = cpu_device()
    text = "\n".join([
        "## The demo learns, and uses the image", "",
        f"Tiny Qwen2.5-VL (demo), {full['rows']} validation rows, {device}, {time.strftime('%Y-%m-%d')}; "
        f"the text-only ablation took {minutes:.1f} min to train.", "", *table, "",
        f"Ratio to the median baseline: {full['smape'] / full['median_baseline_smape']:.2f} (text + image), "
        f"{ablated['eval_smape'] / full['median_baseline_smape']:.2f} (text only). The ablation's figure is on the "
        f"first {ablated['eval_samples']} validation rows (its evaluation inside 6_train.py).", "",
        "Reproduce: `PYTHON=.venv/bin/python ./run.sh --work-dir work && "
        ".venv/bin/python bench/demo_learning.py --work-dir work --write`"])
    print(text)
    if args.write:
        update_section(ROOT / "bench" / "RESULTS.md", "demo", text)


if __name__ == "__main__":
    main()

"""What the demo learns: validation SMAPE by objective (text, regression) and seed, beside the training median and
a text-only ablation (every image and its tokens dropped, in training and evaluation), all with run.sh's schedule.

    PYTHON=.venv/bin/python ./run.sh --work-dir work --to-stage 5      # the demo's stages 1-5, once
    .venv/bin/python bench/demo_learning.py --work-dir work --seeds 1 2 3 --save
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results import cpu_device, save, table  # noqa: E402


def demo_train_args() -> list[str]:
    """run.sh's stage 6 options for the demo, read from run.sh itself."""
    text = (ROOT / "run.sh").read_text()
    return re.search(r"TRAIN=\((--.*?)\)", text, re.S).group(1).split()


def one_run(work: Path, objective: str, seed: int, text_only: bool) -> dict:
    name = f"{objective}_seed{seed}{'_text_only' if text_only else ''}"
    out, run_dir = work / "demo_learning" / name, work / "demo_learning" / f"{name}_infer"
    extra = ["--text-only"] if text_only else []
    started = time.time()
    subprocess.run([sys.executable, "6_train.py", "--work-dir", str(work), "--output-dir", str(out), "--objective",
                    objective, "--seed", str(seed), *demo_train_args(), "--eval-steps", "0", "--eval-samples", "1",
                    *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - started
    subprocess.run([sys.executable, "7_infer.py", "--work-dir", str(work), "--data-dir", str(work / "demo"),
                    "--split", "validation", "--train-dir", str(out), "--run-dir", str(run_dir), "--workers", "1",
                    "--output", str(run_dir / "validation_pred.csv"), *(["--text-only"] if text_only else [])],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    evaluation = json.loads((run_dir / "stats.json").read_text())["evaluation"]
    result = {"objective": objective, "seed": seed, "text_only": text_only, "smape": evaluation["smape"],
              "median_smape": evaluation["median_baseline_smape"], "rows": evaluation["rows"],
              "train_minutes": round(train_s / 60, 1)}
    print(json.dumps(result), flush=True)
    return result


COLUMNS = ["objective", "seeds", "validation SMAPE, mean", "lowest", "highest", "median baseline"]
TITLE = "Demo: validation SMAPE by objective and seed, run.sh's schedule"


def summary_rows(runs: list[dict]) -> list[list]:
    """One row per objective and per text-only ablation: mean, lowest and highest over its seeds."""
    rows = []
    for objective in dict.fromkeys(r["objective"] for r in runs):
        for text_only in (False, True):
            got = [r["smape"] for r in runs if r["objective"] == objective and r["text_only"] == text_only]
            if got:
                rows.append([objective + (" (text only)" if text_only else ""), len(got),
                             round(statistics.mean(got), 2), round(min(got), 2), round(max(got), 2),
                             runs[0]["median_smape"]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("work"), help="a demo work folder with stages 1-5 done")
    ap.add_argument("--objectives", nargs="+", default=["text", "regression"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[1], help="seeds of the text-only runs")
    ap.add_argument("--save", action="store_true", help="store the table in bench/runs/demo_learning.json")
    args = ap.parse_args()
    runs = [one_run(args.work_dir, o, s, False) for o in args.objectives for s in args.seeds]
    runs += [one_run(args.work_dir, o, s, True) for o in args.objectives for s in args.ablation_seeds]
    print(table(COLUMNS, summary_rows(runs)))
    if args.save:
        save("demo_learning", TITLE, COLUMNS, summary_rows(runs),
             f"python bench/demo_learning.py --seeds {' '.join(map(str, args.seeds))}", cpu_device(), runs=runs)


if __name__ == "__main__":
    main()

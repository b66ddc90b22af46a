"""The closing lines of run.sh: rows in and out, validation SMAPE against the median, where things are."""
from __future__ import annotations

import argparse
from pathlib import Path

from common.fsio import read_json


def main() -> None:
    ap = argparse.ArgumentParser(description="Print what the pipeline produced.")
    ap.add_argument("--work-dir", type=Path, default=Path("work"), help="the pipeline's work folder")
    ap.add_argument("--data-dir", type=Path, default=Path("dataset"), help="folder holding test.csv")
    args = ap.parse_args()
    test = read_json(args.work_dir / "infer_test" / "stats.json")
    print("\n== summary")
    print(f"test rows in:  {test['rows_expected']}  ({args.data_dir / 'test.csv'})")
    print(f"test rows out: {test['rows_written']}  ({test['output']}); "
          f"fallbacks to the training median: {sum(test['fallback_counts'].values())} {test['fallback_counts']}")
    val_path = args.work_dir / "infer_validation" / "stats.json"
    ev = read_json(val_path).get("evaluation") if val_path.exists() else None
    if ev is None:
        print("validation SMAPE: no validation rows (3_create_jsonl.py --validation-split-ratio)")
    else:
        print(f"validation SMAPE: {ev['smape']:.2f}  vs  {ev['median_baseline_smape']:.2f} predicting the median "
              f"({ev['rows']} rows); report: {args.work_dir / 'eval' / 'report.md'}")


if __name__ == "__main__":
    main()

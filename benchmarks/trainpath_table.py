"""Print hpml's own training path, one row per `train-squad` run in the store (MLFLOW_TRACKING_URI):
steady and overall features/s, process start to first step, peak VRAM and eval speed, as
`bash benchmarks/gpu.sh squad …` left them. With --reference F (a bench results.json from the same machine),
each row's steady features/s is also given as a ratio to the study's Trainer recipe measured there."""
from __future__ import annotations

import argparse
import json

import mlflow

from hpml import tracking

COLS = [("train_steady_samples_per_s", "steady features/s", "{:.0f}"),
        ("train_samples_per_s", "features/s (all steps)", "{:.0f}"), ("startup_s", "start to first step s", "{:.1f}"),
        ("train_runtime_s", "train s", "{:.1f}"), ("peak_train_vram_allocated_mib", "peak train MiB", "{:.0f}"),
        ("eval_samples_per_s", "eval features/s", "{:.0f}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reference", default="", help="bench results.json whose reference row gives the ratio")
    args = ap.parse_args()
    ref = 0.0
    if args.reference:
        with open(args.reference) as f:
            ref = next(r["features_per_s"] for r in json.load(f)["rows"] if r["label"] == "reference")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.{tracking.TAG_TASK} = 'squad'",
                              order_by=["start_time ASC"])
    hid = f"tags.{tracking.TAG_HIDDEN_IMPORTS}"
    lean = hid in runs and runs[hid].notna().any()  # a startup A/B (HPML_LEAN_IMPORTS=0 and 1)
    head = (["variant", "status", "compiled"] + (["hidden imports"] if lean else []) + [h for _, h, _ in COLS]
            + (["steady x ref"] if ref else []))
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for _, r in runs.iterrows():
        cells = [r.get(f"tags.{tracking.TAG_VARIANT}"), r["status"], r.get(f"tags.{tracking.TAG_COMPILED}")]
        if lean:
            cells.append(r[hid] if isinstance(r[hid], str) else "none")
        for key, _, fmt in COLS:
            v = r.get(f"metrics.{key}")
            cells.append("-" if v is None or v != v else fmt.format(v))
        if ref:
            v = r.get("metrics.train_steady_samples_per_s")
            cells.append("-" if v is None or v != v else f"{v / ref:.2f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if ref:
        print(f"\nreference (the study's Trainer recipe, bench on this machine): {ref:.0f} features/s")


if __name__ == "__main__":
    main()

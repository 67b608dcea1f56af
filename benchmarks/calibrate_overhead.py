"""Fit the engine's per-step overhead (nexus_tune/overhead.py) from measured runs; write it into a profile.

    # on the GPU: engine runs that keep their step records (a workload/seed the evaluation does not use)
    PYTHONPATH=. python benchmarks/paper_eval.py --model llama-3.1-8b --workload mixed --seed 1 \
        --policies chunked,prefill-first,nexus,static:best --rates 5,8 --save-steps --out out/calib/llama
    # anywhere: fit, show, and store in the profile the simulator reads
    PYTHONPATH=. python benchmarks/calibrate_overhead.py out/calib/llama \
        --profile profiles/h100-80gb-hbm3/llama-3.1-8b.json --write

Every step record of every run in the given folders (paper_eval JSONs written with --save-steps)
is fitted at once, against the profile's prediction for that step. Gzipped files (.json.gz) are read
too: docs/results/calibration/ keeps the H100 runs that way.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from rich.console import Console

from nexus_tune.overhead import StepOverhead, overhead_table
from nexus_tune.profile import Profile


def step_records(folders: list[str], model_name: str) -> tuple[list[dict], list[str]]:
    """All saved step records of `model_name`'s runs under `folders`, and the files they came from."""
    records, files = [], []
    for folder in folders:
        for path in sorted([*Path(folder).glob("*.json"), *Path(folder).glob("*.json.gz")]):
            data = json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
            if data.get("kind") != "paper_eval" or data["meta"]["model"] != model_name:
                continue
            runs = [run["step_records"] for run in data["runs"] if "step_records" in run]
            if runs:
                files.append(str(path))
                records += [r for run in runs for r in run]
    return records, files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", help="paper_eval result folders (runs made with --save-steps)")
    p.add_argument("--profile", required=True)
    p.add_argument("--write", action="store_true", help="store the fit in the profile")
    p.add_argument("--min-steps", type=int, default=30, help="fewer steps of a kind: that kind keeps the prediction")
    args = p.parse_args(argv)
    console = Console()
    profile = Profile.load(args.profile)
    records, files = step_records(args.folders, profile.model["name"])
    if not records:
        console.print(f"[red]no step records of {profile.model['name']} under {', '.join(args.folders)} "
                      "(paper_eval.py --save-steps writes them)[/]")
        return 2
    overhead = StepOverhead().fit(records, profile.latency_model, args.min_steps)
    table = overhead_table(overhead, f"{profile.model['name']}: step cycle = scale x predicted + fixed + "
                                     f"per_seq x rows ({len(records)} steps from {len(files)} files)")
    console.print(table)
    if args.write:
        profile.step_overhead = overhead
        profile.save(args.profile)
        console.print(f"wrote step_overhead into {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`nexus-tune calibrate`: fit what the engine's steps cost beyond the profile's kernels into the profile.

    nexus-tune calibrate --profile P                        # on the GPU: replay short traces, fit, write
    nexus-tune calibrate --profile P --from-runs DIR [...]  # anywhere: fit saved engine runs

The profile times kernels alone; a running engine also builds inputs, samples, hands tokens back
and schedules (nexus_tune/core/overhead.py). On the GPU this replays the workload (Poisson arrivals,
greedy, random weights) through one engine per loop family: `chunked` (the mixed loop),
`prefill-first` (the single loop) and `nexus` (the two loops; static splits share them), at each
--loads fraction of the prefill-only bound (the arrival rate at which the whole GPU would do
nothing but prefill), fits how much a running decode slows the two-loop prefill steps (the latency
model's `prefill_contention_`: the profiler times prefill alone), then `StepOverhead` on every step,
and writes both into the profile, where `simulate`, `tune` and `plan` use them. The step records go to --out, so the fit can be redone
anywhere with --from-runs (which also reads `benchmarks/paper_eval.py --save-steps` results).
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nexus_tune.commands.reporting import plot_step_fidelity
from nexus_tune.core.overhead import (FIDELITY_WITHIN, StepOverhead, fidelity_of, fidelity_table,
                                      fit_prefill_contention, overhead_table, step_predictions)
from nexus_tune.core.profile import Profile

RECORDS_FILE = "calibration-steps.json"


class CalibrationError(RuntimeError):
    """Calibration cannot run or has nothing to fit; the message says what to do."""


def saved_results(folders: list[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, content) of every step-record file of this command (RECORDS_FILE) and every paper_eval
    result under `folders`, .json or .json.gz; other JSON files are skipped."""
    for folder in folders:
        for path in sorted([*Path(folder).glob("*.json"), *Path(folder).glob("*.json.gz")]):
            try:
                data = json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as e:  # gzip and JSON errors are these too
                raise CalibrationError(f"{path} is not a readable JSON file: {e}") from None
            if isinstance(data, dict) and data.get("kind") in ("paper_eval", "calibration"):
                yield path, data


def saved_step_logs(folders: list[str], model_name: str) -> tuple[list[list[dict[str, Any]]], list[str]]:
    """The step log of every run of `model_name` saved under `folders` (saved_results: this command's
    records or paper_eval results written with --save-steps), and the files they came from."""
    logs, files = [], []
    for path, data in saved_results(folders):
        try:
            if data["meta"]["model"] != model_name:
                continue
            found = [run["step_records"] for run in data["runs"] if run.get("step_records")]
        except (KeyError, TypeError, AttributeError) as e:
            raise CalibrationError(f"{path} is a damaged {data['kind']} file ({type(e).__name__}: {e})") from None
        if found:
            files.append(str(path))
            logs += found
    return logs, files


def measure_step_records(profile: Profile, model: str, args: Any, console: Any) -> dict[str, Any]:
    """Replay the workload through each loop family's engine at each load; the step records, by run."""
    from rich.progress import Progress

    from nexus_tune.engine.llm import EngineError
    from nexus_tune.engine.loader import resolve_config
    from nexus_tune.commands.replay import PolicyEngine, capped_trace, make_prompts, probe_prompts, release_gpu
    from nexus_tune.commands.tune import prefill_bound
    from nexus_tune.core.workload import make_trace

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CalibrationError("calibration replays the engine on the GPU the profile describes, and PyTorch sees "
                               "none here; on this machine, fit saved runs instead: --from-runs DIR")
    bound = prefill_bound(profile, args.workload, args.num_prompts, args.seed)
    rates = [round(load * bound, 3) for load in args.loads]
    vocab = resolve_config(model).vocab_size
    probes = probe_prompts(vocab, args.seed, args.max_model_len)
    runs = []
    with Progress(console=console) as progress:
        task = progress.add_task("calibration replays", total=len(args.policies) * len(rates))
        for policy in args.policies:
            progress.update(task, description=f"{policy}: building the engine")
            try:
                engine = PolicyEngine(model, policy, probes, device=args.device,
                                      profile=profile if policy == "nexus" else None,
                                      max_model_len=args.max_model_len, seed=args.seed)
            except EngineError as e:
                raise CalibrationError(f"the {policy} engine cannot start: {e}") from None
            with engine:
                for rate in rates:
                    progress.update(task, description=f"{policy} at {rate:g} req/s")
                    trace = capped_trace(make_trace(args.workload, args.num_prompts, rate, seed=args.seed),
                                         args.max_model_len, args.max_output)
                    rep = engine.replay(trace, make_prompts(trace, vocab, args.seed))
                    runs.append({"policy": policy, "rate": rate, "wall_s": round(rep.wall_s, 1),
                                 "step_records": [asdict(s) for s in rep.steps]})
                    progress.advance(task)
            release_gpu()
    meta = {"model": profile.model["name"], "workload": args.workload, "num_prompts": args.num_prompts,
            "seed": args.seed, "loads": list(args.loads), "rates": rates, "max_model_len": args.max_model_len,
            "max_output": args.max_output, "gpu": profile.gpu.get("name"),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}
    return {"kind": "calibration", "meta": meta, "runs": runs}


def calibrate(profile: Profile, step_logs: list[list[dict[str, Any]]], min_steps: int = 30) -> StepOverhead:
    """Fit the profile's model's prefill_contention_ (set in place), then the StepOverhead on top of it."""
    if not step_logs:
        raise CalibrationError("no step records to fit")
    profile.latency_model.prefill_contention_ = fit_prefill_contention(step_logs, profile.latency_model)
    overhead = StepOverhead().fit(step_logs, profile.latency_model, min_steps)
    if not overhead.terms:
        raise CalibrationError(f"no step kind has {min_steps} steps: replay more requests (--num-prompts)")
    return overhead


def run_calibrate(args: Any) -> int:
    from rich.console import Console

    from nexus_tune.commands.cli import report_error
    from nexus_tune.core.profile import ProfileError

    console = Console()
    try:
        profile = Profile.load(args.profile)
        if args.from_runs:
            logs, sources = saved_step_logs(args.from_runs, profile.model["name"])
            if not logs:
                raise CalibrationError(f"no step records of {profile.model['name']} under {', '.join(args.from_runs)} "
                                       "(this command writes them; so does paper_eval.py --save-steps)")
            source = f"{len(sources)} files"
        else:
            measured = measure_step_records(profile, args.model or profile.model["name"], args, console)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            saved = out / RECORDS_FILE
            saved.write_text(json.dumps(measured))
            logs = [run["step_records"] for run in measured["runs"]]
            source = f"replays at {', '.join(f'{r:g}' for r in measured['meta']['rates'])} req/s, saved in {saved}"
        overhead = calibrate(profile, logs, args.min_steps)
    except (ProfileError, CalibrationError, ValueError, OSError) as e:
        report_error(str(e))
        return 2
    stretch = profile.latency_model.prefill_contention_
    console.print(f"prefill beside a running decode: x(1 + {stretch:.3f} x decode SMs / all SMs)"
                  + "".join(f"; on {p} SMs {profile.latency_model.prefill_stretch(p):.3f}x"
                            for p in profile.split_sms[-2:]))
    console.print(overhead_table(overhead, f"{profile.model['name']}: step cycle = scale x predicted + fixed + "
                                           f"per_seq x rows ({sum(map(len, logs))} steps; {source})"))
    predictions = step_predictions(logs, profile.latency_model, overhead)
    console.print(fidelity_table(fidelity_of(predictions, overhead),
                                 "Engine steps, predicted against measured (the steps just fitted)"))
    if args.plot:
        plot_step_fidelity(predictions, args.plot, FIDELITY_WITHIN)
        console.print(f"plot written to {args.plot}")
    profile.step_overhead = overhead
    profile.save(args.profile)
    console.print(f"wrote step_overhead and prefill_contention into {args.profile}; simulate, tune and plan now "
                  "include them")
    return 0

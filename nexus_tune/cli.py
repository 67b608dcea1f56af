"""The `nexus-tune` command line: every subcommand and its flags in one place.

Each subcommand imports its module only when it runs, so `nexus-tune --help` and the
CPU-only commands (`plan`, `simulate`, `tune`) start fast and never touch the GPU.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexus-tune",
        description="Split one GPU's SMs between LLM prefill and decode, and pick the split on the fly.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # -- info ------------------------------------------------------------------------------
    p = sub.add_parser("info", help="the GPU, its SM granularity, the splits it allows, the backend")
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.set_defaults(handler="nexus_tune.info:run_info")

    # -- profile ---------------------------------------------------------------------------
    p = sub.add_parser("profile", help="time prefill and decode over SM counts, fit and save the latency model")
    p.add_argument("--model", help="preset name (llama-3.1-8b, qwen2.5-3b, ...) or a checkpoint folder")
    p.add_argument("--out", default="profiles", help="folder that receives <gpu-slug>/<model-slug>.json")
    p.add_argument("--quick", action="store_true", help="a coarse grid: about two minutes")
    p.add_argument("--device", type=int, default=0)
    p.set_defaults(handler="nexus_tune.profiler:run_profile")
    profile_sub = p.add_subparsers(dest="profile_command")
    ps = profile_sub.add_parser("show", help="print a saved profile and plot latency against SMs")
    ps.add_argument("path", help="a profile JSON file")
    ps.add_argument("--plot", help="write the latency-vs-SMs figure to this PNG")
    ps.set_defaults(handler="nexus_tune.profile:run_show")

    # -- calibrate -------------------------------------------------------------------------
    p = sub.add_parser("calibrate", help="fit the engine's per-step overhead into a profile (simulate, tune, plan use it)")
    p.add_argument("--profile", required=True, help="the profile JSON file to complete")
    p.add_argument("--from-runs", nargs="+", metavar="DIR",
                   help="fit step records saved by an earlier calibrate or paper_eval.py --save-steps; no GPU")
    p.add_argument("--model", help="preset or checkpoint folder (default: the profile's model)")
    p.add_argument("--workload", default="mixed", help="longdata | arxiv | sharegpt-synth | mixed")
    p.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.4, 0.6],
                   help="arrival rates as fractions of the prefill-only bound, comma-separated")
    p.add_argument("--policies", type=lambda s: s.split(","), default=["chunked", "prefill-first", "nexus"],
                   help="one engine per loop family, comma-separated")
    p.add_argument("--num-prompts", type=int, default=80, help="requests per replay")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-output", type=int, default=256, help="cap on each request's output tokens")
    p.add_argument("--min-steps", type=int, default=30, help="a step kind with fewer keeps the bare prediction")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (tiny presets, tests)")
    p.add_argument("--out", default="out/calibration", help="folder for the step records")
    p.set_defaults(handler="nexus_tune.calibrate:run_calibrate")

    # -- serve -----------------------------------------------------------------------------
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the bundled engine")
    p.add_argument("--model", required=True, help="preset name or a checkpoint folder")
    p.add_argument("--policy", default="nexus", help="nexus | chunked | prefill-first | static:N")
    p.add_argument("--profile", help="profile JSON (default: profiles/<gpu-slug>/<model-slug>.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the name clients use (default: the --model value)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests before answering 503")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset")
    p.set_defaults(handler="engine.server:run_serve")

    # -- bench -----------------------------------------------------------------------------
    p = sub.add_parser("bench", help="drive an OpenAI-compatible server like vLLM's serving benchmark")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name sent in requests (default: the server's first)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--dataset", default="random",
                   help="random | sharegpt | longdata | arxiv | sharegpt-synth | mixed")
    p.add_argument("--dataset-path", help="ShareGPT-format JSON file (with --dataset sharegpt)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 is Poisson")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs, e.g. ttft:3000 tpot:50 (ms)")
    p.add_argument("--sweep", help="comma-separated request rates; finds the capacity")
    p.add_argument("--result-file", help="JSON with vLLM's field names")
    p.add_argument("--plot", help="latency against rate, with --sweep (PNG)")
    p.set_defaults(handler="nexus_tune.bench:run_bench")

    # -- simulate / tune / plan --------------------------------------------------------------
    def add_sim_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", required=True, help="a profile JSON file")
        p.add_argument("--workload", default="mixed",
                       help="longdata | arxiv | sharegpt-synth | mixed | a ShareGPT-format JSON file")
        p.add_argument("--num-prompts", type=int, default=1000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--slo", default="ttft=3000,tpot=50", help="ttft=MS,tpot=MS")

    p = sub.add_parser("simulate", help="replay a workload against a profile's latency model, on the CPU")
    add_sim_args(p)
    p.add_argument("--policy", action="append", help="repeatable; default: every policy")
    p.add_argument("--request-rate", type=float, default=2.0)
    p.add_argument("--burstiness", type=float, default=1.0)
    p.set_defaults(handler="nexus_tune.simulate:run_simulate")

    p = sub.add_parser("tune", help="search the controller's knobs with optuna; write them into the profile")
    add_sim_args(p)
    p.add_argument("--trials", type=int, default=40)
    p.set_defaults(handler="nexus_tune.tune:run_tune")

    p = sub.add_parser("plan", help="capacity per policy under your SLOs, from a saved profile")
    add_sim_args(p)
    p.add_argument("--plot", default="plan.png", help="latency against rate per policy (PNG)")
    p.set_defaults(handler="nexus_tune.plan:run_plan")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `nexus-tune` command line: every subcommand and its flags in one place.

Each subcommand imports its module only when it runs, so `nexus-tune --help` and the
CPU-only commands (`plan`, `simulate`, `tune`) start fast and never touch the GPU.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from nexus_tune.core.engine_config import EngineConfig  # light: dataclasses only

T = TypeVar("T")


# -- argument types ------------------------------------------------------------------------------
# Each refuses a bad value while parsing, so argparse prints a one-line usage error before any work
# starts (a NaN rate used to hang the simulator; a bad --plot path failed after a minute-long run).

def _bounded(parse: Callable[[str], T], ok: Callable[[T], bool], what: str) -> Callable[[str], T]:
    """A type that parses with `parse` and keeps values for which `ok` holds; `what` names them."""
    def convert(text: str) -> T:
        try:
            value = parse(text)
            if ok(value):  # NaN fails every comparison: refused with the rest
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return convert


positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _bounded(float, lambda v: 0 < v < math.inf, "a positive, finite number")
nonnegative_float = _bounded(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
request_rate = _bounded(float, lambda v: v > 0, "a positive number of requests per second (inf: all at once)")
fold_count = _bounded(int, lambda v: v >= 2, "a number of folds >= 2")
fraction = _bounded(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
tcp_port = _bounded(int, lambda v: 1 <= v <= 65535, "a TCP port (1..65535)")
_DEVICE = r"cpu|cuda(:\d+)?"
torch_device = _bounded(str, lambda v: re.fullmatch(_DEVICE, v) is not None, "cuda, cuda:N or cpu")
engine_device = _bounded(str, lambda v: re.fullmatch(f"auto|{_DEVICE}", v) is not None, "cuda, cuda:N, cpu or auto")


def _load(target: str) -> Callable:
    """`"module:function"` -> the function, imported only now (so --help imports nothing heavy)."""
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _checked(parser: str) -> Callable[[str], str]:
    """A type that keeps the text when the library's own parser ("module:function") accepts it and
    turns the parser's ValueError into the usage error: the rule lives once, in the library."""
    def convert(text: str) -> str:
        try:
            _load(parser)(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return convert


slo_spec = _checked("nexus_tune.core.metrics:parse_slos")
policy_name = _checked("nexus_tune.core.scheduler:parse_policy")


def comma_list(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """A type for `a,b,c`: each part through `item`; at least one part."""
    def convert(text: str) -> list[T]:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
        return values
    return convert


def output_file(text: str) -> str:
    """A file the command writes at the end (creating missing folders): checked now, so that a typo
    costs no run. The nearest folder that exists must be writable."""
    path = Path(text).absolute()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {existing} is not writable")
    return text


def report_error(message: str) -> None:
    """Every subcommand's failure: one line `error: message` on stderr (rich markup in it escaped)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexus-tune",
        description="Split one GPU's SMs between LLM prefill and decode, and pick the split on the fly.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # -- info ------------------------------------------------------------------------------
    p = sub.add_parser("info", help="the GPU, its SM granularity, the splits it allows, the backend")
    p.add_argument("--device", type=nonnegative_int, default=0, help="CUDA device index")
    p.set_defaults(handler="nexus_tune.commands.info:run_info")

    # -- profile ---------------------------------------------------------------------------
    p = sub.add_parser("profile", help="time prefill and decode over SM counts, fit and save the latency model")
    p.add_argument("--model", help="preset name (llama-3.1-8b, qwen2.5-3b, ...) or a checkpoint folder")
    p.add_argument("--out", default="profiles", help="folder that receives <gpu-slug>/<model-slug>.json")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="a smaller time budget: under a minute (full: three)")
    sweep.add_argument("--from", dest="from_profile", metavar="PROFILE",
                       help="rescale this profile of the same model on another GPU from a short sweep (~45 s)")
    p.add_argument("--device", type=nonnegative_int, default=0, help="CUDA device index")
    p.set_defaults(handler="nexus_tune.commands.profiler:run_profile")
    profile_sub = p.add_subparsers(dest="profile_command")
    ps = profile_sub.add_parser("show", help="print a saved profile and plot latency against SMs")
    ps.add_argument("path", help="a profile JSON file")
    ps.add_argument("--plot", type=output_file, help="write the latency-vs-SMs figure to this PNG")
    ps.set_defaults(handler="nexus_tune.commands.profile_view:run_show")

    def add_cv_args(ps: argparse.ArgumentParser) -> None:
        ps.add_argument("path", help="a profile JSON file")
        ps.add_argument("--folds", type=fold_count, help="cross-validation folds (default 5: nexus_tune/core/crossval.py)")
        ps.add_argument("--seed", type=nonnegative_int, help="seed of the folds' random deal (default 0)")

    ps = profile_sub.add_parser("check", help="cross-validated error of a saved profile's latency model, no GPU "
                                              "(exit 1 when a phase misses the targets)")
    add_cv_args(ps)
    ps.set_defaults(handler="nexus_tune.commands.profile_view:run_check")
    ps = profile_sub.add_parser("refit", help="refit a saved profile's latency model from its samples, no GPU; "
                                              "keeps everything else")
    add_cv_args(ps)
    ps.add_argument("--out", type=output_file, help="write the refitted profile here (default: in place)")
    ps.add_argument("--add-samples", nargs="+", default=[], metavar="PROFILE",
                    help="fit on these profiles' samples too (other sweeps of the same model on this GPU)")
    ps.add_argument("--attention-heads", type=positive_int,
                    help="the model's query heads (default: the profile's, else its preset's or checkpoint's)")
    ps.set_defaults(handler="nexus_tune.commands.profile_view:run_refit")

    # -- calibrate -------------------------------------------------------------------------
    p = sub.add_parser("calibrate", help="fit the engine's per-step overhead into a profile (simulate, tune, plan use it)")
    p.add_argument("--profile", required=True, type=output_file,
                   help="the profile JSON file to complete (written at the end: checked first)")
    p.add_argument("--from-runs", nargs="+", metavar="DIR",
                   help="fit step records saved by an earlier calibrate or paper_eval.py --save-steps; no GPU")
    p.add_argument("--model", help="preset or checkpoint folder (default: the profile's model)")
    p.add_argument("--workload", default="mixed", help="longdata | arxiv | sharegpt-synth | mixed")
    p.add_argument("--loads", type=comma_list(positive_float), default=[0.4, 0.6],
                   help="arrival rates as fractions of the prefill-only bound, comma-separated")
    p.add_argument("--policies", type=comma_list(policy_name), default=["chunked", "prefill-first", "nexus"],
                   help="one engine per loop family, comma-separated")
    p.add_argument("--num-prompts", type=positive_int, default=80, help="requests per replay")
    p.add_argument("--seed", type=nonnegative_int, default=1)
    p.add_argument("--max-model-len", type=positive_int, default=16384)
    p.add_argument("--max-output", type=positive_int, default=256, help="cap on each request's output tokens")
    p.add_argument("--min-steps", type=positive_int, default=30,
                   help="a step kind with fewer keeps the bare prediction")
    p.add_argument("--device", type=torch_device, default="cuda", help="cuda, or cpu (tiny presets, tests)")
    p.add_argument("--out", default="out/calibration", help="folder for the step records")
    p.add_argument("--plot", type=output_file, help="write measured against predicted step cycles, per step kind, to this PNG")
    p.set_defaults(handler="nexus_tune.commands.calibrate:run_calibrate")

    # -- serve -----------------------------------------------------------------------------
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the bundled engine")
    p.add_argument("--model", required=True, help="preset name or a checkpoint folder")
    p.add_argument("--policy", type=policy_name, default="nexus", help="nexus | chunked | prefill-first | static:N")
    p.add_argument("--profile", help="profile JSON (default: profiles/<gpu-slug>/<model-slug>.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=tcp_port, default=8000)
    p.add_argument("--served-model-name", help="the name clients use (default: the --model value)")
    p.add_argument("--max-num-seqs", type=positive_int, default=EngineConfig.max_num_seqs)
    p.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=EngineConfig.gpu_memory_utilization)
    p.add_argument("--max-queue", type=positive_int, default=1024, help="waiting requests before answering 503")
    p.add_argument("--shutdown-timeout", type=nonnegative_float, default=30.0,
                   help="seconds open requests may finish after SIGTERM/SIGINT before they are aborted")
    p.add_argument("--device", type=engine_device, default="auto", help="cuda, cpu or auto")
    p.add_argument("--seed", type=nonnegative_int, default=EngineConfig.seed, help="seed of the random weights of a preset")
    p.add_argument("--slo", type=slo_spec, help="ttft=MS,tpot=MS: the targets nexus plans for "
                   "(default: the profile's tuned knobs', else ttft=3000,tpot=50)")
    p.set_defaults(handler="nexus_tune.commands.serve:run_serve")

    # -- bench -----------------------------------------------------------------------------
    p = sub.add_parser("bench", help="drive an OpenAI-compatible server like vLLM's serving benchmark")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name sent in requests (default: the server's first)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--dataset", default="random",
                   help="random | sharegpt | longdata | arxiv | sharegpt-synth | mixed")
    p.add_argument("--dataset-path", help="ShareGPT-format JSON file (with --dataset sharegpt)")
    p.add_argument("--num-prompts", type=positive_int, default=200)
    p.add_argument("--random-input-len", type=positive_int, default=1024)
    p.add_argument("--random-output-len", type=positive_int, default=128)
    p.add_argument("--request-rate", type=request_rate, default=math.inf, help="requests per second")
    p.add_argument("--burstiness", type=positive_float, default=1.0, help="gamma shape: 1 is Poisson")
    p.add_argument("--max-concurrency", type=positive_int)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--goodput", nargs="*", type=slo_spec, default=[], help="SLOs, e.g. ttft:3000 tpot:50 (ms)")
    p.add_argument("--sweep", type=comma_list(positive_float),
                   help="comma-separated request rates; finds the capacity")
    p.add_argument("--result-file", type=output_file, help="JSON with vLLM's field names")
    p.add_argument("--plot", type=output_file, help="latency against rate, with --sweep (PNG)")
    p.set_defaults(handler="nexus_tune.commands.bench:run_bench")

    # -- simulate / tune / plan --------------------------------------------------------------
    def add_sim_args(p: argparse.ArgumentParser, profile_type: Callable[[str], str] = str) -> None:
        p.add_argument("--profile", required=True, type=profile_type, help="a profile JSON file")
        p.add_argument("--workload", default="mixed",
                       help="longdata | arxiv | sharegpt-synth | mixed | a ShareGPT-format JSON file")
        p.add_argument("--num-prompts", type=positive_int, default=1000)
        p.add_argument("--seed", type=nonnegative_int, default=0)
        p.add_argument("--slo", type=slo_spec, default="ttft=3000,tpot=50", help="ttft=MS,tpot=MS")

    p = sub.add_parser("simulate", help="replay a workload against a profile's latency model, on the CPU")
    add_sim_args(p)
    p.add_argument("--policy", action="append", type=policy_name, help="repeatable; default: every policy")
    p.add_argument("--request-rate", type=request_rate, default=2.0)
    p.add_argument("--burstiness", type=positive_float, default=1.0)
    p.set_defaults(handler="nexus_tune.commands.simulate:run_simulate")

    p = sub.add_parser("tune", help="search the controller's knobs with optuna; write them into the profile")
    add_sim_args(p, profile_type=output_file)  # written at the end: checked before the search
    p.add_argument("--trials", type=positive_int, default=40)
    p.set_defaults(handler="nexus_tune.commands.tune:run_tune")

    p = sub.add_parser("plan", help="capacity per policy under your SLOs, from a saved profile")
    add_sim_args(p)
    p.add_argument("--plot", type=output_file, default="plan.png", help="latency against rate per policy (PNG)")
    p.set_defaults(handler="nexus_tune.commands.plan:run_plan")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return int(_load(args.handler)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

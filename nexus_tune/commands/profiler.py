"""The SM sweep behind `nexus-tune profile`: time real model steps on every side of the splits.

1. Identify the GPU, pre-create every split (green contexts), build the model runner (engine,
   imported here and only here, lazily).
2. A pilot step of each phase on the whole GPU warms the kernels up and calibrates a roofline
   estimate of every step's time and the host time per point (input preparation, decode graph
   capture). The estimate plans the grid (points too slow to be worth their time are left out;
   SM counts are thinned if the sweep would overrun the budget) and drives the progress bar's ETA.
3. Time each point: prefill on the prefill stream of a split with that many SMs, decode as a
   CUDA graph captured on the decode stream (the runner captures it there); warm-up, repeats,
   median. Per operator class (attention, dense) and whole step. Held-out points sit at SM counts
   and sizes the fit never sees. Contention: decode graph replays timed with events while a
   prefill runs on the complementary partition.
4. Fit the LatencyModel on the training points, score it on the held-out ones and by k-fold
   cross-validation over every point (core/crossval.py), save the profile.

Grids (H100: prefill sides 8..120 SMs, decode sides 124..12). Estimated sweep for Llama-3.1-8B
at docs/performance.md rates and 0.15 s per graph capture (`tests/test_profiler.py` checks the
budgets; the command adds ~15 s of loading, compiling and fitting):
- full, ~4 min (budget 10): 11 of the 15 SM counts per phase + the whole GPU; prefill P_T
  128/512/2048/8192 x KV_p 0/8192, decode B_d 1/8/32/128/256 x 512/4096 KV tokens per sequence,
  each as attention, dense and whole step; held out: the other 4 SM counts x 3 off-grid sizes
  per phase; contention at 3 splits x 4 prefills (+2 held out). Runs estimated above 1 s are
  left out (8192-token prefills on 8-16 SMs). 677 points.
- quick, ~72 s (budget 2 min): 5 SM counts + the whole GPU; P_T 256/1024/4096 x KV_p 0/8192;
  B_d 1/16/64/256 x 512/4096; held out: 2 SM counts x 2 sizes per phase; contention at 2 splits
  x 3 prefills (+1 held out); runs above 0.4 s left out. 261 points.
"""
from __future__ import annotations
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from nexus_tune.core.latency_model import LatencyModel, Sample
from nexus_tune.core.crossval import TARGET_MAPE_PCT, TARGET_WORST_PCT
from nexus_tune.core.profile import Profile, ProfileError, fit_latency_model, model_slug, profile_path
from nexus_tune.commands.profile_view import summary_tables
from nexus_tune.core.grid import (CONTENDED_STEPS, PILOT_DECODE, PILOT_PREFILL, WARMUP, Plan, Point, RooflineCost,
                                  contention_window_ms, plan_grid, repeats)

BUDGET_S = {"full": 600.0, "quick": 120.0}  # whole command, load and fit included
FIT_RESERVE_S = 20.0  # the fit and the cross-validation's FOLDS more (1-3 s each on the 2-core CPU machine)


# -- timing on the GPU -------------------------------------------------------------------------
def _time_ms(fn: Callable[[Any], None], stream: Any, runs: int) -> list[float]:
    """Each run from an idle stream: events bracket the launch, so CPU launch gaps count as they would in serving."""
    import torch

    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn(stream)
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _median_ms(fn: Callable[[Any], None], stream: Any, est_ms: float) -> float:
    for _ in range(WARMUP):
        fn(stream)
    stream.synchronize()
    return statistics.median(_time_ms(fn, stream, repeats(est_ms)))


def _contended_ms(prefill: Callable[[Any], None], decode: Callable[[Any], None], split: Any,
                  prefill_ms: float, decode_ms: float) -> float | None:
    """Median decode step while prefills run on the other side of the split, or None if no decode
    step landed inside the prefill window (estimates far off; the caller reports it)."""
    import torch

    ps, ds = split.prefill_stream, split.decode_stream
    prefill(ps)
    decode(ds)
    torch.cuda.synchronize()
    n_prefill = max(1, math.ceil(contention_window_ms(prefill_ms, decode_ms) / prefill_ms))
    for _ in range(2):  # a second try with a four times longer window
        # Decode replays are queued between the prefill launches, so they start while prefill work is
        # pending even when launching a prefill costs the CPU about as long as running it.
        per_prefill = math.ceil(2 * CONTENDED_STEPS / n_prefill)
        window = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        marks = []
        window[0].record(ps)
        for _ in range(n_prefill):
            prefill(ps)
            for _ in range(per_prefill):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(ds)
                decode(ds)
                b.record(ds)
                marks.append((a, b))
        window[1].record(ps)
        torch.cuda.synchronize()
        inside = [a.elapsed_time(b) for a, b in marks
                  if window[0].elapsed_time(a) >= 0 and b.elapsed_time(window[1]) >= 0]
        if len(inside) >= 3:
            return statistics.median(inside)
        n_prefill *= 4
    return None


def _check_gpu_alive(error: RuntimeError) -> None:
    """After a kernel failure: go on only if the CUDA context still runs work (the error was not sticky)."""
    import torch

    try:
        torch.cuda.synchronize()
        (torch.ones(16, device="cuda") * 2).sum().item()
    except RuntimeError:
        raise ProfileError(f"a kernel failed and left the GPU unusable, so the sweep stops: {error}") from None


def usable_splits(split_sms: Sequence[int], total_sms: int, min_partition: int) -> list[int]:
    """The splits the profile offers the controller.

    The decode side of a split is the driver's remainder group, not an aligned group. On the H100
    (2026-11-23) a 12-SM remainder made cuBLAS fail a batch-1 GEMM with CUBLAS_STATUS_EXECUTION_FAILED,
    so a remainder must hold at least two minimum partitions; decode that small would also be over
    twice as slow as on 24 SMs, so the controller loses nothing.
    """
    return [p for p in split_sms if total_sms - p >= 2 * min_partition]


class Sweep:
    """Times plan points on the streams of a SplitTable through a PhaseRunner."""

    def __init__(self, runner: Any, table: Any) -> None:
        self.runner, self.table = runner, table
        self.total_sms = table.total_sms
        self.by_decode_sms = {split.decode_sms: split for split in table}
        self.failed: dict[tuple[str, int], str] = {}  # (phase, SMs) whose kernels the GPU refused to run

    def stream(self, phase: str, sms: int) -> Any:
        if sms >= self.total_sms:
            return self.table.whole
        return self.table[sms].prefill_stream if phase == "prefill" else self.by_decode_sms[sms].decode_stream

    def measure(self, p: Point, est_ms: float, prefill_est_ms: float = 0.0) -> float | None:
        """Median ms of point p (None: no contended decode step could be timed). Steps are captured
        on their side's stream with GEMMs sized for its SMs, as the engine runs them."""
        if p.prefill_tokens:
            split = self.by_decode_sms[p.sms]
            prefill = self.runner.prefill_fn(p.prefill_tokens, p.prefill_kv, "all", split.prefill_stream,
                                             self._sized(split.prefill_sms))
            decode = self.runner.decode_fn(p.size, p.kv, "all", split.decode_stream, self._sized(p.sms))
            return _contended_ms(prefill, decode, split, prefill_est_ms, est_ms)
        stream = self.stream(p.phase, p.sms)
        make = self.runner.prefill_fn if p.phase == "prefill" else self.runner.decode_fn
        return _median_ms(make(p.size, p.kv, p.part, stream, self._sized(p.sms)), stream, est_ms)

    def _sized(self, sms: int) -> int | None:
        """What the runner sizes GEMMs for: a partition's SMs, None on the whole GPU."""
        return sms if sms < self.total_sms else None

    def run(self, plan: Plan, console: Any) -> tuple[list[Sample], list[str]]:
        """Every point of the plan, with a progress bar whose ETA follows the estimates."""
        import torch
        from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        samples, skipped = [], []
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            # The bar advances by estimated seconds, so its ETA is the estimate corrected by the pace so far.
            task = progress.add_task("profiling", total=plan.seconds())
            for i, p in enumerate(plan.points):
                label = f"{p.phase} {p.part} size={p.size} kv={p.kv} on {p.sms} SMs" + (
                    f" beside a {p.prefill_tokens}-token prefill" if p.prefill_tokens else "")
                progress.update(task, description=f"[{i + 1}/{len(plan.points)}] {label}")
                try:
                    ms = None if (p.phase, p.sms) in self.failed else self.measure(p, plan.run_ms[i], plan.prefill_ms[i])
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    ms, label = None, label + " (out of memory)"
                except RuntimeError as e:
                    _check_gpu_alive(e)
                    self.failed[(p.phase, p.sms)] = str(e).splitlines()[0]
                    ms, label = None, label + f" (failed: {self.failed[(p.phase, p.sms)]})"
                if ms is None:
                    skipped.append(label)
                else:
                    samples.append(p.sample(ms))
                progress.advance(task, plan.point_seconds(i))
        return samples, skipped


# -- the command -------------------------------------------------------------------------------
def _build_runner(model: str, device: int) -> tuple[Any, Any]:
    """(PhaseRunner, ModelConfig) from the engine, imported only now: nexus_tune never needs it otherwise.

    The runner sizes its KV cache as `nexus-tune serve` does by default, so kv_capacity_tokens is
    what serving will hold.
    """
    from engine.model_runner import ModelRunner

    try:
        runner = ModelRunner(model, device=f"cuda:{device}")
    except ValueError as e:  # unknown preset, unreadable checkpoint, unsupported architecture
        raise ProfileError(f"cannot load model {model!r}: {e}") from None
    return runner, runner.config


@dataclass(frozen=True)
class Pilot:
    prefill_ms: float  # PILOT_PREFILL on the whole GPU
    decode_ms: float  # PILOT_DECODE on the whole GPU
    prep_s: float  # host time of prefill_fn (warm-up run and graph capture)
    capture_s: float  # host time of decode_fn (likewise)


def _pilot(runner: Any, table: Any) -> Pilot:
    """Whole-GPU steps of each phase: warm up (Triton compiles here), calibrate the roofline and
    the per-point host overheads (timed on second calls, compiled already)."""
    _median_ms(runner.prefill_fn(*PILOT_PREFILL, "all", table.whole), table.whole, 100.0)
    _median_ms(runner.decode_fn(*PILOT_DECODE, "all", table.whole), table.whole, 100.0)
    start = time.perf_counter()
    prefill = runner.prefill_fn(*PILOT_PREFILL, "all", table.whole)
    prep_s = time.perf_counter() - start
    decode = runner.decode_fn(*PILOT_DECODE, "all", table.whole)
    capture_s = time.perf_counter() - start - prep_s
    return Pilot(_median_ms(prefill, table.whole, 100.0), _median_ms(decode, table.whole, 100.0), prep_s, capture_s)


def profile_model(model: str, device: int, quick: bool, console: Any) -> Profile:
    """Measure, fit and return the profile (not yet saved). Raises ProfileError for expected failures."""
    import torch

    from nexus_tune.core.device import identify, software_versions
    from nexus_tune.core.partition import GREEN_CONTEXTS, SplitTable

    if not torch.cuda.is_available():
        raise ProfileError(f"nexus-tune profile times model steps on an NVIDIA GPU, and torch {torch.__version__} "
                           "sees none; run it on the GPU machine that will serve")
    try:
        gpu = identify(device)
    except ValueError as e:  # no such device index
        raise ProfileError(str(e)) from None
    if not gpu:
        raise ProfileError(f"no usable GPU: {gpu.reason}")
    started = time.perf_counter()
    with SplitTable(device, warn=False) as table:
        if table.backend != GREEN_CONTEXTS:
            raise ProfileError(f"the SM sweep needs disjoint SM partitions (green contexts), and this machine has "
                               f"none: {table.fallback_reason}")
        runner, config = _build_runner(model, device)
        kv_capacity = int(runner.kv_capacity_tokens)
        total = table.total_sms
        pilot = _pilot(runner, table)
        cost = RooflineCost.of_config(config, total).calibrated(pilot.prefill_ms, pilot.decode_ms)
        name = "quick" if quick else "full"
        # What is left of the budget once the model is loaded and the fit is done.
        budget = BUDGET_S[name] - (time.perf_counter() - started) - FIT_RESERVE_S
        split_sms = usable_splits(table.split_sms, total, table.granularity.min_partition)
        plan = plan_grid(split_sms, total, kv_capacity, quick, cost, runner.max_model_len, pilot.prep_s,
                         pilot.capture_s, budget)
        console.print(f"{gpu.name}: {len(table)} splits ({table.granularity.min_partition}-SM granularity); "
                      f"{plan.name} grid of {len(plan.points)} points on {len(plan.describe()['prefill_sms'])} "
                      f"SM counts per phase, estimated {plan.seconds() / 60:.1f} min")
        if plan.seconds() > budget:
            console.print(f"[yellow]{config.name} on this GPU is slower than the {BUDGET_S[name] / 60:.0f}-min "
                          f"budget even on the thinnest grid[/]")
        sweep = Sweep(runner, table)
        samples, skipped = sweep.run(plan, console)
        # A split whose side failed is no split the engine may pick.
        split_sms = [p for p in split_sms if ("prefill", p) not in sweep.failed
                     and ("decode", total - p) not in sweep.failed]
        for label in skipped:
            console.print(f"[yellow]not measured: {label}[/]")
        try:
            latency_model, fit_error, cv = fit_latency_model(
                LatencyModel(total, split_sms, config.num_attention_heads), samples)
        except ValueError as e:  # a whole phase failed to measure
            raise ProfileError(f"cannot fit the latency model: {e}") from None
        grid = plan.describe() | {"measured_s": round(time.perf_counter() - started, 1), "skipped": skipped,
                                  "pilot": {k: round(v, 4) for k, v in asdict(pilot).items()}}
        return Profile(
            gpu=gpu.to_dict(), software=software_versions(),
            model={"name": config.name, "slug": model_slug(config.name), "config_hash": config.config_hash()},
            backend=table.backend, granularity=table.granularity.to_dict(), split_sms=split_sms,
            kv_capacity_tokens=kv_capacity, latency_model=latency_model, samples=samples,
            fit_error=fit_error, cross_validation=cv, grid=grid,
        )


def run_profile(args: Any) -> int:
    from rich.console import Console

    console, errors = Console(), Console(stderr=True)
    if not args.model:
        errors.print("[bold red]error:[/] say which model: nexus-tune profile --model PRESET|CHECKPOINT_FOLDER")
        return 2
    try:
        profile = profile_model(args.model, args.device, args.quick, console)
    except ProfileError as e:
        errors.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted: no profile written")
        return 130
    path = profile.save(profile_path(profile.gpu["slug"], profile.model["name"], args.out))
    for table in summary_tables(profile):
        console.print(table)
    for group, e in profile.cross_validation["groups"].items():
        if e["mape_pct"] > TARGET_MAPE_PCT or e["max_pct"] > TARGET_WORST_PCT:
            console.print(f"[yellow]{group}: cross-validated error {e['mape_pct']:.1f}% (worst {e['max_pct']:.1f}%) "
                          f"misses the targets ({TARGET_MAPE_PCT:g}%, worst {TARGET_WORST_PCT:g}%)[/]")
    console.print(f"wrote {path} (nexus-tune profile show {path} --plot curves.png draws it)")
    return 0

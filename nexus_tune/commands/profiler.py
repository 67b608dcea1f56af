"""The SM sweep behind `nexus-tune profile`: time real model steps on every side of the splits.

1. Identify the GPU, pre-create every split (green contexts), start the processes that fit, build
   the model runner (engine, imported here and only here, lazily).
2. A pilot step of each phase on the whole GPU warms the kernels up and calibrates a roofline
   estimate of every step's time and the host time per point (input preparation, graph capture).
   The estimate plans the sweep and drives the progress bar; the pace measured so far (wall time
   over estimate) converts the command's wall-clock budget into estimated seconds.
3. The adaptive sweep (core/grid.py `AdaptiveSweep`, settings in `SWEEPS`): a coarse pass over the
   grid's ends and random held-out points, then rounds of fit (the LatencyModel and its k-fold
   cross-validation, in parallel processes) and points where the fits disagree or mispredict their
   measured neighbours, until the budget is spent. Timing a point: prefill on the prefill stream of
   a split with that many SMs, decode as a CUDA graph captured on the decode stream; warm-up,
   repeats, median; per operator class (attention, dense) and whole step. Contention: decode graph
   replays timed with events while a prefill runs on the complementary partition.
4. The last round's fit, which saw every sample, is the profile's model; its error on the random
   held-out points and its cross-validation are saved with it.

`--from OTHER.json` (the same model profiled on another GPU): a short sweep, and OTHER's model
rescaled to it (core/profile.py `rescale_fit`), unless a fresh fit of the new points cross-validates
better (OTHER's curve shapes do not carry over); the error is reported on the new points held out.

Budgets (whole command, `SWEEPS`): full 165 s, quick 50 s, --from 45 s; `tests/test_grid_adaptive.py`
checks that the sweep stays within them by the estimate.
"""
from __future__ import annotations
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any
from nexus_tune.core.latency_model import LatencyModel, Sample
from nexus_tune.core.crossval import FOLDS, TARGET_MAPE_PCT, TARGET_WORST_PCT, Map
from nexus_tune.core.profile import (SCALE_NAMES, Profile, ProfileError, model_slug, profile_path, rescale_fit,
                                     rescaled)
from nexus_tune.commands.profile_view import summary_tables
from nexus_tune.core.grid import (CONTENDED_STEPS, PILOT_DECODE, PILOT_PREFILL, ROUND_GROWTH, SWEEPS, WARMUP,
                                  AdaptiveSweep, Fitted, Plan, Point, RooflineCost, adaptive_sweep,
                                  contention_window_ms, fit_and_validate, fresh_fit, plan_sweep, repeats)

# Wall time kept back from the sweep: each fit round still to come takes the last one's time grown by
# FIT_GROWTH (a round adds at most ROUND_GROWTH of the samples), and saving and printing the profile
# take REPORT_S. FIRST_FIT_S: a guess until a round is timed (six fits in parallel processes, ~1-2 s each).
FIT_GROWTH = 1.0 + ROUND_GROWTH
REPORT_S = 3.0
FIRST_FIT_S = 4.0


# -- timing on the GPU -------------------------------------------------------------------------
def _median_ms(fn: Callable[[Any], None], stream: Any, est_ms: float) -> float:
    """Each run from an idle stream: events bracket the launch, so CPU launch gaps count as they would in serving."""
    from nexus_tune.engine.cuda_graphs import event_times_ms  # imports torch: the CLI loads without it

    for _ in range(WARMUP):
        fn(stream)
    stream.synchronize()
    return statistics.median(event_times_ms(fn, stream, repeats(est_ms)))


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
    """Times plan points on the streams of a SplitTable through a PhaseRunner, advancing a progress bar
    by each point's estimate; keeps the pace (wall time over estimate) and what could not be timed."""

    def __init__(self, runner: Any, table: Any, progress: Any, task: Any) -> None:
        self.runner, self.table, self.progress, self.task = runner, table, progress, task
        self.total_sms = table.total_sms
        self.by_decode_sms = {split.decode_sms: split for split in table}
        self.failed: dict[tuple[str, int], str] = {}  # (phase, SMs) whose kernels the GPU refused to run
        self.skipped: list[str] = []
        self.wall_s = self.estimated_s = 0.0  # spent measuring, and what the estimate said it would take
        self.stop_at = math.inf  # time.perf_counter() past which the rest of a batch is left out

    @property
    def pace(self) -> float:
        """Wall seconds per estimated second so far (1 before any point)."""
        return self.wall_s / self.estimated_s if self.estimated_s else 1.0

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

    def run(self, plan: Plan, stage: str) -> list[Sample]:
        """Every point of the plan, labelled `stage` on the bar, until `stop_at` (the rest of a round
        are its least useful points: they come in the order the sweep chose them)."""
        import torch

        samples, start = [], time.perf_counter()
        for i, p in enumerate(plan.points):
            if time.perf_counter() > self.stop_at:
                self.skipped.append(f"{len(plan.points) - i} points of {stage}: the time budget ran out")
                break
            label = f"{p.phase} {p.part} size={p.size} kv={p.kv} on {p.sms} SMs" + (
                f" beside a {p.prefill_tokens}-token prefill" if p.prefill_tokens else "")
            self.progress.update(self.task, description=f"{stage} [{i + 1}/{len(plan.points)}] {label}")
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
                self.skipped.append(label)
            else:
                samples.append(p.sample(ms))
            self.progress.advance(self.task, plan.point_seconds(i))
            self.estimated_s += plan.point_seconds(i)
        self.wall_s += time.perf_counter() - start
        return samples


# -- the command -------------------------------------------------------------------------------
def _build_runner(model: str, device: int) -> tuple[Any, Any]:
    """(PhaseRunner, ModelConfig) from the engine, imported only now: nexus_tune never needs it otherwise.

    The runner sizes its KV cache as `nexus-tune serve` does by default, so kv_capacity_tokens is
    what serving will hold.
    """
    from nexus_tune.engine.model_runner import ModelRunner

    try:
        runner = ModelRunner(model, device=f"cuda:{device}")
    except ValueError as e:  # unknown preset, unreadable checkpoint, unsupported architecture
        raise ProfileError(f"cannot load model {model!r}: {e}") from None
    return runner, runner.config


def _model_config(model: str) -> Any:
    """The engine's ModelConfig of a preset or checkpoint folder, without loading weights."""
    from nexus_tune.engine.config import PRESETS, ConfigError, ModelConfig, get_preset

    try:
        return get_preset(model) if model in PRESETS else ModelConfig.from_pretrained(model)
    except (ConfigError, OSError, ValueError) as e:
        raise ProfileError(f"cannot load model {model!r}: {e}") from None


def load_prior(path: str, model: str) -> Profile:
    """The profile `--from` rescales: readable, and of this very model (its config hash), any GPU."""
    prior = Profile.load(path)
    config = _model_config(model)
    if prior.model["config_hash"] != config.config_hash():
        raise ProfileError(
            f"--from {path} is a profile of {prior.model['name']} (config {prior.model['config_hash']}), not of "
            f"{config.name} (config {config.config_hash()}): rescaling needs the same model profiled on another "
            f"GPU; without one, profile from scratch: nexus-tune profile --model {model}")
    return prior


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


@contextmanager
def _fit_workers() -> Iterator[Map]:
    """A map that fits the folds (and the training fit) in parallel processes, spawned: a forked
    child of a process that holds a CUDA context cannot use it, and the fit needs none."""
    workers = min(FOLDS + 1, len(os.sched_getaffinity(0)))
    if workers < 2:
        yield map
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # They start now, and unpickling a function of the grid imports the fit there (~1 s), while the model loads.
        pool.map(repeats, range(workers))
        yield pool.map


def _fit_better(prior_fit: Fitted, setup: LatencyModel, samples: list[Sample], map_: Map) -> tuple[Fitted, str]:
    """The rescaled prior, or a fresh fit of the new points where it cross-validates better on average
    over the groups (the prior's curve shapes did not carry over); and which one."""
    fresh = fit_and_validate(partial(fresh_fit, setup), samples, map_=map_)

    def mean_mape(f: Fitted) -> float:
        return statistics.mean(g["mape_pct"] for g in f.cv.groups().values())

    return (fresh, "fresh") if mean_mape(fresh) < mean_mape(prior_fit) else (prior_fit, "rescaled")


@dataclass
class _Budget:
    """The command's wall-clock deadline, less the fits and the report still to come."""

    deadline: float  # time.perf_counter() by which the profile is written
    reserve_s: float  # kept for after the sweep's fits: the report (and --from's fresh fit)
    fit_s: float = FIRST_FIT_S  # the last fit round's wall time

    def wall_left(self, fits: int) -> float:
        """Wall seconds measuring may still take once `fits` fit rounds still to come and the reserve
        are taken off."""
        return max(0.0, self.deadline - time.perf_counter() - fits * FIT_GROWTH * self.fit_s - self.reserve_s)


def _sweep(sweep: AdaptiveSweep, bar: Sweep, fit: Callable[[list[Sample]], LatencyModel], map_: Map,
           budget: _Budget) -> tuple[list[Sample], Fitted]:
    """Run the adaptive sweep: measure what it asks for, fit in the worker processes, time each fit."""
    stages = iter(["coarse pass"] + [f"round {n}/{sweep.spec.rounds}" for n in range(1, sweep.spec.rounds + 1)])

    def fit_round(samples: list[Sample]) -> Fitted:
        bar.progress.update(bar.task, description=f"fitting {len(samples)} samples ({FOLDS}-fold cross-validation)")
        start = time.perf_counter()
        fitted = fit_and_validate(fit, samples, map_=map_)
        budget.fit_s = time.perf_counter() - start
        return fitted

    def seconds_left() -> float:
        wall = budget.wall_left(sweep.rounds_left)  # a fit after each round left
        bar.stop_at = time.perf_counter() + wall  # the first pass runs whole; a round stops at the deadline
        bar.progress.update(bar.task, total=bar.estimated_s + wall / bar.pace)
        return wall / bar.pace

    return adaptive_sweep(sweep, lambda plan: bar.run(plan, next(stages)), fit_round, seconds_left)


def profile_model(model: str, device: int, quick: bool, console: Any, prior: Profile | None = None) -> Profile:
    """Measure, fit and return the profile (not yet saved); with `prior`, rescale that profile of the
    model on another GPU. Raises ProfileError for expected failures."""
    import torch
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

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
    spec = SWEEPS["from" if prior else "quick" if quick else "full"]
    budget = _Budget(started + spec.budget_s, REPORT_S + (FIRST_FIT_S if prior else 0.0))
    with SplitTable(device, warn=False) as table, _fit_workers() as map_:
        if table.backend != GREEN_CONTEXTS:
            raise ProfileError(f"the SM sweep needs disjoint SM partitions (green contexts), and this machine has "
                               f"none: {table.fallback_reason}")
        runner, config = _build_runner(model, device)
        kv_capacity = int(runner.kv_capacity_tokens)
        total = table.total_sms
        pilot = _pilot(runner, table)
        cost = RooflineCost.of_config(config, total).calibrated(pilot.prefill_ms, pilot.decode_ms)
        split_sms = usable_splits(table.split_sms, total, table.granularity.min_partition)
        setup = LatencyModel(total, split_sms, config.num_attention_heads)
        sweep = plan_sweep(spec, split_sms, total, kv_capacity, cost, runner.max_model_len, pilot.prep_s,
                           pilot.capture_s, budget.wall_left(spec.rounds + 1))
        source = f", rescaling the profile from {prior.gpu.get('name', prior.gpu['slug'])}" if prior else ""
        console.print(f"{gpu.name}: {len(table)} splits ({table.granularity.min_partition}-SM granularity); "
                      f"{spec.name} sweep{source}: a coarse pass of {len(sweep.coarse.points)} points, then "
                      f"{spec.rounds} round{'s' * (spec.rounds != 1)} of points where the fit is least sure, "
                      f"within {spec.budget_s:.0f} s")
        columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            # The bar advances by estimated seconds out of those the budget allows, so its ETA is
            # the estimate corrected by the pace so far.
            bar = Sweep(runner, table, progress, progress.add_task("profiling", total=sweep.budget_s))
            try:
                if prior:
                    samples, rescaled_fit = _sweep(sweep, bar, partial(rescale_fit, prior.latency_model, setup),
                                                   map_, budget)
                    progress.update(bar.task, description="a fresh fit of the new points, to compare")
                    fitted, kept = _fit_better(rescaled_fit, setup, samples, map_)
                else:
                    samples, fitted = _sweep(sweep, bar, partial(fresh_fit, setup), map_, budget)
            except ValueError as e:  # a whole phase failed to measure
                raise ProfileError(f"cannot fit the latency model: {e}") from None
            progress.update(bar.task, total=bar.estimated_s, completed=bar.estimated_s, description="profiled")
        for label in bar.skipped:
            console.print(f"[yellow]not measured: {label}[/]")
        # A split whose side failed is no split the engine may pick.
        fitted.model.split_sms = [p for p in split_sms if ("prefill", p) not in bar.failed
                                  and ("decode", total - p) not in bar.failed]
        grid = sweep.plan.describe() | {
            "rounds": spec.rounds, "budget_s": spec.budget_s, "measured_s": round(time.perf_counter() - started, 1),
            "skipped": bar.skipped, "pilot": {k: round(v, 4) for k, v in asdict(pilot).items()}}
        if prior:
            as_was = rescaled(prior.latency_model, setup, [0.0] * len(SCALE_NAMES))  # on this GPU's SM shares
            grid["from"] = {"gpu": prior.gpu.get("name", prior.gpu["slug"]), "created": prior.created, "kept": kept,
                            "prior_error": as_was.errors(samples)}
        return Profile(
            gpu=gpu.to_dict(), software=software_versions(),
            model={"name": config.name, "slug": model_slug(config.name), "config_hash": config.config_hash()},
            backend=table.backend, granularity=table.granularity.to_dict(), split_sms=fitted.model.split_sms,
            kv_capacity_tokens=kv_capacity, latency_model=fitted.model, samples=samples,
            fit_error=fitted.fit_error, cross_validation=fitted.cv.summary(), grid=grid,
        )


def run_profile(args: Any) -> int:
    from rich.console import Console

    console, errors = Console(), Console(stderr=True)
    if not args.model:
        errors.print("[bold red]error:[/] say which model: nexus-tune profile --model PRESET|CHECKPOINT_FOLDER")
        return 2
    try:
        prior = load_prior(args.from_profile, args.model) if args.from_profile else None
        profile = profile_model(args.model, args.device, args.quick, console, prior)
    except ProfileError as e:
        errors.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        errors.print("interrupted: no profile written")
        return 130
    path = profile.save(profile_path(profile.gpu["slug"], profile.model["name"], args.out))
    for table in summary_tables(profile):
        console.print(table)
    if prior:
        source = profile.grid["from"]
        console.print(f"from {source['gpu']}: its model as it was mispredicts the new points by "
                      + ", ".join(f"{g} {e['mape_pct']:.1f}%" for g, e in source["prior_error"].items())
                      + f"; kept the {source['kept']} fit (cross-validated above; fit error: the held-out points)")
    for kind, groups in (("cross-validated", profile.cross_validation["groups"]), ("held-out", profile.fit_error)):
        for group, e in groups.items():
            if e["mape_pct"] > TARGET_MAPE_PCT or e["max_pct"] > TARGET_WORST_PCT:
                console.print(f"[yellow]{group}: {kind} error {e['mape_pct']:.1f}% (worst {e['max_pct']:.1f}%) "
                              f"misses the targets ({TARGET_MAPE_PCT:g}%, worst {TARGET_WORST_PCT:g}%)[/]")
    console.print(f"wrote {path} (nexus-tune profile show {path} --plot curves.png draws it)")
    return 0

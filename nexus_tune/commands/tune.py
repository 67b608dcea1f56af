"""`nexus-tune tune`: optuna searches the controller's knobs for the highest simulated capacity.

Capacity is the highest arrival rate at which 90% of requests meet the SLOs. It is found by
a ladder (multiply the rate until attainment fails) then geometric bisection, each step one
run of the simulator on the same requests (traces at different rates are time-scaled copies),
with a bounded number of simulations. After the baseline, every trial starts its search at
the best capacity so far and never looks below 40% of it: a trial that cannot reach the best
is known to be worse after at most three simulations, and low rates are the slow ones.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import optuna
from rich.console import Console
from rich.table import Table

from nexus_tune.core import metrics
from nexus_tune.commands.reporting import progress_bar
from nexus_tune.core.controller import CHUNK_CHOICES, ControllerKnobs
from nexus_tune.core.profile import Profile, ProfileError
from nexus_tune.core.simulator import simulate
from nexus_tune.core.workload import TraceRequest, make_trace

TRIAL_BATCH = 4  # trials simulated at once (fixed, so results do not depend on the core count)


def find_capacity(attainment: Callable[[float], float], start: float, step: float = 2.0, rel_tol: float = 0.05,
                  max_evals: int = 10, min_rate: float = 0.0,
                  max_rate: float = math.inf) -> tuple[float, dict[float, float]]:
    """Highest rate with attainment >= metrics.ATTAINMENT_TARGET, assuming attainment falls with rate.

    Climbs (or descends) from `start` by factors of `step` until a passing and a failing rate
    bracket the threshold, then bisects geometrically until they are within `rel_tol`, or
    `max_evals` calls were spent, or the descent would go below `min_rate` (low rates are the
    slowest to simulate). The climb stops at `max_rate`. Returns (capacity, {rate: attainment});
    capacity is 0.0 when no rate tried passed.
    """
    if start <= 0 or step <= 1:
        raise ValueError(f"capacity search needs start > 0 and step > 1, got {start}, {step}")
    tried: dict[float, float] = {}
    good, bad = None, None  # highest passing rate, lowest failing rate
    rate = start
    while len(tried) < max_evals:
        tried[rate] = attainment(rate)
        if tried[rate] >= metrics.ATTAINMENT_TARGET:
            good = rate
        else:
            bad = rate
        if good is None:
            rate = bad / step
            if rate < min_rate:
                break
        elif bad is None:
            if good >= max_rate:
                break
            rate = min(good * step, max_rate)
        elif bad / good <= 1 + rel_tol:
            break
        else:
            rate = math.sqrt(good * bad)
    return good or 0.0, tried


@dataclass
class CapacityProbe:
    """SLO attainment of one policy and knob set at a given rate, by simulation; keeps every summary."""

    profile: Profile
    workload: str
    num_prompts: int
    seed: int
    slos: dict[str, float]
    policy: str = "nexus"
    knobs: ControllerKnobs | None = None
    burstiness: float = 1.0  # arrivals: 1 is Poisson, below 1 burstier (gamma shape)
    summaries: dict[float, dict] = field(default_factory=dict)

    def summary(self, rate: float) -> dict:
        if rate not in self.summaries:
            trace = make_trace(self.workload, self.num_prompts, rate, self.burstiness, self.seed)
            self.summaries[rate] = simulate(self.profile, trace, self.policy, self.knobs).summary(self.slos)
        return self.summaries[rate]

    def __call__(self, rate: float) -> float:
        return self.summary(rate)["slo_attainment"]


def search_capacity(probe: CapacityProbe, start: float, step: float = 2.0, max_evals: int = 10,
                    min_rate: float = 0.0, max_rate: float = math.inf) -> tuple[float, dict[float, dict]]:
    """`find_capacity` through `probe`: (capacity, {rate: summary}). A process-pool job."""
    cap, _ = find_capacity(probe, start, step, max_evals=max_evals, min_rate=min_rate, max_rate=max_rate)
    return cap, probe.summaries


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(fn: Callable, jobs: list[tuple], workers: int | None = None,
                 on_result: Callable[[], None] = lambda: None) -> list:
    """[fn(*job) for job in jobs], in worker processes (simulations are CPU-bound Python)."""
    workers = min(workers or default_workers(), len(jobs))
    if workers <= 1:
        results = []
        for job in jobs:
            results.append(fn(*job))
            on_result()
        return results
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for _ in as_completed(futures):
            on_result()
        return [f.result() for f in futures]


def prefill_bound(profile: Profile, workload: str, num_prompts: int, seed: int) -> float:
    """The arrival rate (req/s) at which the whole GPU would do nothing but prefill the workload's
    prompts in 2048-token chunks. No policy sustains more."""
    sms = profile.gpu["sm_count"]
    chunk = 2048
    tokens_per_s = chunk / profile.latency_model.predict_prefill(chunk, 0, sms) * 1e3
    trace = make_trace(workload, num_prompts, 1.0, seed=seed)
    return tokens_per_s * len(trace) / sum(r.prompt_tokens for r in trace)


def rate_range(profile: Profile, workload: str, num_prompts: int, seed: int) -> tuple[float, float]:
    """(where a capacity search starts, the rate it never exceeds), from the prefill-only bound: a
    finite trace far above the bound can still pass (a short burst fits in one batch), so the search
    stops at 1.5x it."""
    bound = prefill_bound(profile, workload, num_prompts, seed)
    return 0.5 * bound, 1.5 * bound


def suggest_knobs(trial: optuna.Trial, slos: dict[str, float]) -> ControllerKnobs:
    """One point of the search space; knobs a mode does not read are not suggested in it."""
    params: dict = {
        "mode": trial.suggest_categorical("mode", ["paper", "slo"]),
        "delta": trial.suggest_float("delta", 0.0, 0.25),
        "gamma": trial.suggest_float("gamma", 0.1, 300.0, log=True),
        "prefill_chunk_tokens": trial.suggest_categorical("prefill_chunk_tokens", list(CHUNK_CHOICES)),
    }
    if params["mode"] == "paper":
        params["alpha"] = trial.suggest_float("alpha", 1.0, 4.0)
        params["beta"] = trial.suggest_float("beta", 1.0, 3.0)
        params["kv_threshold"] = trial.suggest_float("kv_threshold", 0.3, 0.95)
    else:  # slo mode reads the TBT margin (the TTFT SLO only sizes for_profile's chunk: a knob here)
        params["tbt_margin"] = trial.suggest_float("tbt_margin", 0.0, 0.6)
    return ControllerKnobs(**params).with_slos(slos)


def _as_params(knobs: ControllerKnobs) -> dict:
    """The trial parameters that reproduce `knobs` (for enqueueing a known point)."""
    keys = ["mode", "delta", "gamma", "prefill_chunk_tokens"]
    keys += ["alpha", "beta", "kv_threshold"] if knobs.mode == "paper" else ["tbt_margin"]
    return {k: getattr(knobs, k) for k in keys}


def tune(profile: Profile, workload: str, slos: dict[str, float], trials: int, seed: int = 0,
         num_prompts: int = 1000, max_sims: int = 6, workers: int | None = None,
         on_trial: Callable[[], None] = lambda: None) -> dict:
    """Search the knobs; the first trial is the profile's current knobs (tuned, else derived).

    The baseline runs alone with a full search; then trials run in batches of TRIAL_BATCH, one
    process each: TPE asks a batch, the simulations run in parallel, the results are told in
    order, so a seed gives the same search on any number of cores. Returns {"best_knobs",
    "best_capacity", "baseline_knobs", "baseline_capacity", "trials"}.
    """
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    baseline = ControllerKnobs.for_profile(profile, slos)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(_as_params(baseline))
    best_cap, best_knobs = 0.0, baseline
    start, ceiling = rate_range(profile, workload, num_prompts, seed)
    told = 0  # not len(study.trials): that counts the enqueued baseline before it is asked
    while told < trials:
        if best_cap > 0:  # start at the best so far; a trial far below it is known bad after few runs
            size, search = TRIAL_BATCH, (best_cap, 1.5, max_sims, best_cap / 2.5, ceiling)
        else:  # the baseline alone first (and whatever follows it while nothing passes): a full search
            size, search = 1, (start, 2.0, 2 * max_sims, 0.0, ceiling)
        asked = [study.ask() for _ in range(min(size, trials - told))]
        told += len(asked)
        knobs = [suggest_knobs(t, slos) for t in asked]
        jobs = [(CapacityProbe(profile, workload, num_prompts, seed, slos, "nexus", k), *search) for k in knobs]
        results = parallel_map(search_capacity, jobs, workers, on_trial)
        for trial, k, (cap, _) in zip(asked, knobs, results):
            study.tell(trial, cap)
            if cap > best_cap:
                best_cap, best_knobs = cap, k
    return {"best_knobs": best_knobs, "best_capacity": best_cap, "baseline_knobs": baseline,
            "baseline_capacity": study.trials[0].value, "trials": len(study.trials)}


def knobs_table(columns: dict[str, ControllerKnobs], title: str = "Controller knobs") -> Table:
    table = Table(title=title)
    table.add_column("knob")
    for name in columns:
        table.add_column(name, justify="right")
    for key in ControllerKnobs().to_dict():
        values = [getattr(k, key) for k in columns.values()]
        table.add_row(key, *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values))
    return table


def check_slos_reachable(profile: Profile, trace: list[TraceRequest], slos: dict[str, float]) -> None:
    """Raise ValueError when no arrival rate can meet `slos` for ATTAINMENT_TARGET of `trace`'s requests.

    Each request is timed alone on the whole GPU, its prompt in one prefill step, kernel time only:
    no policy does better. If too few requests meet the SLOs even so, a capacity search could only
    end at 0, after its slowest simulations (the low rates)."""
    model, sms = profile.latency_model, profile.gpu["sm_count"]
    alone = []
    for r in trace:
        first_s = model.predict_prefill(r.prompt_tokens, 0, sms) * 1e-3
        per_token_s = model.predict_decode(1, r.prompt_tokens, sms) * 1e-3
        alone.append(metrics.RequestRecord(r.request_id, 0.0, r.prompt_tokens, r.output_tokens, first_token_s=first_s,
                                           finish_s=first_s + (r.output_tokens - 1) * per_token_s, success=True))
    share, target = metrics.slo_attainment(alone, slos), metrics.ATTAINMENT_TARGET
    if share >= target:
        return
    rank = math.ceil(target * len(alone)) - 1  # the limit that `target` of the requests meet alone
    least = ", ".join(f"{name} {sorted(getattr(r, f'{name}_ms') for r in alone)[rank]:.4g}" for name in slos)
    raise ValueError(f"no arrival rate meets {', '.join(f'{k}={v:g}' for k, v in slos.items())} ms for "
                     f"{target:.0%} of the requests: even alone on the whole GPU only {share:.0%} do. "
                     f"Limits {target:.0%} of them meet alone: at least {least} ms")


def sim_inputs(args) -> tuple[Profile, dict[str, float]]:
    """The profile and SLOs a `tune` or `plan` command line names; a bad workload or SLOs no rate can
    meet fail here, before any simulation. Raises ValueError or ProfileError."""
    slos = metrics.parse_slos(args.slo)
    if not slos:
        raise ValueError("--slo is empty: give ttft=MS,tpot=MS")
    profile = Profile.load(args.profile)
    check_slos_reachable(profile, make_trace(args.workload, args.num_prompts, 1.0, seed=args.seed), slos)
    return profile, slos


def checked_sim_inputs(args) -> tuple[Profile, dict[str, float]] | None:
    """sim_inputs, a bad command line reported as one error line (and None)."""
    from nexus_tune.commands.cli import report_error

    try:
        return sim_inputs(args)
    except (ValueError, ProfileError) as e:
        report_error(str(e))
        return None


def capacity_text(capacity: float, ceiling: float) -> str:
    """A capacity as printed: a search that reached its ceiling only knows a lower bound."""
    return f">={capacity:.3g}" if capacity >= ceiling else f"{capacity:.3g}"


CEILING_NOTE = (">=: the search stops at 1.5x the prefill-only bound (the GPU doing nothing but prefill); "
                "the SLOs do not limit the capacity below that")


def run_tune(args) -> int:
    from nexus_tune.commands.cli import report_error

    if (inputs := checked_sim_inputs(args)) is None:
        return 2
    profile, slos = inputs
    console = Console()
    progress = progress_bar(console)
    with progress:
        task = progress.add_task("tuning", total=args.trials)
        out = tune(profile, args.workload, slos, args.trials, args.seed, args.num_prompts,
                   on_trial=lambda: progress.advance(task))
    console.print(knobs_table({"before": out["baseline_knobs"], "tuned": out["best_knobs"]}))
    ceiling = rate_range(profile, args.workload, args.num_prompts, args.seed)[1]
    console.print(f"Capacity under {args.slo} on {args.workload}: {capacity_text(out['baseline_capacity'], ceiling)} "
                  f"-> {capacity_text(out['best_capacity'], ceiling)} req/s after {out['trials']} trials")
    if out["best_capacity"] >= ceiling:
        console.print(CEILING_NOTE)
    profile.tuned_knobs = out["best_knobs"].to_dict()
    try:
        profile.save(args.profile)
    except (OSError, ProfileError) as e:  # the CLI checked the file is writable; this is what changed since
        report_error(f"could not write the tuned knobs: {e}")
        return 1
    console.print(f"Tuned knobs written to {args.profile}")
    return 0

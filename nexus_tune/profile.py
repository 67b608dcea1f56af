"""`Profile`: one GPU's and one model's measured latency curves, as versioned JSON.

Written by `nexus-tune profile` to `profiles/<gpu-slug>/<model-slug>.json` (docs/profile-format.md
has the schema); read by serve, simulate, tune and plan. Loading refuses, with the command that
makes the right file, a profile of another GPU, of another model, of a newer schema, or a corrupt
one. `nexus-tune profile show` prints it and plots latency against SMs.

`synthetic_profile()` builds a profile from H100-like parameters (docs/gpu-facts.md) for tests of other parts;
it is marked `"synthetic": true` and is never written under the repository's profiles/.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from nexus_tune.controller import ControllerKnobs
from nexus_tune.latency_model import PHASES, LatencyModel, OpClass, Sample
from nexus_tune.overhead import StepOverhead, overhead_table
from nexus_tune.partition import Granularity, split_sizes

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("profiles")
_REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"


class ProfileError(Exception):
    """A profile that cannot be used here; the message names the command that makes the right one."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no SM count


def model_slug(name: str) -> str:
    """A path component for a model name or checkpoint folder: "Meta-Llama-3.1-8B" -> "meta-llama-3.1-8b"."""
    slug = re.sub(r"[^a-z0-9.]+", "-", Path(str(name).rstrip("/")).name.lower()).strip("-.")
    return slug or "model"


def profile_path(gpu_slug: str, model_name: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """Where `nexus-tune profile --model model_name --out root` writes on the GPU `gpu_slug`."""
    return Path(root) / gpu_slug / f"{model_slug(model_name)}.json"


def _make_command(model: str, path: Path | None) -> str:
    cmd = f"nexus-tune profile --model {model}"
    root = path.parent.parent if path is not None else DEFAULT_ROOT
    return cmd if root in (DEFAULT_ROOT, Path(".")) else f"{cmd} --out {root}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Profile:
    gpu: dict[str, Any]  # DeviceInfo.to_dict(): name, slug, sm_count, memory_bytes, ...
    model: dict[str, Any]  # name, slug, config_hash
    granularity: dict[str, Any]  # total_sms, min_partition, alignment, from_device
    split_sms: list[int]  # prefill SM counts of every pre-creatable split
    kv_capacity_tokens: int  # KV tokens the engine's cache holds beside the weights on this GPU
    latency_model: LatencyModel
    samples: list[Sample]
    fit_error: dict[str, dict[str, float]]  # held-out error per phase (and "contention")
    software: dict[str, Any] = field(default_factory=dict)
    backend: str = "green-contexts"
    grid: dict[str, Any] = field(default_factory=dict)  # what was swept and how long it took
    created: str = field(default_factory=_now)
    tuned_knobs: dict[str, Any] | None = None
    step_overhead: StepOverhead | None = None  # the engine's cost beyond kernel time (nexus_tune/overhead.py)
    synthetic: bool = False
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Refuse what the simulator and engine cannot run on (they would fail later, far from the cause)."""
        sms = self.gpu.get("sm_count")
        if not _is_int(sms) or sms < 1:
            raise ValueError(f"gpu.sm_count must be a positive integer, got {sms!r}")
        if not self.split_sms or not all(_is_int(s) and 0 < s < sms for s in self.split_sms):
            raise ValueError(f"split_sms must list prefill SM counts in 1..{sms - 1}, got {self.split_sms!r}")
        if not _is_int(self.kv_capacity_tokens) or self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be a positive integer, got {self.kv_capacity_tokens!r}")
        if self.tuned_knobs is not None:
            if not isinstance(self.tuned_knobs, dict):
                raise TypeError("tuned_knobs must be an object or null")
            ControllerKnobs.from_dict(self.tuned_knobs)  # raises on an unknown knob or a bad value

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "synthetic": self.synthetic,
            "created": self.created,
            "gpu": self.gpu,
            "software": self.software,
            "model": self.model,
            "backend": self.backend,
            "granularity": self.granularity,
            "split_sms": list(self.split_sms),
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "grid": self.grid,
            "fit_error": self.fit_error,
            "latency_model": self.latency_model.to_dict(),
            "tuned_knobs": self.tuned_knobs,
            "step_overhead": self.step_overhead.to_dict() if self.step_overhead else None,
            "samples": [s.to_dict() for s in self.samples],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        """Raises KeyError, TypeError or ValueError on a malformed dict (load turns them into ProfileError)."""
        for key, needed in (("gpu", ("slug", "sm_count")), ("model", ("name", "slug", "config_hash")),
                            ("granularity", ())):
            if not isinstance(d[key], dict):
                raise TypeError(f"{key} must be an object")
            missing = [k for k in needed if k not in d[key]]
            if missing:
                raise KeyError(f"{key}.{missing[0]}")
        return cls(
            gpu=d["gpu"], model=d["model"], granularity=d["granularity"],
            split_sms=[int(s) for s in d["split_sms"]], kv_capacity_tokens=int(d["kv_capacity_tokens"]),
            latency_model=LatencyModel.from_dict(d["latency_model"]),
            samples=[Sample.from_dict(s) for s in d["samples"]], fit_error=dict(d["fit_error"]),
            software=dict(d.get("software") or {}), backend=str(d.get("backend", "green-contexts")),
            grid=dict(d.get("grid") or {}), created=str(d["created"]), tuned_knobs=d.get("tuned_knobs"),
            step_overhead=StepOverhead.from_dict(d["step_overhead"]) if d.get("step_overhead") else None,
            synthetic=bool(d.get("synthetic", False)), schema_version=int(d["schema_version"]),
        )

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (a reader never sees half a file); returns the path."""
        path = Path(path)
        if self.synthetic and path.resolve().is_relative_to(_REPO_PROFILES):
            raise ProfileError(f"refusing to write a synthetic profile to {path}: "
                               "profiles/ holds measured profiles only")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, expect_gpu: Any = None, expect_model_hash: str | None = None) -> Profile:
        """Read and check a profile. expect_gpu: a DeviceInfo (or None: any GPU); expect_model_hash:
        the running model's ModelConfig.config_hash() (or None: any model)."""
        path = Path(path)
        guess = path.stem  # the model slug, for the hint when the file says nothing usable
        if not path.is_file():
            raise ProfileError(f"no profile at {path}; make one with: {_make_command(guess, path)}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ProfileError(f"{path} is not a readable profile ({e}); remake it with: "
                               f"{_make_command(guess, path)}") from None
        model = raw.get("model") if isinstance(raw, dict) else None
        model_name = model.get("name") if isinstance(model, dict) else None
        model_name = model_name if isinstance(model_name, str) and model_name else guess
        remake = _make_command(model_name, path)
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if not isinstance(version, int) or version < 1:
            raise ProfileError(f"{path} is not a nexus-tune profile (no valid schema_version); "
                               f"remake it with: {remake}")
        if version > SCHEMA_VERSION:
            raise ProfileError(f"{path} has schema {version}, newer than this nexus-tune reads ({SCHEMA_VERSION}): "
                               f"upgrade nexus-tune, or remake it with: {remake}")
        try:
            profile = cls.from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{path} is corrupt ({type(e).__name__}: {e}); remake it with: {remake}") from None
        if expect_gpu is not None and (profile.gpu["slug"] != expect_gpu.slug
                                       or profile.gpu["sm_count"] != expect_gpu.sm_count):
            raise ProfileError(
                f"{path} was measured on {profile.gpu.get('name', profile.gpu['slug'])} "
                f"({profile.gpu['sm_count']} SMs), not on this {expect_gpu.name} ({expect_gpu.sm_count} SMs); "
                f"make one for this GPU with: {_make_command(model_name, None)}")
        if expect_model_hash is not None and profile.model["config_hash"] != expect_model_hash:
            raise ProfileError(
                f"{path} is for model {model_name} (config {profile.model['config_hash']}), not for this model "
                f"(config {expect_model_hash}); make one for it with: nexus-tune profile --model <this model>")
        return profile


# -- summary and plot --------------------------------------------------------------------------
def _plot_configs(profile: Profile, phase: str, limit: int = 4) -> list[tuple[int, int]]:
    """(size, kv) pairs to draw: those with the most solo whole-step samples, spread over sizes."""
    counts: dict[tuple[int, int], int] = {}
    for s in profile.samples:
        if s.phase == phase and s.part == "all" and not s.prefill_tokens:
            counts[(s.size, s.kv)] = counts.get((s.size, s.kv), 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    chosen = sorted(ranked[: 2 * limit])
    picks = sorted({chosen[round(i)] for i in np.linspace(0, len(chosen) - 1, min(limit, len(chosen)))})
    if picks:
        return picks
    return [(512, 0), (2048, 0), (8192, 0)] if phase == "prefill" else [(8, 16384), (64, 131072), (256, 262144)]


def _reference_points(profile: Profile) -> list[tuple[str, int, int]]:
    cap = max(profile.kv_capacity_tokens, 1)
    return ([("prefill", n, 0) for n in (512, 2048, 8192)]
            + [("decode", b, min(b * 2048, cap)) for b in (8, 64, 256)])


def _largest_side(m: LatencyModel, phase: str) -> int:
    """The most SMs `phase` gets inside a split (the whole GPU when the model knows no splits)."""
    sides = m.sm_choices(phase)
    return sides[-2] if len(sides) > 1 else sides[-1]


def summary_tables(profile: Profile) -> list[Any]:
    """Rich tables: identity, held-out error, saturation points, fitted parameters, step overhead."""
    from rich.table import Table

    m = profile.latency_model
    info = Table(title="Profile" + (" [bold red](SYNTHETIC: tests only)[/]" if profile.synthetic else ""),
                 show_header=False)
    gran = profile.granularity
    for key, value in [
        ("GPU", f"{profile.gpu.get('name', '?')} ({profile.gpu['slug']}, {profile.gpu['sm_count']} SMs)"),
        ("model", f"{profile.model['name']} (config {profile.model['config_hash']})"),
        ("created", profile.created),
        ("backend", f"{profile.backend}, granularity {gran.get('min_partition')}/{gran.get('alignment')}"),
        ("splits (prefill SMs)", ", ".join(map(str, profile.split_sms))),
        ("KV capacity", f"{profile.kv_capacity_tokens:,} tokens"),
        ("samples", f"{len(profile.samples)} ({sum(s.holdout for s in profile.samples)} held out)"),
        ("grid", ", ".join(f"{k} {v}" for k, v in profile.grid.items() if not isinstance(v, (list, dict)))),
        ("software", ", ".join(f"{k} {v}" for k, v in profile.software.items() if v)),
        ("tuned knobs", json.dumps(profile.tuned_knobs) if profile.tuned_knobs else "none"),
    ]:
        info.add_row(key, value)

    err = Table(title="Fit error on held-out points")
    for col in ("phase", "MAPE %", "max %", "points"):
        err.add_column(col, justify="right" if col != "phase" else "left")
    for phase, e in profile.fit_error.items():
        err.add_row(phase, f"{e['mape_pct']:.1f}", f"{e['max_pct']:.1f}", str(e["n"]))

    sat = Table(title="Saturation: fewest SMs within 5% of the whole GPU, and of the phase's largest partition")
    for col in ("phase", "size", "KV", "whole GPU ms", "SMs", "largest side ms", "SMs "):
        sat.add_column(col, justify="left" if col == "phase" else "right")
    for phase, size, kv in _reference_points(profile):
        largest = _largest_side(m, phase)
        sat.add_row(phase, str(size), f"{kv:,}", f"{m.predict(phase, size, kv, m.total_sms):.2f}",
                    str(m.saturation_sms(phase, size, kv)), f"{m.predict(phase, size, kv, largest):.2f}",
                    str(m.saturation_sms(phase, size, kv, reference_sms=largest)))

    par = Table(title="Operator classes (SM shares)")
    for col in ("phase", "class", "r_sat", "decay", "mem r_sat", "mem decay", "whole", "t0 ms", "launch ms"):
        par.add_column(col, justify="left" if col in ("phase", "class") else "right")
    for phase in PHASES:
        for cls, p in m.classes_[phase].items():
            par.add_row(phase, cls, f"{p.r_sat:.3f}", f"{p.decay:.2f}", f"{p.mem_r_sat:.3f}", f"{p.mem_decay:.2f}",
                        f"{p.whole:.3f}", f"{p.t0_ms:.3f}", f"{p.launch_ms:.3f}")
    par.caption = "contention " + ", ".join(f"{k} {v:.3g}" for k, v in m.contention_.items())
    if profile.step_overhead is None:
        return [info, err, sat, par]
    steps = overhead_table(profile.step_overhead, "Engine step overhead: cycle = scale x predicted + fixed + "
                                                  "per_seq x rows (the simulator adds it)")
    return [info, err, sat, par, steps]


def plot_profile(profile: Profile, path: str | Path) -> Path:
    """Latency against SMs per phase: samples (o trained on, x held out), the fit, saturation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = profile.latency_model
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, phase in zip(axes, PHASES):
        partitions = m.sm_choices(phase)[:-1]
        for i, (size, kv) in enumerate(_plot_configs(profile, phase)):
            color = f"C{i}"
            ax.plot(partitions, [m.predict(phase, size, kv, s) for s in partitions], color=color,
                    label=f"{'P_T' if phase == 'prefill' else 'B_d'}={size} KV={kv:,}")
            ax.plot([m.total_sms], [m.predict(phase, size, kv, m.total_sms)], "*", color=color, ms=10)
            for s in profile.samples:
                if (s.phase, s.part, s.size, s.kv, s.prefill_tokens) == (phase, "all", size, kv, 0):
                    ax.plot(s.sms, s.ms, "x" if s.holdout else "o", color=color, mfc="none")
            sat = m.saturation_sms(phase, size, kv, reference_sms=_largest_side(m, phase))
            ax.plot([sat], [m.predict(phase, size, kv, sat)], "v", color=color, ms=9)
        ax.set(title=f"{phase} ({profile.model['name']}, {profile.gpu['slug']})", xlabel="SMs",
               ylabel="step latency (ms)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="line: fit, o/x: measured/held out, *: whole GPU, v: within 5% of the largest partition",
                  title_fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_show(args: Any) -> int:
    from rich.console import Console

    from nexus_tune.cli import report_error

    console = Console()
    try:
        profile = Profile.load(args.path)
    except ProfileError as e:
        report_error(str(e))
        return 2
    for table in summary_tables(profile):
        console.print(table)
    if args.plot:
        console.print(f"wrote {plot_profile(profile, args.plot)}")
    return 0


# -- synthetic profiles (tests only) ----------------------------------------------------------
# Parameters that reproduce docs/gpu-facts.md for Llama-3.1-8B on an H100 (132 SMs) within ~7%:
# prefill 2048 tokens 314/88/64/57 ms on 16/64/112/128 SMs and 46.5 on the whole GPU; decode
# 64 x 2048 KV 28.8/15.9/12.5/12.0 ms on 16/32/64/132 SMs; about +30% decode under a prefill.
# Prefill launches eagerly (~20 ms of Python per step, docs/performance.md), decode replays a
# CUDA graph.
_LLAMA_8B_H100 = {
    "classes": {
        "prefill": {
            "attention": OpClass([1.3, 0.3], 0.3, 1.0, [0.05], 0.15, 6.5, t0_ms=0.1, launch_ms=6.0, whole=0.9),
            "dense": OpClass([16.9], 0.2, 1.5, [1.42, 0.43], 0.15, 6.5, t0_ms=0.5, launch_ms=14.0, whole=0.81),
        },
        "decode": {
            "attention": OpClass([0.004, 0.5, 0.002], 0.3, 3.0, [0.01422, 0.05], 0.15, 6.5, t0_ms=0.1,
                                 launch_ms=0.02, whole=1.0),
            "dense": OpClass([25.0], 0.3, 3.0, [1.63, 0.3], 0.15, 6.5, t0_ms=0.3, launch_ms=0.02, whole=1.0),
        },
    },
    "overhead_ms": {"prefill": 0.2, "decode": 0.05},
    "contention": {"base": 0.15, "weights": 5.0, "activations": 2.0, "attention": 2.0},
}


def synthetic_latency_model(total_sms: int = 132, granularity: int = 8, scale: float = 1.0) -> LatencyModel:
    """The H100-like model of docs/gpu-facts.md; `scale` multiplies every time (0.4 is roughly a 3B model)."""
    m = LatencyModel(total_sms, split_sizes(Granularity(total_sms, granularity, granularity)))
    truth = _LLAMA_8B_H100
    m.classes_ = {
        phase: {c: OpClass([a * scale for a in p.compute], p.r_sat, p.decay, [b * scale for b in p.memory],
                           p.mem_r_sat, p.mem_decay, p.t0_ms * scale, p.launch_ms * scale, p.whole)
                for c, p in classes.items()}
        for phase, classes in truth["classes"].items()
    }
    m.overhead_ms_ = {k: v * scale for k, v in truth["overhead_ms"].items()}
    m.contention_ = dict(truth["contention"])
    return m


def synthetic_profile(total_sms: int = 132, granularity: int = 8, model_name: str = "llama-3.1-8b",
                      scale: float = 1.0, kv_capacity_tokens: int = 400_000, noise: float = 0.02,
                      seed: int = 0, config_hash: str = "synthetic", quick: bool = True) -> Profile:
    """A profile whose latency model is the synthetic truth, with samples drawn from it on the
    profiler's grid (quick by default) with log-normal noise of `noise`. Tests only."""
    from nexus_tune.profiler import plan_grid  # the profiler imports this module

    if noise < 0 or scale <= 0:
        raise ValueError("noise must be >= 0 and scale > 0")
    gran = Granularity(total_sms, granularity, granularity, from_device=False)
    splits = split_sizes(gran)
    truth = synthetic_latency_model(total_sms, granularity, scale)
    plan = plan_grid(splits, total_sms, kv_capacity_tokens, quick, truth.predict_part)
    rng = np.random.default_rng(seed)
    samples = []
    for p in plan.points:
        if p.prefill_tokens:
            ms = truth.predict_decode(p.size, p.kv, p.sms, p.prefill_tokens, p.prefill_kv)
        else:
            ms = truth.predict_part(p.phase, p.part, p.size, p.kv, p.sms)
        samples.append(p.sample(ms * math.exp(rng.normal(0.0, noise))))
    gpu = {"index": 0, "name": f"Synthetic GPU ({total_sms} SMs)", "slug": f"synthetic-{total_sms}sm",
           "sm_count": total_sms, "memory_bytes": 80 * 2**30, "compute_capability": [9, 0],
           "driver_version": "synthetic", "cuda_version": "synthetic"}
    return Profile(
        gpu=gpu, model={"name": model_name, "slug": model_slug(model_name), "config_hash": config_hash},
        granularity=gran.to_dict(), split_sms=splits, kv_capacity_tokens=kv_capacity_tokens,
        latency_model=truth, samples=samples, fit_error=truth.errors(s for s in samples if s.holdout),
        software={"python": sys.version.split()[0]}, grid=plan.describe(), synthetic=True,
    )

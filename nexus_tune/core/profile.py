"""`Profile`: one GPU's and one model's measured latency curves, as versioned JSON.

Written by `nexus-tune profile` to `profiles/<gpu-slug>/<model-slug>.json` (docs/profile-format.md
has the schema); read by serve, simulate, tune and plan. Loading refuses, with the command that
makes the right file, a profile of another GPU, of another model, of a newer schema, or a corrupt
one. `find_profile` is the one rule that says which file serves a GPU and a model. `fit_latency_model`
is how a profile's model is fitted and scored, by the profiler and by `Profile.refit` alike;
`rescale_fit` carries another GPU's model of the same LLM over to this GPU from a few points
(`nexus-tune profile --from`).
"""
from __future__ import annotations
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
import numpy as np
from scipy.optimize import least_squares
from nexus_tune.core.controller import ControllerKnobs
from nexus_tune.core.crossval import FOLDS, SEED
from nexus_tune.core.grid import fit_and_validate, fresh_fit
from nexus_tune.core.latency_model import CLASSES, PHASES, LatencyModel, Sample
from nexus_tune.core.overhead import StepOverhead

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("profiles")
REPO_PROFILES = Path(__file__).resolve().parents[2] / DEFAULT_ROOT  # the measured profiles that ship


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


def find_profile(gpu_slug: str, model_name: str) -> Path:
    """The profile that serves `model_name` on `gpu_slug` by default: profiles/<gpu>/<model>.json under
    the working directory (what `nexus-tune profile` writes there), else the one the repository ships.
    The path returned may not exist (the caller says how to make it)."""
    path = profile_path(gpu_slug, model_name)
    shipped = profile_path(gpu_slug, model_name, REPO_PROFILES)
    return shipped if not path.is_file() and shipped.is_file() else path


def _make_command(model: str, path: Path | None) -> str:
    cmd = f"nexus-tune profile --model {model}"
    root = path.parent.parent if path is not None else DEFAULT_ROOT
    return cmd if root in (DEFAULT_ROOT, Path(".")) else f"{cmd} --out {root}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fit_latency_model(setup: LatencyModel, samples: list[Sample], folds: int = FOLDS,
                      seed: int = SEED) -> tuple[LatencyModel, dict[str, Any], dict[str, Any]]:
    """(model, fit_error, cross_validation) of a profile's samples: a fresh model set up as `setup`,
    fitted on the training samples and scored on the held-out ones, and the k-fold summary over all."""
    fitted = fit_and_validate(partial(fresh_fit, setup), samples, folds, seed)
    return fitted.model, fitted.fit_error, fitted.cv.summary()


# Rescaling: per phase and operator class, compute, memory and fixed times (t0 and launch) and the
# whole GPU's factor scale; per phase, the overhead; and each contention term. Curve shapes (saturation,
# waves) stay the prior's. Each log-scale is pulled toward 0 (the other GPU's curve) by this weight
# against residuals in log units: a scale the few new points cannot pin stays near the prior.
RESCALE_PRIOR = 0.05
_CLASS_SCALES = ("compute", "memory", "fixed", "whole")
SCALE_NAMES = tuple([f"{phase} {cls} {what}" for phase in PHASES for cls in CLASSES for what in _CLASS_SCALES]
                    + [f"{phase} overhead" for phase in PHASES]
                    + [f"contention {term}" for term in LatencyModel(1).contention_])  # its terms, in order


def rescaled(prior: LatencyModel, setup: LatencyModel, log_scales: Sequence[float]) -> LatencyModel:
    """`prior`'s curves set up as `setup` (this GPU's SMs, splits, heads), scaled by exp(log_scales)
    (in SCALE_NAMES order)."""
    k = {name: math.exp(x) for name, x in zip(SCALE_NAMES, log_scales, strict=True)}
    m = setup.fresh()
    for phase in PHASES:
        m.classes_[phase] = {}
        for cls in CLASSES:
            op = prior.classes_[phase][cls]
            compute, memory, fixed, whole = (k[f"{phase} {cls} {what}"] for what in _CLASS_SCALES)
            m.classes_[phase][cls] = replace(op, compute=[a * compute for a in op.compute],
                                             memory=[b * memory for b in op.memory], t0_ms=op.t0_ms * fixed,
                                             launch_ms=op.launch_ms * fixed, whole=op.whole * whole)
        m.overhead_ms_[phase] = prior.overhead_ms_[phase] * k[f"{phase} overhead"]
    m.contention_ = {term: v * k[f"contention {term}"] for term, v in prior.contention_.items()}
    return m


def rescale_fit(prior: LatencyModel, setup: LatencyModel, samples: list[Sample]) -> LatencyModel:
    """`prior` (another GPU's fit, same LLM) rescaled to `samples` measured here (module level: a
    process pool pickles it)."""
    def residuals(x: np.ndarray) -> np.ndarray:
        m = rescaled(prior, setup, x)
        return np.concatenate([[math.log(m.sample_ms(s) / s.ms) for s in samples], RESCALE_PRIOR * x])

    # soft_l1 at 5%, as the full fit: one disturbed measurement must not rescale a whole class.
    fit = least_squares(residuals, np.zeros(len(SCALE_NAMES)), loss="soft_l1", f_scale=0.05)
    return rescaled(prior, setup, fit.x)


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
    cross_validation: dict[str, Any] | None = None  # crossval.CrossValidation.summary() of the samples
    software: dict[str, Any] = field(default_factory=dict)
    backend: str = "green-contexts"
    grid: dict[str, Any] = field(default_factory=dict)  # what was swept and how long it took
    created: str = field(default_factory=_now)
    tuned_knobs: dict[str, Any] | None = None
    step_overhead: StepOverhead | None = None  # the engine's cost beyond kernel time (nexus_tune/core/overhead.py)
    synthetic: bool = False
    refitted: str | None = None  # when `nexus-tune profile refit` last refitted the model (None: as profiled)
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
            "cross_validation": self.cross_validation,
            "refitted": self.refitted,
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
            cross_validation=d.get("cross_validation"), refitted=d.get("refitted"),
            software=dict(d.get("software") or {}), backend=str(d.get("backend", "green-contexts")),
            grid=dict(d.get("grid") or {}), created=str(d["created"]), tuned_knobs=d.get("tuned_knobs"),
            step_overhead=StepOverhead.from_dict(d["step_overhead"]) if d.get("step_overhead") else None,
            synthetic=bool(d.get("synthetic", False)), schema_version=int(d["schema_version"]),
        )

    def refit(self, attention_heads: int | None = None, folds: int = FOLDS, seed: int = SEED) -> Profile:
        """This profile with its latency model refitted from its samples as the profiler fits them (no
        GPU): fit_error and cross_validation recomputed, everything else kept. attention_heads: the
        model's query heads (prefill attention's waves), default the model's own setting.
        step_overhead and the model's prefill_contention_ stay as calibrated against the previous model
        (calibrate --from-runs redoes them)."""
        old = self.latency_model
        setup = LatencyModel(old.total_sms, old.split_sms, attention_heads or old.attention_heads)
        model, fit_error, cv = fit_latency_model(setup, self.samples, folds, seed)
        model.prefill_contention_ = old.prefill_contention_  # calibrated from engine steps, as step_overhead
        return replace(self, latency_model=model, fit_error=fit_error, cross_validation=cv, refitted=_now())

    def with_samples_of(self, others: Sequence[Profile]) -> Profile:
        """This profile with the samples of `others` added: more sweeps of the same model on the same GPU
        (refit it to use them). A point held out in one sweep and trained on in another is trained on."""
        mine = (self.gpu["slug"], self.gpu["sm_count"], self.model["config_hash"], self.backend)
        for other in others:
            theirs = (other.gpu["slug"], other.gpu["sm_count"], other.model["config_hash"], other.backend)
            if theirs != mine:
                raise ProfileError(f"samples of {other.model['name']} on {other.gpu['slug']} ({other.backend}) "
                                   f"cannot join a profile of {self.model['name']} on {self.gpu['slug']} "
                                   f"({self.backend}): same GPU, model and backend only")
        pooled = self.samples + [s for other in others for s in other.samples]
        trained = {s.key for s in pooled if not s.holdout}
        samples = [replace(s, holdout=False) if s.holdout and s.key in trained else s for s in pooled]
        grid = dict(self.grid, samples_from=[*self.grid.get("samples_from", [self.created]),
                                             *(other.created for other in others)])
        return replace(self, samples=samples, grid=grid)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (a reader never sees half a file); returns the path."""
        path = Path(path)
        if self.synthetic and path.resolve().is_relative_to(REPO_PROFILES):
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

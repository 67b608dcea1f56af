"""Request traces: the paper's workloads as synthetic length distributions, ShareGPT files,
and Poisson / gamma arrivals (vLLM's `--request-rate` and `--burstiness`).

Each synthetic dataset's token lengths come from a piecewise-linear quantile function that
passes exactly through the paper's p50, p95 and p99 (Nexus, Table 1). Below the median it
follows a lognormal whose spread is set by p50..p95; above p99 it extends the p95..p99 slope
for the last 1%; the one free knot left, p75, is solved in closed form so that the mean
matches too. Sampling is inverse-transform, so large samples reproduce all four statistics.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

SYNTHETIC = ("longdata", "arxiv", "sharegpt-synth", "mixed")
DATASETS = ("random", "sharegpt", *SYNTHETIC)
MIXED_SHAREGPT_SHARE = 0.6  # Mixed: 60% ShareGPT + 40% Long Data Collections


@dataclass(frozen=True)
class LengthStats:
    """Token-length statistics as the paper reports them."""

    mean: float
    p50: float
    p95: float
    p99: float


# Nexus Table 1: (input tokens, output tokens).
PAPER_STATS: dict[str, tuple[LengthStats, LengthStats]] = {
    "longdata": (LengthStats(5905, 5461, 9292, 9817), LengthStats(180, 159, 339, 454)),
    "arxiv": (LengthStats(3832, 3575, 6460, 6894), LengthStats(200, 181, 357, 443)),
    "sharegpt-synth": (LengthStats(496, 432, 970, 1367), LengthStats(97, 37, 383, 474)),
}


@dataclass
class TraceRequest:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prompt: str | None = None  # the text, for file-based datasets; bench writes one otherwise


class QuantileFunction:
    """Piecewise-linear inverse CDF through fixed (u, value) knots."""

    def __init__(self, stats: LengthStats):
        z = norm.ppf  # lognormal lower half: sigma from the p50..p95 spread
        sigma = math.log(stats.p95 / stats.p50) / z(0.95)
        q0 = stats.p50 * math.exp(sigma * z(0.01))  # the minimum sits where a lognormal's 1% point would
        q25 = stats.p50 * math.exp(sigma * z(0.25))
        q100 = stats.p99 + (stats.p99 - stats.p95) / 4  # the p95..p99 slope carried over the last 1%
        u = np.array([0.0, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0])
        q = np.array([q0, q25, stats.p50, 0.0, stats.p95, stats.p99, q100])
        # The mean is the integral of the quantile function: trapezoids, linear in the p75 knot.
        weights = np.zeros_like(u)
        widths = np.diff(u)
        weights[:-1] += widths / 2
        weights[1:] += widths / 2
        q[3] = (stats.mean - weights @ q) / weights[3]
        if not stats.p50 <= q[3] <= stats.p95:
            raise ValueError(f"length statistics {stats} are not fitted by a monotone quantile function")
        self.u, self.q = u, q

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.u, self.q)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.maximum(1, np.rint(self(rng.random(n)))).astype(int)


def synthetic_lengths(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, output tokens) of `n` requests of a synthetic dataset."""
    if name == "mixed":
        share = rng.random(n) < MIXED_SHAREGPT_SHARE
        short_in, short_out = synthetic_lengths("sharegpt-synth", n, rng)
        long_in, long_out = synthetic_lengths("longdata", n, rng)
        return np.where(share, short_in, long_in), np.where(share, short_out, long_out)
    stats_in, stats_out = PAPER_STATS[name]
    return QuantileFunction(stats_in).sample(rng, n), QuantileFunction(stats_out).sample(rng, n)


def arrival_times(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival instants (s) from 0: gamma gaps with shape = burstiness and mean 1/rate.

    Burstiness 1 is a Poisson process; below 1 burstier, above 1 more regular. The gaps are
    drawn at unit rate and divided by the rate, so traces at different rates (same seed) are
    time-scaled copies of one another: capacity searches then see a monotone workload.
    """
    # Written so that NaN fails too: NaN arrival times never compare equal and hang the simulator.
    if not 0 < burstiness < math.inf:
        raise ValueError(f"burstiness must be a positive, finite number, got {burstiness}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be positive (inf: all at once), got {request_rate}")
    if math.isinf(request_rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=max(n - 1, 0)) / request_rate
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


def count_tokens(text: str) -> int:
    """Token estimate without a tokenizer: words and punctuation marks, close to BPE counts for prose."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def load_sharegpt(path: str, n: int, rng: np.random.Generator) -> list[tuple[str, int, int]]:
    """(prompt, prompt tokens, output tokens) from a ShareGPT-format JSON file, filtered as vLLM does.

    The first human turn is the prompt, the reply that follows sets the output length; pairs
    with fewer than 4 tokens on either side, prompts over 1024 or totals over 2048 tokens are
    dropped. If the file holds fewer than `n` usable pairs they are reused in turn.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"ShareGPT file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"ShareGPT file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue
        prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        n_in, n_out = count_tokens(prompt), count_tokens(reply)
        if n_in < 4 or n_out < 4 or n_in > 1024 or n_in + n_out > 2048:
            continue
        pairs.append((prompt, n_in, n_out))
    if not pairs:
        raise ValueError(f"ShareGPT file {path} holds no usable conversation (need 'conversations' "
                         "with a human turn and a reply of 4..1024 tokens)")
    order = rng.permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] for i in range(n)]


def make_trace(name: str, num_prompts: int, request_rate: float, burstiness: float = 1.0, seed: int = 0,
               path: str | None = None, random_input_len: int = 1024,
               random_output_len: int = 128) -> list[TraceRequest]:
    """A trace of `num_prompts` requests of dataset `name` arriving at `request_rate` per second.

    `name` is one of DATASETS or a ShareGPT-format JSON file (then read as `sharegpt`).
    Lengths and arrivals use separate random streams of `seed`: the same seed gives the
    same requests at every rate.
    """
    if name not in DATASETS and os.path.isfile(name):
        name, path = "sharegpt", name
    if name not in DATASETS:
        raise ValueError(f"unknown workload {name!r}: use one of {', '.join(DATASETS)} or a ShareGPT JSON file")
    if min(num_prompts, random_input_len, random_output_len) < 1:
        raise ValueError(f"num_prompts, random_input_len and random_output_len must be at least 1, got "
                         f"{num_prompts}, {random_input_len}, {random_output_len}")
    rng_len = np.random.default_rng([seed, 0])
    arrivals = arrival_times(num_prompts, request_rate, burstiness, np.random.default_rng([seed, 1]))
    prompts: list[str | None] = [None] * num_prompts
    if name == "random":
        lens_in = np.full(num_prompts, random_input_len)
        lens_out = np.full(num_prompts, random_output_len)
    elif name == "sharegpt":
        if path is None:
            raise ValueError("dataset sharegpt needs a ShareGPT-format JSON file (--dataset-path)")
        rows = load_sharegpt(path, num_prompts, rng_len)
        prompts = [p for p, _, _ in rows]
        lens_in = np.array([r[1] for r in rows])
        lens_out = np.array([r[2] for r in rows])
    else:
        lens_in, lens_out = synthetic_lengths(name, num_prompts, rng_len)
    return [TraceRequest(str(i), float(arrivals[i]), int(lens_in[i]), int(lens_out[i]), prompts[i])
            for i in range(num_prompts)]

"""Next-token sampling (greedy, temperature, top-k, top-p, per-request seed) and the stop check.

`sample` works on the whole batch at once on the device: one sort serves top-k and top-p, and
the draw is the exponential race argmax(p / q), q ~ Exp(1), which needs no cumulative-sum
search. A seeded request draws its noise from a generator seeded with (seed, step), so its
tokens depend only on its own logits: the same with any batch-mates, and reproducible.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from nexus_tune.sequence import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the 64-bit seed space


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64, on the logits' device).

    `steps[i]` is how many tokens request i has generated so far; it picks the seeded noise.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    dev = logits.device
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=dev)
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < vocab or min(top_p) < 1.0:
        logits = _top_k_top_p(logits, torch.tensor(top_k, device=dev), torch.tensor(top_p, device=dev))
    probs = logits.softmax(dim=-1)
    sampled = (probs / _exponential_noise(probs, params, steps)).argmax(dim=-1)
    is_greedy = torch.tensor([p.temperature == 0 for p in params], device=dev)
    return torch.where(is_greedy, greedy, sampled)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its smallest top-p mass."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Drop a token once the tokens ranked above it already hold top_p; the first always stays.
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _exponential_noise(probs: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for i, p in enumerate(params):
        if p.seed is not None and p.temperature > 0:
            gen = torch.Generator(device=probs.device).manual_seed((p.seed * _GOLDEN + steps[i]) % 2**63)
            noise[i].exponential_(generator=gen)
    return noise


@dataclass(frozen=True)
class StopDecision:
    reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens), as OpenAI's finish_reason
    text_end: int  # keep output_text[:text_end]: a matched stop string and what follows are cut


def check_stop(output_ids: Sequence[int], output_text: str, new_chars: int, params: SamplingParams,
               eos_token_ids: Collection[int]) -> StopDecision | None:
    """Is a request finished after appending its newest token (`output_ids[-1]`, `new_chars` of text)?

    Only the text that the new token could have completed is searched, so the check stays cheap
    for long outputs.
    """
    if not params.ignore_eos and output_ids and output_ids[-1] in eos_token_ids:
        return StopDecision("stop", len(output_text))
    if params.stop:
        start = max(0, len(output_text) - new_chars - max(map(len, params.stop)) + 1)
        hits = [i for s in params.stop if (i := output_text.find(s, start)) >= 0]
        if hits:
            return StopDecision("stop", min(hits))
    if len(output_ids) >= params.max_tokens:
        return StopDecision("length", len(output_text))
    return None

"""Next-token sampling (penalties, greedy, temperature, top-k, top-p, per-request seed), logprobs,
and the stop check.

`sample` works on the whole batch at once on the device: one sort serves top-k and top-p, and
the draw is the exponential race argmax(p / q), q ~ Exp(1), which needs no cumulative-sum
search. A seeded request draws its noise from a generator seeded with (seed, step), so its
tokens depend only on its own logits: the same with any batch-mates, and reproducible.

Penalties and logprobs cost nothing for rows that do not ask for them: each works on the
sub-batch of rows that do, and a batch where none does runs exactly the plain sampling path.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from nexus_tune.core.sequence import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the 64-bit seed space


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int],
           token_ids: Sequence[Sequence[int]] | None = None, pending_ids: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64, on the logits' device). `logits` is left unchanged.

    `steps[i]` is how many tokens request i has generated so far; it picks the seeded noise.
    `token_ids[i]` is request i's prompt followed by those `steps[i]` output tokens; only rows
    with a penalty read it, and it is required when there is one. An output token still on the
    device (asynchronous decode) is written -1 there, and `pending_ids[i]` (int64 [B], on the
    device) holds it.
    """
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if penalized:
        if token_ids is None:
            raise ValueError("a request asks for penalties, and the caller passed no token_ids")
        logits = _penalize(logits.float(), penalized, params, steps, token_ids, pending_ids)
    # argmax needs no float32 copy: widening keeps the order (and which of tied logits comes first).
    greedy = logits.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    logits = logits.float()
    dev = logits.device
    temperature = _to(torch.tensor([p.temperature or 1.0 for p in params]), dev)
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    # Any k >= vocab means no filter; clamping also keeps huge ints out of the int64 tensor.
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < vocab or min(top_p) < 1.0:
        logits = _top_k_top_p(logits, _to(torch.tensor(top_k), dev), _to(torch.tensor(top_p), dev))
    probs = logits.softmax(dim=-1)
    sampled = (probs / _exponential_noise(probs, params, steps)).argmax(dim=-1)
    is_greedy = _to(torch.tensor([p.temperature == 0 for p in params]), dev)
    return torch.where(is_greedy, greedy, sampled)


def _penalize(logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams], steps: Sequence[int],
              token_ids: Sequence[Sequence[int]], pending_ids: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of `logits` with the penalties of `rows` applied (vLLM's semantics, OpenAI's for two).

    repetition_penalty r (tokens of the prompt or the output): positive logits / r, negative
    ones * r; then frequency_penalty * (count in the output) + presence_penalty * (in the output
    at all) is subtracted. The counts come from one scatter_add over the rows' padded histories.
    """
    vocab, dev = logits.shape[-1], logits.device
    # Only a repetition penalty reads the prompt: the other rows send their output tokens alone.
    history = [token_ids[i] if params[i].repetition_penalty != 1 else token_ids[i][len(token_ids[i]) - steps[i]:]
               for i in rows]
    width = max(1, max(map(len, history)))
    ids = torch.tensor([list(h) + [vocab] * (width - len(h)) for h in history])  # padding -> column `vocab`
    position = torch.arange(width)[None, :]
    length = torch.tensor([len(h) for h in history])[:, None]
    in_output = (position >= length - torch.tensor([steps[i] for i in rows])[:, None]) & (position < length)
    on_device = ids < 0
    index = _to(torch.tensor(rows), dev)
    ids, in_output = _to(ids, dev), _to(in_output, dev)
    if on_device.any():  # fill in the tokens that never came to the host, without waiting for them
        if pending_ids is None:
            raise ValueError("token_ids holds -1 (a token on the device), and the caller passed no pending_ids")
        ids = torch.where(_to(on_device, dev), pending_ids.index_select(0, index)[:, None], ids)
    occurrences = torch.zeros(len(rows), vocab + 1, device=dev)
    seen = occurrences.scatter_add(1, ids, torch.ones(ids.shape, device=dev))[:, :vocab] > 0
    counts = occurrences.scatter_add_(1, ids, in_output.float())[:, :vocab]

    def column(name: str) -> torch.Tensor:
        return _to(torch.tensor([float(getattr(params[i], name)) for i in rows]), dev)[:, None]

    sub = logits.index_select(0, index)
    r = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0).float()
    return logits.index_copy(0, index, sub)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without blocking the host: pinned staging on CUDA (a plain
    copy from pageable memory would wait for the stream, i.e. for the forward pass)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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


# -- logprobs ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One sampled token's log-probability and its row's most likely tokens (most likely first)."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob); `params.logprobs` of them


class BatchLogprobs:
    """The logprobs of a step's rows that asked for them, on their way to the host.

    The copies start (non-blocking) when `logprobs()` builds this; read `rows()` once the step's
    fence has passed.
    """

    def __init__(self, batch: int, rows: list[int], counts: list[int], chosen: torch.Tensor,
                 top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> None:
        self.batch, self.rows_asked, self.counts = batch, rows, counts
        cuda = chosen.device.type == "cuda"
        self._host = [t.to("cpu", non_blocking=cuda) for t in (chosen, top_ids, top_logprobs)]

    def rows(self) -> list[TokenLogprobs | None]:
        """Per row of the batch: its TokenLogprobs, or None where it did not ask."""
        chosen, top_ids, top_lp = (t.tolist() for t in self._host)
        out: list[TokenLogprobs | None] = [None] * self.batch
        for j, (row, n) in enumerate(zip(self.rows_asked, self.counts)):
            out[row] = TokenLogprobs(chosen[j], list(zip(top_ids[j][:n], top_lp[j][:n])))
        return out


def logprobs(logits: torch.Tensor, ids: torch.Tensor, params: Sequence[SamplingParams]) -> BatchLogprobs | None:
    """The logprobs of the sampled `ids` [B] and the top alternatives, for the rows whose params
    ask (`params[i].logprobs` is not None); None, with no device work, when no row does.

    They are the model's distribution: log_softmax in float32 of the logits as `sample` received
    them, before penalties, temperature and top-k/top-p (vLLM's default; OpenAI's logprobs also
    do not move with temperature).
    """
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    index = _to(torch.tensor(rows), logits.device)
    lp = logits.index_select(0, index).float().log_softmax(dim=-1)
    counts = [min(params[i].logprobs, lp.shape[-1]) for i in rows]
    top_lp, top_ids = lp.topk(max(counts), dim=-1)
    chosen = lp.gather(1, ids.index_select(0, index)[:, None])[:, 0]
    return BatchLogprobs(len(params), rows, counts, chosen, top_ids, top_lp)


# -- stopping ----------------------------------------------------------------------------------

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

"""One request as the scheduler sees it: token ids, sampling parameters, lifecycle state, KV blocks.

Lifecycle: WAITING -> PREFILLING (in chunks) -> DECODING -> FINISHED or ABORTED. A preempted
sequence goes back to WAITING with its KV dropped but its generated tokens kept: its next
prefill covers prompt + generated tokens (recompute), and the token sampled from that prefill's
last chunk is simply its next output token.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_REPETITION_PENALTY = 10.0  # far past any useful value; keeps logits finite


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k filter
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: logits of prompt and output tokens / r (positive) or * r
    logprobs: int | None = None  # return the sampled token's logprob and this many most likely tokens'

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI's API accepts one string or a list
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], "
                             f"got {self.repetition_penalty!r}")
        if self.logprobs is not None and not (type(self.logprobs) is int and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False, slots=True)
class Sequence:
    """A request's tokens and state. `token_ids` holds the prompt followed by the generated tokens."""

    seq_id: str
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0  # seconds, on the caller's clock
    num_prompt_tokens: int = -1  # set from token_ids when left at -1
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    in_flight: int = 0  # batches the engine is running that hold it; set by the scheduler
    # Output tokens sampled by decode batches in flight, not yet in token_ids: a decode batch may be
    # scheduled while the previous one still runs (its input token then comes from the device).
    num_pending: int = 0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)
        if self.num_prompt_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: the prompt must hold at least one token")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_prefill_remaining(self) -> int:
        """Tokens still to prefill (all tokens, prompt and generated, after a preemption)."""
        return len(self.token_ids) - self.num_computed_tokens

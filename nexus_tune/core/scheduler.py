"""Batch selection for every serving policy; the engine and the simulator share this one copy.

Policies:
- `nexus`: two concurrent loops (prefill, decode) on disjoint SM sets; the controller picks the split.
- `static:N`: the same two loops on a fixed split with N prefill SMs.
- `chunked`: vLLM v1's scheduler: one loop, one mixed batch per step on the whole GPU under a
  token budget; running requests first (a decoding one gets 1 token, a partly prefilled one its
  next chunk), then waiting ones, first come first served, the last one chunked.
- `prefill-first`: SGLang's default: one loop on the whole GPU; a prefill batch whenever one can
  be formed, a decode batch otherwise.

The prefill queue of the two-loop policies is shortest-remaining-first with aging: score =
remaining tokens - gamma x waiting ms, lowest first. Since every queued request ages at the
same rate, that order equals the order of `remaining + gamma x arrival ms`, a key that is fixed
while a request waits: a heap keeps the queue. The baselines keep it first come, first served.
Decode is first come, first served: `running` keeps admission order.

KV: a request is admitted (gets blocks, joins `running`) when its first chunk fits and fewer than
`max_num_seqs` run. When a running request needs a block and none is free, it preempts
(recompute) the running requests admitted after it, newest first, that are not inside a batch
in flight; if that cannot free enough it skips this step and keeps its blocks. The oldest
running request can always proceed, so no request is lost. (vLLM v1 preempts the request itself
when nothing is behind it; skipping keeps its KV for the next step instead.)

Lookahead (the engine's overlap of scheduling with the GPU, as vLLM v1's async scheduling): a
decode batch may be scheduled while the decode batch before it is still running, so the host
prepares step n+1 while the GPU runs step n. A sequence of the running batch then joins the next
one with its output token *pending* (`Sequence.num_pending`): sampled on the device, not yet in
`token_ids`; the engine feeds it to the next step from the device. Its KV length counts the
pending token, and one that will reach max_tokens with it is left out. A sequence that stops on
EOS in step n still rides in step n+1 (its token is dropped) and frees its blocks when the last
batch holding it finishes. The single-loop policies may look ahead only past a decode-only batch;
after a batch with prompt chunks they schedule once it finished. The simulator finishes every
batch before the next, so it never looks ahead.

Decode pause (nexus): the controller may give prefill the whole GPU while requests decode
(controller.py says when). When the decode loop gets that decision while a prefill runs, it
launches nothing until the next prefill step has started on every SM; that step waits for a
decode step still in flight (the engine's lookahead one) to end. When no prefill runs (none could
be formed, or the prefill loop has yet to ask), decode runs this step on the free SMs and the
pause starts after it, so a queue that no KV admits never stalls decode. When the prefill loop
gets the decision while decode runs, the prefill takes the free SMs. The simulator and the
engine's decode loop both see None from `schedule_decode` and idle.

Time is passed in (`now`, seconds); nothing here reads a clock. One lock guards all state;
`wait` lets a loop sleep until another thread changed it.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from nexus_tune.core.block_manager import BlockManager, Fence
from nexus_tune.core.engine_config import EngineConfig
from nexus_tune.core.latency_model import chunk_prefix
from nexus_tune.core.controller import Controller, ControllerKnobs, LatencyPredictor, StepState
from nexus_tune.core.sequence import Sequence, SequenceStatus

WAITING, PREFILLING, DECODING = SequenceStatus.WAITING, SequenceStatus.PREFILLING, SequenceStatus.DECODING
FINISHED, ABORTED = SequenceStatus.FINISHED, SequenceStatus.ABORTED
POLICIES = ("nexus", "chunked", "prefill-first", "static:N")


def parse_policy(policy: str) -> tuple[str, int | None]:
    """`"static:64"` -> `("static", 64)`; `"nexus"` -> `("nexus", None)`."""
    name, sep, arg = policy.strip().partition(":")
    if name == "static":
        if not arg.strip().isdigit() or int(arg) < 1:
            raise ValueError(f"policy {policy!r}: static needs a prefill SM count, e.g. static:64")
        return name, int(arg)
    if sep or name not in ("nexus", "chunked", "prefill-first"):
        raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    return name, None


@dataclass
class PrefillBatch:
    """Chunks of one or more sequences: sequence i computes tokens [prefix_lens[i], prefix_lens[i] + chunk_lens[i])."""

    seqs: list[Sequence]
    chunk_lens: list[int]
    prefix_lens: list[int]
    last: list[bool]  # the chunk ends the sequence's prefill: sample its next token from it
    sms: int | None = None  # SMs to launch on (None: the whole device, no split known)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_lens)

    @property
    def prefix_tokens(self) -> int:
        return sum(self.prefix_lens)

    @functools.cached_property  # a batch's chunks never change once formed; read on every decode step
    def attention_pairs(self) -> int:
        """Causal (query, key) pairs the chunks attend: sum of n * (prefix + (n + 1) / 2)."""
        return sum(n * p + n * (n + 1) // 2 for n, p in zip(self.chunk_lens, self.prefix_lens))

    @functools.cached_property
    def priced_prefix(self) -> int:
        """The prefix the latency model prices this batch at: its pairs as one chunk (chunk_prefix)."""
        return chunk_prefix(self.num_tokens, self.attention_pairs)


@dataclass
class DecodeBatch:
    """One new token for each sequence. `kv_lens[i]`: the KV sequence i holds after the step (its
    input token at position kv_lens[i] - 1); `pending[i]`: that input token is still on the device."""

    seqs: list[Sequence]
    kv_lens: list[int]
    pending: list[bool]
    sms: int | None = None

    @property
    def kv_tokens(self) -> int:
        """KV_d: the KV tokens the step reads, its new tokens' included."""
        return sum(self.kv_lens)


@dataclass
class MixedBatch:
    """The chunked policy's step: one forward pass over both parts, on the whole GPU."""

    prefill: PrefillBatch | None
    decode: DecodeBatch | None


class Scheduler:
    def __init__(self, policy: str, block_manager: BlockManager, knobs: ControllerKnobs | None = None, *,
                 max_num_seqs: int = EngineConfig.max_num_seqs, total_sms: int | None = None,
                 split_sms: Iterable[int] = (), model: LatencyPredictor | None = None,
                 mixed_token_budget: int = EngineConfig.mixed_token_budget):
        """`total_sms` and `split_sms` (pre-created splits, prefill SM counts) are needed by the two-loop
        policies; `model` (a LatencyModel) by `nexus`."""
        self.policy, self.static_sms = parse_policy(policy)
        self.two_loops = self.policy in ("nexus", "static")
        self.knobs = knobs or ControllerKnobs()
        if max_num_seqs < 1 or mixed_token_budget < 1:
            raise ValueError("max_num_seqs and mixed_token_budget must be positive")
        self.max_num_seqs = max_num_seqs
        self.mixed_token_budget = mixed_token_budget
        self.bm = block_manager
        self.total_sms = total_sms
        split_sms = sorted(split_sms)
        if self.two_loops and (not total_sms or not split_sms):
            raise ValueError(f"policy {policy!r} needs total_sms and the pre-created splits (split_sms)")
        if self.policy == "static" and self.static_sms not in split_sms:
            raise ValueError(f"policy {policy!r}: {self.static_sms} prefill SMs is not a pre-created split; "
                             f"choose one of {', '.join(map(str, split_sms))}")
        self.controller = None
        if self.policy == "nexus":
            if model is None:
                raise ValueError("policy 'nexus' needs a latency model (model=...)")
            self.controller = Controller(model, split_sms, total_sms, self.knobs)
        self._gamma_per_s = self.knobs.gamma * 1e3 if self.two_loops else 0.0

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seqs: dict[str, Sequence] = {}  # every live sequence
        self._waiting: list[tuple[float, int, Sequence]] = []  # heap of unadmitted ones, by queue key
        # nexus: a heap by arrival time, for the age of the oldest request still without a first token
        self._oldest: list[tuple[float, int, Sequence]] = []
        self._order = itertools.count()
        self._running: dict[str, Sequence] = {}  # admitted (holding blocks), in admission order
        self._partial: dict[str, Sequence] = {}  # two-loop and prefill-first: admitted, prefill unfinished, idle
        self._num_waiting = 0
        self._num_decoding = 0
        self._queued_tokens = 0  # tokens still to prefill, over waiting and prefilling sequences
        self._decode_kv = 0  # sum of num_tokens over decoding sequences
        self._due_ms: float | None = None  # _decode_slack_ms's due instant, until the decoding sequences change
        self._prefill_batch: PrefillBatch | None = None  # in flight
        self._decode_batches: list[DecodeBatch] = []  # in flight: at most two (lookahead)
        self._prefill_sms = 0  # SMs held by the batches in flight on each side
        self._pause_pending = False  # nexus: decode paused; the next prefill step gets the whole GPU
        self.split = self.static_sms if self.policy == "static" else total_sms
        self.num_preemptions = 0

    # -- requests in and out -------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new request; `seq.arrival_time` is its arrival instant. ValueError if it can never fit."""
        need = self.bm.blocks_for(seq.num_tokens + seq.params.max_tokens - 1)
        if need > self.bm.num_blocks:
            raise ValueError(
                f"request {seq.seq_id}: {seq.num_tokens} prompt tokens + max_tokens {seq.params.max_tokens} "
                f"need {need} KV blocks, the cache holds {self.bm.num_blocks}")
        with self._lock:
            if seq.seq_id in self._seqs:
                raise ValueError(f"request {seq.seq_id} is already queued")
            seq.status = WAITING
            self._seqs[seq.seq_id] = seq
            self._push_waiting(seq)
            if self.controller is not None:
                heapq.heappush(self._oldest, (seq.arrival_time, next(self._order), seq))
            self._changed.notify_all()

    def abort(self, seq_id: str, fence: Fence | None = None) -> bool:
        """Drop a request wherever it is; False if unknown or already done. Blocks of a sequence inside a
        batch in flight are freed when that batch finishes."""
        with self._lock:
            seq = self._seqs.get(seq_id)
            if seq is None:
                return False
            self._retire(seq, ABORTED, None, fence)
            self._changed.notify_all()
            return True

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._seqs)

    def wait(self, timeout: float) -> None:
        """Sleep until another thread adds, finishes or aborts work (or `timeout` seconds pass)."""
        with self._changed:
            self._changed.wait(timeout)

    # -- two-loop policies (nexus, static:N) ---------------------------------------------------

    def schedule_prefill(self, now: float) -> PrefillBatch | None:
        """The next prefill batch and its SMs; None if nothing can run now (no work, no KV, or the
        decode batch in flight holds every SM)."""
        with self._lock:
            self._require(self.two_loops and self._prefill_batch is None, "schedule_prefill")
            free_sms = self.total_sms - self._decode_sms
            if free_sms <= 0 or (self._pause_pending and free_sms < self.total_sms):
                return None  # a decode pause: wait for decode's last step (a lookahead one) to end
            batch = self._form_prefill(self.knobs.prefill_chunk_tokens)
            if batch is None:
                if self._pause_pending:  # nothing to pause decode for: wake the decode loop now
                    self._pause_pending = False
                    self._changed.notify_all()
                return None
            if self._pause_pending:
                batch.sms = self.split = self.total_sms
                self._pause_pending = False
            else:
                batch.sms = min(self._decide(now, batch.num_tokens, batch.priced_prefix), free_sms)
            self._prefill_batch, self._prefill_sms = batch, batch.sms
            return batch

    def schedule_decode(self, now: float) -> DecodeBatch | None:
        """Every decoding sequence (first come, first served, at most max_num_seqs) and the SMs to use."""
        with self._lock:
            self._require(self.two_loops and len(self._decode_batches) <= 1, "schedule_decode")
            free_sms = self.total_sms - self._prefill_sms
            if free_sms <= 0 or not self._num_decoding or self._pause_pending:
                return None
            prefill_sms = self._decide(now, *self._prefill_load())
            if prefill_sms == self.total_sms:  # a decode pause: the next prefill step gets the whole GPU
                self._pause_pending = True
                if self._prefill_batch is not None:
                    return None  # decode waits for the prefill in flight, then that step
            batch = self._form_decode()
            if batch is None:
                return None
            # No prefill runs yet (none could be formed, or the prefill loop has yet to ask): this step
            # takes what is free, and the prefill waits for it (a KV-bound queue never stalls decode).
            batch.sms = min(self.total_sms - prefill_sms, free_sms) or free_sms
            self._decode_batches.append(batch)
            return batch

    # -- single-loop policies ------------------------------------------------------------------

    def schedule_step(self, now: float) -> PrefillBatch | DecodeBatch | None:
        """prefill-first: a prefill batch whenever one can be formed, else a decode batch."""
        with self._lock:
            self._require(self.policy == "prefill-first" and self._may_look_ahead(), "schedule_step")
            batch = self._form_prefill(self.mixed_token_budget)
            if batch is not None:
                batch.sms = self.total_sms
                self._prefill_batch = batch
                return batch
            batch = self._form_decode()
            if batch is not None:
                batch.sms = self.total_sms
                self._decode_batches.append(batch)
            return batch

    def schedule_mixed(self, now: float) -> MixedBatch | None:
        """chunked (vLLM v1): running sequences first in admission order, then waiting ones, first come
        first served, under the token budget; no new admission in a step that preempted."""
        with self._lock:
            self._require(self.policy == "chunked" and self._may_look_ahead(), "schedule_mixed")
            budget = self.mixed_token_budget
            decode, chunks = [], []
            preemptions = self.num_preemptions
            for seq in list(self._running.values()):
                if budget <= 0:
                    break
                if seq.status is DECODING:
                    if self._done_with_pending(seq):
                        continue
                    n, total = 1, seq.num_tokens + seq.num_pending
                elif seq.status is PREFILLING:
                    n = min(seq.num_prefill_remaining, budget)
                    total = seq.num_computed_tokens + n
                else:  # preempted earlier in this loop
                    continue
                if not self._allocate_or_preempt(seq, total):
                    continue
                if seq.status is DECODING:
                    decode.append(seq)
                else:
                    seq.in_flight += 1
                    chunks.append((seq, n))
                budget -= n
            if self.num_preemptions == preemptions:
                while budget > 0 and len(self._running) < self.max_num_seqs:
                    seq = self._peek_waiting()
                    if seq is None or not self.bm.allocate(seq, min(seq.num_prefill_remaining, budget)):
                        break
                    n = min(seq.num_prefill_remaining, budget)
                    self._admit(seq)
                    chunks.append((seq, n))
                    budget -= n
            prefill = self._prefill_batch_of(chunks)
            dec = self._decode_batch_of(decode) if decode else None
            if prefill is None and dec is None:
                return None
            self._prefill_batch = prefill
            if dec is not None:
                self._decode_batches.append(dec)
            return MixedBatch(prefill, dec)

    # -- results -------------------------------------------------------------------------------

    def finish_prefill(self, batch: PrefillBatch, now: float, first_tokens: list[int],
                       finished: Collection[str] = (), fence: Fence | None = None) -> None:
        """The batch ran. `first_tokens[i]` is the token sampled for sequence i if `batch.last[i]` (ignored
        otherwise); `finished` holds the ids the engine stops (EOS, stop string, max tokens)."""
        with self._lock:
            self._prefill_batch, self._prefill_sms = None, 0
            for seq, n, last, token in zip(batch.seqs, batch.chunk_lens, batch.last, first_tokens):
                if self._land(seq, fence):
                    continue
                seq.num_computed_tokens += n
                self._queued_tokens -= n
                if last:
                    seq.token_ids.append(token)
                    if seq.first_token_time is None:
                        seq.first_token_time = now
                    seq.status = DECODING
                    self._num_decoding += 1
                    self._decode_kv += seq.num_tokens
                    self._due_ms = None
                elif self.policy != "chunked":  # chunked keeps it in `running` order instead
                    self._partial[seq.seq_id] = seq
            self._retire_finished(finished, now, fence)
            self._changed.notify_all()

    def finish_decode(self, batch: DecodeBatch, now: float, new_tokens: list[int],
                      finished: Collection[str] = (), fence: Fence | None = None) -> None:
        """The batch ran: `new_tokens[i]` is sequence i's new token; `finished` as in finish_prefill."""
        with self._lock:
            self._decode_batches = [b for b in self._decode_batches if b is not batch]
            grown = 0
            for seq, token in zip(batch.seqs, new_tokens):
                seq.num_pending -= 1
                if self._land(seq, fence):
                    continue
                seq.num_computed_tokens = len(seq.token_ids)
                seq.token_ids.append(token)
                grown += 1
            self._decode_kv += grown
            self._due_ms = None
            self._retire_finished(finished, now, fence)
            self._changed.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {
                "num_waiting": self._num_waiting,
                "num_prefilling": len(self._running) - self._num_decoding,
                "num_decoding": self._num_decoding,
                "queued_prefill_tokens": self._queued_tokens,
                "decode_kv_tokens": self._decode_kv,
                "kv_usage": self.bm.usage,
                "free_blocks": self.bm.num_free,
                "fenced_blocks": self.bm.num_fenced,
                "num_preemptions": self.num_preemptions,
                "split": self.split,
            }

    # -- internals (caller holds the lock) -------------------------------------------------------

    def _require(self, ok: bool, call: str) -> None:
        if not ok:
            raise RuntimeError(f"{call}() is not valid now for policy {self.policy!r} (wrong policy, or the "
                               "previous batch of that kind has not been finished)")

    @property
    def _decode_sms(self) -> int:
        """SMs held by decode: the widest decode batch in flight (0 when none is)."""
        return max((b.sms or 0 for b in self._decode_batches), default=0)

    def _may_look_ahead(self) -> bool:
        """Single-loop policies: nothing in flight, or only one decode-only batch."""
        return self._prefill_batch is None and len(self._decode_batches) <= 1

    def _land(self, seq: Sequence, fence: Fence | None) -> bool:
        """A batch holding `seq` finished: True if `seq` was retired meanwhile (its output is dropped);
        its blocks are freed once no batch in flight holds it."""
        seq.in_flight -= 1
        if seq.status in (ABORTED, FINISHED):
            if not seq.in_flight:
                self.bm.free(seq, fence)
            return True
        return False

    @staticmethod
    def _done_with_pending(seq: Sequence) -> bool:
        """Its pending token is its last one (max_tokens): no further step for it."""
        return seq.num_pending > 0 and seq.num_output_tokens + seq.num_pending >= seq.params.max_tokens

    def _key(self, seq: Sequence) -> float:
        if self.two_loops:  # remaining - gamma x (now - arrival), up to the shared -gamma x now
            return seq.num_prefill_remaining + self._gamma_per_s * seq.arrival_time
        return seq.arrival_time

    def _push_waiting(self, seq: Sequence) -> None:
        heapq.heappush(self._waiting, (self._key(seq), next(self._order), seq))
        self._num_waiting += 1
        self._queued_tokens += seq.num_prefill_remaining

    def _peek_waiting(self) -> Sequence | None:
        while self._waiting and self._waiting[0][2].status is not WAITING:  # aborted while waiting
            heapq.heappop(self._waiting)
        return self._waiting[0][2] if self._waiting else None

    def _admit(self, seq: Sequence) -> None:
        """Move the head of the waiting heap (already given its blocks) into `running`."""
        heapq.heappop(self._waiting)
        self._num_waiting -= 1
        seq.status = PREFILLING
        seq.in_flight += 1
        self._running[seq.seq_id] = seq

    def _form_prefill(self, budget: int) -> PrefillBatch | None:
        """Chunks in queue order under `budget` tokens: admitted sequences with an unfinished prefill
        compete with waiting ones; admission stops at the first waiting one that does not fit, and
        after a preemption (as in vLLM: what was just preempted is not readmitted in the same step)."""
        partials = sorted(self._partial.values(), key=self._key)
        chunks: list[tuple[Sequence, int]] = []
        i, admitting, preemptions = 0, True, self.num_preemptions
        while budget > 0:
            admitting = admitting and self.num_preemptions == preemptions
            head = self._peek_waiting() if admitting else None
            if i < len(partials) and (head is None or self._key(partials[i]) <= self._waiting[0][0]):
                seq = partials[i]
                i += 1
                if seq.status is not PREFILLING:  # preempted by an earlier chunk of this batch
                    continue
                n = min(seq.num_prefill_remaining, budget)
                if not self._allocate_or_preempt(seq, seq.num_computed_tokens + n):
                    continue
                del self._partial[seq.seq_id]
                seq.in_flight += 1
            elif head is not None:
                seq, n = head, min(head.num_prefill_remaining, budget)
                if len(self._running) >= self.max_num_seqs or not self.bm.allocate(seq, n):
                    admitting = False
                    continue
                self._admit(seq)
            else:
                break
            chunks.append((seq, n))
            budget -= n
        return self._prefill_batch_of(chunks)

    def _prefill_batch_of(self, chunks: list[tuple[Sequence, int]]) -> PrefillBatch | None:
        if not chunks:
            return None
        seqs = [s for s, _ in chunks]
        lens = [n for _, n in chunks]
        prefixes = [s.num_computed_tokens for s in seqs]
        last = [p + n == s.num_tokens for s, n, p in zip(seqs, lens, prefixes)]
        return PrefillBatch(seqs, lens, prefixes, last)

    def _form_decode(self) -> DecodeBatch | None:
        """Every decoding sequence in admission order that has (or can get) a block for its next token."""
        seqs = []
        capacity = self.bm.block_size
        for seq in list(self._running.values()):
            if seq.status is not DECODING or self._done_with_pending(seq):
                continue
            n = seq.num_tokens + seq.num_pending  # KV it holds after this step
            if len(seq.block_table) * capacity < n and not self._allocate_or_preempt(seq, n):
                continue
            seqs.append(seq)
        return self._decode_batch_of(seqs) if seqs else None

    @staticmethod
    def _decode_batch_of(seqs: list[Sequence]) -> DecodeBatch:
        """The batch of `seqs`, each now one more output token (pending) ahead."""
        pending = [s.num_pending > 0 for s in seqs]
        kv_lens = [s.num_tokens + s.num_pending for s in seqs]
        for seq in seqs:
            seq.in_flight += 1
            seq.num_pending += 1
        return DecodeBatch(seqs, kv_lens, pending)

    def _allocate_or_preempt(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `seq` to hold `num_tokens`, preempting idle sequences admitted after it if that suffices."""
        if self.bm.allocate(seq, num_tokens):
            return True
        victims = []
        for other in reversed(self._running.values()):
            if other is seq:
                break
            if not other.in_flight:
                victims.append(other)
        if self.bm.num_free + sum(len(v.block_table) for v in victims) < self.bm.blocks_needed(seq, num_tokens):
            return False
        for victim in victims:
            self._preempt(victim)
            if self.bm.allocate(seq, num_tokens):
                return True
        raise AssertionError("preemption freed fewer blocks than counted")

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens, queue the whole sequence for prefill again."""
        if seq.status is PREFILLING:
            self._queued_tokens -= seq.num_prefill_remaining
        self._leave_running(seq)
        self.bm.free(seq)  # idle: no kernel in flight reads these blocks
        seq.num_computed_tokens = 0
        seq.status = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(seq)

    def _leave_running(self, seq: Sequence) -> None:
        del self._running[seq.seq_id]
        self._partial.pop(seq.seq_id, None)
        if seq.status is DECODING:
            self._num_decoding -= 1
            self._decode_kv -= seq.num_tokens
            self._due_ms = None

    def _retire(self, seq: Sequence, status: SequenceStatus, now: float | None, fence: Fence | None) -> None:
        """Finish or abort: leave every queue; free the blocks unless a batch in flight still uses them."""
        del self._seqs[seq.seq_id]
        if seq.status is WAITING:
            self._num_waiting -= 1  # its heap entry is skipped lazily
            self._queued_tokens -= seq.num_prefill_remaining
        else:
            if seq.status is PREFILLING:
                self._queued_tokens -= seq.num_prefill_remaining
            self._leave_running(seq)
        seq.status = status
        seq.finish_time = now
        if not seq.in_flight:
            self.bm.free(seq, fence)

    def _retire_finished(self, finished: Collection[str], now: float, fence: Fence | None) -> None:
        for seq_id in finished:
            seq = self._seqs.get(seq_id)
            if seq is not None:  # an abort may have won the race
                self._retire(seq, FINISHED, now, fence)

    def _prefill_load(self) -> tuple[int, int]:
        """(P_T, KV_p) of the prefill in flight, else an estimate of the next one."""
        if self._prefill_batch is not None:
            return self._prefill_batch.num_tokens, self._prefill_batch.priced_prefix
        return min(self._queued_tokens, self.knobs.prefill_chunk_tokens), 0

    def _oldest_wait_ms(self, now: float) -> float:
        heap = self._oldest
        while heap and (heap[0][2].status not in (WAITING, PREFILLING) or heap[0][2].first_token_time is not None):
            heapq.heappop(heap)  # it has its first token (or is gone) and never waits for one again
        return (now - heap[0][0]) * 1e3 if heap else 0.0

    def _decode_slack_ms(self, now: float) -> float:
        """The TPOT slack (ms) the running requests banked, at knobs.pause_quantile (0: the least). A
        request's mean TPOT stays on the target while its next token lands by its first token's time
        plus its tokens so far x the target; its slack is that instant less `now`. Only a decode pause
        reads it: 0 unless prompts wait beside a decode batch. O(running) once per decode step."""
        if not self._queued_tokens or not self._num_decoding:
            return 0.0
        if self._due_ms is None:
            target = self.knobs.tbt_target_ms
            due = sorted(seq.first_token_time * 1e3 + seq.num_output_tokens * target
                         for seq in self._running.values() if seq.status is DECODING)
            self._due_ms = due[int(self.knobs.pause_quantile * (len(due) - 1))]
        return self._due_ms - now * 1e3

    def _decide(self, now: float, prefill_tokens: int, prefill_kv: int) -> int | None:
        if self.controller is not None:
            state = StepState(self._queued_tokens, prefill_tokens, prefill_kv, self._num_decoding,
                              self._decode_kv, self.bm.usage, self._oldest_wait_ms(now), self._decode_slack_ms(now))
            self.split = self.controller.decide(state)
        return self.split

"""GPU check of nexus_tune.partition: are the pre-created splits disjoint, and does work scale with SMs?

    python benchmarks/partition_check.py --out out/partition_check

On one GPU, in well under 90 s on an H100:
1. Table: create the SplitTable (time, device memory), close it and check the memory comes back,
   create it again for the checks.
2. SM ids: a Triton kernel stores %smid of every program launched on a stream. On every split the
   two sides' SM sets must be disjoint and no larger than the side's SM count.
3. Correctness: a bf16 matmul on every side's stream equals the same matmul on the whole GPU.
4. Scaling: a compute-bound kernel alone on each side of every split; time x SMs must lie within
   15% of the median over all sides. Each side runs as many launches as make about --target-ms,
   so both sides of a split run equally long when run together. Two kernels: `fma`, a Triton
   kernel of dependent fp32 FMAs in registers (no memory traffic; it gates the checks), and
   `matmul`, a bf16 cuBLAS matmul (--size, random data), reported beside it: tensor-core work
   on the whole chip runs into the power limit and lower clocks, so its time x SMs grows with
   the SM count and two busy sides slow each other though they share no SM.
5. Disjoint by timing: both sides at once, each launched from its own worker thread (which calls
   table.bind_thread()); each must stay within 1.2x of its time alone.
6. Controls over SHARED SMs, which must take about 2x: two streams on the whole GPU (checked:
   at least 1.5x), and two torch.cuda.green_contexts contexts of half the SMs each (reported).

Timing is host-side (perf_counter around launch + stream.synchronize in the worker thread), the
same in every measurement; runs last tens of ms, so the microseconds of overhead do not matter.
Prints a markdown table; writes partition_check.json and partition_check.md under --out.
Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl

from nexus_tune.core.device import identify, software_versions
from nexus_tune.core.partition import GREEN_CONTEXTS, GreenContextError, SplitTable

SCALING_TOLERANCE = 0.15
DISJOINT_LIMIT = 1.2
SHARED_MIN = 1.5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON and markdown result")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--size", type=int, default=8192, help="M = N = K of the bf16 matmul")
    p.add_argument("--target-ms", type=float, default=40.0, help="length of one timed run per side")
    p.add_argument("--reps", type=int, default=3, help="timed runs per measurement (median)")
    return p.parse_args()


# -- SM ids ------------------------------------------------------------------------------------

@triton.jit
def _smid_kernel(out_ptr):
    smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(out_ptr + tl.program_id(0), smid)


def sm_ids(stream: torch.cuda.Stream, programs: int, device: int) -> set[int]:
    """The SMs that ran `programs` tiny programs launched on `stream`."""
    out = torch.full((programs,), -1, dtype=torch.int32, device=device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the fill above runs on the current stream
    with torch.cuda.stream(stream):
        _smid_kernel[(programs,)](out, num_warps=1)
    stream.synchronize()
    ids = set(out.tolist())
    if -1 in ids:
        raise RuntimeError("the SM-id kernel left programs unwritten")
    return ids


# -- timing ------------------------------------------------------------------------------------

FMA_PROGRAMS = 65536  # enough programs that wave quantisation on any side costs under ~3%
FMA_BLOCK = 256


@triton.jit
def _fma_kernel(out_ptr, iters, BLOCK: tl.constexpr):
    """Two dependent fp32 FMA chains per element in registers: pure SM arithmetic, no memory traffic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = offs.to(tl.float32) * 1e-6
    y = x + 1.0
    for _ in range(iters):
        x = x * 0.999 + y
        y = y * 0.999 - x
    tl.store(out_ptr + offs, x + y)


class Workload:
    """One compute-bound launch on the current stream, writing into output slot `slot`."""

    def __init__(self, kind: str, size: int, device: int) -> None:
        self.kind = kind
        if kind == "matmul":
            self.a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            self.b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
            self.outs = [torch.empty_like(self.a) for _ in range(2)]
        else:
            self.outs = [torch.empty(FMA_PROGRAMS * FMA_BLOCK, device=device) for _ in range(2)]

    def launch(self, slot: int) -> None:
        if self.kind == "matmul":
            torch.mm(self.a, self.b, out=self.outs[slot])
        else:
            _fma_kernel[(FMA_PROGRAMS,)](self.outs[slot], 2048, BLOCK=FMA_BLOCK, num_warps=4)


def launch_loop(stream, work: Workload, slot: int, iters: int, barrier: threading.Barrier | None = None) -> float:
    """In a worker thread: `iters` launches on `stream`, synchronised; wall ms per launch."""
    with torch.cuda.stream(stream):
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        for _ in range(iters):
            work.launch(slot)
        stream.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


class Timer:
    """Two long-lived worker threads, one per side (their cuBLAS handles and workspaces persist)."""

    def __init__(self, table: SplitTable, work: Workload, target_ms: float, reps: int) -> None:
        device = table.device
        self.work = work
        torch.cuda.synchronize(device)
        self.workers = [ThreadPoolExecutor(1, thread_name_prefix=f"side{i}", initializer=table.bind_thread)
                        for i in range(2)]
        self.total_sms, self.target_ms, self.reps = table.total_sms, target_ms, reps
        self.ms_whole = 0.0

    def _submit(self, slot: int, stream, iters: int, barrier: threading.Barrier | None = None):
        return self.workers[slot].submit(launch_loop, stream, self.work, slot, iters, barrier)

    def calibrate(self, whole) -> None:
        """ms per launch on the whole GPU, which sizes every later run to about target_ms."""
        self._submit(0, whole, 1).result()  # cuBLAS set-up / Triton compile
        self.ms_whole = self._submit(0, whole, 3).result()
        self.ms_whole = self.alone(0, whole, self.total_sms)

    def iters(self, sms: int) -> int:
        return max(1, round(self.target_ms * sms / (self.ms_whole * self.total_sms)))

    def alone(self, slot: int, stream, sms: int) -> float:
        self._submit(slot, stream, 1).result()  # warm-up: cuBLAS workspace for this (thread, stream)
        return statistics.median(self._submit(slot, stream, self.iters(sms)).result() for _ in range(self.reps))

    def together(self, streams, sms: tuple[int, int]) -> tuple[float, float]:
        runs = []
        for _ in range(self.reps):
            barrier = threading.Barrier(2)
            futures = [self._submit(i, streams[i], self.iters(sms[i]), barrier) for i in range(2)]
            runs.append([f.result() for f in futures])
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)

    def close(self) -> None:
        for w in self.workers:
            w.shutdown()


# -- the checks --------------------------------------------------------------------------------

def table_cost(device: int) -> dict:
    free_start = torch.cuda.mem_get_info(device)[0]
    with SplitTable(device, backend=GREEN_CONTEXTS) as table:
        cost = {"creation_s": table.creation_s, "memory_bytes": table.memory_bytes, "splits": len(table)}
    torch.cuda.synchronize(device)
    cost["not_returned_after_close_bytes"] = free_start - torch.cuda.mem_get_info(device)[0]
    return cost


def split_identity(table: SplitTable, device: int) -> list[dict]:
    """Per split: the SM ids each side ran on, and a matmul on each side equal to the whole GPU's."""
    programs = 256 * table.total_sms
    x = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    reference = x @ x
    rows = []
    for split in table:
        streams = [split.prefill_stream, split.decode_stream]
        ids = [sm_ids(stream, programs, device) for stream in streams]
        correct = []
        for stream in streams:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                y = x @ x
            stream.synchronize()
            correct.append(bool(torch.allclose(y, reference, rtol=1.6e-2, atol=1e-5)))
        rows.append({
            "prefill_sms": split.prefill_sms, "decode_sms": split.decode_sms,
            "sm_ids": [len(ids[0]), len(ids[1])], "sm_ids_shared": len(ids[0] & ids[1]),
            "sm_ids_ok": not ids[0] & ids[1] and len(ids[0]) <= split.prefill_sms and len(ids[1]) <= split.decode_sms,
            "correct": all(correct),
        })
    return rows


def split_timings(table: SplitTable, timer: Timer) -> list[dict]:
    """Per split: each side alone and both together, with the timer's workload."""
    rows = []
    for split in table:
        sides = [(split.prefill_stream, split.prefill_sms), (split.decode_stream, split.decode_sms)]
        alone = [timer.alone(i, stream, sms) for i, (stream, sms) in enumerate(sides)]
        together = timer.together([s for s, _ in sides], (split.prefill_sms, split.decode_sms))
        rows.append({
            "prefill_sms": split.prefill_sms, "decode_sms": split.decode_sms,
            "iters": [timer.iters(sms) for _, sms in sides],
            "alone_ms": alone, "together_ms": list(together),
            "ms_x_sms": [alone[i] * sides[i][1] for i in range(2)],
            "together_over_alone": [together[i] / alone[i] for i in range(2)],
        })
    print(f"  {timer.work.kind}: {len(rows)} splits timed", flush=True)
    return rows


def shared_pair(timer: Timer, streams, sms: int, device: int) -> dict:
    """Two streams expected to share SMs: each side's time together over alone, and SM-id overlap."""
    alone = [timer.alone(i, s, sms) for i, s in enumerate(streams)]
    together = timer.together(streams, (sms, sms))
    ids = [sm_ids(s, 256 * timer.total_sms, device) for s in streams]
    return {"sms_asked": sms, "alone_ms": alone, "together_ms": list(together),
            "together_over_alone": [together[i] / alone[i] for i in range(2)],
            "sm_ids": [len(ids[0]), len(ids[1])], "sm_ids_shared": len(ids[0] & ids[1])}


def torch_green_control(timer: Timer, device: int) -> dict:
    half = timer.total_sms // 2
    try:
        from torch.cuda.green_contexts import GreenContext

        contexts = [GreenContext.create(num_sms=half, device_id=device) for _ in range(2)]
        streams = [ctx.Stream() for ctx in contexts]
    except Exception as e:  # an older torch or a build without green contexts
        return {"skipped": f"{type(e).__name__}: {e}"}
    return shared_pair(timer, streams, half, device)


def scaling_stats(rows: list[dict]) -> dict:
    products = [p for r in rows for p in r["ms_x_sms"]]
    median = statistics.median(products)
    return {"median_ms_x_sms": median, "max_spread": max(abs(p / median - 1) for p in products),
            "worst_together_over_alone": max(x for r in rows for x in r["together_over_alone"])}


def summarize(identity: list[dict], gating: list[dict], whole_control: dict) -> dict:
    stats = scaling_stats(gating)
    shared = min(whole_control["together_over_alone"])
    return {
        "scaling": {"median_ms_x_sms": stats["median_ms_x_sms"], "max_spread": stats["max_spread"],
                    "limit": SCALING_TOLERANCE, "passed": stats["max_spread"] <= SCALING_TOLERANCE},
        "disjoint_timing": {"worst_together_over_alone": stats["worst_together_over_alone"],
                            "limit": DISJOINT_LIMIT, "passed": stats["worst_together_over_alone"] <= DISJOINT_LIMIT},
        "disjoint_sm_ids": {"passed": all(r["sm_ids_ok"] for r in identity)},
        "correctness": {"passed": all(r["correct"] for r in identity)},
        "shared_control": {"min_together_over_alone": shared, "limit": SHARED_MIN, "passed": shared >= SHARED_MIN},
    }


# -- report ------------------------------------------------------------------------------------

def timing_table(kind: str, rows: list[dict], whole_ms: float) -> list[str]:
    stats = scaling_stats(rows)
    lines = [
        "", f"### {kind} ({'gates the checks' if kind == 'fma' else 'reported'}): whole GPU {whole_ms:.3f} ms/launch; "
        f"time x SMs median {stats['median_ms_x_sms']:.1f}, max spread {stats['max_spread']:.1%}; "
        f"worst together/alone {stats['worst_together_over_alone']:.2f}", "",
        "| prefill SMs | decode SMs | P ms | D ms | P ms x SMs | D ms x SMs | P together/alone | D together/alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prefill_sms']} | {r['decode_sms']} | {r['alone_ms'][0]:.3f} | {r['alone_ms'][1]:.3f} "
            f"| {r['ms_x_sms'][0]:.1f} | {r['ms_x_sms'][1]:.1f} | {r['together_over_alone'][0]:.2f} "
            f"| {r['together_over_alone'][1]:.2f} |")
    return lines


def markdown(result: dict) -> str:
    dev, cost, checks = result["device"], result["table"], result["checks"]
    lines = [
        f"# partition_check on {dev['name']} ({dev['sm_count']} SMs)",
        "",
        f"driver {dev['driver_version']}, CUDA {dev['cuda_version']}, torch {result['versions']['torch']}, "
        f"cuda-bindings {result['versions']['cuda_bindings']}; granularity: min partition "
        f"{result['granularity']['min_partition']} SMs, alignment {result['granularity']['alignment']}; "
        f"runtime {result['runtime_s']:.1f} s",
        f"table: {cost['splits']} splits created in {cost['creation_s'] * 1e3:.1f} ms, "
        f"{cost['memory_bytes'] / 2**20:.1f} MiB device memory, {cost['not_returned_after_close_bytes'] / 2**20:.1f} MiB "
        "not returned after close()",
        "",
        "| prefill SMs | decode SMs | SM ids P / D / shared | matmul on each side correct |",
        "|---|---|---|---|",
    ]
    for r in result["identity"]:
        lines.append(f"| {r['prefill_sms']} | {r['decode_sms']} | {r['sm_ids'][0]} / {r['sm_ids'][1]} / "
                     f"{r['sm_ids_shared']} | {'yes' if r['correct'] else 'NO'} |")
    for kind, timing in result["timings"].items():
        lines += timing_table(kind, timing["splits"], timing["whole_ms"])
    lines += ["", "Controls (fma on the same SMs shared; expected about 2x together):", ""]
    for name, c in result["controls"].items():
        if "skipped" in c:
            lines.append(f"- {name}: skipped ({c['skipped']})")
        else:
            lines.append(f"- {name}: {c['sms_asked']} SMs asked, together/alone "
                         f"{c['together_over_alone'][0]:.2f} and {c['together_over_alone'][1]:.2f}; "
                         f"SM ids {c['sm_ids'][0]} / {c['sm_ids'][1]}, shared {c['sm_ids_shared']}")
    lines += ["", "| check | result | value |", "|---|---|---|"]
    for name, c in checks.items():
        value = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items() if k != "passed")
        lines.append(f"| {name} | {'PASS' if c['passed'] else 'FAIL'} | {value} |")
    lines += ["", f"**{'ALL CHECKS PASSED' if result['passed'] else 'SOME CHECKS FAILED'}**"]
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition_check.json").write_text(json.dumps(result, indent=2))
    (out / "partition_check.md").write_text(text)
    print(f"wrote {out / 'partition_check.json'} and {out / 'partition_check.md'}")


def main() -> int:
    args = parse_args()
    out, started = Path(args.out), time.perf_counter()
    dev = identify(args.device)
    if not dev or not torch.cuda.is_available():
        reason = dev.reason if not dev else "torch has no CUDA"
        write(out, {"passed": False, "error": f"no usable GPU: {reason}"}, f"no usable GPU: {reason}\n")
        print(f"no usable GPU: {reason}", file=sys.stderr)
        return 1
    try:
        cost = table_cost(args.device)
        table = SplitTable(args.device, backend=GREEN_CONTEXTS)
    except GreenContextError as e:
        write(out, {"passed": False, "error": str(e)}, f"green contexts unavailable: {e}\n")
        print(f"green contexts unavailable: {e}", file=sys.stderr)
        return 1
    print(f"{dev.name}: {len(table)} splits {table.split_sms}, granularity {table.granularity}", flush=True)
    timers = {kind: Timer(table, Workload(kind, args.size, args.device), args.target_ms, args.reps)
              for kind in ("fma", "matmul")}
    try:
        identity = split_identity(table, args.device)
        timings = {}
        for kind, timer in timers.items():
            timer.calibrate(table.whole)
            timings[kind] = {"whole_ms": timer.ms_whole, "splits": split_timings(table, timer)}
        fma = timers["fma"]
        controls = {
            "two streams on the whole GPU": shared_pair(
                fma, [table.whole, torch.cuda.Stream(args.device)], table.total_sms, args.device),
            "torch.cuda.green_contexts, two contexts of half the SMs": torch_green_control(fma, args.device),
        }
    finally:
        for timer in timers.values():
            timer.close()
        table.close()
    checks = summarize(identity, timings["fma"]["splits"], controls["two streams on the whole GPU"])
    result = {
        "device": dev.to_dict(), "versions": software_versions(), "granularity": table.granularity.to_dict(),
        "size": args.size, "target_ms": args.target_ms, "reps": args.reps,
        "table": cost, "identity": identity, "timings": timings, "controls": controls, "checks": checks,
        "passed": all(c["passed"] for c in checks.values()), "runtime_s": time.perf_counter() - started,
    }
    text = markdown(result)
    print(text)
    write(out, result, text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

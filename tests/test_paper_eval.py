"""benchmarks/paper_eval.py, paper_report.py and sim_fidelity.py, and `nexus-tune calibrate`, on the
CPU: the tiny preset, a synthetic profile.

paper_eval runs two policies at two rates with a handful of short requests and writes its files
(with their step records); paper_report turns them (and hand-made results with known targets) into
markdown and plots; calibrate fits the step overhead from them, or from replays of its own;
sim_fidelity replays them in the simulator.
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import paper_eval, paper_report, sim_fidelity
from benchmarks.model_roofline import step_roofline_ms, step_serial_floor_ms
from benchmarks.paper_eval import PolicyResult, Sweep
from nexus_tune.commands.replay import Replay, _Progress
from nexus_tune.engine.loader import resolve_config
from nexus_tune.engine.loops import StepRecord
from nexus_tune.commands import cli
from nexus_tune.commands.calibrate import RECORDS_FILE, calibrate, saved_results
from nexus_tune.core import metrics
from nexus_tune.core.profile import Profile
from nexus_tune.core.testing import synthetic_profile
from nexus_tune.core.workload import TraceRequest

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SLOS = {"ttft": 3000.0, "tpot": 50.0}


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    synthetic_profile(model_name="tiny", config_hash=resolve_config("tiny").config_hash()).save(path)
    return path


def eval_args(profile: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--device", "cpu", "--profile", str(profile), "--workload", "mixed",
            "--num-prompts", "5", "--min-duration", "0", "--max-model-len", "128", "--max-output", "6",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def eval_out(tiny_profile, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper_eval")
    assert paper_eval.main(eval_args(tiny_profile, out, "--policies", "nexus,chunked", "--rates", "40,80",
                                     "--save-steps")) == 0
    return out


def load(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def test_one_file_per_policy_with_every_rate_measured(eval_out):
    files = load(eval_out)
    assert sorted(files) == ["tiny__mixed__chunked.json", "tiny__mixed__nexus.json"]
    for data in files.values():
        assert data["kind"] == "paper_eval"
        assert data["meta"]["slos"] == SLOS and data["meta"]["device"] == "cpu"
        assert "--rates 40,80" in data["meta"]["commands"][0]
        assert [r["rate"] for r in data["runs"]] == [40.0, 80.0]
        for run in data["runs"]:
            assert run["summary"]["completed"] == 5 and run["stopped"] is None
            assert all(run["checks"].values())
            assert run["passed"] == (run["summary"]["slo_attainment"] >= 0.9)
            assert set(run["slo_misses"]) == {"unfinished", "ttft", "tpot"}
            assert run["steps"] and run["loops"] and run["simulated"]["duration"] > 0
        assert data["capacity"] == max((r["rate"] for r in data["runs"] if r["passed"]), default=None)
        assert data["simulated"]["capacity"] > 0
    nexus = files["tiny__mixed__nexus.json"]
    timeline = nexus["split_timeline"]
    assert timeline["rate"] in (40.0, 80.0) and timeline["splits"]
    assert all(0 <= sms <= timeline["total_sms"] for _, sms in timeline["splits"])
    assert timeline["queue"] and all(0 <= waiting <= 5 for _, waiting in timeline["queue"])
    assert "chunked_efficiency" in files["tiny__mixed__chunked.json"]


def test_split_timeline_counts_the_requests_still_without_a_first_token():
    def step(start_ms: float, sms: int) -> StepRecord:
        return StepRecord("decode", "decode", sms, 1, 0, 0, 1, 10, 0, 0, 0.1, 1.0, start_ms=start_ms)

    def request(i: int, arrival_s: float, first_s: float | None) -> metrics.RequestRecord:
        return metrics.RequestRecord(str(i), arrival_s, 10, first_token_s=first_s)

    # the steps' time zero is 100 s on the records' clock; the first step starts 1 s later; request 5
    # never got a first token (aborted)
    times = [(100.5, 101.5), (100.9, 102.5), (102.6, 103.2), (102.7, 103.9), (102.8, 104.5), (104.9, None)]
    records = [request(i, arrival, first) for i, (arrival, first) in enumerate(times)]
    rep = Replay(records, [step(1000.0, 100), step(2000.0, 90), step(5000.0, 90)], 100.0, 0, 0, [], True, None, 4.0)
    timeline = paper_eval.split_timeline(rep, total_sms=132, points=5)  # at 0, 1, 2, 3, 4 s from the first step
    assert timeline["splits"] == [[0.0, 32], [1.0, 42]]
    assert timeline["queue"] == [[0.0, 2], [1.0, 1], [2.0, 3], [3.0, 1], [4.0, 1]]


def test_resume_runs_no_rate_twice(eval_out, tiny_profile, tmp_path):
    args = eval_args(tiny_profile, tmp_path, "--policies", "chunked", "--rates", "40,80", "--resume", str(eval_out))
    assert paper_eval.main(args) == 0
    before, after = load(eval_out)["tiny__mixed__chunked.json"], load(tmp_path)["tiny__mixed__chunked.json"]
    assert after["runs"] == before["runs"]


def test_a_failing_rate_stops_early_and_ends_the_climb(tiny_profile, tmp_path):
    args = eval_args(tiny_profile, tmp_path, "--policies", "chunked", "--rates", "40,80", "--slo", "ttft=0.01,tpot=50",
                     "--num-prompts", "8")
    assert paper_eval.main(args) == 0
    data = load(tmp_path)["tiny__mixed__chunked.json"]
    [run] = data["runs"]  # 80 req/s is never tried after 40 failed
    assert run["rate"] == 40.0 and not run["passed"] and run["stopped"] == "slo"
    assert run["checks"]["kv_blocks_returned"] and data["capacity"] is None and data["first_failing_rate"] == 40.0
    # the requests it finished are listed, and the simulator is compared with the GPU on those
    assert len(run["finished"]) == run["summary"]["completed"] < 8
    [row] = fidelity(tmp_path, tiny_profile, tmp_path)
    assert row["compared"] == f"{len(run['finished'])} finished of 8, stopped"
    assert all(row[m]["measured"] == run["summary"][m] for m in sim_fidelity.METRICS)


def test_dry_run_resolves_static_best_and_prints_the_follow_up(tiny_profile, tmp_path, capsys):
    args = eval_args(tiny_profile, tmp_path, "--policies", "chunked,static:best", "--num-prompts", "12",
                     "--time-budget", "30", "--dry-run")
    assert paper_eval.main(args) == 0
    text = capsys.readouterr().out
    assert "static:" in text and "static:best" not in text.split("afterwards run:")[-1]
    follow_up = " ".join(text.split("afterwards run:")[-1].split())
    assert "--policies" in follow_up and f"--resume {tmp_path}" in follow_up and "--dry-run" not in follow_up
    assert not list(tmp_path.glob("*.json"))


def test_bad_input_is_a_clear_error(tiny_profile, tmp_path, capsys):
    assert paper_eval.main(eval_args(tiny_profile, tmp_path, "--rates", "fast")) == 2
    assert "--rates" in capsys.readouterr().out
    assert paper_eval.main(eval_args(tiny_profile, tmp_path, "--policies", "fastest")) == 2


def run_sweep(sweep: Sweep, passes) -> list[float]:
    rates = []
    while (rate := sweep.next()) is not None and len(rates) < 20:
        rates.append(rate)
        sweep.record(rate, passes(rate))
    return rates


def test_sweep_climbs_to_the_first_failure_then_bisects_once():
    assert run_sweep(Sweep([1.0, 2.0, 3.0, 4.0], auto=True), lambda r: r < 3) == [1, 2, 3, 2.45]


def test_sweep_halves_a_failing_start_and_extends_a_ladder_that_never_fails():
    assert run_sweep(Sweep([1.0, 2.0], auto=True), lambda r: False) == [1, 0.5, 0.25]
    assert run_sweep(Sweep([1.0, 2.0], auto=True, refine=0), lambda r: True) == [1, 2, 2.5, 3.12]


def test_explicit_rates_stop_at_the_first_failure_but_run_the_anchors():
    sweep = Sweep([1.0, 2.0, 3.0], auto=False, anchors=[2.5])
    assert run_sweep(sweep, lambda r: r < 2) == [1, 2, 2.5]


def test_a_request_is_a_certain_miss_once_no_future_can_meet_the_slos():
    p = _Progress(TraceRequest("a", 0.0, 10, 5), sent_s=0.0)
    slos = {"ttft": 100.0, "tpot": 10.0}
    assert not p.certain_miss(slos, now=0.05)
    assert p.certain_miss(slos, now=0.2)  # no first token after 200 ms
    p.token_times.append(0.05)
    assert not p.certain_miss(slos, now=0.06)  # 4 tokens left: the TPOT can still be 2.5 ms
    assert p.certain_miss(slos, now=0.2)  # 150 ms over the 4 gaps already: 37.5 ms each at best


def step(**kw) -> StepRecord:
    fields = dict(loop="mixed", kind="mixed", sms=132, num_seqs=1, prefill_tokens=0, prefill_kv=0, decode_seqs=0,
                  decode_kv=0, beside_prefill=0, beside_prefill_kv=0, sched_ms=0.0, host_ms=0.0)
    return StepRecord(**{**fields, **kw})


def test_roofline_is_compute_bound_for_a_long_prefill_and_memory_bound_for_a_small_decode():
    c = resolve_config("llama-3.1-8b")
    tflops, gbps = 700.0, 3000.0
    dense = c.num_params(include_embeddings=False) - c.hidden_size
    prefill = step_roofline_ms(c, step(prefill_tokens=2048, num_seqs=1), tflops, gbps)
    assert prefill == pytest.approx(2 * dense * 2048 / (tflops * 1e9), rel=0.1)
    decode = step_roofline_ms(c, step(num_seqs=8, decode_seqs=8, decode_kv=8000), tflops, gbps)
    weights = 2 * (dense + c.vocab_size * c.hidden_size)
    assert decode == pytest.approx(weights / (gbps * 1e6), rel=0.1)


def test_serial_floor_adds_a_mixed_steps_kv_to_its_gemms():
    """512 prompt tokens + 64 decode rows over 2048 KV each: the roofline lets the GEMMs' FLOPs hide the
    KV read; one kernel after the other, the KV read comes on top. A plain prefill or decode: the same."""
    c = resolve_config("llama-3.1-8b")
    tflops, gbps = 700.0, 4200.0
    mixed = step(num_seqs=65, prefill_tokens=512, decode_seqs=64, decode_kv=64 * 2048)
    kv_ms = 2 * c.num_hidden_layers * c.kv_size * 2 * (64 * 2048 + 512 + 64) / (gbps * 1e6)
    assert step_serial_floor_ms(c, mixed, tflops, gbps) == pytest.approx(
        step_roofline_ms(c, mixed, tflops, gbps) + kv_ms, rel=0.02)
    for alone in (step(prefill_tokens=2048, num_seqs=1), step(num_seqs=8, decode_seqs=8, decode_kv=8000)):
        assert step_serial_floor_ms(c, alone, tflops, gbps) == pytest.approx(step_roofline_ms(c, alone, tflops, gbps),
                                                                            rel=0.05)


def test_report_writes_the_tables_and_plots(eval_out, tmp_path):
    md = tmp_path / "results.md"
    assert paper_report.main([str(eval_out), "--out", str(md)]) == 0
    text = md.read_text()
    for heading in ("## tiny, Mixed", "### Capacity under the SLOs", "### Latency per rate", "### Targets (issue 8)"):
        assert heading in text
    assert "| nexus | 40 |" in text and "| chunked | 80 |" in text
    assert "capacity: nexus / chunked" in text and "prefill-first not run" in text
    assert "paper_eval.py --model tiny" in text
    assert (tmp_path / "results-tiny-mixed-latency.png").stat().st_size > 0
    assert (tmp_path / "results-tiny-mixed-split.png").stat().st_size > 0


def test_saved_steps_calibrate_the_profile_and_the_simulator_replays_the_runs(eval_out, tiny_profile, tmp_path):
    profile = tmp_path / "tiny.json"
    profile.write_bytes(tiny_profile.read_bytes())
    plot = tmp_path / "steps.png"
    assert cli.main(["calibrate", "--profile", str(profile), "--from-runs", str(eval_out), "--min-steps", "5",
                     "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 0
    overhead = Profile.load(profile).step_overhead
    assert overhead.terms and set(overhead.terms) <= {"decode/decode", "prefill/prefill", "mixed/decode",
                                                      "mixed/mixed", "mixed/prefill"}
    assert all(e["steps"] >= 5 for e in overhead.fit_error.values())
    rows, bare = ({(r["policy"], r["rate"]): r for r in fidelity(eval_out, profile, tmp_path, *extra)}
                  for extra in ((), ("--no-overhead",)))
    assert set(rows) == {("nexus", 40.0), ("nexus", 80.0), ("chunked", 40.0), ("chunked", 80.0)}
    measured = {(f["policy"], run["rate"]): run["summary"] for f in load(eval_out).values() for run in f["runs"]}
    for key, row in rows.items():
        for m in sim_fidelity.METRICS:  # each replay is set against the run it replays
            assert row[m]["measured"] == measured[key][m] > 0
            assert row[m]["ratio"] == pytest.approx(row[m]["simulated"] / row[m]["measured"])
        # the fitted step overhead is part of the replay: without it the simulator predicts otherwise
        assert any(row[m]["simulated"] != bare[key][m]["simulated"] for m in sim_fidelity.METRICS), key


def test_leave_one_out_fits_each_run_on_the_others_and_reads_gzipped_results(eval_out, tiny_profile, tmp_path):
    gz = tmp_path / "gz"
    gz.mkdir()
    for f in eval_out.glob("*.json"):
        (gz / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    plain = fidelity(eval_out, tiny_profile, tmp_path)
    assert fidelity(gz, tiny_profile, tmp_path) == plain
    held = fidelity(gz, tiny_profile, tmp_path, "--leave-one-out", "--min-steps", "5")
    assert [(r["policy"], r["rate"]) for r in held] == [(r["policy"], r["rate"]) for r in plain]
    # each run is replayed with an overhead fitted on the other runs' steps, never on its own
    logs = {(str(path), i): run["step_records"] for path, r in saved_results([str(gz)]) for i, run in enumerate(r["runs"])}
    profile, leave = Profile.load(tiny_profile), next(iter(logs))
    fitted = sim_fidelity.held_out(profile, logs, leave, 5).step_overhead
    assert fitted.terms == calibrate(profile, [log for k, log in logs.items() if k != leave], 5).terms
    assert fitted.terms != calibrate(profile, list(logs.values()), 5).terms


def fidelity(eval_out: Path, profile: Path, tmp_path: Path, *extra: str) -> list[dict]:
    """sim_fidelity's rows for the runs in eval_out."""
    out = tmp_path / f"fidelity{''.join(extra)}.json"
    assert sim_fidelity.main([str(eval_out), "--profile", str(profile), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_calibration_without_saved_steps_is_a_clear_error(tiny_profile, tmp_path, capsys):
    assert cli.main(["calibrate", "--profile", str(tiny_profile), "--from-runs", str(tmp_path)]) == 2
    assert "--save-steps" in capsys.readouterr().err
    assert Profile.load(tiny_profile).step_overhead is None  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_calibrate_without_a_gpu_points_to_saved_runs(tiny_profile, capsys):
    assert cli.main(["calibrate", "--profile", str(tiny_profile)]) == 2
    assert "--from-runs" in capsys.readouterr().err
    assert Profile.load(tiny_profile).step_overhead is None


def test_calibrate_replays_each_loop_family_and_writes_the_fit(tiny_profile, tmp_path):
    profile = tmp_path / "tiny.json"
    profile.write_bytes(tiny_profile.read_bytes())
    args = ["calibrate", "--profile", str(profile), "--model", "tiny", "--device", "cpu", "--loads", "0.3",
            "--num-prompts", "6", "--max-model-len", "128", "--max-output", "6", "--min-steps", "3",
            "--out", str(tmp_path / "records")]
    assert cli.main(args) == 0
    keys = set(Profile.load(profile).step_overhead.terms)
    assert {k.split("/")[0] for k in keys} >= {"mixed", "single"} and keys & {"decode/decode", "prefill/prefill"}
    saved = json.loads((tmp_path / "records" / RECORDS_FILE).read_text())
    assert [r["policy"] for r in saved["runs"]] == ["chunked", "prefill-first", "nexus"]
    assert all(run["step_records"] for run in saved["runs"])
    # The saved records alone give the same fit (the --from-runs path).
    again = tmp_path / "again.json"
    again.write_bytes(tiny_profile.read_bytes())
    assert cli.main(["calibrate", "--profile", str(again), "--from-runs", str(tmp_path / "records"),
                     "--min-steps", "3"]) == 0
    assert Profile.load(again).step_overhead.terms == Profile.load(profile).step_overhead.terms


def test_report_places_a_written_analysis_after_the_summary(eval_out, tmp_path):
    notes = tmp_path / "analysis.md"
    notes.write_text("## What the runs say\n\nnexus wins here.\n")
    md = tmp_path / "results.md"
    assert paper_report.main([str(eval_out), "--out", str(md), "--analysis", str(notes)]) == 0
    text = md.read_text()
    assert text.index("| model | workload |") < text.index("nexus wins here.") < text.index("## tiny, Mixed")


def fake_run(rate: float, passed: bool, ttft: float, itl: float) -> dict:
    summary = {"slo_attainment": 0.95 if passed else 0.5, "mean_ttft_ms": ttft, "p99_ttft_ms": 2 * ttft,
               "mean_itl_ms": itl / 2, "p99_itl_ms": itl, "mean_tpot_ms": itl / 2}
    dist = {"n": 10, "mean": 1.0, "p50": 1.0, "p99": 2.0}
    return {"rate": rate, "date": "2026-11-24T00:00:00+00:00", "stopped": None if passed else "slo", "passed": passed,
            "wall_s": 10.0, "summary": summary, "slo_misses": {"unfinished": 0, "ttft": 0 if passed else 9, "tpot": 0},
            "split_switches": 3, "preemptions": 0, "checks": {"kv_blocks_returned": True},
            "errors": [], "steps": {"decode": dist}, "sched_us_per_step": dist, "controller_us_per_decision": None,
            "interference": None, "vs_profile": {"prefill": dist}, "loops": {"single": {"steps": 10, "gpu_busy": 0.9,
                                                                                         "host_over_gpu_ms": dist}},
            "simulated": {"slo_attainment": 1.0, "duration": 10.0, "mean_ttft_ms": 100.0, "p99_ttft_ms": 200.0,
                          "mean_itl_ms": 5.0, "p99_itl_ms": 9.0, "mean_tpot_ms": 5.0}}


def write_fake(folder: Path, policy: str, runs: list[dict]) -> None:
    meta = {"model": "llama-3.1-8b", "workload": "mixed", "slos": {"ttft": 3000.0, "tpot": 50.0}, "num_prompts": 60,
            "min_duration": 12.0, "max_output": 256, "max_model_len": 16384, "seed": 0, "device": "NVIDIA H100",
            "torch": "2.11", "date": "2026-11-24T00:00:00+00:00",
            "profile": {"grid": "full", "created": "2026-11-23", "tuned_knobs": True},
            "knobs": {"mode": "slo", "prefill_chunk_tokens": 4096}}
    result = PolicyResult(policy, policy, 5.0, [4.0, 8.0], [f"paper_eval {policy}"], runs)
    (folder / f"{policy}.json").write_text(json.dumps(result.to_json(meta)))


def test_report_judges_issue_8_targets(tmp_path):
    write_fake(tmp_path, "chunked", [fake_run(4.0, True, 1000.0, 100.0), fake_run(5.0, False, 4000.0, 120.0)])
    write_fake(tmp_path, "prefill-first", [fake_run(4.0, True, 900.0, 150.0), fake_run(5.0, False, 5000.0, 160.0)])
    write_fake(tmp_path, "nexus", [fake_run(4.0, True, 400.0, 80.0), fake_run(8.0, True, 900.0, 40.0),
                                   fake_run(10.0, False, 5000.0, 50.0)])
    md = tmp_path / "out" / "results.md"
    assert paper_report.main([str(tmp_path), "--out", str(md)]) == 0
    text = md.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "2.00x (brackets allow 1.60-2.50x)" in rows["capacity: nexus / chunked"]
    assert "**met** (+5%)" in rows["capacity: nexus / chunked"]
    assert "**met**" in rows["capacity: nexus / prefill-first"]
    ttft = next(v for k, v in rows.items() if k.startswith("mean TTFT at chunked's capacity (4 req/s)"))
    assert "1000.0 / 400.0 ms = 2.50x" in ttft and "**met**" in ttft
    tbt = next(v for k, v in rows.items() if k.startswith("p99 TBT at chunked's capacity"))
    assert "1.25x" in tbt and "**missed** by 17%" in tbt
    assert "### Why targets were missed" in text and "- **nexus** at 10 req/s (stopped early†)" in text
    assert "| llama-3.1-8b | Mixed | 8 | 2.00x | 2.00x | 3 of 4 |" in text
    assert math.isclose(len(list(md.parent.glob("*.png"))), 1)  # latency only: no split timeline in these files

"""Bad command lines, every subcommand (issue 14's table and its siblings).

Each must end in a clean error: argparse's usage message or one line `error: ...` on stderr, exit
code 2 or 1, no traceback, nothing on stdout (no table, no progress bar: no run was started), and
no hang. In-process, so the whole table costs seconds; pytest-timeout turns a hang into a failure.
`serve` never reaches a real server here: nexus_tune.commands.serve.serve fails the test if a case gets that far.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import socket
from pathlib import Path

import pytest

from nexus_tune.commands.cli import main
from nexus_tune.core.testing import synthetic_profile

pytestmark = pytest.mark.timeout(60)

# A damaged copy of a good profile per name: what each does to the profile's JSON.
DAMAGES = {
    "split_empty": lambda raw: raw.update(split_sms=[]),
    "split_outside": lambda raw: raw.update(split_sms=[0, 64, 200]),
    "kv_zero": lambda raw: raw.update(kv_capacity_tokens=0),
    "sm_zero": lambda raw: raw["gpu"].update(sm_count=0),
    "sm_bool": lambda raw: raw["gpu"].update(sm_count=True),
    "knobs_list": lambda raw: raw.update(tuned_knobs=[1, 2]),
    "knobs_string": lambda raw: raw.update(tuned_knobs="fast"),
    "knobs_wrong_type": lambda raw: raw.update(tuned_knobs={"mode": "slo", "alpha": "high"}),
    "knobs_bad_mode": lambda raw: raw.update(tuned_knobs={"mode": 3}),
    "knobs_unknown": lambda raw: raw.update(tuned_knobs={"bogus": 1}),
}
CORRUPT = "is corrupt"  # Profile.load's refusal, whatever the field


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Placeholders of the table: the good profile, its damaged copies, bad step-record folders."""
    root = tmp_path_factory.mktemp("cli")
    good = synthetic_profile().save(root / "good.json")
    raw = json.loads(good.read_text())
    for name, damage in DAMAGES.items():
        copy_ = copy.deepcopy(raw)
        damage(copy_)
        (root / f"{name}.json").write_text(json.dumps(copy_))
    (root / "not_json.json").write_text("{not json")
    (root / "sharegpt_bad.json").write_text(json.dumps([{"conversations": ["hi", "there"]}]))
    for folder, content in (("runs_damaged", {"kind": "calibration", "meta": {"model": "llama-3.1-8b"}, "runs": 5}),
                            ("runs_not_json", None)):
        (root / folder).mkdir()
        (root / folder / "steps.json").write_text(json.dumps(content) if content else "[1, 2")
    with socket.socket() as sock:  # a port nothing listens on (serve binds it to check, then lets go)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"dir": str(root), "P": str(good), "port": str(port)}


SIM = "--profile {P} --num-prompts 5"
SERVE = "serve --model tiny --device cpu --policy chunked --port {port}"
BENCH = "bench --base-url http://127.0.0.1:9 --num-prompts 2"  # nothing listens on port 9
NO_NUMBER = "is not a positive, finite number"
NO_INT = "is not a positive integer"
NO_SLO = "must be a positive, finite number of ms"

CASES: list[tuple[str, str]] = [
    # -- the command itself
    ("", "the following arguments are required: command"),
    ("frobnicate", "invalid choice: 'frobnicate'"),
    # -- info
    ("info --device -1", "is not an integer >= 0"),
    ("info --device abc", "is not an integer >= 0"),
    ("info --bogus", "unrecognized arguments: --bogus"),
    # -- profile, profile show
    ("profile", "say which model"),
    ("profile --model tiny --device -1", "is not an integer >= 0"),
    ("profile show", "the following arguments are required: path"),
    ("profile show {dir}/missing.json", "no profile at"),
    ("profile show {dir}/not_json.json", "not a readable profile"),
    ("profile show {dir}/split_empty.json", "split_sms must list"),
    ("profile show {dir}/knobs_bad_mode.json", "controller mode 3"),
    ("profile show {P} --plot {P}/curves.png", "is a file, not a folder"),
    ("profile show {P} --plot {dir}", "is a folder, not a file"),
    # -- profile check, profile refit
    ("profile check", "the following arguments are required: path"),
    ("profile check {dir}/missing.json", "no profile at"),
    ("profile check {dir}/not_json.json", "not a readable profile"),
    ("profile check {P} --folds 1", "is not a number of folds >= 2"),
    ("profile check {P} --seed -1", "is not an integer >= 0"),
    ("profile refit {dir}/missing.json", "no profile at"),
    ("profile refit {P} --folds x", "is not a number of folds >= 2"),
    ("profile refit {P} --attention-heads 0", NO_INT),
    ("profile refit {P} --out {dir}", "is a folder, not a file"),
    ("profile refit {P} --add-samples {dir}/missing.json", "no profile at"),
    # -- calibrate
    ("calibrate", "the following arguments are required: --profile"),
    ("calibrate --profile {dir}/missing.json --from-runs {dir}", "no profile at"),
    ("calibrate --profile {P}/p.json", "is a file, not a folder"),
    ("calibrate --profile {P} --loads abc", NO_NUMBER),
    ("calibrate --profile {P} --loads 0", NO_NUMBER),
    ("calibrate --profile {P} --loads -0.5", NO_NUMBER),
    ("calibrate --profile {P} --loads 0.4,nan", NO_NUMBER),
    ("calibrate --profile {P} --loads 0.4,inf", NO_NUMBER),
    ("calibrate --profile {P} --loads ,", "expected a comma-separated list"),
    ("calibrate --profile {P} --policies chunked,vllm", "unknown policy 'vllm'"),
    ("calibrate --profile {P} --policies static:0", "static needs a prefill SM count"),
    ("calibrate --profile {P} --num-prompts 0", NO_INT),
    ("calibrate --profile {P} --max-model-len 0", NO_INT),
    ("calibrate --profile {P} --max-output 0", NO_INT),
    ("calibrate --profile {P} --min-steps 0", NO_INT),
    ("calibrate --profile {P} --seed -1", "is not an integer >= 0"),
    ("calibrate --profile {P} --device gpu", "is not cuda, cuda:N or cpu"),
    ("calibrate --profile {P} --from-runs {dir}/runs_damaged", "is a damaged calibration file"),
    ("calibrate --profile {P} --from-runs {dir}/runs_not_json", "is not a readable JSON file"),
    ("calibrate --profile {P} --from-runs {dir}/no_such_folder", "no step records of llama-3.1-8b"),
    ("calibrate --profile {dir}/kv_zero.json --from-runs {dir}", "kv_capacity_tokens must be a positive integer"),
    # -- serve
    ("serve", "the following arguments are required: --model"),
    (SERVE.replace("{port}", "99999"), "is not a TCP port"),
    (SERVE.replace("{port}", "0"), "is not a TCP port"),
    (SERVE.replace("{port}", "http"), "is not a TCP port"),
    (SERVE + " --max-model-len 0", NO_INT),
    (SERVE + " --max-model-len -5", NO_INT),
    (SERVE + " --max-num-seqs 0", NO_INT),
    (SERVE + " --max-queue 0", NO_INT),
    (SERVE + " --gpu-memory-utilization 0", "is not a number in (0, 1]"),
    (SERVE + " --gpu-memory-utilization 1.5", "is not a number in (0, 1]"),
    (SERVE + " --gpu-memory-utilization nan", "is not a number in (0, 1]"),
    (SERVE + " --seed -1", "is not an integer >= 0"),
    (SERVE + " --device tpu", "is not cuda, cuda:N, cpu or auto"),
    (SERVE + " --policy vllm", "unknown policy 'vllm'"),
    (SERVE + " --policy static:x", "static needs a prefill SM count"),
    (SERVE.replace("tiny", "no-such-model"), "is neither a preset"),
    (SERVE + " --max-model-len 100000", "exceeds the model's 1024 positions"),
    (SERVE.replace("chunked", "nexus") + " --profile {dir}/missing.json", "no profile at"),
    # -- bench: every bad value is refused before the unreachable server is tried (exit 1 otherwise)
    (BENCH + " --request-rate nan", "is not a positive number of requests per second"),
    (BENCH + " --request-rate 0", "is not a positive number of requests per second"),
    (BENCH + " --request-rate -3", "is not a positive number of requests per second"),
    (BENCH + " --burstiness nan", NO_NUMBER),
    (BENCH + " --burstiness inf", NO_NUMBER),
    (BENCH + " --burstiness 0", NO_NUMBER),
    (BENCH.replace("2", "0"), NO_INT),
    (BENCH + " --random-input-len 0", NO_INT),
    (BENCH + " --random-output-len 0", NO_INT),
    (BENCH + " --max-concurrency 0", NO_INT),
    (BENCH + " --seed -2", "is not an integer >= 0"),
    (BENCH + " --goodput ttft:nan", NO_SLO),
    (BENCH + " --goodput ttft:0", NO_SLO),
    (BENCH + " --goodput tpot:inf", NO_SLO),
    (BENCH + " --goodput speed:3", "the names are ttft, tpot, e2el"),
    (BENCH + " --goodput ttft3000", "expected NAME=MS"),
    (BENCH + " --sweep 1,nan --goodput ttft:3000", NO_NUMBER),
    (BENCH + " --sweep 1,inf --goodput ttft:3000", NO_NUMBER),
    (BENCH + " --sweep 0,2 --goodput ttft:3000", NO_NUMBER),
    (BENCH + " --sweep 1,2", "--sweep finds the capacity under SLOs"),
    (BENCH + " --plot {dir}/b.png", "--plot draws latency against rate: it needs --sweep"),
    (BENCH + " --sweep 1,2 --goodput ttft:3000 --plot {P}/b.png", "is a file, not a folder"),
    (BENCH + " --result-file {P}/r.json", "is a file, not a folder"),
    (BENCH + " --dataset nope", "unknown workload 'nope'"),
    (BENCH + " --dataset sharegpt", "needs a ShareGPT-format JSON file"),
    (BENCH + " --dataset sharegpt --dataset-path {dir}/missing.json", "does not exist"),
    (BENCH + " --dataset {dir}/sharegpt_bad.json", "holds no usable conversation"),
    (BENCH, "cannot reach http://127.0.0.1:9"),
    # -- simulate
    ("simulate", "the following arguments are required: --profile"),
    ("simulate " + SIM + " --request-rate nan", "is not a positive number of requests per second"),
    ("simulate " + SIM + " --request-rate 0", "is not a positive number of requests per second"),
    ("simulate " + SIM + " --request-rate -1", "is not a positive number of requests per second"),
    ("simulate " + SIM + " --request-rate fast", "is not a positive number of requests per second"),
    ("simulate " + SIM + " --burstiness nan", NO_NUMBER),
    ("simulate " + SIM + " --burstiness inf", NO_NUMBER),
    ("simulate " + SIM + " --burstiness 0", NO_NUMBER),
    ("simulate " + SIM + " --burstiness -1", NO_NUMBER),
    ("simulate --profile {P} --num-prompts 0", NO_INT),
    ("simulate --profile {P} --num-prompts -3", NO_INT),
    ("simulate --profile {P} --num-prompts 1.5", NO_INT),
    ("simulate " + SIM + " --seed -1", "is not an integer >= 0"),
    ("simulate " + SIM + " --slo ttft=0,tpot=0", NO_SLO),
    ("simulate " + SIM + " --slo ttft=nan", NO_SLO),
    ("simulate " + SIM + " --slo ttft=inf,tpot=inf", NO_SLO),
    ("simulate " + SIM + " --slo ttft=-5", NO_SLO),
    ("simulate " + SIM + " --slo ttft=fast", "not a number of milliseconds"),
    ("simulate " + SIM + " --slo latency=3", "the names are ttft, tpot, e2el"),
    ("simulate " + SIM + " --policy vllm", "unknown policy 'vllm'"),
    ("simulate " + SIM + " --policy static:63", "not a pre-created split"),
    ("simulate " + SIM + " --workload nope", "unknown workload 'nope'"),
    ("simulate " + SIM + " --workload {dir}/sharegpt_bad.json", "holds no usable conversation"),
    ("simulate --profile {dir}/missing.json", "no profile"),
    ("simulate --profile {dir}/not_json.json", "not a readable profile"),
    *[(f"simulate --profile {{dir}}/{name}.json --num-prompts 5", CORRUPT) for name in DAMAGES],
    # -- tune
    ("tune --profile {P} --trials 0", NO_INT),
    ("tune --profile {P} --trials -1", NO_INT),
    ("tune --profile {P} --trials many", NO_INT),
    ("tune --profile {P} --num-prompts 0", NO_INT),
    ("tune --profile {P} --slo ttft=0,tpot=0", NO_SLO),
    ("tune --profile {P} --slo ttft=nan", NO_SLO),
    ("tune --profile {P} --slo ttft=inf,tpot=inf", NO_SLO),
    ("tune --profile {P} --slo ''", "--slo is empty"),
    ("tune --profile {P} --slo ttft=3000,tpot=50,e2el=1", "no arrival rate meets"),
    ("tune --profile {P}/p.json", "is a file, not a folder"),
    ("tune --profile {dir}/missing.json", "no profile"),
    ("tune --profile {dir}/kv_zero.json", CORRUPT),
    ("tune --profile {dir}/knobs_wrong_type.json", CORRUPT),
    ("tune --profile {P} --workload nope", "unknown workload 'nope'"),
    # -- plan
    ("plan --profile {P} --num-prompts 0", NO_INT),
    ("plan --profile {P} --seed -1", "is not an integer >= 0"),
    ("plan --profile {P} --slo ttft=0,tpot=0", NO_SLO),
    ("plan --profile {P} --slo ttft=nan", NO_SLO),
    ("plan --profile {P} --slo ttft=inf,tpot=inf", NO_SLO),
    ("plan --profile {P} --slo ttft=3000,tpot=50,e2el=1", "no arrival rate meets"),
    ("plan --profile {P} --slo ttft=1,tpot=50", "no arrival rate meets"),
    ("plan --profile {P} --plot {P}/x.png", "is a file, not a folder"),
    ("plan --profile {P} --plot {dir}", "is a folder, not a file"),
    ("plan --profile {dir}/split_empty.json", CORRUPT),
    ("plan --profile {dir}/sm_zero.json", CORRUPT),
    ("plan --profile {dir}/kv_zero.json", CORRUPT),
    ("plan --profile {dir}/knobs_list.json", CORRUPT),
    ("plan --profile {P} --workload nope", "unknown workload 'nope'"),
]
# A usage error (argparse: "nexus-tune plan: error: ...") or a handler's `error: ...`, as the last line.
ERROR_LINE = re.compile(r"^(nexus-tune( [\w-]+)*: )?error: ")


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """A serve case that got past every check would block serving: fail it there instead."""
    def started(*args, **kwargs):
        raise AssertionError("the server started: the bad input was accepted")

    monkeypatch.setattr("nexus_tune.commands.serve.serve", started)
    monkeypatch.setattr("logging.basicConfig", lambda **kwargs: None)  # no handlers left on the root logger


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("line, message", CASES, ids=[line or "(nothing)" for line, _ in CASES])
def test_bad_input_is_a_clean_error(line, message, files, capsys):
    code, out, err = run_cli(shlex.split(line.format(**files)), capsys)
    assert "Traceback" not in out + err, err
    assert code in (1, 2), f"exit code {code}: a wrong success (stderr: {err})"
    assert out.strip() == "", "a refused command must not start the run"
    lines = err.strip().splitlines()
    assert lines and ERROR_LINE.match(lines[-1]), err
    assert message.format(**files) in " ".join(lines), err


def test_serve_refuses_a_taken_port_before_loading_the_model(files, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = shlex.split(SERVE.format(port=taken.getsockname()[1]))
        code, out, err = run_cli(argv + ["--model", "no-such-model"], capsys)  # loading it would fail too
    assert code == 2 and out == "" and "cannot listen on 127.0.0.1:" in err and "Traceback" not in err


def test_tune_with_one_trial_runs_the_baseline(files, capsys, tmp_path):
    """Was a traceback: the enqueued baseline counted as a trial before it ran."""
    profile = tmp_path / "p.json"
    profile.write_bytes(Path(files["P"]).read_bytes())  # tune writes the knobs into it
    code, out, err = run_cli(["tune", "--profile", str(profile), "--num-prompts", "20", "--trials", "1"], capsys)
    assert code == 0, err
    assert "after 1 trials" in out and "Tuned knobs written" in out


def test_slos_that_never_bind_report_a_lower_bound_not_the_search_ceiling(files, capsys):
    """SLOs every rate meets: the search stops at its ceiling, so the capacity is a lower bound (>=)."""
    png = Path(files["dir"]) / "plots" / "plan.png"  # a missing folder is made
    code, out, err = run_cli(["plan", "--profile", files["P"], "--num-prompts", "20", "--slo", "ttft=1e9,tpot=1e9",
                              "--plot", str(png)], capsys)
    assert code == 0, err
    assert ">=" in out and "the SLOs do not limit the capacity" in " ".join(out.split())
    assert png.read_bytes()[:4] == b"\x89PNG"

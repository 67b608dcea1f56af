"""benchmarks/soak.py on the CPU: a few seconds against the real tiny server (every check passes, the
counts add up), then against a server that keeps a KV block of every request (the soak fails it)."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from benchmarks import soak

TESTS = Path(__file__).resolve().parent
# Every kind of request in a short run; storms of 3 cut after 0.3 s, while the tiny model still streams.
SHORT = ["--request-rate", "8", "--duration", "3", "--dataset", "random", "--random-input-len", "24",
         "--random-output-len", "8", "--disconnect-share", "0.25", "--storm-size", "3", "--storm-hold", "0.3",
         "--oversize-share", "0.2", "--malformed-share", "0.2", "--settle-timeout", "2", "--shutdown-timeout", "5"]

# The server's app over the tests' fake engine, whose stats say one block of every request it ran stays taken.
LEAKY_SERVE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from nexus_tune.engine.server import build_app, serve
    from server_helpers import FakeEngine

    class Leaky(FakeEngine):
        max_model_len = 4096  # room for the soak's calibration probes

        def stats(self):
            stats = super().stats()
            stats["free_blocks"] -= min(len(self.calls), self.num_blocks)
            stats["kv_usage"] = 1 - stats["free_blocks"] / self.num_blocks
            return stats

    serve(build_app(Leaky(scripted=False, max_request_tokens=4096), "fake-model"), "127.0.0.1", int(sys.argv[1]))
""")


def run(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    rc = soak.main([*SHORT, *extra, "--out", str(tmp_path)])
    return rc, json.loads((tmp_path / "soak.json").read_text())


def test_soak_on_the_tiny_server_passes_and_counts_add_up(tmp_path):
    rc, result = run(tmp_path, "--model", "tiny", "--device", "cpu", "--policy", "chunked")
    failed = [c for c in result["checks"] if not c["passed"]]
    assert rc == 0 and result["passed"] and not failed, failed
    counts = result["counts"]
    assert sum(sum(per_kind.values()) for per_kind in counts.values()) == result["sent"]
    assert all(sum(per_kind.values()) > 0 for per_kind in counts.values())  # every kind was sent
    assert counts["disconnect"][soak.DISCONNECTED] > 0  # a storm cut streams the server was running...
    assert result["metrics_after"]["nexus_requests_total{finished_reason=abort}"] > 0  # ...which it aborted
    statuses = result["statuses"]
    assert {s for v in statuses["oversize"].values() for s in v} == {"400"}
    assert all(400 <= int(s) < 500 for v in statuses["malformed"].values() for s in v)


def test_soak_fails_a_server_that_never_frees_kv_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(soak, "serve_command",
                        lambda args, port: [sys.executable, "-c", LEAKY_SERVE, str(port), str(TESTS)])
    rc, result = run(tmp_path, "--model", "fake-model")
    failed = {c["check"] for c in result["checks"] if not c["passed"]}
    assert rc == 1 and failed == {"every KV block back"}

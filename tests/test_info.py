"""`nexus-tune info` on a machine without a GPU: a clear answer, exit code 0."""
import subprocess
import sys

import pytest
import torch

from nexus_tune.commands.cli import main
from nexus_tune.core.partition import TimeSharingWarning

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU output")


def check_output(out: str) -> None:
    assert "no NVIDIA GPU:" in out
    assert "time-sharing" in out
    assert "torch" in out and torch.__version__ in out  # the versions table


def test_info_in_process(capsys, recwarn):
    assert main(["info"]) == 0
    captured = capsys.readouterr()
    check_output(captured.out)
    assert "Traceback" not in captured.err
    # info explains the fallback in its table, without the loud warning on top
    assert not [w for w in recwarn if w.category is TimeSharingWarning]


def test_info_subprocess():
    result = subprocess.run([sys.executable, "-m", "nexus_tune", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    check_output(result.stdout)
    assert "Traceback" not in result.stderr


def test_info_bad_device_index(capsys, monkeypatch):
    def bad_index(index):
        raise ValueError(f"device {index} does not exist: this machine has 1 GPU(s), 0..0")

    monkeypatch.setattr("nexus_tune.commands.info.identify", bad_index)
    assert main(["info", "--device", "3"]) == 2
    assert "device 3 does not exist" in capsys.readouterr().out

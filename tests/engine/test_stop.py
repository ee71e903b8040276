"""StopRequests: the first stop signal is recorded, the second acts at once; handlers are restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kdzoo.engine.stop import StopRequests


def test_first_ctrl_c_requests_a_stop_and_the_second_interrupts(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        assert "stopping after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_second_term_signal_terminates_the_process():
    # A signal a process sends itself is handled before the next statement runs, so the second one must
    # end the process right there: no grace period to wait out, and `survived` is never printed.
    # The deadline only bounds the child's start (importing torch is slow on a loaded machine).
    code = ("import os, signal\nfrom kdzoo.engine.stop import StopRequests\n"
            "with StopRequests() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert stop.signum == signal.SIGTERM\n"
            "    print('recorded', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('survived', flush=True)\n"
            "print('survived the context', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.stdout == "recorded\n" and result.returncode == -signal.SIGTERM, result.stderr[-2000:]

"""examples/slurm_imagenet.sh: valid bash, signals that kdzoo's stop handler answers, a kdzoo command line that
loads, and the stop -> requeue flow, run against stand-ins for srun, scancel, scontrol and torchrun."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

from kdzoo.cli import build_parser
from kdzoo.config.loader import load_config
from kdzoo.engine.stop import STOP_SIGNALS
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "examples" / "slurm_imagenet.sh"


def _sbatch(name: str) -> str:
    found = re.findall(rf"^#SBATCH --{name}=(\S+)$", SCRIPT.read_text(), flags=re.MULTILINE)
    assert len(found) == 1, (name, found)
    return found[0]


def _srun_tokens() -> list[str]:
    """The srun command, continuation lines joined, split as the shell splits it."""
    joined = SCRIPT.read_text().replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.startswith("srun ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def _option(tokens: list[str], name: str) -> str:
    assert tokens.count(name) == 1, name
    return tokens[tokens.index(name) + 1]


def _signal(name: str) -> signal.Signals:
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def test_slurm_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_script_sends_a_stop_signal_that_reaches_each_worker_once():
    warning = re.fullmatch(r"(B:)?(\w+)@(\d+)", _sbatch("signal"))
    assert warning and warning.group(1) == "B:" and int(warning.group(3)) >= 60
    warned = _signal(warning.group(2))
    assert warned in STOP_SIGNALS
    text = SCRIPT.read_text()
    # the batch shell's trap for that signal passes the same signal on to the job's tasks
    handler = re.search(rf"^trap (\w+) {warned.name.removeprefix('SIG')}$", text, flags=re.MULTILINE)
    assert handler, "no trap for the warning signal"
    body = re.search(rf"^{handler.group(1)}\(\) {{\n(.*?)^}}", text, flags=re.MULTILINE | re.DOTALL)
    assert body and re.findall(r"scancel --signal=(\w+)", body.group(1)) == [warned.name.removeprefix("SIG")]
    tokens = _srun_tokens()
    # the node wrapper ignores every stop signal, so torchrun inherits SIG_IGN and does not die of one, and it
    # hands none to the workers a second time; the workers install kdzoo's handler over the inherited SIG_IGN
    wrapper = tokens[tokens.index("-c") + 1]
    ignored = re.fullmatch(r'trap "" ([A-Z0-9 ]+); exec "\$@"', wrapper)
    assert ignored, wrapper
    assert set(STOP_SIGNALS) <= {_signal(name) for name in ignored.group(1).split()}
    handled = {_signal(name) for name in _option(tokens, "--signals-to-handle").split(",")}
    assert not handled & set(STOP_SIGNALS)
    assert "--requeue" in text and "scontrol requeue" in text


def test_slurm_script_launches_torchrun_per_node_with_a_c10d_rendezvous():
    tokens = _srun_tokens()
    assert int(_sbatch("ntasks-per-node")) == 1
    assert _option(tokens, "--nnodes") == "$SLURM_JOB_NUM_NODES"
    assert _option(tokens, "--nproc-per-node") == _sbatch("gpus-per-node")
    assert _option(tokens, "--rdzv-backend") == "c10d"
    assert _option(tokens, "--rdzv-endpoint") == "$head_node:29500"
    assert _option(tokens, "--max-restarts") == "0"
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in SCRIPT.read_text()


def test_slurm_script_kdzoo_command_loads_and_keeps_the_recipes_global_batch():
    tokens = _srun_tokens()
    start = tokens.index("-m")
    assert tokens[start + 1:start + 3] == ["kdzoo", "train"]
    argv = tokens[start + 2:]
    assert argv[-1] == "&"
    args = build_parser().parse_args(argv[:-1])
    overrides = [item for item in args.overrides if not item.startswith("resume=")]
    assert overrides != args.overrides and "resume=auto" in args.overrides  # a requeued job continues its run
    config = REPO_ROOT / args.config
    assert config.is_file()
    cfg = load_config(config, overrides)
    processes = int(_sbatch("nodes")) * int(_option(tokens, "--nproc-per-node"))
    assert (processes, cfg.data.batch_size) == (16, 32)
    assert cfg.data.batch_size * processes == cfg.schedule.reference_batch == 512
    assert cfg.data.num_workers * int(_option(tokens, "--nproc-per-node")) <= int(_sbatch("cpus-per-task"))


STUB_TORCHRUN = """#!{python}
# torchrun and one worker in one: records which stop signals it inherited as ignored, then waits under kdzoo's
# stop handler (as a worker does) and exits 128 + the signal, as kdzoo train does after its checkpoint.
import os, signal, sys, time
from kdzoo.engine.stop import STOP_SIGNALS, StopRequests
ignored = [s.name for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("torchrun ignores " + ",".join(ignored) + "\\n")
if os.environ.get("STUB_FINISH"):
    sys.exit(0)
with StopRequests() as stop:
    with open(os.environ["STUB_TASK_PID"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.environ["STUB_TASK_PID"] + ".tmp", os.environ["STUB_TASK_PID"])
    deadline = time.monotonic() + 30
    while stop.signum is None and time.monotonic() < deadline:
        time.sleep(0.01)
sys.exit(128 + stop.signum if stop.signum else 3)
"""
STUBS = {
    # srun: drop its own options, run the task here
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\necho "srun" >> "$STUB_LOG"\nexec "$@"\n',
    # scancel --signal=SIG JOB: signal the job's task (SLURM: every process of the job steps)
    "scancel": '#!/bin/bash\necho "scancel $*" >> "$STUB_LOG"\nkill -"${1#--signal=}" "$(cat "$STUB_TASK_PID")"\n',
    "scontrol": ('#!/bin/bash\nif [ "$1" = show ]; then printf "gpu-a\\ngpu-b\\n"\n'
                 'else echo "scontrol $*" >> "$STUB_LOG"; fi\n'),
}


def _run_script(tmp_path, finish: bool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {**STUBS, "torchrun": STUB_TORCHRUN.format(python=sys.executable)}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log, task_pid = tmp_path / "log", tmp_path / "task.pid"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_TASK_PID": str(task_pid), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(REPO_ROOT), "PYTHONPATH": str(REPO_ROOT)}
    if finish:
        env["STUB_FINISH"] = "1"
    batch = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    if not finish:
        deadline = time.monotonic() + 30
        while not task_pid.exists() and time.monotonic() < deadline and batch.poll() is None:
            time.sleep(0.02)
        assert task_pid.exists(), "the task never started"
        batch.send_signal(_signal(re.fullmatch(r"B:(\w+)@\d+", _sbatch("signal")).group(1)))  # SLURM's warning
    out, _ = batch.communicate(timeout=60)
    return batch.returncode, out, log.read_text().splitlines()


def test_slurm_script_warning_stops_the_workers_and_requeues(tmp_path):
    returncode, out, log = _run_script(tmp_path, finish=False)
    warned = _signal(re.fullmatch(r"B:(\w+)@\d+", _sbatch("signal")).group(1))
    assert returncode == 128 + warned, out
    assert log == ["srun", "torchrun ignores " + ",".join(s.name for s in STOP_SIGNALS),
                   f"scancel --signal={warned.name.removeprefix('SIG')} 4242", "scontrol requeue 4242"], out
    assert "rendezvous on gpu-a" in out


def test_slurm_script_does_not_requeue_a_finished_run(tmp_path):
    returncode, out, log = _run_script(tmp_path, finish=True)
    assert returncode == 0, out
    assert log == ["srun", "torchrun ignores " + ",".join(s.name for s in STOP_SIGNALS)], out

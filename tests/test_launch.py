"""`ponder launch local` and multi-process start-up, with real processes on localhost."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from model.distributed import DistributedError, JobSpec, detect_cluster, job_spec
from train.launch.local import free_port, local_workers
from train.launch.supervisor import Supervisor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ponder_launch(*args, timeout=180, **kwargs):
    """Starts `ponder launch local ARGS` as a process (stdout and stderr merged)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, "-m", "tools.cli", "launch", "local", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_hosts_get_their_identity_prefixed_output_and_logs(tmp_path):
    """Every host sees the job's coordinator, size, its id and its devices; lines are prefixed and logged."""
    code = """
        import os
        print(os.environ["PONDER_PROCESS_ID"], os.environ["PONDER_NUM_PROCESSES"], os.environ["PONDER_COORDINATOR"],
              os.environ["XLA_FLAGS"].split()[-1], os.environ["JAX_PLATFORMS"])
    """
    process = ponder_launch("--hosts", "3", "--devices-per-host", "2", "--log-dir", str(tmp_path), "--",
                            *python(code))
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out
    lines = sorted(line for line in out.splitlines() if line.startswith("[host"))
    assert len(lines) == 3
    coordinators = {line.split()[4] for line in lines}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    for i, line in enumerate(lines):
        assert line.startswith(f"[host {i}] {i} 3 ")
        assert line.endswith("--xla_force_host_platform_device_count=2 cpu")
        assert (tmp_path / f"host-{i}.log").read_text() == line.removeprefix(f"[host {i}] ") + "\n"


def test_a_failing_host_stops_the_others_and_sets_the_status(tmp_path):
    """Host 1 exits 3 at once; host 0 would sleep a minute but is stopped; the job's status is 3."""
    workers = local_workers(python("""
        import os, sys, time
        if os.environ["PONDER_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(60)
    """), hosts=2, devices_per_host=1)
    start = time.monotonic()
    status = Supervisor(workers, log_dir=tmp_path, out=open(os.devnull, "w")).run()
    assert status == 3
    assert time.monotonic() - start < 30


def test_kill_9_of_one_host_stops_the_job(tmp_path):
    """A host killed by SIGKILL: the other is stopped and the job reports 128 + 9."""
    marker = tmp_path / "pids"
    marker.mkdir()
    code = f"""
        import os, pathlib, time
        pathlib.Path({str(marker)!r}, os.environ["PONDER_PROCESS_ID"]).write_text(str(os.getpid()))
        print("ready", flush=True)
        time.sleep(120)
    """
    process = ponder_launch("--hosts", "2", "--log-dir", str(tmp_path / "logs"), "--", *python(code))
    _wait_for(lambda: len(list(marker.iterdir())) == 2)
    os.kill(int((marker / "1").read_text()), signal.SIGKILL)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 137, out
    assert "host 1 exited with status 137" in out
    with pytest.raises(ProcessLookupError):
        os.kill(int((marker / "0").read_text()), 0)


def test_sigterm_to_the_launcher_reaches_every_host(tmp_path):
    """Each host traps SIGTERM, says so and exits 0: the job exits 0 and both said it."""
    ready = tmp_path / "ready"
    ready.mkdir()
    code = f"""
        import os, pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("saved and stopping", flush=True), sys.exit(0)))
        pathlib.Path({str(ready)!r}, os.environ["PONDER_PROCESS_ID"]).touch()
        time.sleep(120)
    """
    process = ponder_launch("--hosts", "2", "--", *python(code))
    _wait_for(lambda: len(list(ready.iterdir())) == 2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert "[host 0] saved and stopping" in out and "[host 1] saved and stopping" in out


def test_two_processes_join_one_job(tmp_path):
    """`ponder info` as 2 processes x 2 devices: each sees 4 devices, 2 of them its own, and its index."""
    process = ponder_launch("--hosts", "2", "--devices-per-host", "2", "--log-dir", str(tmp_path), "--",
                            "ponder", "info", "--config", "tiny")
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, out
    for i in range(2):
        log = (tmp_path / f"host-{i}.log").read_text()
        assert "devices:   4 (4 x cpu)" in log
        assert f"process:   {i} of 2" in log


def test_mismatched_process_counts_stop_with_a_named_error_not_a_hang():
    """Process 0 says 2 processes, process 1 says 3: both stop within the timeout naming the count."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu",
                                                                       "PONDER_INIT_TIMEOUT": "20"}
    processes = [subprocess.Popen([sys.executable, "-m", "tools.cli", "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", str(count), "--process-id", str(i), "info", "--config", "tiny"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i, count in enumerate((2, 3))]
    outs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [2, 2], outs
    for out in outs:
        assert "disagree on number of processes" in out or "started with --num-processes 3" in out, out


def test_an_unreachable_coordinator_is_named():
    """Process 1 of 2 with nobody at the coordinator's port: a clear error within the timeout, no abort."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu",
                                                                       "PONDER_INIT_TIMEOUT": "3"}
    process = subprocess.run([sys.executable, "-m", "tools.cli", "--coordinator", f"127.0.0.1:{free_port()}",
                              "--num-processes", "2", "--process-id", "1", "info", "--config", "tiny"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "did not answer within 3 s" in process.stderr and "process 0 is running" in process.stderr


def test_job_spec_reads_flags_then_environment_then_the_cluster():
    assert job_spec(environ={}) is None
    assert job_spec("h:1", 1, 0, environ={}) is None  # a job of one is a single-process run
    assert job_spec("h:1", 2, 1, environ={}) == JobSpec("h:1", 2, 1, "flags")
    env = {"PONDER_COORDINATOR": "10.0.0.1:8476", "PONDER_NUM_PROCESSES": "4", "PONDER_PROCESS_ID": "3"}
    assert job_spec(environ=env) == JobSpec("10.0.0.1:8476", 4, 3, "environment")
    assert job_spec("h:1", 2, 0, environ=env).source == "flags"
    with pytest.raises(DistributedError, match="missing --process-id"):
        job_spec("h:1", 2, environ={})
    with pytest.raises(DistributedError, match="not in 0..1"):
        job_spec("h:1", 2, 2, environ={})
    with pytest.raises(DistributedError, match="HOST:PORT"):
        job_spec("h", 2, 0, environ={})
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}) == "tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == "slurm"
    assert job_spec(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}).auto


def _wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize(("command", "name"), [(["demo"], "demo"), (["bench", "data"], "bench"),
                                             (["reward", "eval", "--checkpoint", "x", "--data", "y"], "reward eval")])
def test_single_host_commands_refuse_a_multi_process_job_naming_why(command, name):
    """A command that runs on one host by design says so instead of joining a job."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "PONDER_COORDINATOR": f"127.0.0.1:{free_port()}", "PONDER_NUM_PROCESSES": "2", "PONDER_PROCESS_ID": "1"}
    process = subprocess.run([sys.executable, "-m", "tools.cli", *command], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    assert process.returncode == 2, process.stderr
    assert f"`ponder {name}` runs on one host (" in process.stderr

"""Many hosts, for real: `ponder train` as 2 local processes x 4 CPU devices (gloo collectives).

Every run is a real `ponder launch local` (or a single `ponder train` process) of the tiny
config; the runs share the session's persistent compilation cache, so only the first
compiles. `data.shards=2` makes the global batch the same whatever the process count.
Search and GRPO on many hosts are in tests/test_multihost_policy.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.load import load_config
from model.sharding import make_mesh
from train.checkpoint import load_params
from train.state import state_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/experiments/tiny.yaml"
STEPS = 20
# A constant learning rate after warmup: the 1-process leg stops early with train.steps=12, which
# would otherwise change a cosine schedule.
OVERRIDES = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "data.shards=2",
             "optimizer.decay=constant", "train.checkpoint_every=5", "train.keep_checkpoints=10"]


def _env(extra=None):
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"} | (extra or {})


def launch(run_dir, *overrides, hosts=2, env=None):
    """Starts `ponder train` on `hosts` local processes (4 devices each), or on one process of 8 devices."""
    train = ["train", "--no-progress", "--config", CONFIG, *OVERRIDES, f"train.run_dir={run_dir}", *overrides]
    if hosts == 1:
        command = [sys.executable, "-m", "tools.cli", "--devices", "8", *train]
    else:
        command = [sys.executable, "-m", "tools.cli", "launch", "local", "--hosts", str(hosts),
                   "--devices-per-host", "4", "--", "ponder", *train]
    return subprocess.Popen(command, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process, timeout=600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def losses(run_dir) -> dict[int, float]:
    """step -> training loss, the last record of each step (a resumed run writes its steps again).

    `run_dir` is a pathlib.Path or an epath.Path (a bucket).
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def params(run_dir):
    cfg = load_config(str(run_dir / "config.yaml"))
    layout = state_layout(cfg, make_mesh(cfg.mesh))
    return jax.tree.map(np.asarray, load_params(run_dir, layout.abstract["params"]))


def steps_saved(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def wait_for_checkpoint(run_dir, step: int, process, timeout=300.0) -> None:
    """Until `step` is committed in the bucket (orbax writes commit_success.txt into a step last)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / str(step) / "commit_success.txt").exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2-process run straight through its 20 steps."""
    run_dir = tmp_path_factory.mktemp("multihost") / "uninterrupted"
    out = finish(launch(run_dir))
    assert out.count("ponder train: accuracy=") == 1, out[-4000:]  # the result is said once, by host 0
    return run_dir


def test_two_processes_train_like_one_with_the_same_global_batch(uninterrupted, tmp_path):
    single = tmp_path / "single"
    finish(launch(single, hosts=1))
    two, one = losses(uninterrupted), losses(single)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=0, atol=1e-5)
    assert one[STEPS] < one[1] - 1.0  # it learned: the comparison is not between two flat lines
    for hosts in (0, 1):
        assert (uninterrupted / "logs" / f"host-{hosts}.log").is_file()


def test_preempted_killed_and_resumed_in_a_bucket_on_other_process_counts_ends_like_an_uninterrupted_run(
        uninterrupted, gcs_emulator):
    """In a gs:// run directory (a local GCS emulator: orbax/tensorstore and epath/gcsfs write the
    checkpoints, data positions, metrics, TensorBoard events and host logs to it): SIGTERM to the
    launcher (both hosts save one step, exit 0); resume on 1 process; resume on 2 and kill -9 one
    host (the other is stopped); resume on 2 to the end: the losses and params of the local-disk run."""
    from etils import epath

    run_dir, env = epath.Path(f"gs://{gcs_emulator.bucket}/run"), gcs_emulator.env
    process = launch(run_dir, env=env)
    wait_for_checkpoint(run_dir, 5, process)
    process.send_signal(signal.SIGTERM)
    out = finish(process)
    preempted = steps_saved(run_dir)[-1]
    assert f"SIGTERM: saved step {preempted}" in out and preempted > 5
    for host in (0, 1):
        assert f"Reached preemption sync point, step={preempted}" in (run_dir / "logs" / f"host-{host}.log").read_text()

    out = finish(launch(run_dir, "train.steps=12", hosts=1, env=env))
    assert f"resumed from step {preempted}" in out and steps_saved(run_dir)[-1] == 12

    process = launch(run_dir, env=env)
    wait_for_checkpoint(run_dir, 15, process)
    _kill_host(run_dir, 1)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 137, out[-4000:]
    assert "host 1 exited with status 137" in out

    out = finish(launch(run_dir, env=env))
    resumed_from = int(out.split("resumed from step ")[1].split(")")[0])
    assert resumed_from >= 15
    expected, got = losses(uninterrupted), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)],
                               rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params(run_dir)), jax.tree.leaves(params(uninterrupted)), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for shard in (0, 1):  # each host saved its own data shard's position into the bucket
        assert (run_dir / "checkpoints" / "20" / "data" / f"shard-{shard}-of-2" / "state.json").exists()
    assert any((run_dir / "tensorboard").iterdir())
    log = (run_dir / "logs" / "host-0.log").read_text()  # the three 2-process launches' lines, appended
    assert log.count(f"ponder train: {run_dir} (") == 3, log[-3000:]


def _kill_host(run_dir, host: int) -> None:
    """SIGKILL to the `ponder train` process of host `host` of the run writing to `run_dir`."""
    for pid in subprocess.check_output(["pgrep", "-f", f"train.run_dir={run_dir}"], text=True).split():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"PONDER_PROCESS_ID") == str(host).encode():
            os.kill(int(pid), signal.SIGKILL)
            return
    raise AssertionError(f"no process of host {host} found")


def _run(command: list[str], hosts: int, env=None) -> str:
    """`ponder COMMAND` on one process of 8 devices, or on `hosts` processes of 8 / hosts devices; its output."""
    if hosts == 1:
        argv = [sys.executable, "-m", "tools.cli", "--devices", "8", *command]
    else:
        argv = [sys.executable, "-m", "tools.cli", "launch", "local", "--hosts", str(hosts), "--devices-per-host",
                str(8 // hosts), "--", "ponder", *command]
    return finish(subprocess.Popen(argv, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True))


def test_export_hf_from_a_two_process_checkpoint_to_a_bucket_writes_what_one_process_writes(
        uninterrupted, tmp_path, gcs_emulator):
    """Params sharded over both hosts' devices are gathered; process 0 alone writes, here to a bucket."""
    from etils import epath

    bucket = epath.Path(f"gs://{gcs_emulator.bucket}/export-hf")
    for hosts, out in ((1, tmp_path / "hf"), (2, bucket)):
        log = _run(["export", "hf", "--checkpoint", str(uninterrupted), "--out", str(out), "--shard-size", "1MB"],
                   hosts, env=gcs_emulator.env)
        assert log.count("wrote ") == 1, log[-3000:]
    local = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert sorted(p.name for p in bucket.iterdir()) == local
    assert sum(name.endswith(".safetensors") for name in local) > 1
    for name in local:
        if name.endswith(".safetensors"):
            assert (bucket / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name

"""`ponder launch tpu-vm | queued` run for real against a fake `gcloud` (tests/fakes/gcloud) first on PATH.

The fake records its calls, keeps the TPUs' states in files and runs each worker's command
(the generated worker script: unpack the commit's tarball, preflight, `ponder train`) as a
local process with simulated CPU devices. The code that runs is the tarball of HEAD, as on a
pod: these tests run the committed code.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
TRAIN = ["config=configs/experiments/tiny.yaml", "zone=fake-zone", "project=fake-project"]
STEPS = ["train.log_every=1", "train.eval_every=0", "optimizer.decay=constant", "train.checkpoint_every=5",
         "train.keep_checkpoints=10"]


def launch(backend, spec, overrides, cloud, **fake_env):
    """`ponder launch BACKEND SPEC OVERRIDES` with the fake gcloud; (exit status, output)."""
    cloud.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "PATH": f"{FAKES}:{os.environ['PATH']}", "FAKE_CLOUD": str(cloud), "FAKE_PYTHON": sys.executable,
        "JAX_PLATFORMS": "cpu"} | fake_env
    done = subprocess.run([sys.executable, "-m", "tools.cli", "launch", backend, spec, *overrides,
                           "--poll-seconds", "0.05"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr


def calls(cloud) -> list[list[str]]:
    return [json.loads(line) for line in (cloud / "calls.jsonl").read_text().splitlines()]


def overrides_of(run_dir, steps, *more):
    return [*TRAIN, f"run_dir={run_dir}", f"overrides=[train.steps={steps}, {', '.join(STEPS)}]", *more]


def test_a_preempted_tpu_vm_is_recreated_and_the_run_ends_like_an_uninterrupted_one(tmp_path):
    """Preempted (SIGTERM, state PREEMPTED) once checkpoint 10 exists: deleted, recreated, resumed to step 20."""
    from configs.load import load_config
    from model.sharding import make_mesh
    from train.checkpoint import load_params
    from train.state import state_layout

    run_dir, cloud = tmp_path / "run", tmp_path / "cloud"
    status, out = launch("tpu-vm", "v5litepod-8", overrides_of(run_dir, 20, "max_restarts=2"), cloud,
                         FAKE_DEVICES_PER_HOST="8", FAKE_PREEMPT_WHEN=str(run_dir / "checkpoints" / "10"))
    assert status == 0, out[-4000:]
    assert "summary: 2 attempt(s), 1 preemption(s)" in out and "last checkpoint step 20" in out, out[-3000:]
    assert "preempted (TPU state PREEMPTED" in out and "resumed from step" in out
    verbs = [" ".join(call[3:5]) for call in calls(cloud)]
    assert verbs.count("tpu-vm create") == 2 and verbs.count("tpu-vm delete") == 1, verbs
    assert len(list((ROOT / "build" / "launch").glob("ponder-*.tar.gz"))) >= 1  # built once, reused

    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "tools.cli", "--devices", "8", "train", "--no-progress", "--config",
                    "configs/experiments/tiny.yaml", "train.steps=20", *STEPS, f"train.run_dir={reference}"],
                   cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, check=True,
                   capture_output=True, timeout=600)
    params = {}
    for name, directory in (("pod", run_dir), ("reference", reference)):
        cfg = load_config(str(directory / "config.yaml"))
        params[name] = load_params(directory, state_layout(cfg, make_mesh(cfg.mesh)).abstract["params"])
    for a, b in zip(jax.tree.leaves(params["pod"]), jax.tree.leaves(params["reference"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_max_restarts_spent_stops_with_the_restartable_status(tmp_path):
    run_dir, cloud = tmp_path / "run", tmp_path / "cloud"
    status, out = launch("tpu-vm", "v5litepod-8", overrides_of(run_dir, 20, "max_restarts=0"), cloud,
                         FAKE_DEVICES_PER_HOST="8", FAKE_PREEMPT_WHEN=str(run_dir / "checkpoints" / "5"))
    assert status == 75, out[-4000:]
    assert "max_restarts=0 restarts are spent: stopping" in out
    assert "summary: 1 attempt(s), 1 preemption(s)" in out


def test_a_preflight_finds_the_worker_with_another_libtpu(tmp_path, gcs_emulator):
    """v4-16: two workers (4 devices each) that must share a bucket run directory; worker 1 has a libtpu."""
    cloud = tmp_path / "cloud"
    run_dir = f"gs://{gcs_emulator.bucket}/preflight"
    status, out = launch("tpu-vm", "v4-32", [*overrides_of(run_dir, 4), "accelerator=v4-16"], cloud,
                         FAKE_DEVICES_PER_HOST="4", FAKE_ODD_LIBTPU="1", **gcs_emulator.env)
    assert status == 2, out[-4000:]
    assert "different libtpu versions: none on process 0, 0.0.99 on process 1" in out, out[-4000:]
    assert "not restarting" in out and "summary: 1 attempt(s), 0 preemption(s)" in out
    assert "ponder train:" not in out  # the job never started



def test_an_xpk_workload_is_created_waited_for_and_deleted(tmp_path, gcs_emulator):
    """The spec's bucket is looked up (for the summary's last step) in the emulator, where it does not exist."""
    cloud = tmp_path / "cloud"
    status, out = launch("xpk", "xpk-v5p-256", ["max_restarts=4"], cloud, **gcs_emulator.env)
    assert status == 0, out[-4000:]
    recorded = calls(cloud)
    assert [call[1:3] for call in recorded] == [["workload", "create"], ["workload", "list"], ["workload", "delete"]]
    assert "--max-restarts=4" in recorded[0] and "--wait-for-job-completion=ponder-xpk" in recorded[1]
    assert "summary: 1 attempt(s), 0 preemption(s)" in out
    status, out = launch("xpk", "xpk-v5p-256", [], tmp_path / "failing", FAKE_XPK_STATUS="3", **gcs_emulator.env)
    assert status == 3 and "the job failed with status 3" in out, out[-3000:]


def test_two_queued_slices_are_waited_for_run_as_one_job_and_deleted(tmp_path, gcs_emulator):
    """2 x v5litepod-8 (node prefix, one host each) against the emulator's bucket: the request waits, then the
    workers of both slices join one job of 16 devices (on CPU, which has no slices, mesh.dcn_data=2 is ignored
    with a warning), their logs land in the bucket, and the request is deleted at the end."""
    from etils import epath

    cloud = tmp_path / "cloud"
    run_dir = f"gs://{gcs_emulator.bucket}/two-slices"
    overrides = [*TRAIN, f"run_dir={run_dir}", "slices=2", "name=ponder-two",
                 "overrides=[train.steps=2, train.eval_every=0, data.shards=2, data.batch_size=16]"]
    status, out = launch("queued", "v5litepod-8", overrides, cloud, FAKE_DEVICES_PER_HOST="8",
                         FAKE_QUEUED_STATES="WAITING_FOR_RESOURCES,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE",
                         **gcs_emulator.env)
    assert status == 0, out[-4000:]
    recorded = calls(cloud)
    verbs = [" ".join(call[3:5]) for call in recorded]
    assert verbs == ["queued-resources create", *["queued-resources describe"] * 4, *["tpu-vm scp"] * 2,
                     *["tpu-vm ssh"] * 2, "queued-resources describe", "queued-resources delete"], verbs
    assert "--node-count=2" in recorded[0] and "--node-prefix=ponder-two" in recorded[0]
    assert sorted(call[5] for call in recorded if call[3:5] == ["tpu-vm", "ssh"]) == ["ponder-two-0", "ponder-two-1"]
    assert "[slice 1 worker 0] ponder launch preflight: worker 1 ready (16 devices)" in out
    assert "mesh.dcn_data=2 ignored: all devices are on one slice" in out
    assert "[slice 0 worker 0] ponder train: accuracy=" in out
    assert "summary: 1 attempt(s), 0 preemption(s)" in out and "last checkpoint step 2" in out
    assert "ponder train:" in epath.Path(f"{run_dir}/logs/slice-0-worker-0.log").read_text()
    assert not (cloud / "queued-ponder-two.json").exists()  # deleted at the end

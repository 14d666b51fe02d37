"""Launch specs (configs/launch/*.yaml) and TPU shapes: what a pod job asks for, checked before anything runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.launch_spec import LAUNCH_DIR, load_launch_spec
from configs.load import ConfigError
from train.launch.accelerators import AcceleratorError, tpu_shape


@pytest.mark.parametrize("name, chips, hosts, per_host", [
    ("v5litepod-8", 8, 1, 8), ("v5litepod-16", 16, 4, 4), ("v4-8", 4, 1, 4), ("v4-32", 16, 4, 4),
    ("v5p-128", 64, 16, 4), ("v6e-4", 4, 1, 4), ("v6e-256", 256, 64, 4),
])
def test_accelerator_types_give_their_chips_hosts_and_devices(name, chips, hosts, per_host):
    shape = tpu_shape(name)
    assert (shape.chips, shape.hosts, shape.devices_per_host, shape.devices) == (chips, hosts, per_host, chips)


@pytest.mark.parametrize("name", ["v4-30", "v5e-8", "v5litepod-12", "tpu"])
def test_an_unknown_accelerator_type_lists_the_known_ones(name):
    with pytest.raises(AcceleratorError, match=f"unknown accelerator type '{name}' .*v5litepod-"):
        tpu_shape(name)


def test_every_packaged_spec_loads():
    specs = {path.stem: load_launch_spec(path.stem) for path in LAUNCH_DIR.glob("*.yaml")}
    assert {"v5litepod-8", "v4-32", "v5p-128-x2-spot", "xpk-v5p-256"} <= set(specs)
    assert specs["v5p-128-x2-spot"].slices == 2 and specs["v5p-128-x2-spot"].capacity == "spot"
    assert load_launch_spec("v4-32", ["max_restarts=7", "env.XLA_FLAGS=--xla_dump_to=/tmp"]).max_restarts == 7


@pytest.mark.parametrize("overrides, message", [
    (["accelerator=v4-33"], "command-line override `accelerator=v4-33`: accelerator: unknown accelerator type"),
    (["run_dir=/tmp/run"], "run_dir: a job of 4 hosts needs a run directory they all see: gs://"),
    (["run_dir=null"], "run_dir: a job of 4 hosts needs a run directory"),
    (["capacity=cheap"], "capacity: Input should be 'on-demand', 'spot', 'reserved' or 'best-effort'"),
    (["slices=0"], "slices: Input should be greater than 0"),
    (["code.kind=image"], "code.kind=image needs code.image"),
    (["zonee=us-east5-a"], "zonee: unknown key; did you mean 'zone'?"),
    (["name=Ponder_Run"], "name: String should match pattern"),
])
def test_a_bad_spec_stops_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match="invalid launch spec .*v4-32.yaml") as err:
        load_launch_spec("v4-32", overrides)
    assert message in str(err.value)


def test_one_host_may_keep_its_run_directory_on_its_own_disk(tmp_path):
    spec = load_launch_spec("v5litepod-8", [f"run_dir={tmp_path}"])
    assert spec.run_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="launch spec not found: nothing.yaml"):
        load_launch_spec("nothing.yaml")


ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "launch"
GOLDEN_CASES = [("tpu-vm", "v5litepod-8"), ("tpu-vm", "v4-32"), ("queued", "v5p-128-x2-spot"), ("xpk", "xpk-v5p-256")]


@pytest.mark.parametrize("backend, spec", GOLDEN_CASES)
def test_dry_run_prints_exactly_the_golden_file(backend, spec):
    """`ponder launch BACKEND SPEC --dry-run` against tests/golden/launch/BACKEND-SPEC.txt: a changed flag or
    quote fails. After an intended change: UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_launch_spec.py -k golden"""
    out = subprocess.run([sys.executable, "-m", "tools.cli", "launch", backend, spec, "--dry-run",
                          "--sha", "0123456789ab"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    golden = GOLDEN / f"{backend}-{spec}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(out.stdout)
    assert out.stdout == golden.read_text()


@pytest.mark.parametrize("backend, overrides, message", [
    ("tpu-vm", ["slices=2"], "slices: 2 slices need queued resources"),
    ("tpu-vm", ["capacity=best-effort"], "capacity: best-effort needs queued resources"),
    ("queued", ["code.kind=image", "code.image=gcr.io/p/i"], "code.kind: queued copies a tarball or wheel"),
    ("xpk", ["command=[generate]"], "command: a pod job runs `ponder train` or `ponder rl`"),
    ("tpu-vm", ["accelerator=v4-31"], "accelerator: unknown accelerator type 'v4-31'"),
])
def test_a_spec_a_backend_cannot_run_stops_naming_the_key(backend, overrides, message):
    spec = "xpk-v5p-256" if backend == "xpk" else "v4-32"
    out = subprocess.run([sys.executable, "-m", "tools.cli", "launch", backend, spec, *overrides, "--dry-run",
                          "--sha", "0123456789ab"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-3000:]
    assert out.stdout == ""  # nothing printed as if it would run


def test_preflight_kills_what_holds_the_tpu_and_removes_the_lock_file(tmp_path):
    """A fake /proc in which a real process (`sleep`) holds /dev/accel0 open, and a libtpu lock file."""
    from train.launch.preflight import free_tpu

    holder = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        for pid, target in ((holder.pid, "/dev/accel0"), (bystander.pid, "/dev/null")):
            (tmp_path / "proc" / str(pid) / "fd").mkdir(parents=True)
            (tmp_path / "proc" / str(pid) / "fd" / "3").symlink_to(target)
        (tmp_path / "proc" / "self").mkdir()
        lockfile = tmp_path / "libtpu_lockfile"
        lockfile.write_text("")
        done = free_tpu(tmp_path / "proc", lockfile)
        assert done == [f"killed process {holder.pid}, which held /dev/accel0", f"removed {lockfile}"]
        assert holder.wait(timeout=10) == -9 and bystander.poll() is None and not lockfile.exists()
    finally:
        for process in (holder, bystander):
            process.kill()
            process.wait()


def test_a_wheel_is_built_once_copied_whole_and_installed_with_its_packaged_configs():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "launch", "tpu-vm", "v5litepod-8", "code.kind=wheel",
                          "--dry-run", "--sha", "0123456789ab"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "$ python3 -m pip wheel --no-deps --wheel-dir build/launch/ponder-0123456789ab .\n" in out.stdout
    assert "scp --recurse build/launch/ponder-0123456789ab build/launch/ponder-v5e-8-worker.sh" in out.stdout
    assert 'pip install --quiet --user --force-reinstall "$(ls ponder-0123456789ab/*.whl)[tpu]"' in out.stdout
    assert "--config experiments/tiny.yaml" in out.stdout  # found among the installed package's configs

"""Launch specs (configs/launch/*.yaml) and TPU shapes: what a pod job asks for, checked before anything runs."""

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

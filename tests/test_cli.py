"""The real `ponder` CLI, run in subprocesses (each one imports jax afresh, so `--devices` applies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def ponder(*args: str) -> subprocess.CompletedProcess:
    """Runs `python -m tools.cli ARGS` from the repo root on a plain one-device CPU setup."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices: not ours
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def llama_info() -> dict:
    result = ponder("--devices", "8", "info", "--config", "configs/models/llama3-8b.yaml", "mesh.fsdp=8", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_help_lists_commands():
    result = ponder("--help")
    assert result.returncode == 0
    assert "info" in result.stdout and "--devices" in result.stdout


def test_no_command_prints_help_and_fails():
    result = ponder()
    assert result.returncode == 2
    assert "usage: ponder" in result.stderr


def test_llama3_8b_on_8_devices_mesh_and_sizes(llama_info):
    assert llama_info["devices"]["count"] == 8
    assert llama_info["mesh"]["shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
    model = llama_info["model"]
    assert abs(model["param_count"] - 8.03e9) / 8.03e9 < 0.01
    total = sum(p["bytes"] for p in model["params"])
    per_device = llama_info["memory_per_device"]["bytes"]["params"]
    assert total == 4 * model["param_count"]  # float32 params
    assert abs(per_device - total / 8) / (total / 8) < 0.05


def test_llama3_8b_specs_follow_rules(llama_info):
    params = {p["name"]: p for p in llama_info["model"]["params"]}
    gate = params["blocks.mlp.w_gate"]
    assert gate["axes"] == ["layers", "embed", "mlp"]
    assert gate["spec"] == [None, "fsdp", "tensor"]  # embed -> fsdp, mlp -> tensor
    embed = params["embed"]
    assert "fsdp" in embed["spec"]
    assert embed["bytes_per_device"] * 8 == embed["bytes"]


def test_info_text_for_tiny_on_one_device():
    result = ponder("info", "--config", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("mesh:") and "(1, 1, 1)" in line for line in lines)
    assert any(line.startswith("kernels:") and "native CPU kernels" in line for line in lines), result.stdout
    assert any(line.startswith("attention:") and "xla" in line for line in lines), result.stdout
    assert any(line.startswith("decode:") and "native CPU kernel" in line for line in lines), result.stdout
    assert any(line.split()[:2] == ["name", "shape"] and "spec" in line for line in lines)
    assert "estimate" in result.stdout
    assert max(len(line) for line in lines) <= 100


def test_info_names_the_kernels_a_config_asks_for_and_its_optimizer_memory():
    result = ponder("info", "--config", "configs/models/1b.yaml", "model.attention=cudnn",
                    "model.decode_attention=xla", "model.param_dtype=bfloat16", "optimizer.master_weights=true",
                    "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    attention, decode = info["kernels"]["attention"], info["kernels"]["decode_attention"]
    assert attention["kernel"] == "cudnn" and "needs a CUDA GPU" in attention["detail"], attention
    assert decode["kernel"] == "xla", decode
    memory = info["memory_per_device"]["bytes"]
    # bfloat16 params: 2 bytes each; a float32 master and two float32 moments: 12; float32 grads: 4.
    assert memory["adamw_state"] == 6 * memory["params"] and memory["grads"] == 2 * memory["params"]


def test_the_decode_roofline_runs_on_cpu():
    """`bench search --roofline` at toy sizes: the code path a GPU run takes, with the CPU kernel and bandwidth."""
    roofline = ponder("bench", "search", "--roofline", "--config", "tiny", "--roofline-batches", "2,4",
                      "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1")
    assert roofline.returncode == 0, roofline.stderr
    assert "decode attention: native CPU kernel" in roofline.stdout, roofline.stdout
    assert "measured read bandwidth" in roofline.stdout, roofline.stdout
    rows = [line.split() for line in roofline.stdout.splitlines() if line.split()[:1] in (["2"], ["4"])]
    assert [r[0] for r in rows] == ["2", "4"] and all(r[-1].endswith("%") for r in rows), roofline.stdout


def test_unknown_key_is_a_clean_error():
    result = ponder("info", "--config", "tiny", "model.num_layayers=3")
    assert result.returncode == 2
    assert "model.num_layayers" in result.stderr and "num_layers" in result.stderr
    assert "Traceback" not in result.stderr


def test_mesh_that_cannot_fill_the_devices_is_a_clean_error():
    result = ponder("--devices", "8", "info", "mesh.data=3", "mesh.fsdp=-1")
    assert result.returncode == 2
    assert "does not fit 8 devices" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_explicit_mesh_larger_than_this_machine_is_described_as_a_plan():
    result = ponder("info", "--config", "configs/models/llama3-8b.yaml", "mesh.fsdp=8", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["devices"]["count"] == 1
    assert info["mesh"] == {"shape": {"data": 1, "fsdp": 8, "tensor": 1}, "devices": 8, "planned": True}
    total = sum(p["bytes"] for p in info["model"]["params"])
    assert abs(info["memory_per_device"]["bytes"]["params"] * 8 / total - 1) < 0.05


def test_data_export_writes_a_problem_file_that_checks_and_verifies(tmp_path):
    out = tmp_path / "problems.jsonl"
    result = ponder("data", "export", "--task", "countdown", "--difficulty", "2", "--split", "test",
                    "--num", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 20
    record = json.loads(lines[0])
    assert record["task"] == "countdown" and record["split"] == "test" and record["prompt"].startswith("Numbers:")
    assert ponder("data", "check", str(out)).returncode == 0

    out.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    bad = ponder("data", "check", str(out))
    assert bad.returncode == 2 and f"{out}:4:" in bad.stderr and "Traceback" not in bad.stderr
    skipped = ponder("data", "check", str(out), "--skip-bad-lines")
    assert skipped.returncode == 1 and "19 problems" not in skipped.stdout and "20 problems" in skipped.stdout


def test_vocab_train_writes_a_sentencepiece_model(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"the sum of {i} and {i + 3} is {2 * i + 3}" for i in range(400)))
    corpus, out = str(tmp_path / "*.txt"), str(tmp_path / "v")
    too_small = ponder("vocab", "train", "--input", corpus, "--size", "100", "--out", out)
    assert too_small.returncode == 2 and "Vocabulary size is smaller" in too_small.stderr
    assert not (tmp_path / "v" / "spm.model").exists()  # nothing half-written
    result = ponder("vocab", "train", "--input", corpus, "--size", "300", "--out", out)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "v" / "spm.model").stat().st_size > 0
    assert "model.vocab_size >= 384" in result.stdout


def test_cpu_backend_flags_turn_ynnpack_matmuls_off_unless_the_user_chose():
    from configs.xla_flags import YNN_FLAG, cpu_backend_flags

    assert cpu_backend_flags("", "0.10.2") == f"{YNN_FLAG}="
    devices = "--xla_force_host_platform_device_count=8"
    assert cpu_backend_flags(devices, "0.10.2") == f"{devices} {YNN_FLAG}="
    chosen = f"{YNN_FLAG}=dot"
    assert cpu_backend_flags(chosen, "0.10.2") == chosen  # the user's choice stands
    assert cpu_backend_flags(devices, "0.11.0") == devices  # a jaxlib not known to have the flag: untouched
    # the test session itself (JAX_PLATFORMS=cpu) runs with what `ponder` runs with on CPU
    from importlib.metadata import version

    assert (f"{YNN_FLAG}=" in os.environ["XLA_FLAGS"]) == version("jaxlib").startswith("0.10.")


@pytest.mark.parametrize("environ, devices, accelerator", [
    ({}, [], False),  # a plain CPU machine
    ({}, ["nvidiactl", "nvidia-uvm", "vfio/vfio"], False),  # drivers loaded, no device behind them
    ({"JAX_PLATFORMS": "cpu"}, ["nvidia0", "accel0"], False),  # told to run on CPU: jax will
    ({"JAX_PLATFORMS": "cuda"}, [], True),
    ({"JAX_PLATFORMS": "cpu,tpu"}, [], True),
    ({}, ["nvidiactl", "nvidia0"], True),
    ({"CUDA_VISIBLE_DEVICES": ""}, ["nvidia0"], False),  # every GPU hidden
    ({"CUDA_VISIBLE_DEVICES": "-1"}, ["nvidia0"], False),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, [], True),
    ({}, ["accel0"], True),  # TPU v4
    ({}, ["vfio/vfio", "vfio/0"], True),  # TPU v5e / v6e
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, [], True),
    ({"TPU_WORKER_ID": "0"}, [], True),
    ({}, ["kfd"], True),  # AMD GPU
])
def test_an_accelerator_host_is_recognised_without_jax(tmp_path, environ, devices, accelerator):
    from configs.xla_flags import accelerator_host

    for name in devices:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert accelerator_host(environ, tmp_path) is accelerator


@pytest.mark.parametrize("environ, devices, accelerator", [
    ({}, [], False), ({}, ["nvidia0"], True), ({"JAX_PLATFORMS": "cpu"}, ["nvidia0"], False),
    ({"JAX_PLATFORMS": "tpu"}, [], True),
])
def test_the_cpu_only_flag_is_not_added_on_an_accelerator_host(tmp_path, environ, devices, accelerator):
    """`tune_cpu_backend` as `ponder` runs it, first thing in a fresh process (and without importing jax)."""
    from importlib.metadata import version

    from configs.xla_flags import YNN_FLAG

    for name in devices:
        (tmp_path / name).touch()
    ours = ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES")
    env = {k: v for k, v in os.environ.items() if k not in ours} | environ | {"XLA_FLAGS": "--xla_dump_to=x"}
    code = ("import os, sys; from configs.xla_flags import tune_cpu_backend; tune_cpu_backend(dev=sys.argv[1]); "
            "print(os.environ['XLA_FLAGS']); print('jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    flags, imported_jax = done.stdout.splitlines()
    assert imported_jax == "False"
    added = not accelerator and version("jaxlib").startswith("0.10.")
    assert flags == (f"--xla_dump_to=x {YNN_FLAG}=" if added else "--xla_dump_to=x")

"""`ponder export search` and `ponder search --compiled`: an exported search program against the live search.

One artifact (lowered for CPU, CUDA and TPU, run on this CPU) is exported from the trained
tiny policy on the test session's 8 devices; the live search runs in this process, the
compiled one in a fresh process that counts every trace of the model's code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import jax
import pytest
from test_cli import ROOT

from configs.load import load_config, save_config
from model.sharding import make_mesh
from search.export import ArtifactError, check_runtime, read_artifact
from tasks import get_task
from tasks.files import write_problems
from tools import cli
from train.checkpoint import Checkpoints
from train.state import init_state, state_layout

# best_of_n of 2 chains, 8 problems a batch (one per device); prompts of widths 32 and 64 (max_len 64)
SIZES = ["search.strategy=best_of_n", "search.n=2", "search.max_steps=4", "search.max_step_tokens=12",
         "search.max_len=64", "search.batch_size=8", "search.prompt_buckets=[32]"]
PLATFORMS = "cpu,cuda,tpu"

# Runs `ponder` in a fresh process after wrapping the model's entry points with a counter of their traces.
COUNTING = """
import sys
from model import decode, transformer
traced = []
def counted(name, fn):
    def wrapper(*args, **kwargs):
        traced.append(name)
        return fn(*args, **kwargs)
    return wrapper
for name in ("__call__", "decode", "prefill", "decode_hidden"):
    setattr(transformer.Transformer, name, counted(name, getattr(transformer.Transformer, name)))
decode.decode_step = counted("decode_step", decode.decode_step)
from tools import cli
try:
    cli.main(sys.argv[1:])
finally:
    print(f"model traces: {len(traced)} {sorted(set(traced))}", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    arithmetic = get_task("arithmetic")
    write_problems(path, [arithmetic.generate(0, i, 1 + i % 2, "test") for i in range(10)])  # batches of 8 and 2
    return path


@pytest.fixture(scope="module")
def artifact(trained_tiny_policy, tmp_path_factory):
    """The exported program's path (`ponder export search` in this process, 8 devices)."""
    _, run_dir = trained_tiny_policy
    path = tmp_path_factory.mktemp("export") / "best_of_n.ponder"
    assert _main(["export", "search", "--checkpoint", str(run_dir), "--out", str(path), "--platforms", PLATFORMS,
                  *SIZES]) == 0
    return path


def test_the_compiled_search_in_a_fresh_process_equals_the_live_search_without_tracing_the_model(
        trained_tiny_policy, artifact, problems, tmp_path, capsys):
    _, run_dir = trained_tiny_policy
    live_out, compiled_out = tmp_path / "live.jsonl", tmp_path / "compiled.jsonl"
    assert _main(["search", "--no-progress", "--checkpoint", str(run_dir), "--problems", str(problems),
                  "--out", str(live_out), *SIZES]) == 0
    assert "start-up:" in capsys.readouterr().out

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_COMPILATION_CACHE": "false"}  # its program is compiled here, from the artifact, not found
    result = subprocess.run([sys.executable, "-c", COUNTING, "search", "--no-progress", "--compiled", str(artifact),
                             "--params", str(run_dir), "--problems", str(problems), "--out", str(compiled_out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model traces: 0 []" in result.stderr, result.stderr[-3000:]
    assert "compiles: 1 (" in result.stdout and "start-up:" in result.stdout, result.stdout

    live, compiled = ([json.loads(line) for line in path.read_text().splitlines()] for path in (live_out, compiled_out))
    assert len(live) == len(compiled) == 10
    for expected, got in zip(live, compiled, strict=True):
        expected.pop("wall_s"), got.pop("wall_s")
        assert got == expected
    assert all(isinstance(record["correct"], bool) and record["chain"] for record in live)


def test_the_artifact_holds_a_program_per_width_lowered_for_cpu_cuda_and_tpu(artifact):
    loaded = read_artifact(artifact)
    assert loaded.widths == [32, 64] and loaded.batch_size == 8
    for exported in loaded.exported.values():
        assert exported.platforms == ("cpu", "cuda", "tpu") and exported.nr_devices == 8
    metadata = loaded.metadata
    assert metadata["jax"] == jax.__version__ and metadata["vocab"] == "byte" and metadata["devices"] == 8
    assert metadata["config"]["search"]["n"] == 2 and metadata["spec"]["strategy"] == "best_of_n"
    assert {p["name"] for p in metadata["params"]["params"]} >= {"embed", "lm_head", "blocks.mlp.w_down"}
    assert loaded.metadata["cpu_kernels"]["targets"]  # the CPU branch keeps ponder's kernels (registered at load)
    with pytest.raises(ArtifactError, match=r"no program for prompts of shape \[8, 48\].*\[32, 64\]"):
        loaded.program(loaded.spec, (8, 48))
    with pytest.raises(ArtifactError, match=r"shape \[4, 32\]"):
        loaded.program(loaded.spec, (4, 32))


@pytest.mark.parametrize("change, message", [
    ({"jax": "0.4.1"}, f"exported with jax 0.4.1 .*this is jax {jax.__version__}"),
    ({"vocab": "spm0123456789"}, "built for vocabulary spm0123456789; the problems would be encoded with byte"),
])
def test_another_jax_or_vocabulary_is_refused(trained_tiny_policy, artifact, problems, tmp_path, capsys, change,
                                              message):
    changed = tmp_path / "changed.ponder"
    with zipfile.ZipFile(artifact) as source, zipfile.ZipFile(changed, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "metadata.json":
                data = json.dumps(json.loads(data) | change).encode()
            target.writestr(item, data)
    _, run_dir = trained_tiny_policy
    assert _main(["search", "--compiled", str(changed), "--params", str(run_dir), "--problems", str(problems),
                  "--out", str(tmp_path / "out.jsonl")]) == 2
    stderr = capsys.readouterr().err
    assert "ponder search: error:" in stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_params_of_another_model_or_another_device_count_are_refused(trained_tiny_policy, artifact, problems,
                                                                       tmp_path, capsys):
    _, run_dir = trained_tiny_policy
    other = tmp_path / "other"
    cfg = load_config(str(run_dir / "config.yaml"), ["model.mlp_dim=256", f"train.run_dir={other}"])
    mesh = make_mesh(cfg.mesh)
    save_config(cfg, other)
    checkpoints = Checkpoints(other / "checkpoints", save_every=1, keep=1)
    checkpoints.save(1, init_state(cfg, state_layout(cfg, mesh), mesh), config=cfg, force=True)
    checkpoints.close()
    assert _main(["search", "--compiled", str(artifact), "--params", str(other), "--problems", str(problems),
                  "--out", str(tmp_path / "out.jsonl")]) == 2
    assert "blocks.mlp.w_down is float32[2, 256, 128], the program takes float32[2, 384, 128]" in \
        capsys.readouterr().err

    loaded = read_artifact(artifact)
    with pytest.raises(ArtifactError, match="built for 8 devices in the mesh data=8 fsdp=1 tensor=1; here the mesh "
                                            "is data=4 fsdp=1 tensor=1 of 4 devices"):
        check_runtime(loaded, "byte", make_mesh(cfg.mesh, jax.devices()[:4]))


def test_what_an_export_cannot_hold_is_refused(trained_tiny_policy, artifact, problems, tmp_path, capsys):
    _, run_dir = trained_tiny_policy
    out = tmp_path / "refused.ponder"
    cases = [
        (["export", "search", "--checkpoint", str(run_dir), "--out", str(out), *SIZES, "search.scorer=oracle"],
         "the ORACLE scorer cannot be exported: it scores steps in a Python host callback"),
        (["export", "search", "--checkpoint", str(run_dir), "--out", str(out), *SIZES, "search.budget=64"],
         "search.budget=64 sizes the strategy from a pilot search at run time"),
        (["search", "--compiled", str(artifact), "--params", str(run_dir), "--checkpoint", str(run_dir),
          "--problems", str(problems), "--out", str(out), "search.n=4"],
         "--checkpoint, key=value overrides cannot go with --compiled"),
    ]
    for argv, message in cases:
        assert _main(argv) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def _main(argv: list[str]) -> int:
    """`ponder ARGV` in this process; its exit status."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code

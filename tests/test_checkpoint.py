"""Orbax checkpoints: restore onto other meshes, exact data resume, keep-N, corruption fallback, params-only load.

Failures: damage falls back to an older step, a transient read error stops without renaming
anything, a failed save (in the background too) names its step, a crash's tmp dirs go.
Past 400 lines because these cases share one module-scoped run of real saved steps.
"""

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs.load import load_config
from configs.schema import MeshConfig
from model.sharding import make_mesh, state_shardings
from model.transformer import Transformer, create_model
from train import checkpoint_read
from train.checkpoint import CheckpointError, Checkpoints, load_params
from train.checkpoint_read import transient
from train.data import DataStateError, Pipeline
from train.data.shards import HostShards
from train.state import opt_state_shardings, with_shardings

# A restore that fails part-way (the corruption tests) leaves orbax's pending array reads to be
# garbage-collected with their event loop closed; Python reports each as "Exception ignored".
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def collect_failed_reads():
    """Reports those here, under the filter above, rather than in whichever test runs next."""
    yield
    gc.collect()


OPTIMIZER = optax.adamw(1e-3)
STEPS = (1, 2, 3)  # saved by the `run` fixture, one batch read before each


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", ["data.seq_len=128", "data.max_prompt_len=48", "data.batch_size=4"])


def _mesh(data: int, fsdp: int, tensor: int):
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices=jax.devices()[: data * fsdp * tensor])


def _abstract_state(cfg, mesh):
    """The train state's ShapeDtypeStructs, sharded for `mesh` (Adam's mu/nu like their params)."""
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rules=cfg.rules(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract_model, nnx.Param)
    param_shardings = nnx.to_pure_dict(state_shardings(params, mesh, cfg.rules()))
    params = nnx.to_pure_dict(params)
    opt_state = jax.eval_shape(OPTIMIZER.init, params)
    shardings = {
        "params": param_shardings,
        "opt_state": opt_state_shardings(opt_state, param_shardings, mesh),
        "step": NamedSharding(mesh, PartitionSpec()),
    }
    abstract = {"params": params, "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return with_shardings(abstract, shardings)


@pytest.fixture(scope="module")
def run(cfg, tmp_path_factory):
    """Steps 1-3 saved on an 8-device FSDP mesh; step k saved after k batches; `batches[k]` is the next one."""
    mesh = _mesh(1, 8, 1)
    params = nnx.to_pure_dict(nnx.state(create_model(cfg.model, cfg.rules(), seed=0, mesh=mesh), nnx.Param))

    @jax.jit
    def one_update(params):  # non-zero Adam moments, count = 1
        opt_state = OPTIMIZER.init(params)
        grads = jax.tree.map(lambda p: 0.5 * p + 0.01, params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = one_update(params)
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    checkpoints = Checkpoints(directory, save_every=1, keep=3)
    pipeline = _one_shard(cfg)
    batches, states = [next(pipeline)], {}
    for step in STEPS:
        states[step] = {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}
        assert checkpoints.save(step, states[step], data=pipeline, config=cfg)
        batches.append(next(pipeline))
    checkpoints.close()
    return {"dir": directory, "states": states, "batches": batches, "mesh": mesh}


def _assert_restored(restored, saved, abstract):
    for (path, got), want, spec in zip(
        jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved), jax.tree.leaves(abstract), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
        assert got.sharding == spec.sharding, jax.tree_util.keystr(path)


def _copy(run, tmp_path) -> Path:
    directory = tmp_path / "checkpoints"
    shutil.copytree(run["dir"], directory)
    return directory


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 1)], ids=["2x2x2-mesh", "2-devices"])
def test_restore_onto_another_mesh(run, cfg, shape):
    mesh = _mesh(*shape)
    abstract = _abstract_state(cfg, mesh)
    checkpoints = Checkpoints(run["dir"], save_every=1, keep=3)
    assert checkpoints.all_steps() == list(STEPS) and checkpoints.latest_step() == 3
    step, state = checkpoints.restore(abstract)
    assert step == 3
    _assert_restored(state, run["states"][3], abstract)
    mu = state["opt_state"][0].mu["embed"]  # Adam moments are split like their parameter
    assert mu.sharding.spec == state["params"]["embed"].sharding.spec != PartitionSpec()
    assert checkpoints.restore_config() == cfg.model_dump(mode="json")
    checkpoints.close()


def test_data_position_resumes_exactly(run, cfg):
    checkpoints = Checkpoints(run["dir"], save_every=1, keep=3)
    pipeline = _one_shard(cfg)
    abstract = _abstract_state(cfg, run["mesh"])
    for step in (3, 1):
        assert checkpoints.restore(abstract, data=pipeline, step=step)[0] == step
        assert pipeline.batches_read == step
        batch, expected = next(pipeline), run["batches"][step]
        for name in expected:
            np.testing.assert_array_equal(batch[name], expected[name], err_msg=name)
    other_seed = _one_shard(cfg, seed=1)
    with pytest.raises(DataStateError, match="different data settings"):  # not damage: no fallback
        checkpoints.restore(abstract, data=other_seed)
    checkpoints.close()


def _one_shard(cfg, seed=0) -> HostShards:
    """The data position a one-process run checkpoints: its one data shard."""
    return HostShards(lambda k, n: Pipeline(cfg.data, seed=seed, shard_index=k, num_shards=n), 1,
                      process_index=0, process_count=1)


def _truncate_largest_array_file(step_dir: Path) -> None:
    largest = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


CORRUPTIONS = {
    "truncated-array-file": (_truncate_largest_array_file, "reading array"),
    "garbled-tree-metadata": (lambda d: (d / "state" / "_METADATA").write_text("{not json"), "JSONDecodeError"),
    "missing-checkpoint-metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "_CHECKPOINT_METADATA"),
    "missing-array-manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(), "NOT_FOUND"),
    "missing-data-position": (lambda d: shutil.rmtree(d / "data" / "shard-0-of-1"), "shard-0-of-1"),
    "metadata-replaced-by-a-directory": (lambda d: ((d / "_CHECKPOINT_METADATA").unlink(),
                                                    (d / "_CHECKPOINT_METADATA").mkdir()), "IsADirectoryError"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_latest_checkpoint_falls_back(run, cfg, tmp_path, corruption, collect_failed_reads):
    directory = _copy(run, tmp_path)
    damage, problem = CORRUPTIONS[corruption]
    damage(directory / "3")
    files_before = sorted(str(p) for p in directory.rglob("*"))
    checkpoints = Checkpoints(directory, save_every=1, keep=3)
    pipeline = _one_shard(cfg) if corruption == "missing-data-position" else None
    with pytest.warns(UserWarning) as caught:
        step, state = checkpoints.restore(_abstract_state(cfg, run["mesh"]), data=pipeline)
    assert step == 2 and int(state["step"]) == 2
    message = next(str(w.message) for w in caught if "unreadable" in str(w.message))
    assert str(directory / "3") in message and problem in message
    assert sorted(str(p) for p in directory.rglob("*")) == files_before  # nothing deleted
    if pipeline is not None:  # the data position comes from the same step as the state
        np.testing.assert_array_equal(next(pipeline)["tokens"], run["batches"][2]["tokens"])
    checkpoints.close()


def test_all_corrupted_raises_and_resumed_run_sets_damage_aside(run, cfg, tmp_path, collect_failed_reads):
    directory = _copy(run, tmp_path)
    abstract = _abstract_state(cfg, run["mesh"])
    for step in STEPS:
        (directory / str(step) / "state" / "_METADATA").write_text("{not json")
    checkpoints = Checkpoints(directory, save_every=1, keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as err:
            checkpoints.restore(abstract)
    assert all(f"{directory / str(step)}: JSONDecodeError" in str(err.value) for step in STEPS)
    # A run resumed from step 2 (step 3 unreadable) must be able to write step 3 again, keeping the old one.
    shutil.copytree(run["dir"] / "2", directory / "2", dirs_exist_ok=True)
    with pytest.warns(UserWarning, match="unreadable"):
        assert checkpoints.restore(abstract)[0] == 2
    with pytest.warns(UserWarning, match=r"moved unreadable checkpoint .*3 to .*3\.corrupt \(JSONDecodeError"):
        assert checkpoints.save(3, run["states"][3])
    checkpoints.wait()
    assert (directory / "3.corrupt" / "state" / "_METADATA").read_text() == "{not json"
    assert checkpoints.restore(abstract)[0] == 3
    checkpoints.close()


KILLED_MID_SAVE = """
import os, sys
import jax.numpy as jnp
from train.checkpoint import Checkpoints

class DiesWhileSaving:  # stands in for the pipeline: its save is where the process gets killed
    def save(self, directory):
        (directory / "partial").write_text("half")
        os._exit(3)

checkpoints = Checkpoints(sys.argv[1], save_every=1, keep=3)
state = {"w": jnp.arange(1024.0)}
checkpoints.save(1, state)
checkpoints.wait()
checkpoints.save(2, state, data=DiesWhileSaving())
"""


def test_run_killed_mid_save_leaves_earlier_steps_and_no_partial_latest(tmp_path):
    directory = tmp_path / "checkpoints"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(directory)], env=env, capture_output=True)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    assert [p.name for p in directory.glob("2.orbax-checkpoint-tmp*")]  # the partial save, never renamed
    with pytest.warns(UserWarning, match="never finished"):
        checkpoints = Checkpoints(directory, save_every=1, keep=3)
    assert checkpoints.all_steps() == [1] and not list(directory.glob("2.orbax-checkpoint-tmp*"))  # space freed
    replicated = NamedSharding(_mesh(1, 1, 1), PartitionSpec())
    abstract = {"w": jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=replicated)}
    step, state = checkpoints.restore(abstract)
    assert step == 1 and np.array_equal(state["w"], np.arange(1024.0))
    assert checkpoints.save(2, state)  # the resumed run writes step 2 for real
    checkpoints.close()
    assert Checkpoints(directory, save_every=1, keep=3).all_steps() == [1, 2]


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_and_save_every(tmp_path, async_save):
    mesh = _mesh(1, 8, 1)
    state = {"w": jax.device_put(jnp.arange(16.0), NamedSharding(mesh, PartitionSpec("fsdp")))}
    checkpoints = Checkpoints(tmp_path / "every2", save_every=2, keep=2, async_save=async_save)
    abstract = {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=state["w"].sharding)}
    with pytest.raises(CheckpointError, match="no step"):
        checkpoints.restore(abstract)
    assert [checkpoints.save(step, state) for step in (1, 2, 3, 4)] == [False, True, False, True]
    assert checkpoints.save(5, state, force=True)  # final step / preemption
    assert checkpoints.save(6, state)
    with pytest.warns(UserWarning, match="already holds step 6"):  # never mixes an older history in
        assert not checkpoints.save(4, state, force=True)
    checkpoints.wait()
    assert checkpoints.all_steps() == [5, 6] and sorted(os.listdir(tmp_path / "every2")) == ["5", "6"]
    checkpoints.close()
    checkpoints = Checkpoints(tmp_path / "every1", save_every=1, keep=2, async_save=async_save)
    assert all(checkpoints.save(step, state) for step in (1, 2, 3, 4))
    checkpoints.wait()
    assert checkpoints.all_steps() == [3, 4]
    step, restored = checkpoints.restore(abstract)
    assert step == 4 and np.array_equal(restored["w"], np.arange(16.0))
    checkpoints.close()


def test_load_params_reads_only_params_onto_another_mesh(run, cfg):
    mesh = _mesh(1, 2, 1)
    abstract = _abstract_state(cfg, mesh)["params"]
    for path in (run["dir"].parent, run["dir"], run["dir"] / "2"):  # run dir, its checkpoints, one step
        params = load_params(path, abstract)
        _assert_restored(params, run["states"][3]["params"], abstract)
    with pytest.raises(CheckpointError, match="neither a checkpoint step"):
        load_params(run["dir"] / "3" / "config", abstract)


def test_saved_config_is_plain_json(run, cfg):
    saved = json.loads((run["dir"] / "3" / "config" / "metadata").read_text())
    assert saved == cfg.model_dump(mode="json")


def test_opening_removes_the_tmp_dirs_of_unfinished_saves_and_nothing_else(run, cfg, tmp_path):
    directory = _copy(run, tmp_path)
    for leftover in ("4.orbax-checkpoint-tmp", "5.orbax-checkpoint-tmp-1733000000"):  # orbax's names for a step
        (directory / leftover / "state" / "d").mkdir(parents=True)
        (directory / leftover / "state" / "d" / "shard").write_bytes(b"\0" * 4096)
    shutil.copytree(directory / "1", directory / "1.corrupt")  # set aside earlier: evidence, kept
    (directory / "notes.orbax-checkpoint-tmp").mkdir()  # not a step's name: not ours to remove
    (directory / "6.orbax-checkpoint-tmp").symlink_to(tmp_path)  # never followed
    with pytest.warns(UserWarning, match="never finished") as caught:
        checkpoints = Checkpoints(directory, save_every=1, keep=3)
    assert sorted(p.name for p in directory.iterdir()) == [
        "1", "1.corrupt", "2", "3", "6.orbax-checkpoint-tmp", "notes.orbax-checkpoint-tmp"]
    assert sum("never finished" in str(w.message) for w in caught) == 2
    assert checkpoints.all_steps() == list(STEPS)
    step, state = checkpoints.restore(_abstract_state(cfg, run["mesh"]))
    assert step == 3 and int(state["step"]) == 3
    checkpoints.close()


TRANSIENT_ERRORS = {
    "EIO": (lambda path: OSError(errno.EIO, os.strerror(errno.EIO), str(path)), "Input/output error"),
    "permission": (lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path)),
                   "Permission denied"),
    "out-of-memory": (lambda path: MemoryError(), "out of memory"),
}


@pytest.mark.parametrize("kind", list(TRANSIENT_ERRORS))
def test_transient_read_error_stops_without_renaming_or_rolling_back(run, cfg, tmp_path, monkeypatch, kind):
    """An error a retry may clear, raised where the newest step's metadata is read, is retried and then raised:
    the run does not fall back to step 2, and step 3 is neither skipped nor set aside."""
    directory = _copy(run, tmp_path)
    make_error, reason = TRANSIENT_ERRORS[kind]
    failing, attempts = str(directory / "3" / "_CHECKPOINT_METADATA"), []
    read_text = epath.Path.read_text  # run directories are etils.epath paths (local or gs://)

    def flaky_read_text(path, *args, **kwargs):
        if os.fspath(path) == failing:
            attempts.append(path)
            raise make_error(Path(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_read, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(epath.Path, "read_text", flaky_read_text)
    checkpoints = Checkpoints(directory, save_every=1, keep=3)
    abstract = _abstract_state(cfg, run["mesh"])
    with pytest.warns(UserWarning, match="retrying") as caught, pytest.raises(CheckpointError) as err:
        checkpoints.restore(abstract)
    message = str(err.value)
    assert str(directory / "3") in message and reason in message and "nothing was renamed" in message
    # tried, then retried after each of the two delays (orbax may read the file once more itself)
    assert sum("retrying" in str(w.message) for w in caught) == 2 and len(attempts) >= 3
    monkeypatch.undo()  # the fault clears: the same step reads back, nothing was set aside
    assert checkpoints.restore(abstract)[0] == 3
    assert checkpoints.save(4, run["states"][3])
    checkpoints.wait()
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3", "4"]
    checkpoints.close()


def test_transient_or_damage_is_told_by_the_error_and_its_causes():
    assert transient(PermissionError(errno.EACCES, "Permission denied")) == os.strerror(errno.EACCES)
    assert transient(ValueError("DATA_LOSS: Error reading \"x\": [os_error_code='5']")) == os.strerror(errno.EIO)
    assert transient(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")) is not None
    try:
        try:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        except OSError as cause:
            raise ValueError("restore failed") from cause
    except ValueError as chained:
        assert transient(chained) == os.strerror(errno.ESTALE)
    for damage in (json.JSONDecodeError("Expecting value", "{not json", 1), FileNotFoundError(errno.ENOENT, "gone"),
                   IsADirectoryError(errno.EISDIR, "a dir"), ValueError("NOT_FOUND: manifest.ocdbt"),
                   ValueError("OUT_OF_RANGE: Failed writing: File too large [os_error_code='27']")):
        assert transient(damage) is None, damage


def test_a_save_that_fails_at_once_names_its_step(tmp_path):
    class FullDisk:  # stands in for the pipeline: its position cannot be written
        def save(self, directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    checkpoints = Checkpoints(tmp_path / "checkpoints", save_every=1, keep=3)
    state = {"w": jnp.arange(16.0)}
    assert checkpoints.save(1, state)
    with pytest.raises(CheckpointError, match=r"saving step 2 .* failed: OSError: .*No space left") as err:
        checkpoints.save(2, state, data=FullDisk())
    assert isinstance(err.value.__cause__, OSError) and "Steps [1] are complete" in str(err.value)
    checkpoints.close()


FAILS_IN_THE_BACKGROUND = """
import json, resource, signal, sys, time, warnings
import jax.numpy as jnp
from train.checkpoint import CheckpointError, Checkpoints

def limit_file_size(limit):  # writes past it fail with EFBIG (SIGXFSZ ignored): a real I/O error in orbax's thread
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

out = {}
checkpoints = Checkpoints(sys.argv[1], save_every=100, keep=3)
small, big = {"w": jnp.arange(1024.0)}, {"w": jnp.arange(1 << 21, dtype=jnp.float32)}  # 8 MB
checkpoints.save(1, small, force=True)
checkpoints.wait()
limit_file_size(1 << 20)
out["started"] = checkpoints.save(2, big, force=True)
step, deadline = 3, time.time() + 120
try:
    while time.time() < deadline:  # the training steps after it: none of them saves
        checkpoints.save(step, small)
        step, _ = step + 1, time.sleep(0.05)
except CheckpointError as err:
    out |= {"error": str(err), "cause": repr(err.__cause__), "raised_at": step}
limit_file_size(resource.RLIM_INFINITY)
out["steps"] = checkpoints.all_steps()
limit_file_size(1 << 20)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        with checkpoints:  # the run stops on its own error while a save fails: that error is the one raised
            checkpoints.save(10, big, force=True)
            raise RuntimeError("the training step broke")
    except RuntimeError as err:
        out["propagated"] = str(err)
out["warned"] = [str(w.message) for w in caught if "saving step" in str(w.message)]
print("RESULT " + json.dumps(out))
"""


def test_a_save_that_fails_in_the_background_raises_at_once_naming_its_step(tmp_path):
    directory = tmp_path / "checkpoints"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", FAILS_IN_THE_BACKGROUND, str(directory)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert out["started"] and out["steps"] == [1]
    assert out["error"].startswith(f"saving step 2 to {directory} failed: ValueError: ")
    assert "File too large" in out["cause"]  # chained to orbax's own error
    assert out["raised_at"] < 100  # at a step of the run, not at the next checkpoint (step 100)
    assert out["propagated"] == "the training step broke"
    assert len(out["warned"]) == 1 and out["warned"][0].startswith("saving step 10 ")
    assert "RuntimeError: the training step broke" in out["warned"][0]
    assert sorted(p.name for p in directory.iterdir())[0] == "1"
    with pytest.warns(UserWarning, match="never finished"):
        Checkpoints(directory, save_every=1, keep=3).close()
    assert sorted(p.name for p in directory.iterdir()) == ["1"]

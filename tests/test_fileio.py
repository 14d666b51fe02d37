"""Run-state files on a local disk and in a bucket (a local GCS emulator): growing logs, shard positions."""

import json

import jax
import pytest
from etils import epath

from configs.fileio import LineLog, local_copy, write_atomic
from train.host_state import DataStateError, check_saved, load_host_state, save_host_state


def lines(path) -> list[str]:
    return epath.Path(path).read_text().splitlines()


def test_a_local_line_log_appends_each_line_and_drops_what_a_resume_runs_again(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = LineLog(path)
    for step in (1, 2, 3):
        log.write(json.dumps({"step": step}))
    assert lines(path) == ['{"step": 1}', '{"step": 2}', '{"step": 3}']  # on disk before any sync
    log.close()
    log = LineLog(path, keep=lambda line: json.loads(line)["step"] <= 2)
    assert lines(path) == ['{"step": 1}', '{"step": 2}']
    log.write('{"step": 3}')
    log.close()
    assert lines(path)[-1] == '{"step": 3}' and len(lines(path)) == 3
    LineLog(path, fresh=True).close()
    assert lines(path) == []


def test_a_bucket_line_log_uploads_whole_at_sync_and_keeps_earlier_lines(gcs_emulator):
    path = epath.Path(f"gs://{gcs_emulator.bucket}/fileio/rollouts.jsonl")
    log = LineLog(path, upload_every_s=3600)
    log.write('{"step": 1}')
    log.write('{"step": 2}')
    assert lines(path) == []  # objects cannot be appended to: nothing goes up until a sync
    log.sync()
    assert lines(path) == ['{"step": 1}', '{"step": 2}'] and log.uploads == 1
    log.sync()
    assert log.uploads == 1  # nothing new, no upload
    log.close()
    log = LineLog(path, keep=lambda line: json.loads(line)["step"] <= 1, upload_every_s=0)
    assert lines(path) == ['{"step": 1}']
    log.write('{"step": 2}')  # upload_every_s=0: every line goes up
    assert lines(path) == ['{"step": 1}', '{"step": 2}']
    log.close()
    assert write_atomic(path.parent / "config.yaml", "a: 1\n").read_text() == "a: 1\n"


def test_a_shard_position_round_trips_through_a_bucket_and_a_cut_upload_reads_as_missing(gcs_emulator):
    directory = epath.Path(f"gs://{gcs_emulator.bucket}/fileio/step/data")

    def extra(staging):
        (staging / "iterator.index").write_bytes(b"\x00\x01binary")

    target = save_host_state(directory, 1, 2, {"batches_read": 7}, extra)
    assert str(target) == f"gs://{gcs_emulator.bucket}/fileio/step/data/shard-1-of-2"
    found, state = load_host_state(directory, 1, 2)
    assert state == {"batches_read": 7, "num_shards": 2}
    with local_copy(found) as local:  # what TensorFlow reads its iterator from
        assert (local / "iterator.index").read_bytes() == b"\x00\x01binary"
    check_saved(directory, 1, 2)

    (found / "state.json").unlink()  # as if the upload stopped before its last file
    with pytest.raises(FileNotFoundError, match="no data position saved for this shard"):
        check_saved(directory, 1, 2)
    with pytest.raises(DataStateError, match="no saved data position for data shard 1"):
        load_host_state(directory, 1, 2)
    other = directory.parent / "other"
    save_host_state(other, 0, 4, {"batches_read": 1})
    with pytest.raises(DataStateError, match="saved as 4 data shards but this run reads 2"):
        load_host_state(other, 0, 2)


def test_a_bucket_checkpoint_step_without_its_commit_file_is_removed_when_the_directory_opens(gcs_emulator):
    """Orbax writes a step in place on a bucket and marks it with commit_success.txt last."""
    import jax.numpy as jnp
    import numpy as np

    from train.checkpoint import Checkpoints

    directory = epath.Path(f"gs://{gcs_emulator.bucket}/fileio/checkpoints")
    state = {"w": jnp.arange(4.0)}
    with Checkpoints(directory, save_every=1, keep=3) as checkpoints:
        checkpoints.save(1, state)
    (directory / "2" / "state").mkdir(parents=True)
    (directory / "2" / "state" / "_METADATA").write_text("{")  # a save killed half-way
    with pytest.warns(UserWarning, match="never finished"):
        checkpoints = Checkpoints(directory, save_every=1, keep=3)
    assert sorted(p.name for p in directory.iterdir()) == ["1"]
    step, restored = checkpoints.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    checkpoints.close()
    assert step == 1
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))

"""Checkpoints out to other tools and in from them: HF safetensors both ways, and params-only exports.

    export_hf("runs/small", "hf/small", dtype="bfloat16")          # transformers loads hf/small
    export_params("runs/small", "params/small")                     # no optimizer state; any mesh
    import_hf("hf/llama", "runs/llama")                             # a run train/rl/search/generate start from

A params-only export and an import are both a run directory: `config.yaml` plus
`checkpoints/<step>/state` holding only `params`, which `train.checkpoint.load_params` (and so
every inference path, `train.init_from` and `rl.init_from`) reads like any run. Outputs are
written beside `out` and renamed at the end (on a bucket, written in place with config.yaml
last); an existing `out` is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from tqdm import tqdm

from configs.fileio import atomic_path, is_remote, run_path
from configs.load import load_config, save_config
from configs.schema import Config
from model.distributed import host_values, ponder_version
from model.hf import (
    ARCHITECTURE_FIELDS,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    hf_entries,
    hf_shapes,
    hf_tensor_reader,
)
from model.safetensors_io import SafetensorsDir, SafetensorsError, write_file, write_sharded
from train.checkpoint import Checkpoints
from train.policy import Policy, load_policy
from train.state import state_layout

VALUE_HEAD_FILE = "value_head.safetensors"  # a reward model's head: score = sigmoid(hidden[-1] @ weight + bias)
EXPORT_INFO_FILE = "ponder_export.json"
TOKENIZER_DIR = "tokenizer"  # an import's own tokenizer files, which its data.vocab names
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "config.json")


class InterchangeError(ValueError):
    """An export or import cannot be done as asked; the message names the file, key or tensor."""


@dataclasses.dataclass
class Written:
    """What an export or import wrote: where, from which step, how big, how long it took."""

    out: Any
    step: int
    bytes: int
    seconds: float
    source_bytes: int = 0  # the checkpoint step it came from (for params-only: the full train state)
    files: list[str] = dataclasses.field(default_factory=list)


def load_run(checkpoint: str | Path, *, step: int | None = None) -> Policy:
    """The config and newest readable params (or step `step`) of a run dir, its checkpoints/ or a step dir."""
    path = run_path(checkpoint)
    if step is not None:
        steps = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = steps / str(step)
        if not (path / "state").is_dir():
            raise InterchangeError(f"{steps}: no checkpoint step {step}")
    return load_policy(path)


def _refuse_existing(out) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InterchangeError(f"{out} exists; remove it or choose another --out (an export never overwrites)")


def tree_bytes(path) -> int:
    """Bytes of the files under `path` (local or on a bucket)."""
    path = run_path(path)
    if path.is_file():
        return path.stat().length
    return sum(tree_bytes(child) for child in path.iterdir())


def _is_writer() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# -- params-only run directories (export params, import hf) --


def write_params_run(params: Any, cfg: Config, out, step: int,
                     add_files: Callable[[Path], None] | None = None) -> None:
    """`out/config.yaml` and `out/checkpoints/<step>/state` holding only `params` (all processes call it).

    Locally the run is assembled in a temporary directory beside `out` and renamed; on a
    bucket it is written in place, orbax marking the step complete, with config.yaml last.
    `add_files(dir)` (process 0, before config.yaml) puts other files into the run.
    """
    out = run_path(out)
    target = out if is_remote(out) else out.parent / f".{out.name}.export-tmp"
    if not is_remote(out):
        if _is_writer() and target.exists():
            shutil.rmtree(target)
        _barrier("ponder-export-clean")
    with Checkpoints(target / "checkpoints", save_every=1, keep=1, async_save=False) as checkpoints:
        checkpoints.save(step, {"params": params}, config=cfg, force=True)
        checkpoints.wait()
    _barrier("ponder-export-saved")
    if _is_writer():
        if add_files is not None:
            add_files(target)
        save_config(cfg, target)
        if target != out:
            target.rename(out)
    _barrier("ponder-export-renamed")


def export_params(checkpoint: str | Path, out: str | Path, *, step: int | None = None,
                  dtype: str | None = None) -> Written:
    """A params-only checkpoint of a run (no optimizer state), cast to `dtype` when given.

    It restores onto any mesh (orbax reshards); with `dtype` the exported config's
    model.param_dtype says so, and a reader asking for float32 gets the values cast up.
    """
    start = time.perf_counter()
    out = run_path(out)
    _refuse_existing(out)
    run = load_run(checkpoint, step=step)
    params, cfg = run.params, run.cfg
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"param_dtype": dtype})})
    step_number = int(run.step_dir.name)
    write_params_run(params, cfg, out, step_number)
    return Written(out, step_number, tree_bytes(out), time.perf_counter() - start,
                   source_bytes=tree_bytes(run.step_dir))


# -- HuggingFace export --


def export_hf(checkpoint: str | Path, out: str | Path, *, step: int | None = None, dtype: str | None = None,
              max_shard_bytes: int = 2 * 2**30, lm_only: bool = False) -> Written:
    """A HuggingFace Llama directory of a run's params: safetensors shards, config, generation config, tokenizer.

    `dtype` (float32 or bfloat16) defaults to the params' own. A reward model's value head
    goes to VALUE_HEAD_FILE beside the weights; `lm_only` refuses a reward model rather than
    drop its head silently. Every process reads (gathers) each tensor; process 0 writes.
    """
    from train.data.hf_tokenizer import write_tokenizer

    start = time.perf_counter()
    out = run_path(out)
    _refuse_existing(out)
    run = load_run(checkpoint, step=step)
    cfg, model = run.cfg, run.cfg.model
    if model.value_head and lm_only:
        raise InterchangeError(
            f"{checkpoint} is a reward model (model.value_head: true): its scores come from the value head, "
            f"which an LM-only export would drop. Export it without --lm-only to write {VALUE_HEAD_FILE} "
            "beside the weights.")
    dtype = dtype or model.param_dtype
    step_number = int(run.step_dir.name)
    read = hf_tensor_reader(run.params, model, fetch=host_values)
    entries = hf_entries(model)
    bar = tqdm(total=len(entries), unit="tensor", desc="export hf", leave=False, disable=not _is_writer())

    def read_one(name: str):
        value = read(name)
        bar.update()
        return value

    written: list[str] = []
    with bar, atomic_path(out, directory=True) if _is_writer() else contextlib.nullcontext() as tmp:
        tmp = Path(tmp) if tmp is not None else None
        write_sharded(entries, read_one, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes,
                      metadata={"format": "pt"})
        if model.value_head:
            head = host_values(run.params["value_head"])
            entries = [("value_head.weight", (model.embed_dim,)), ("value_head.bias", ())]
            values = {"value_head.weight": head["w"], "value_head.bias": head["b"]}
            write_file(tmp / VALUE_HEAD_FILE if tmp else None, entries, values.__getitem__, dtype="float32")
        if tmp is not None:
            write_tokenizer(cfg.data.vocab, tmp, model_max_length=model.max_seq_len)
            # No pad_token_id for generation: ponder's BOS is id 0, the pad id, and transformers would
            # mask a leading pad out of an input given without an attention mask.
            _write_json(tmp / "config.json", config_to_hf(model, dtype=dtype, pad_id=None))
            _write_json(tmp / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False})
            _write_json(tmp / EXPORT_INFO_FILE, {
                "source": str(run.step_dir), "step": step_number, "ponder": ponder_version(),
                "dtype": dtype, "vocab": cfg.data.vocab,
                "value_head": (f"{VALUE_HEAD_FILE}: value_head.weight [hidden_size] and value_head.bias [] (float32); "
                               "score of a sequence = sigmoid(final-normed hidden state of its last token . weight "
                               "+ bias)") if model.value_head else None})
            written = sorted(path.name for path in tmp.iterdir())
    _barrier("ponder-export-hf")
    return Written(out, step_number, tree_bytes(out) if _is_writer() else 0, time.perf_counter() - start,
                   source_bytes=tree_bytes(run.step_dir), files=written)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


# -- HuggingFace import --


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a HF directory, as a dict; errors name the file."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise InterchangeError(f"{hf_dir}: no config.json (not a HuggingFace model directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InterchangeError(f"{path}: not JSON ({err})") from err
    if not isinstance(config, dict):
        raise InterchangeError(f"{path}: not a JSON object")
    return config


def import_hf(hf_dir: str | Path, out: str | Path, *, config: str | None = None, overrides: tuple[str, ...] = (),
              vocab: str | None = None) -> Written:
    """A ponder run directory (config.yaml, params-only checkpoint at step 0) from a local HF Llama directory.

    The model section comes from config.json; everything else from `config` (default
    configs/base.yaml) and `overrides`. The vocabulary is the directory's own tokenizer
    (tokenizer.json, copied into out/tokenizer/), unless `vocab` names another data.vocab.
    """
    from model.sharding import make_mesh

    start = time.perf_counter()
    hf_dir, out = Path(hf_dir), run_path(out)
    if is_remote(out):
        raise InterchangeError(f"{out}: import writes a local run directory (its data.vocab names local files)")
    _refuse_existing(out)
    hf_config = read_hf_config(hf_dir)
    try:
        model_cfg = config_from_hf(hf_config)
        tensors = SafetensorsDir(hf_dir)
    except SafetensorsError as err:
        raise InterchangeError(str(err)) from err
    except ValueError as err:
        raise InterchangeError(f"{hf_dir / 'config.json'}: {err}") from err
    expected = set(hf_shapes(model_cfg)) | ({"lm_head.weight"} if model_cfg.tie_embeddings else set())
    unexpected = sorted(name for name in tensors if name not in expected and not name.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise InterchangeError(f"{hf_dir}: tensors ponder's Llama has no place for: {unexpected[:5]} "
                               "(biases or another architecture?)")
    if vocab is None and not (hf_dir / "tokenizer.json").is_file():
        raise InterchangeError(f"{hf_dir}: no tokenizer.json; name the vocabulary with --vocab "
                               "(byte, a SentencePiece model or a tokenizer.json)")
    vocab_spec = vocab or str(Path(out).absolute() / TOKENIZER_DIR)
    model_fields = model_cfg.model_dump(mode="json", include=set(ARCHITECTURE_FIELDS))
    settings = [f"model.{key}={json.dumps(value)}" for key, value in model_fields.items()]
    cfg = load_config(config, [*settings, f"data.vocab={vocab_spec}", *overrides])
    try:
        params = from_hf_state_dict(tensors, cfg.model)
    except (KeyError, ValueError) as err:
        raise InterchangeError(f"{hf_dir}: {err.args[0]}") from err
    mesh = make_mesh(cfg.mesh)
    shardings = state_layout(cfg, mesh).shardings["params"]
    params = jax.tree.map(lambda array, sharding: jax.device_put(array.astype(jnp.dtype(cfg.model.param_dtype)),
                                                                 sharding), params, shardings)
    if vocab is not None:
        _check_vocab(vocab, cfg)

    def add_tokenizer(run_dir) -> None:
        if vocab is None:
            tokenizer = Path(run_dir) / TOKENIZER_DIR
            tokenizer.mkdir(parents=True)
            for name in TOKENIZER_FILES:
                if (hf_dir / name).is_file():
                    shutil.copy2(hf_dir / name, tokenizer / name)
            _check_vocab(tokenizer, cfg)

    write_params_run(params, cfg, out, 0, add_files=add_tokenizer)
    return Written(out, 0, tree_bytes(out), time.perf_counter() - start, source_bytes=tree_bytes(hf_dir))


def _check_vocab(spec, cfg: Config) -> None:
    """The vocabulary must fit the model's embedding."""
    from train.data.vocab import get_vocabulary

    vocabulary = get_vocabulary(str(spec))
    if vocabulary.vocab_size > cfg.model.vocab_size:
        raise InterchangeError(f"the tokenizer has {vocabulary.vocab_size} tokens, more than config.json's "
                               f"vocab_size {cfg.model.vocab_size}")

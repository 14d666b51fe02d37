"""`ponder export hf/params` and `ponder import hf`: real orbax checkpoints, real safetensors, real transformers.

HF models are built from a config here (no hub); what transformers loads is only what the
export wrote.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from configs.load import load_config
from model import create_model
from model.hf import load_params as load_into_model
from model.sharding import make_mesh
from search.sampler import Sampling, generate
from tasks import get_task
from tasks.files import write_problems
from train.checkpoint import load_params
from train.interchange import VALUE_HEAD_FILE, InterchangeError, export_hf, export_params, import_hf, write_params_run
from train.state import state_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_TASKS = [("arithmetic", 1), ("arithmetic", 2), ("countdown", 2), ("sudoku", 1)]


def _task_texts(count: int = 4) -> list[str]:
    texts = []
    for name, difficulty in PROMPT_TASKS:
        for index in range(count):
            problem = get_task(name).generate(7, index, difficulty, "test")
            texts += [problem.prompt, problem.prompt + "\n".join(problem.steps)]
    return texts + ["ünïcödé ✓ 🙂", " leading space\n\ttabs"]


def _ponder_model(cfg, params):
    model = create_model(cfg.model, seed=0)
    load_into_model(model, jax.tree.map(np.asarray, params))
    return model


def _ponder_greedy(cfg, params, prompt_ids: list[int], max_new: int) -> list[int]:
    """ponder's greedy completion (the jitted paged-KV sampler `ponder generate` runs), up to EOS."""
    mesh = make_mesh(cfg.mesh)
    layout = state_layout(cfg, mesh)
    with jax.set_mesh(mesh):
        out = generate(layout.graphdef, params, cfg.model, jnp.asarray([prompt_ids], jnp.int32),
                       jnp.asarray([len(prompt_ids)], jnp.int32), jax.random.key(0)[None],
                       max_new_tokens=max_new, sampling=Sampling(temperature=0.0))
    return np.asarray(out.tokens)[0, : int(np.asarray(out.num)[0])].tolist()


@pytest.fixture(scope="module")
def policy_params(trained_tiny_policy):
    cfg, run_dir = trained_tiny_policy
    layout = state_layout(cfg, make_mesh(cfg.mesh))
    return cfg, run_dir, load_params(run_dir, layout.abstract["params"])


def test_export_hf_loads_in_transformers_with_the_same_logits_greedy_and_tokens(policy_params, tmp_path):
    cfg, run_dir, params = policy_params
    out = tmp_path / "hf"
    written = export_hf(run_dir, out, dtype="float32", max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(tmp_path.glob(".*"))  # nothing staged is left beside --out

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = seqio.ByteVocabulary()
    for text in _task_texts():
        assert tokenizer.encode(text, add_special_tokens=False) == list(vocab.encode(text)), text
        assert tokenizer.decode(vocab.encode(text)) == text

    problem = get_task("arithmetic").generate(3, 0, 2, "test")
    prompt_ids = [0, *vocab.encode(problem.prompt)]
    tokens = np.asarray([prompt_ids + list(vocab.encode("1 + 2 = 3\n"))])
    with torch.no_grad():
        hf_logits = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(_ponder_model(cfg, params)(jnp.asarray(tokens)))
    assert np.abs(hf_logits - ours).max() <= 1e-4

    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=40)[0, len(prompt_ids):].tolist()
    assert hf_ids == _ponder_greedy(cfg, params, prompt_ids, 40)
    assert written.step == 400 and written.bytes > 0


def test_export_params_is_smaller_and_restores_onto_another_mesh(policy_params, tmp_path):
    cfg, run_dir, params = policy_params
    written = export_params(run_dir, tmp_path / "params")
    assert written.bytes < 0.5 * written.source_bytes  # no Adam moments
    other = cfg.model_copy(update={"mesh": cfg.mesh.model_copy(update=dict(data=2, fsdp=2, tensor=2))})
    mesh = make_mesh(other.mesh)
    restored = load_params(tmp_path / "params", state_layout(other, mesh).abstract["params"])
    leaf = restored["blocks"]["attn"]["wq"]
    assert leaf.sharding.mesh.shape == mesh.shape
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    half = export_params(run_dir, tmp_path / "params16", dtype="bfloat16")
    assert half.bytes < 0.75 * written.bytes
    assert load_config(str(tmp_path / "params16" / "config.yaml")).model.param_dtype == "bfloat16"
    with pytest.raises(InterchangeError, match="exists"):
        export_params(run_dir, tmp_path / "params")


def _reward_run(tmp_path):
    """A real orbax run of a tiny reward model (random params, value head)."""
    cfg = load_config("experiments/tiny", ["model.value_head=true"])
    mesh = make_mesh(cfg.mesh)
    params = nnx.state(create_model(cfg.model, seed=3), nnx.Param).to_pure_dict()
    params = jax.device_put(params, state_layout(cfg, mesh).shardings["params"])
    write_params_run(params, cfg, tmp_path / "reward", 5)
    return cfg, tmp_path / "reward", params


def test_a_reward_model_exports_its_value_head_beside_the_weights_and_refuses_lm_only(tmp_path):
    from safetensors.numpy import load_file

    cfg, run, params = _reward_run(tmp_path)
    with pytest.raises(InterchangeError, match="value head"):
        export_hf(run, tmp_path / "lm", lm_only=True)
    assert not (tmp_path / "lm").exists()
    export_hf(run, tmp_path / "hf", dtype="bfloat16")
    head = load_file(tmp_path / "hf" / VALUE_HEAD_FILE)
    np.testing.assert_allclose(head["value_head.weight"], np.asarray(params["value_head"]["w"]))
    assert "value_head" in json.loads((tmp_path / "hf" / "ponder_export.json").read_text())["value_head"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    # the documented score: the head on transformers' last (final-normed) hidden state
    tokens = np.random.default_rng(1).integers(3, 259, (2, 16))
    export_hf(run, tmp_path / "hf32", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf32").eval()
    with torch.no_grad():
        hidden = hf.model(torch.tensor(tokens)).last_hidden_state[:, -1].numpy()
    hf_score = 1 / (1 + np.exp(-(hidden @ head["value_head.weight"].astype(np.float32) + head["value_head.bias"])))
    model = _ponder_model(cfg, params)
    ours = np.asarray(jax.nn.sigmoid(model.value(model.hidden(jnp.asarray(tokens)))[:, -1]))
    assert np.abs(ours - 0.5).max() > 1e-3  # scores that say something
    np.testing.assert_allclose(hf_score, ours, atol=1e-5)


def _hf_llama(tied: bool, kv_heads: int, rope_scaling: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32} if rope_scaling else None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied,kv_heads,rope_scaling,dtype", [
    (False, 2, True, torch.float32),   # GQA, llama3 RoPE, sharded fp32
    (True, 1, False, torch.bfloat16),  # MQA, tied, bf16
])
def test_import_hf_matches_transformers(tmp_path, tied, kv_heads, rope_scaling, dtype):
    hf = _hf_llama(tied, kv_heads, rope_scaling).to(dtype)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    written = import_hf(tmp_path / "hf", tmp_path / "run", vocab="byte", overrides=("mesh.fsdp=-1",))
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert (cfg.model.tie_embeddings, cfg.model.num_kv_heads) == (tied, kv_heads)
    assert (cfg.model.rope_scaling is not None) == rope_scaling
    params = load_params(tmp_path / "run", state_layout(cfg, make_mesh(cfg.mesh)).abstract["params"])
    tokens = np.random.default_rng(0).integers(0, 384, (2, 80))  # past original_max_position_embeddings
    with torch.no_grad():
        want = hf.float()(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(_ponder_model(cfg, params)(jnp.asarray(tokens)))
    assert np.abs(got - want).max() <= 1e-4
    assert written.bytes > 0


def test_an_imported_model_trains_and_searches_with_its_own_tokenizer(tmp_path):
    from train.data.hf_tokenizer import write_tokenizer

    hf = _hf_llama(tied=False, kv_heads=2, rope_scaling=True)
    hf.save_pretrained(tmp_path / "hf")
    write_tokenizer("byte", tmp_path / "hf", model_max_length=512)  # a tokenizer.json beside the weights
    import_hf(tmp_path / "hf", tmp_path / "run")
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert cfg.data.vocab == str(tmp_path / "run" / "tokenizer")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}

    def ponder(*argv):
        process = subprocess.run([sys.executable, "-m", "tools.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)
        assert process.returncode == 0, process.stderr[-3000:]
        return process.stdout

    ponder("train", "--no-progress", "--config", str(tmp_path / "run" / "config.yaml"),
           f"train.init_from={tmp_path / 'run'}", f"train.run_dir={tmp_path / 'trained'}", "train.steps=2",
           "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2", "data.seq_len=128",
           "data.max_prompt_len=64", "data.batch_size=4")
    lines = (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))

    problems = tmp_path / "problems.jsonl"
    write_problems(problems, [get_task("arithmetic").generate(0, i, 1, "test") for i in range(2)])
    out = ponder("search", "--no-progress", "--checkpoint", str(tmp_path / "trained"), "--problems", str(problems),
                 "--out", str(tmp_path / "results.jsonl"), "search.strategy=sample", "search.n=2",
                 "search.max_steps=2", "search.max_step_tokens=8", "search.max_len=64", "search.batch_size=2",
                 "search.prompt_buckets=[32]")
    assert "problems: 2" in out
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def _saved(tmp_path, shard: str = "50KB"):
    hf = _hf_llama(tied=False, kv_heads=2, rope_scaling=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    return tmp_path / "hf"


def _refused(hf_dir, tmp_path, match: str):
    with pytest.raises(InterchangeError, match=match):
        import_hf(hf_dir, tmp_path / "run", vocab="byte")
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_hf_directories_are_named_and_leave_nothing(tmp_path):
    hf_dir = _saved(tmp_path)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))

    (hf_dir / shards[-1]).rename(tmp_path / "moved")  # a missing shard
    _refused(hf_dir, tmp_path, shards[-1])
    (tmp_path / "moved").rename(hf_dir / shards[-1])

    data = (hf_dir / shards[0]).read_bytes()  # a truncated shard
    (hf_dir / shards[0]).write_bytes(data[: len(data) - 100])
    _refused(hf_dir, tmp_path, f"{shards[0]}: truncated")
    (hf_dir / shards[0]).write_bytes(data)

    bad = json.loads(json.dumps(index))  # an index naming a tensor its shard lacks
    bad["weight_map"]["model.layers.0.mlp.up_proj.weight"] = shards[-1] if \
        index["weight_map"]["model.layers.0.mlp.up_proj.weight"] != shards[-1] else shards[0]
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(bad))
    _refused(hf_dir, tmp_path, "model.layers.0.mlp.up_proj.weight")
    del bad["weight_map"]["model.layers.0.mlp.up_proj.weight"]  # an index lacking a tensor
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(bad))
    _refused(hf_dir, tmp_path, "model.layers.0.mlp.up_proj.weight")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))

    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))  # shapes disagree
    _refused(hf_dir, tmp_path, r"mlp\.\w+_proj\.weight: shape .* config.json implies")
    (hf_dir / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    _refused(hf_dir, tmp_path, "hidden_act")
    for key in ("rope_parameters", "rope_scaling"):  # transformers 5.x and 4.x spellings
        yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
        without_rope = {k: v for k, v in config.items() if "rope" not in k}
        (hf_dir / "config.json").write_text(json.dumps(without_rope | {key: yarn}))
        _refused(hf_dir, tmp_path, "rope_type: 'yarn'")
    (hf_dir / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"]}))
    _refused(hf_dir, tmp_path, "MistralForCausalLM")
    (hf_dir / "config.json").write_text(json.dumps(config))
    import_hf(hf_dir, tmp_path / "run", vocab="byte")  # the repaired directory imports


def _ponder(capsys, *argv: str) -> tuple[int, str, str]:
    from tools import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_the_commands_export_params_generate_from_it_and_name_bad_input(policy_params, tmp_path, capsys):
    _, run_dir, _ = policy_params
    code, out, err = _ponder(capsys, "export", "params", "--checkpoint", str(run_dir), "--out", str(tmp_path / "p"))
    assert code == 0 and "params only" in out and "of the full checkpoint" in out, err
    prompt = get_task("arithmetic").generate(5, 1, 1, "test").prompt
    completions = []
    for checkpoint in (run_dir, tmp_path / "p"):
        code, out, err = _ponder(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--json",
                                 "--max-new-tokens", "24")
        assert code == 0, err
        completions.append(json.loads(out)["tokens"])
    assert completions[0] == completions[1] and completions[0]

    code, _, err = _ponder(capsys, "export", "params", "--checkpoint", str(run_dir), "--out", str(tmp_path / "p"))
    assert code == 2 and "exists" in err
    code, _, err = _ponder(capsys, "export", "hf", "--checkpoint", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "h"))
    assert code == 2 and "nope: no such checkpoint directory" in err
    code, _, err = _ponder(capsys, "import", "hf", str(tmp_path), "--out", str(tmp_path / "r"))
    assert code == 2 and "no config.json" in err
    code, _, err = _ponder(capsys, "export", "hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "h"),
                           "--shard-size", "lots")
    assert code == 2 and "--shard-size" in err

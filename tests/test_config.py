"""Config loading: every shipped YAML validates, inheritance, overrides, errors that name their source."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from configs.load import CONFIG_DIR, ConfigError, dump_config, load_config, resolve_path, save_config, with_overrides
from configs.schema import Config, ModelConfig

ALL_YAML = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent.name != "launch")  # launch specs: test_launch_spec


def num_params(m: ModelConfig) -> int:
    """Parameter count of the Llama-style decoder, from its shapes."""
    e, h, k, d, f, v = m.embed_dim, m.num_heads, m.num_kv_heads, m.resolved_head_dim, m.mlp_dim, m.vocab_size
    per_layer = e * h * d + 2 * e * k * d + h * d * e + 3 * e * f + 2 * e
    return v * e + m.num_layers * per_layer + e + (0 if m.tie_embeddings else e * v)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def schema_defaults(section: type[BaseModel] = Config, prefix: str = "") -> dict[str, object]:
    """Dotted key -> the schema's default (as YAML would write it), for every field of every section."""
    defaults = section().model_dump(mode="json")
    out: dict[str, object] = {}
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= schema_defaults(annotation, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = defaults[name]
    return out


def flatten(yaml_data: dict, schema_keys: set[str], prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of a YAML mapping, descending only into sections (not mixture or rules)."""
    out: dict[str, object] = {}
    for name, value in yaml_data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in schema_keys:
            out |= flatten(value, schema_keys, f"{key}.")
        else:
            out[key] = value
    return out


def default_drift(base: dict) -> list[str]:
    """One line per key where the mapping `base` (base.yaml's) and the schema's defaults differ."""
    want = schema_defaults()
    got = flatten(base, set(want))
    problems = [f"{key}: base.yaml lacks it (schema default {want[key]!r})" for key in want if key not in got]
    problems += [f"{key}: in base.yaml but not in the schema" for key in got if key not in want]
    problems += [f"{key}: base.yaml says {got[key]!r}, the schema {want[key]!r}" for key in want
                 if key in got and (got[key] != want[key] or type(got[key]) is not type(want[key]))]
    return problems


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_yaml_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.rules(), "every config should inherit the logical axis rules"


def test_base_yaml_lists_exactly_the_schema_defaults():
    """base.yaml documents every knob with the schema's own default, and nothing else."""
    base = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    assert default_drift(base) == []
    assert load_config(None) == Config(), "base.yaml resolves to the schema's defaults"


@pytest.mark.parametrize("edit, needle", [
    (lambda b: b["model"].update(max_seq_len=2048), "model.max_seq_len: base.yaml says 2048, the schema 512"),
    (lambda b: b["logical_axis_rules"].update(embed=None), "logical_axis_rules: base.yaml says"),
    (lambda b: b["optimizer"].update(learning_rate="3e-3"), "optimizer.learning_rate: base.yaml says '3e-3'"),
    (lambda b: b["search"].update(top_p=1), "search.top_p: base.yaml says 1, the schema 1.0"),
    (lambda b: b["rl"].pop("seed"), "rl.seed: base.yaml lacks it"),
    (lambda b: b["train"].update(retired_knob=3), "train.retired_knob: in base.yaml but not in the schema"),
])
def test_default_drift_names_the_key(edit, needle):
    base = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    edit(base)
    (problem,) = default_drift(base)
    assert problem.startswith(needle)


def test_config_not_rooted_at_base_yaml_shards_like_one_that_is(tmp_path):
    """A file naming no base gets base.yaml's logical axis rules; a partial table merges over them."""
    base = load_config(None)
    lone = load_config(write(tmp_path / "lone.yaml", "model: {num_layers: 3}\n"))
    assert lone.rules() == base.rules() and lone.model.max_seq_len == base.model.max_seq_len
    assert lone.model_dump() == base.model_dump() | {"model": base.model.model_dump() | {"num_layers": 3}}
    partial = load_config(write(tmp_path / "partial.yaml", "logical_axis_rules: {embed: null}\n"))
    assert dict(partial.rules()) == dict(base.rules()) | {"embed": ()}
    rooted = write(tmp_path / "rooted.yaml", f"base: {CONFIG_DIR / 'base.yaml'}\nlogical_axis_rules: {{embed: null}}\n")
    assert load_config(rooted) == partial


def test_base_rules_and_mesh():
    cfg = load_config(None)
    assert cfg.rules() == (
        ("batch", ("data", "fsdp")),
        ("length", ()),
        ("embed", ("fsdp",)),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("head_dim", ()),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("layers", ()),
    )
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data) == (1, -1, 1, 1)
    assert cfg.model == load_config("tiny").model


def test_model_sizes():
    assert num_params(load_config("tiny").model) < 1_000_000
    assert 3e6 < num_params(load_config("small").model) < 10e6
    assert num_params(load_config("llama3-8b").model) == pytest.approx(8.03e9, rel=0.01)
    one_b = load_config("1b").model
    assert one_b.tie_embeddings and one_b.resolved_head_dim == 64
    assert num_params(one_b) == pytest.approx(1.24e9, rel=0.02)


def test_bare_names_resolve_to_packaged_configs():
    assert resolve_path("tiny") == CONFIG_DIR / "models" / "tiny.yaml"
    assert resolve_path("models/tiny") == CONFIG_DIR / "models" / "tiny.yaml"
    assert resolve_path("experiments/tiny.yaml") == CONFIG_DIR / "experiments" / "tiny.yaml"
    assert load_config("experiments/tiny").mesh.fsdp == -1


def test_child_overrides_one_key_and_keeps_the_rest(tmp_path):
    write(tmp_path / "parent.yaml", "seed: 7\nmodel: {num_layers: 3, embed_dim: 64, mlp_dim: 96}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nmodel: {num_layers: 5}\n")
    cfg = load_config(child)
    assert (cfg.seed, cfg.model.num_layers, cfg.model.embed_dim, cfg.model.mlp_dim) == (7, 5, 64, 96)
    assert cfg.rules() == load_config(None).rules(), "a chain not rooted at base.yaml still gets the rules"


def test_child_of_packaged_config_in_another_directory(tmp_path):
    child = write(tmp_path / "mine.yaml", f"base: {CONFIG_DIR / 'models' / 'small.yaml'}\nmodel: {{num_layers: 1}}\n")
    cfg = load_config(child)
    assert (cfg.model.num_layers, cfg.model.embed_dim) == (1, 256)
    assert cfg.rules() == load_config(None).rules()


def test_list_base_applies_in_order_and_shared_parent_once(tmp_path):
    write(tmp_path / "root.yaml", "seed: 1\nmodel: {num_layers: 2, embed_dim: 64}\n")
    write(tmp_path / "a.yaml", "base: root.yaml\nmodel: {num_layers: 6}\n")
    write(tmp_path / "b.yaml", "base: root.yaml\nmodel: {embed_dim: 32}\nseed: 2\n")
    top = write(tmp_path / "top.yaml", "base: [a.yaml, b.yaml]\nseed: 3\n")
    cfg = load_config(top)
    # b's parent (root) is not re-applied over a's change; b's own keys win over a's.
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.seed) == (6, 32, 3)


def test_inheritance_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match="cycle") as err:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml" in str(err.value) and "b.yaml" in str(err.value)


def test_self_cycle_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path / "a.yaml", "base: a.yaml\n"))


def test_overrides_are_applied_and_typed():
    cfg = load_config(
        "experiments/tiny",
        [
            "model.num_layers=4",
            "mesh.fsdp=-1",
            "mesh.data=1",
            "model.tie_embeddings=true",
            "model.norm_eps=1e-6",
            "logical_axis_rules.embed=null",
            "logical_axis_rules.batch=[data]",
        ],
    )
    assert cfg.model.num_layers == 4 and isinstance(cfg.model.num_layers, int)
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (1, -1)
    assert cfg.model.tie_embeddings is True
    assert cfg.model.norm_eps == pytest.approx(1e-6)
    assert cfg.logical_axis_rules["embed"] is None
    assert dict(cfg.rules())["batch"] == ("data",)


@pytest.mark.parametrize("override", ["model.num_layers", "=4", "model..num_layers=4", "model.num_layers: 4"])
def test_bad_override_names_it(override):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert override in str(err.value)


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path / "typo.yaml", f"base: {CONFIG_DIR / 'base.yaml'}\nmodel:\n  num_layayers: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}: model.num_layayers:" in msg
    assert "did you mean 'num_layers'?" in msg


def test_unknown_section_is_suggested(tmp_path):
    with pytest.raises(ConfigError, match=r"modle: unknown key; did you mean 'model'\?"):
        load_config(write(tmp_path / "typo.yaml", "modle: {num_layers: 4}\n"))


def test_wrong_type_names_key_file_expected_type_and_value(tmp_path):
    parent = write(tmp_path / "parent.yaml", "model:\n  num_layers: four\n")
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub" / "bad.yaml", "base: ../parent.yaml\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    (line,) = [ln for ln in str(err.value).splitlines() if "model.num_layers" in ln]
    # the key was set by the parent, so the parent is named, not the child
    assert line.strip().startswith(f"{parent.resolve()}: model.num_layers:")
    assert "valid integer" in line and "'four'" in line


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: {num_heads: 6, num_kv_heads: 4}", "multiple of num_kv_heads"),
        ("mesh: {tensor: 0}", "mesh.tensor"),
        ("mesh: {data: -1, fsdp: -1}", "at most one mesh axis"),
        ("model: {num_layers: 0}", "greater than 0"),
        ("logical_axis_rules: {embed: model}", "logical_axis_rules.embed"),
        ("logical_axis_rules: {hidden: fsdp}", "unknown logical axis 'hidden'"),
        ("model: {dtype: float16}", "'bfloat16'"),
    ],
)
def test_impossible_values_are_errors_naming_the_file(tmp_path, text, needle):
    path = write(tmp_path / "bad.yaml", text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert f"{path}:" in str(err.value)


def test_error_from_override_names_the_override():
    with pytest.raises(ConfigError) as err:
        load_config("experiments/tiny", ["mesh.data=-1"])  # fsdp is already -1 there
    assert "command-line override `mesh.data=-1`" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.num_layers=lots"])
    assert "command-line override `model.num_layers=lots`: model.num_layers:" in str(err.value)
    with pytest.raises(ConfigError, match="override `model.num_layayers=4`: model.num_layayers: .*num_layers"):
        load_config("tiny", ["model.num_layayers=4"])


def test_all_errors_are_listed_one_per_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "seed: x\nmodel: {vocab_size: -1, embedim: 8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = [ln.strip() for ln in str(err.value).splitlines()[1:]]
    assert {ln.split(": ")[1] for ln in lines} == {"seed", "model.vocab_size", "model.embedim"}
    assert all(ln.startswith(f"{path}: ") for ln in lines)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "seed: 1\nmodel:\n  num_layers: [1, 2\n  embed_dim: 3\n")
    with pytest.raises(ConfigError, match="invalid YAML") as err:
        load_config(path)
    assert f"{path}:4:" in str(err.value) or f"{path}:3:" in str(err.value)


def test_non_mapping_top_level(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert str(child) in str(err.value) and "gone.yaml" in str(err.value)


def test_bad_base_value(tmp_path):
    with pytest.raises(ConfigError, match="base: must be"):
        load_config(write(tmp_path / "b.yaml", "base: {a: 1}\n"))


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config("llama3-8b", ["model.norm_eps=1e-6", "logical_axis_rules.embed=null", "seed=11"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"], "no temp file left behind"
    assert load_config(path) == cfg
    assert "base:" not in path.read_text()
    assert dump_config(load_config(path)) == path.read_text()
    # saving again replaces the file in place
    save_config(load_config("tiny"), tmp_path / "run")
    assert load_config(path) == load_config("tiny")


def test_a_mixture_replaces_the_inherited_one(tmp_path):
    """data.mixture is one whole: a child's mixture (file or override) does not add to its base's."""
    child = tmp_path / "child.yaml"
    parent = CONFIG_DIR / "experiments/demo_tiny.yaml"
    child.write_text(f"base: {parent}\ndata:\n  mixture:\n    countdown_d1_direct: 1.0\n")
    assert load_config(str(child)).data.mixture == {"countdown_d1_direct": 1.0}
    assert load_config("experiments/demo_tiny").data.mixture == {"arithmetic_d2_direct": 1.0}  # not base's d1 too
    cfg = load_config("experiments/demo_tiny", ["data.mixture={sudoku_d1_direct: 2.0}"])
    assert cfg.data.mixture == {"sudoku_d1_direct": 2.0}


def test_with_overrides_applies_to_a_loaded_config_and_names_its_source_on_a_bad_key():
    cfg = load_config("experiments/demo_tiny")
    changed = with_overrides(cfg, ["optimizer.learning_rate=1.0e-4", "rl.steps=7"], "demo.rl_overrides")
    assert (changed.optimizer.learning_rate, changed.rl.steps) == (1.0e-4, 7)
    assert changed.model == cfg.model and cfg.optimizer.learning_rate != 1.0e-4  # the original is untouched
    with pytest.raises(ConfigError, match=r"demo.rl_overrides `optimizer.learnin_rate=1`: optimizer.learnin_rate: "
                                          r"unknown key; did you mean 'learning_rate'"):
        with_overrides(cfg, ["optimizer.learnin_rate=1"], "demo.rl_overrides")

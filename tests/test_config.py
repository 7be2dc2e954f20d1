"""Config validation: every mistake is reported before any work starts, as a ConfigError whose message
names the dotted key and what is allowed; relative paths and --set overrides behave as documented."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO, write_config, write_ids
from megastream.config import Config, build_config, load_config
from megastream.errors import ConfigError, MegastreamError
from megastream.presets import PRESETS


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_ids(tmp_path / "train.jsonl", [[1, 2, 3], [4, 5, 6]])


def _raw(data_file: Path, **sections) -> dict:
    """A valid raw config (tiny preset, absolute data path), with sections merged in key by key."""
    raw = {"model": {"preset": "tiny"}, "data": {"path": str(data_file), "seq_len": 8},
           "output": {"dir": "runs/x"}}
    for name, sec in sections.items():
        if isinstance(sec, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **sec}
        else:
            raw[name] = sec
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as ei:
        build_config(raw)
    return str(ei.value)


def test_valid_base_config_builds(data_file):
    cfg = build_config(_raw(data_file))
    assert isinstance(cfg, Config)
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    assert cfg.data.path == str(data_file) and cfg.data.seq_len == 8
    assert cfg.train == type(cfg.train)()  # untouched sections keep their defaults


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, MegastreamError) and ConfigError.exit_code == 2


# ---------------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_section_names_dotted_key_and_allowed_keys(data_file):
    msg = _error(_raw(data_file, train={"learning_rate": 3e-5}))
    assert "train.learning_rate" in msg
    assert "unknown key" in msg
    allowed = msg.split("train.learning_rate", 1)[1]
    for name in ("steps", "micro_batch_size", "grad_accum", "lr", "warmup_steps", "schedule", "min_lr"):
        assert name in allowed, (name, msg)


def test_unknown_section_lists_the_sections(data_file):
    msg = _error(_raw(data_file, trainer={"lr": 1e-3}))
    assert "trainer" in msg and "unknown key" in msg
    for name in ("model", "data", "train", "optim", "engine", "output"):
        assert name in msg.split("trainer", 1)[1], (name, msg)


def test_section_that_is_not_a_mapping(data_file):
    msg = _error(_raw(data_file, train=5))
    assert "train" in msg and "mapping" in msg


# ---------------------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "steps", "ten", "an integer"),
    ("train", "micro_batch_size", 2.5, "an integer"),
    ("train", "grad_accum", True, "an integer"),  # a bool is not an integer
    ("data", "shuffle", "yes", "true/false"),
    ("train", "lr", "fast", "a finite number"),
    ("optim", "betas", [0.9], "a list of 2"),
    ("optim", "betas", 0.9, "a list of 2"),
    ("model", "preset", 7, "a string"),
    ("engine", "dtype", "float16", "'bfloat16'"),
])
def test_wrong_type_names_key_and_expected_type(data_file, section, key, value, expected):
    msg = _error(_raw(data_file, **{section: {key: value}}))
    assert f"{section}.{key}: expected" in msg, msg
    assert expected in msg, msg
    assert repr(value) in msg, msg  # and shows what it got


def test_int_is_accepted_where_a_float_is_expected(data_file):
    cfg = build_config(_raw(data_file, train={"lr": 1, "grad_clip": 0}, optim={"betas": [0, 0.5]}))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip == 0.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.optim.betas == (0.0, 0.5) and isinstance(cfg.optim.betas, tuple)


# ---------------------------------------------------------------------------------------------- impossible values


@pytest.mark.parametrize("sections,key,hint", [
    ({"data": {"seq_len": 0}}, "data.seq_len", ">= 2"),
    ({"data": {"seq_len": 1}}, "data.seq_len", ">= 2"),
    ({"train": {"steps": 0}}, "train.steps", ">= 1"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", ">= 1"),
    ({"train": {"grad_accum": -1}}, "train.grad_accum", ">= 1"),
    ({"train": {"lr": -1}}, "train.lr", "> 0"),
    ({"train": {"lr": 0}}, "train.lr", "> 0"),
    ({"train": {"steps": 10, "warmup_steps": 11}}, "train.warmup_steps", "between 0 and train.steps (10)"),
    ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "train.min_lr", "between 0 and train.lr"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay", ">= 0"),
    ({"train": {"grad_clip": -1}}, "train.grad_clip", ">= 0"),
    ({"optim": {"betas": [1.0, 0.9]}}, "optim.betas", "[0, 1)"),
    ({"optim": {"betas": [0.9, -0.1]}}, "optim.betas", "[0, 1)"),
    ({"optim": {"eps": 0}}, "optim.eps", "> 0"),
    ({"output": {"dir": ""}}, "output.dir", "required"),
    ({"output": {"shard_size_gb": 0}}, "output.shard_size_gb", "> 0"),
])
def test_impossible_value_names_key_and_bound(data_file, sections, key, hint):
    msg = _error(_raw(data_file, **sections))
    assert f"{key}: " in msg, msg
    assert hint in msg, msg


@pytest.mark.parametrize("sections", [{"train": {"lr": float("inf")}}, {"train": {"lr": "inf"}},
                                      {"output": {"shard_size_gb": float("inf")}}, {"optim": {"eps": float("inf")}}],
                         ids=["lr-inf", "lr-inf-string", "shard-size-inf", "eps-inf"])
def test_non_finite_numbers_are_rejected(data_file, sections):
    with pytest.raises(ConfigError):
        build_config(_raw(data_file, **sections))


def test_nan_is_rejected(data_file):
    msg = _error(_raw(data_file, train={"lr": "nan"}))
    assert "train.lr" in msg


def test_boundary_values_are_accepted(data_file):
    cfg = build_config(_raw(data_file, data={"seq_len": 2},
                            train={"steps": 5, "warmup_steps": 5, "lr": 1e-3, "min_lr": 1e-3},
                            optim={"betas": [0.0, 0.999]}))
    assert cfg.train.warmup_steps == cfg.train.steps == 5
    assert cfg.train.min_lr == cfg.train.lr == 1e-3
    assert cfg.data.seq_len == 2


def test_bad_choice_lists_the_choices(data_file):
    msg = _error(_raw(data_file, train={"schedule": "exponential"}))
    assert "train.schedule" in msg and "'exponential'" in msg
    for choice in ("cosine", "linear", "constant"):
        assert choice in msg, msg


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_each_schedule_is_accepted(data_file, schedule):
    assert build_config(_raw(data_file, train={"schedule": schedule})).train.schedule == schedule


# ---------------------------------------------------------------------------------------------- files and the model


def test_missing_data_file(tmp_path, data_file):
    missing = tmp_path / "nope.jsonl"
    msg = _error(_raw(data_file, data={"path": str(missing)}))
    assert "data.path" in msg and str(missing) in msg and "does not exist" in msg


def test_data_path_required(data_file):
    msg = _error(_raw(data_file, data={"path": ""}))
    assert "data.path: required" in msg


def test_data_path_directory_and_list(tmp_path, data_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _error(_raw(data_file, data={"path": str(empty)}))
    assert "data.path" in msg and "holds no data files" in msg
    assert build_config(_raw(data_file, data={"path": str(data_file.parent)})).data.path == str(data_file.parent)
    cfg = build_config(_raw(data_file, data={"path": [str(data_file), str(data_file)]}))
    assert cfg.data.path == (str(data_file), str(data_file))
    msg = _error(_raw(data_file, data={"path": [str(data_file), str(tmp_path / "nope.jsonl")]}))
    assert "nope.jsonl does not exist" in msg
    msg = _error(_raw(data_file, data={"path": []}))
    assert "data.path" in msg


def test_missing_tokenizer_file(tmp_path, data_file):
    msg = _error(_raw(data_file, data={"tokenizer": str(tmp_path / "tok.json")}))
    assert "data.tokenizer" in msg and "tok.json" in msg


def test_model_path_not_a_directory(tmp_path, data_file):
    missing = tmp_path / "no_model"
    msg = _error(_raw(data_file, model={"path": str(missing), "preset": None}))
    assert "model.path" in msg and str(missing) in msg and "not a directory" in msg
    assert "config.json" in msg  # says what it should be


def test_model_path_without_config_json(tmp_path, data_file):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    msg = _error(_raw(data_file, model={"path": str(d), "preset": None}))
    assert "model.path" in msg and "config.json" in msg
    assert "not a directory" not in msg


def test_model_path_without_safetensors(tmp_path, data_file):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (d / "pytorch_model.bin").write_bytes(b"")
    msg = _error(_raw(data_file, model={"path": str(d), "preset": None}))
    assert "model.path" in msg and "safetensors" in msg


def test_model_path_with_config_and_safetensors_is_accepted(tmp_path, data_file):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    cfg = build_config(_raw(data_file, model={"path": str(d), "preset": None}))
    assert cfg.model.path == str(d) and cfg.model.preset is None


def test_both_model_path_and_preset(tmp_path, data_file):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    msg = _error(_raw(data_file, model={"path": str(d), "preset": "tiny"}))
    assert "exactly one of model.path" in msg and "model.preset" in msg


def test_neither_model_path_nor_preset(data_file):
    raw = _raw(data_file)
    raw["model"] = {}
    msg = _error(raw)
    assert "exactly one of model.path" in msg and "model.preset" in msg
    assert "tiny" in msg  # lists the presets


def test_unknown_preset_lists_known_presets(data_file):
    msg = _error(_raw(data_file, model={"preset": "gpt-5"}))
    assert "model.preset" in msg and "'gpt-5'" in msg
    for name in PRESETS:
        assert name in msg, (name, msg)


# ---------------------------------------------------------------------------------------------- all errors at once


def test_several_type_errors_are_reported_together(data_file):
    raw = _raw(data_file, train={"learning_rate": 1, "steps": "ten"}, data={"shuffle": "yes"}, extra={})
    msg = _error(raw)
    for part in ("train.learning_rate", "train.steps", "data.shuffle", "extra"):
        assert part in msg, (part, msg)
    assert msg.count("\n  - ") == 4, msg


def test_several_value_errors_are_reported_together(data_file):
    raw = _raw(data_file, data={"seq_len": 0}, train={"steps": 0, "lr": 1e-3, "min_lr": 1e-2},
               optim={"betas": [1.0, 0.9]}, model={"preset": "nope"})
    msg = _error(raw)
    for key in ("data.seq_len", "train.steps", "train.min_lr", "optim.betas", "model.preset"):
        assert f"  - {key}: " in msg, (key, msg)


# ---------------------------------------------------------------------------------------------- YAML files


def test_yaml_file_errors_name_the_file(tmp_path, data_file):
    path = write_config(tmp_path / "run.yaml", _raw(data_file, train={"learning_rate": 1e-3}))
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value) and "train.learning_rate" in str(ei.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_yaml_3e_minus_5_is_a_float(tmp_path, data_file):
    text = f"model:\n  preset: tiny\ndata:\n  path: {data_file}\ntrain:\n  lr: 3e-5\n  min_lr: 1e-6\n"
    assert yaml.safe_load(text)["train"]["lr"] == "3e-5"  # the PyYAML quirk this guards against
    path = tmp_path / "run.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 3e-5
    assert isinstance(cfg.train.min_lr, float) and cfg.train.min_lr == 1e-6


def test_relative_data_path_resolves_against_the_yaml_dir(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    write_ids(cfg_dir / "train.jsonl", [[1, 2, 3]])
    (cfg_dir / "tok").mkdir()
    (cfg_dir / "tok" / "tokenizer.json").write_text("{}")
    write_config(cfg_dir / "run.yaml", {
        "model": {"preset": "tiny"},
        "data": {"path": "train.jsonl", "tokenizer": "tok/tokenizer.json"},
        "output": {"dir": "runs/rel"},
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the data file is not in the cwd: only the YAML-relative lookup finds it
    cfg = load_config(Path("..") / "project" / "run.yaml")
    assert Path(cfg.data.path).is_absolute()
    assert Path(cfg.data.path).resolve() == (cfg_dir / "train.jsonl").resolve()
    assert Path(cfg.data.tokenizer).resolve() == (cfg_dir / "tok" / "tokenizer.json").resolve()
    assert cfg.output.dir == "runs/rel"  # output.dir stays relative to the cwd


def test_set_paths_are_relative_to_the_cwd(tmp_path, monkeypatch, data_file):
    path = write_config(tmp_path / "run.yaml", _raw(data_file))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    write_ids(cwd / "other.jsonl", [[7, 8]])
    monkeypatch.chdir(cwd)
    cfg = load_config(path, ["data.path=other.jsonl"])
    assert cfg.data.path == "other.jsonl"
    assert Path(cfg.data.path).resolve() == (cwd / "other.jsonl").resolve()


SHIPPED = sorted({p for d in ("configs", "megastream/demo") for p in (REPO / d).rglob("*.y*ml")})


def test_there_are_shipped_configs():
    assert REPO / "configs" / "demo.yaml" in SHIPPED
    assert REPO / "megastream" / "demo" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert Path(cfg.data.path).is_file()


def test_demo_config_values():
    cfg = load_config(REPO / "configs" / "demo.yaml")  # a symlink: paths resolve against its target's dir
    assert cfg.model.preset == "tiny"
    assert Path(cfg.data.path) == (REPO / "megastream" / "demo" / "corpus.jsonl").resolve()
    assert cfg.train.lr == 3e-3 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.output.dir == "runs/demo"


# ---------------------------------------------------------------------------------------------- --set overrides


def test_set_overrides_change_values(tmp_path, data_file):
    path = write_config(tmp_path / "run.yaml", _raw(data_file, train={"lr": 1e-3, "steps": 3}))
    base = load_config(path)
    assert base.train.lr == 1e-3 and base.train.steps == 3
    cfg = load_config(path, ["train.lr=3e-5", "train.steps=10", "data.shuffle=false",
                             "optim.betas=[0.8, 0.9]", "engine.device=cpu"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10 and isinstance(cfg.train.steps, int)
    assert cfg.data.shuffle is False
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.engine.device == "cpu"


def test_set_later_override_wins_and_can_clear_a_key(tmp_path, data_file):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    path = write_config(tmp_path / "run.yaml", _raw(data_file))
    cfg = load_config(path, ["train.steps=4", "train.steps=6", f"model.path={d}", "model.preset=null"])
    assert cfg.train.steps == 6
    assert cfg.model.path == str(d) and cfg.model.preset is None


def test_set_unknown_key_fails_naming_it(tmp_path, data_file):
    path = write_config(tmp_path / "run.yaml", _raw(data_file))
    with pytest.raises(ConfigError) as ei:
        load_config(path, ["train.learning_rate=3e-5"])
    assert "train.learning_rate" in str(ei.value) and "lr" in str(ei.value)


def test_set_bad_value_fails_naming_the_key(tmp_path, data_file):
    path = write_config(tmp_path / "run.yaml", _raw(data_file))
    with pytest.raises(ConfigError) as ei:
        load_config(path, ["train.steps=ten"])
    assert "train.steps" in str(ei.value) and "an integer" in str(ei.value)


@pytest.mark.parametrize("item,hint", [
    ("train.lr", "KEY=VALUE"),
    ("train.lr.x=1", "SECTION.NAME"),
    ("lr=1", "SECTION.NAME"),
])
def test_set_malformed(tmp_path, data_file, item, hint):
    path = write_config(tmp_path / "run.yaml", _raw(data_file))
    with pytest.raises(ConfigError) as ei:
        load_config(path, [item])
    assert hint in str(ei.value) and item in str(ei.value)


# ---------------------------------------------------------------------------------------------- the result


def test_config_is_frozen(data_file):
    cfg = build_config(_raw(data_file))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None
    assert cfg.train.lr == 1e-5


def test_to_dict_round_trips(data_file):
    cfg = build_config(_raw(data_file, train={"lr": 2e-4}, optim={"betas": [0.8, 0.9]}))
    d = cfg.to_dict()
    assert d["train"]["lr"] == 2e-4 and d["model"]["preset"] == "tiny"
    # the dump written next to a run (output/config.yaml) loads back to the same config
    assert build_config(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_empty_section_means_defaults(data_file):
    raw = _raw(data_file)
    raw["optim"] = None  # `optim:` with nothing under it
    assert build_config(raw).optim.eps == 1e-8


def test_section_that_is_not_a_mapping_names_its_keys(data_file):
    raw = _raw(data_file)
    raw["train"] = 5
    msg = _error(raw)
    assert "train: expected a mapping of keys (steps, micro_batch_size" in msg and "train.:" not in msg


def test_readme_config_reference_lists_every_key():
    """README's config reference has a row `section.key` for every key of every section (lora's too)."""
    import re
    import typing

    rows = set(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", (REPO / "README.md").read_text(), re.M))
    hints = typing.get_type_hints(Config)
    keys = set()
    for section in dataclasses.fields(Config):
        tp = hints[section.name]  # a section, or Optional[a section] (lora)
        cls = next(a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a))
        keys |= {f"{section.name}.{f.name}" for f in dataclasses.fields(cls)}
    assert keys - rows == set(), "keys without a README row"

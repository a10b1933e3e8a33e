"""The training config: every example YAML validates; mistakes fail early with place and hint."""

from pathlib import Path

import pytest

from mptkit.train.config import ConfigError, RunConfig, load_run

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs").rglob("*.yaml"))


def test_the_example_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in EXAMPLES}
    expected = {f"pretrain/{n}.yaml" for n in ("tiny", "125m", "1b", "7b")}
    expected |= {f"finetune/{n}.yaml" for n in ("instruct", "chat", "storywriter")}
    assert expected <= names


@pytest.fixture(scope="module")
def stand_in_model(tmp_path_factory):
    """A small HF-format MPT for the examples whose init_from is a model they expect to exist
    (a pretraining run's output, a hub download): long enough for their seq_len."""
    from mptkit.model import MPTConfig, MPTForCausalLM

    directory = tmp_path_factory.mktemp("stand-in")
    MPTForCausalLM(MPTConfig.from_preset("tiny", max_seq_len=2048)).save_pretrained(directory)
    return directory


def _stand_ins(path: Path, model: Path) -> list[str]:
    """Overrides for what an example expects an earlier step to have made (a model, prepared data):
    the stand-in model and the repository's own files of the same kind."""
    import yaml

    text = yaml.safe_load(path.read_text())
    overrides = [f"model.init_from={model}"] if text["model"].get("init_from") else []
    for split, stand_in in (("train", "data/books/train"), ("val", "data/books/heldout")):
        if not all((REPO / p).exists() for p in text["data"].get(split, [])):
            overrides.append(f"data.{split}=[{REPO / stand_in}]")
    return overrides


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_example_config_validates(path, stand_in_model, monkeypatch):
    monkeypatch.chdir(REPO)  # the examples name their data relative to the repository
    run = load_run(path, _stand_ins(path, stand_in_model))
    assert isinstance(run.config, RunConfig)
    assert run.config.data.train and run.seq_len <= run.model_config.max_seq_len


@pytest.mark.parametrize("path", EXAMPLES[:3], ids=lambda p: p.name)
def test_the_config_saved_beside_checkpoints_loads_back_unchanged(path, tmp_path, stand_in_model, monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)
    config = load_run(path, ["optimizer.lr=3e-4", "model.attn_config.alibi_bias_max=16",
                             *_stand_ins(path, stand_in_model)]).config
    saved = tmp_path / "run_config.yaml"
    saved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert load_run(saved).config == config


def test_storywriter_raises_context_and_alibi_bias_max():
    path = REPO / "configs/finetune/storywriter.yaml"
    config = load_run(path, ["model.init_from=null", "model.preset=mpt-7b", f"data.train=[{REPO / 'data/books/train'}]",
                             "data.val=[]"]).config
    assert config.model.overrides["max_seq_len"] == 65536
    assert config.model.overrides["attn_config"]["alibi_bias_max"] == 16


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = f"data:\n  train: [{REPO / 'data/books/train'}]\n"


def test_unknown_key_names_file_line_path_and_suggestion(tmp_path):
    path = _write(tmp_path, BASE + "optimizer:\n  name: adamw\n  lr: 1.0e-3\n  weight_decya: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_run(path)
    message = str(info.value)
    assert f"{path}:6" in message and "optimizer.weight_decya" in message and "did you mean 'weight_decay'" in message


# (config text, the error it must give: the file:line where known, the field, what was expected)
CONFIG_ERRORS = [
    (BASE + "optimiser:\n  lr: 1.0\n",
     r"optimiser.*did you mean 'optimizer'"),
    (BASE + "schedule:\n  name: cosin\n",
     r"schedule.name: expected one of 'cosine', 'linear', 'constant', got 'cosin'.*did you mean 'cosine'"),
    (BASE + "train:\n  max_steps: lots\n",
     r"run.yaml:4: train.max_steps: expected an integer, got 'lots'"),
    (BASE + "train:\n  activation_checkpointing: 3\n",
     r"train.activation_checkpointing: expected true or false"),
    (BASE + "optimizer:\n  betas: [0.9]\n",
     r"optimizer.betas: expected a list of 2 values"),
    (BASE + "model:\n  preset: tiny\n  max_seq_lne: 512\n",
     r"run.yaml:5: model.max_seq_lne: not an MPTConfig field.*'max_seq_len'"),
    (BASE + "model:\n  attn_config:\n    alibi_bias_max: -1\n",
     r"model.attn_config.alibi_bias_max: expected > 0"),
    (BASE + "model:\n  preset: mpt-7bb\n",
     r"model.preset: unknown preset 'mpt-7bb'.*did you mean 'mpt-7b'"),
    (BASE + "train:\n  global_batch_size: 10\n  micro_batch_size: 4\n",
     r"train.global_batch_size: 10 is not a multiple of train.micro_batch_size=4"),
    (BASE + "train:\n  max_steps: 10\nschedule:\n  warmup_steps: 50\n",
     r"schedule.warmup_steps: 50 exceeds train.max_steps=10"),
    ("train:\n  max_steps: 10\n",
     r"data.train: no training data"),
]


@pytest.mark.parametrize("text, message", CONFIG_ERRORS)
def test_config_errors_say_where_and_what_was_expected(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_run(_write(tmp_path, text))


def test_dotted_overrides_apply_and_are_checked(tmp_path):
    path = _write(tmp_path, BASE + "optimizer:\n  lr: 1.0e-3\n")
    # `3e-4` without a dot is a string to YAML 1.1; a float field accepts it.
    config = load_run(path, ["optimizer.lr=3e-4", "train.max_steps=7", "model.attn_config.alibi_bias_max=16",
                             "checkpoint.resume=never"]).config
    assert config.optimizer.lr == 3e-4 and config.train.max_steps == 7 and config.checkpoint.resume == "never"
    assert config.model.overrides == {"attn_config": {"alibi_bias_max": 16}}
    with pytest.raises(ConfigError, match=r"override 'train.max_stpes=3': train.max_stpes: unknown key.*'max_steps'"):
        load_run(path, ["train.max_stpes=3"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_run(path, ["train.max_steps"])


def test_model_config_errors_come_back_as_the_run_config_error_with_the_field_and_line(tmp_path):
    from mptkit.model import ConfigError as ModelConfigError
    from mptkit.model import MPTConfig

    path = _write(tmp_path, BASE + "model:\n  attn_config:\n    alibi_bias_max: -1\n")
    with pytest.raises(ConfigError) as info:
        load_run(path)
    error = info.value
    assert (error.where, error.field, error.message) == (f"{path}:5", "model.attn_config.alibi_bias_max",
                                                         "expected > 0, got -1")
    assert str(error) == f"{path}:5: model.attn_config.alibi_bias_max: expected > 0, got -1"
    with pytest.raises(ModelConfigError, match=r"^MPTConfig\.n_layers: "):  # the model's own, without a file
        MPTConfig.from_preset("tiny", n_layers=0)


def test_mptkit_train_prints_one_line_for_run_and_model_config_errors(tmp_path, capsys):
    from mptkit.model import MPTConfig
    from mptkit.train.commands import main

    path = _write(tmp_path, BASE + "model:\n  attn_config:\n    alibi_bias_max: -1\n")
    assert main("train", [str(path)]) == 2
    assert capsys.readouterr().err == f"mptkit train: {path}:5: model.attn_config.alibi_bias_max: expected > 0, got -1\n"
    # An init_from model's fields are checked when the file is read too: the same one line, no traceback.
    MPTConfig.from_preset("tiny").save_pretrained(tmp_path / "hf")
    overrides = [f"model.init_from={tmp_path / 'hf'}", "model.attn_config.clip_qkv=-2", f"output_dir={tmp_path / 'out'}",
                 "train.device=cpu"]
    assert main("train", [str(_write(tmp_path, BASE)), *overrides, "--print-config"]) == 2
    assert capsys.readouterr().err == ("mptkit train: override 'model.attn_config.clip_qkv=-2': "
                                       "model.attn_config.clip_qkv: expected null or > 0, got -2.0\n")


def test_a_seq_len_beyond_the_init_from_models_context_fails_when_read_naming_its_line(tmp_path, capsys):
    from mptkit.model import MPTConfig
    from mptkit.train.commands import main

    MPTConfig.from_preset("tiny", max_seq_len=128).save_pretrained(tmp_path / "hf")
    path = _write(tmp_path, BASE + f"model:\n  init_from: {tmp_path / 'hf'}\ntrain:\n  device: cpu\n  seq_len: 256\n")
    with pytest.raises(ConfigError) as info:
        load_run(path)
    assert (info.value.where, info.value.field) == (f"{path}:7", "train.seq_len")
    assert info.value.message.startswith("256 exceeds the model's max_seq_len=128")
    assert main("train", [str(path), "--print-config"]) == 2
    assert capsys.readouterr().err.startswith(f"mptkit train: {path}:7: train.seq_len: 256 exceeds")
    # Raising the model's context with it makes the same run valid (ALiBi extrapolates).
    assert load_run(path, ["model.max_seq_len=256"]).seq_len == 256


def test_the_yaml_engine_reads_any_dataclasses_and_takes_custom_readers(tmp_path):
    from dataclasses import dataclass, field

    from mptkit.train import typed_yaml

    @dataclass
    class Span:
        low: int = 0
        high: int = 0

    @dataclass
    class Section:
        span: Span = field(default_factory=Span)
        ratio: float = 1.0

    @dataclass
    class Top:
        section: Section = field(default_factory=Section)
        names: list[str] = field(default_factory=list)

    def read_span(value, key, reader):  # "3-7" -> Span(3, 7)
        low, sep, high = str(value).partition("-")
        if not (sep and low.isdigit() and high.isdigit()):
            reader.fail(key, f"expected LOW-HIGH, got {value!r}")
        return Span(int(low), int(high))

    path = _write(tmp_path, "section:\n  span: 3-7\n  ratio: 2\nnames: a\n")
    config, _ = typed_yaml.load(Top, path, readers={Span: read_span})
    assert config == Top(section=Section(span=Span(3, 7), ratio=2.0), names=["a"])
    with pytest.raises(ConfigError) as info:
        typed_yaml.load(Top, path, ["section.span=9"], readers={Span: read_span})
    assert str(info.value) == "override 'section.span=9': section.span: expected LOW-HIGH, got 9"
    with pytest.raises(ConfigError, match=r"run.yaml:2: section.ratoi: unknown key \(did you mean 'ratio'\?\)"):
        typed_yaml.load(Top, _write(tmp_path, "section:\n  ratoi: 2\n"), readers={Span: read_span})


@pytest.mark.parametrize("argv", [["--print-config", "{yaml}", "train.max_steps=30"],
                                  ["{yaml}", "--print-config", "train.max_steps=30"],
                                  ["{yaml}", "train.max_steps=30", "--print-config"]])
def test_print_config_goes_anywhere_on_the_command_line(argv, capsys):
    from mptkit.train.commands import main

    yaml_path = str(REPO / "configs/pretrain/tiny.yaml")
    assert main("train", [a.format(yaml=yaml_path) for a in argv]) == 0
    assert "max_steps: 30" in capsys.readouterr().out


def test_missing_data_and_shards_of_another_length_fail_when_read(tmp_path):
    from mptkit.data.prepare import prepare_pretraining

    path = _write(tmp_path, f"data:\n  train: [{tmp_path / 'nowhere.txt'}]\n")
    with pytest.raises(ConfigError) as info:
        load_run(path)
    assert (info.value.where, info.value.field) == (f"{path}:2", "data.train")
    assert info.value.message.startswith(f"{tmp_path / 'nowhere.txt'} does not exist")
    prepare_pretraining([REPO / "data/books/heldout"], tmp_path / "shards", seq_len=32, progress=False)
    path = _write(tmp_path, f"data:\n  train: [{tmp_path / 'shards'}]\ntrain:\n  seq_len: 64\n")
    with pytest.raises(ConfigError, match=rf"run.yaml:2: data.train: the shards in {tmp_path / 'shards'} hold samples "
                                          r"of 32 tokens but the run's seq_len is 64"):
        load_run(path)
    assert load_run(path, ["train.seq_len=32"]).seq_len == 32

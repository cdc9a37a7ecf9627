import pytest
import yaml
from conftest import ROOT

from fashion_sd.config import (
    Config,
    ConfigError,
    load_config,
    parse_override,
    valid_keys,
)

KEYS = ["seed", "data.styles", "data.images", "data.resolution", "captions.template",
        "captions.max_images", "captions.split", "model.weights", "lora.rank", "lora.alpha",
        "lora.targets", "train.epochs", "train.max_steps", "train.batch_size",
        "train.learning_rate", "train.precision", "train.jit_compile", "eval.backend",
        "eval.num_images", "output.dir"]


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_documented_keys_exist():
    assert set(KEYS) <= set(valid_keys())


def test_base_yaml_documents_the_defaults(root):
    assert load_config(root / "configs/base.yaml") == Config()
    # and it names every key, so it really is the documentation of the defaults
    data = yaml.safe_load((root / "configs/base.yaml").read_text())
    flat = {f"{s}.{k}" if isinstance(v, dict) else s
            for s, v in data.items() for k in (v if isinstance(v, dict) else [None])}
    assert {k for k in valid_keys() if k.count(".") == 1} <= flat


def test_paper_best_is_the_papers_run(root):
    cfg = load_config(root / "configs/paper_best.yaml")
    assert (cfg.lora.rank, cfg.lora.alpha) == (4, 8.0)
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.epochs) == (5e-5, 3, 20)
    assert (cfg.data.resolution, cfg.captions.max_images) == (256, 850)
    assert cfg.train.precision.startswith("mixed_")


def test_portrait_is_3_4_with_the_recommended_options(root):
    cfg = load_config(root / "configs/portrait.yaml")
    w, h = cfg.data.resolution
    assert w * 4 == h * 3 and "kaggle-full" in cfg.data.images
    t = cfg.train
    assert (t.snr_gamma, t.noise_offset, t.caption_dropout, t.ema_decay) == (5.0, 0.05, 0.1, 0.999)


def test_demo_is_small(root):
    cfg = load_config(root / "configs/demo.yaml")
    assert cfg.data.resolution == 64 and cfg.data.styles == "data/demo/styles.csv"
    assert cfg.model.weights == "auto"


def test_overrides_are_typed_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "lora: {rank: 8}\n"), [
        "train.learning_rate=1e-4", "lora.rank=16", "train.jit_compile=true",
        "captions.split={train: 0.9, val: 0.05, test: 0.05}", "data.images=null",
        "lora.targets=[to_q, to_v]", "train.max_steps=7"])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.lora.rank == 16  # the command line wins over the file
    assert cfg.train.jit_compile is True
    assert (cfg.captions.split.train, cfg.captions.split.test) == (0.9, 0.05)
    assert cfg.data.images is None and cfg.lora.targets == ["to_q", "to_v"]
    assert cfg.train.max_steps == 7


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `5e-5` as a string (YAML 1.1); users write it that way all the time.
    cfg = load_config(write(tmp_path, "train: {learning_rate: 5e-5}\n"))
    assert cfg.train.learning_rate == 5e-5


def test_mapping_overrides_merge_with_defaults():
    cfg = load_config(None, ["captions.exclude.articleType=[Socks]"])
    assert cfg.captions.exclude["articleType"] == ["Socks"]
    assert "Personal Care" in cfg.captions.exclude["masterCategory"]


def test_unknown_key_suggests_nearest_and_names_file(tmp_path):
    p = write(tmp_path, "lora:\n  rnak: 4\n")
    msg = error_of(p)
    assert str(p) in msg and "'lora.rnak'" in msg and "did you mean 'lora.rank'" in msg
    assert "did you mean 'train'" in error_of(None, ["trian.epochs=3"])


@pytest.mark.parametrize("text, key, expected", [
    ("lora: {rank: four}", "lora.rank", "must be int"),
    ("lora: {rank: 2.5}", "lora.rank", "must be int"),
    ("train: {jit_compile: maybe}", "train.jit_compile", "must be bool | 'auto'"),
    ("train: {precision: fp16}", "train.precision", "'mixed_float16'"),
    ("data: {flip: 1}", "data.flip", "must be bool"),
    ("lora: {targets: to_q}", "lora.targets", "must be list[str]"),
    ("captions: {split: 0.8}", "captions.split", "must be a mapping"),
    ("lora: {rank: 0}", "lora.rank", "must be > 0"),
    ("lora: {rank: -2}", "lora.rank", "must be > 0"),
    ("lora: {alpha: 0}", "lora.alpha", "must be > 0"),
    ("data: {resolution: 100}", "data.resolution", "multiple of 64"),
    ("data: {resolution: 0}", "data.resolution", "multiple of 64"),
    ("train: {learning_rate: 0}", "train.learning_rate", "positive"),
    ("train: {learning_rate: -1.0e-4}", "train.learning_rate", "positive"),
    ("train: {batch_size: 0}", "train.batch_size", "must be > 0"),
    ("train: {epochs: 0}", "train.epochs", "must be > 0"),
    ("captions: {split: {train: 0.7, val: 0.1, test: 0.1}}", "captions.split", "sum to 1"),
    ("captions: {split: {train: 1.1, val: -0.1, test: 0.0}}", "captions.split.val", ">= 0"),
    ("captions: {max_images: 0}", "captions.max_images", "must be > 0"),
    ("captions: {template: 'a {colr} {article}'}", "captions.template", "{colr}"),
    ("captions: {template: 'a photo'}", "captions.template", "no {field}"),
    ("captions: {exclude: {brand: [Nike]}}", "captions.exclude.brand", "not a category column"),
    ("model: {weights: pretrianed}", "model.weights", "local:DIR"),
    ("eval: {backend: torch}", "eval.backend", "'tfhub'"),
])
def test_each_bad_value_is_one_clear_error(tmp_path, text, key, expected):
    p = write(tmp_path, text + "\n")
    msg = error_of(p)
    lines = msg.splitlines()[1:]
    assert len(lines) == 1, msg
    assert str(p) in lines[0] and f"'{key}" in lines[0] and expected in lines[0], msg


def test_override_errors_name_the_command_line(tmp_path):
    msg = error_of(write(tmp_path, "seed: 1\n"), ["data.resolution=65"])
    assert "--set" in msg and "data.resolution" in msg


def test_all_problems_reported_at_once():
    msg = error_of(None, ["lora.rank=0", "train.learning_rate=-1", "lora.rnak=2"])
    assert len(msg.splitlines()) == 4


@pytest.mark.parametrize("text, expected", [
    ("lora: [1, 2]\n", "'lora' must be a mapping of rank, alpha, targets"),
    ("- 1\n- 2\n", "mapping of sections"),
    ("lora: {rank: [\n", "not valid YAML"),
])
def test_malformed_files(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


def test_missing_file_and_bad_override_syntax(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("lora.rank")


def test_save_round_trips(tmp_path):
    cfg = load_config(None, ["lora.rank=6", "captions.max_images=10", "data.images=null"])
    path = cfg.save(tmp_path / "out" / "config.yaml")
    assert load_config(path) == cfg
    assert not list(path.parent.glob("*.tmp"))


def test_text_overrides_stay_text():
    cfg = load_config(None, ["captions.template={article} {productDisplayName}",
                             "output.dir=runs/a: b", "model.weights=local:/tmp/w"])
    assert cfg.captions.template == "{article} {productDisplayName}"
    assert cfg.output.dir == "runs/a: b" and cfg.model.weights == "local:/tmp/w"


def test_yaml_that_would_lose_a_value_or_explode_is_refused(tmp_path):
    """A key given twice (PyYAML keeps the last silently), aliases that expand without bound
    and nesting past YAML_MAX_DEPTH: refused with the file and line; merge keys still merge."""
    from fashion_sd.config import YAML_MAX_DEPTH, YamlLimitError, strict_yaml

    assert strict_yaml("b: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n") == {
        "b": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}
    with pytest.raises(YamlLimitError, match="key 'lr' is given twice, on lines 2 and 4"):
        strict_yaml("train:\n  lr: 1\n  epochs: 2\n  lr: 3\n")
    with pytest.raises(YamlLimitError, match="contains it"):
        strict_yaml("a: &a [1, *a]\n")
    with pytest.raises(YamlLimitError, match=f"nested more than {YAML_MAX_DEPTH} levels"):
        strict_yaml("a: " + "[" * 100_000 + "]" * 100_000)
    strict_yaml("a: " + "[" * (YAML_MAX_DEPTH - 1) + "]" * (YAML_MAX_DEPTH - 1))
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\ntrain:\n  epochs: 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'seed' is given twice, on lines 1 and 4"):
        load_config(p)


@pytest.mark.parametrize(("key", "value"), [
    ("train.learning_rate", "1e308"), ("train.learning_rate", "2"), ("train.text_encoder_lr", "inf"),
    ("train.weight_decay", "1e300"), ("train.grad_clip", "1e300"), ("lora.alpha", "1e30"),
    ("lora.rank", "100000"), ("train.min_loss_scale", "1e300"), ("train.snr_gamma", "1e300"),
    ("train.sample_guidance", "nan"), ("train.sample_guidance", "-1"), ("eval.guidance", "inf"),
    ("train.sample_steps", "100000"), ("eval.steps", "100000"), ("train.sample_seeds", "[0, -1]"),
    ("train.sample_seeds", "[4294967296]"), ("seed", "4294967296"), ("seed", "-1"),
    ("train.max_steps", "4294967296")])
def test_absurd_numbers_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [f"{key}={value}"])


def test_the_edges_of_each_range_are_accepted():
    cfg = load_config(None, ["train.learning_rate=1", "seed=4294967295", "train.sample_seeds=[0, 4294967295]",
                             "train.sample_guidance=100", "eval.guidance=0", "lora.rank=1024",
                             "lora.alpha=65536", "train.min_loss_scale=32768", "eval.steps=1000"])
    assert cfg.seed == 2**32 - 1 and cfg.lora.alpha == 65536


def test_a_run_begun_before_a_key_existed_resumes_with_its_default(tmp_path):
    """config.yaml of a run from before lora.type, the masks, eval.dinov2 and eval.bootstrap:
    those keys ran as their defaults, so --resume with today's defaults is the same run."""
    import yaml

    from fashion_sd.training.inputs import TrainingError, check_resume_config

    cfg = load_config(ROOT / "configs/demo.yaml")
    old = cfg.to_dict()
    del old["lora"]["type"], old["train"]["mask_normalize"], old["eval"]["dinov2"]
    del old["eval"]["bootstrap"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resume_config(tmp_path / "config.yaml", cfg)
    with pytest.raises(TrainingError, match="lora.type: was 'lora', now 'dora'"):
        check_resume_config(tmp_path / "config.yaml", load_config(
            ROOT / "configs/demo.yaml", ["lora.type=dora"]))

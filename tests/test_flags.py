"""Flags <-> Config: one flag per field, precedence preset < config file < flags, bad values."""
import dataclasses

import pytest
import yaml
from absl import flags as absl_flags

from ncsn_tf.config import flags, presets


def _flag_values(argv):
    fv = absl_flags.FlagValues()
    flags.define_config_flags(fv)
    fv(["prog", *argv])
    return fv


def _all_fields():
    """(section, field) for every dataclass field, read off the dataclasses themselves."""
    config = presets.Config()
    return [(s, f.name) for s in presets.SECTIONS
            for f in dataclasses.fields(getattr(config, s))]


def test_every_config_field_has_a_flag_with_help_and_no_default():
    fv = _flag_values([])
    for section, field in _all_fields():
        assert field in fv, field
        flag = fv[field]
        assert flag.default is None, field  # unset means "keep the preset/config file value"
        assert len(flag.help) > 30 and section in flag.help, (field, flag.help)
    assert "preset" in fv and "config" in fv


def test_precedence_preset_then_config_file_then_flags(tmp_path):
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump({"training": {"batch_size": 32, "n_iters": 77},
                                    "model": {"ngf": 8}}))
    fv = _flag_values(["--preset=celeb_a", f"--config={path}", "--batch_size=16",
                       "--norandom_flip", "--sigma_begin=60.5"])
    config = flags.config_from_flags(fv)
    preset = presets.get("celeb_a")
    assert config.training.batch_size == 16  # flag beats file
    assert config.training.n_iters == 77  # file beats preset
    assert config.model.ngf == 8
    assert config.model.sigma_begin == 60.5 and config.data.random_flip is False
    # Everything not overridden is the preset's.
    assert config.model.num_scales == preset.model.num_scales == 500
    assert config.sampling.step_lr == preset.sampling.step_lr
    assert config.optim == preset.optim and config.data.image_size == 64


def test_config_file_round_trip_reproduces_the_config(tmp_path):
    original = presets.override(presets.get("cifar10"), batch_size=12, lr=3e-4,
                                precision="bf16", data_dir=str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(original.to_dict()))
    assert flags.config_from_flags(_flag_values([f"--config={path}"])) == original


def test_preset_is_inferred_from_the_dataset_or_the_image_size():
    assert flags.resolve_config(overrides={"dataset": "celeb_a"}).name == "celeb_a"
    bedroom = flags.resolve_config(overrides={"dataset": "lsun/bedroom"})
    assert bedroom.name == "lsun_bedroom" and bedroom.model.num_scales == 1086
    custom = flags.resolve_config(overrides={"dataset": "folder:/images", "image_size": 64})
    assert custom.name == "celeb_a" and custom.data.dataset == "folder:/images"
    assert custom.model.sigma_begin == 90.0
    with pytest.raises(ValueError, match="--preset"):
        flags.resolve_config(overrides={"dataset": "folder:/images"})
    with pytest.raises(ValueError, match="--preset"):
        flags.resolve_config(overrides={"dataset": "tfrecord:/x/*.tfrec", "image_size": 48})


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": -4}, "--batch_size=-4 must be >= 1"),
    ({"n_iters": 0}, "--n_iters=0 must be >= 1"),
    ({"lr": 0.0}, "--lr=0.0 must be > 0"),
    ({"ema_rate": 1.0}, "--ema_rate=1.0 must be < 1"),
    ({"sigma_end": 60.0}, "must be larger than --sigma_end"),
    ({"channels": 2}, "--channels=2 must be one of 1, 3"),
    ({"test_freq": -1}, "--test_freq=-1 must be >= 0"),
    ({"num_scales": 1}, "--num_scales=1 must be >= 2"),
    ({"sigma_begin": float("nan")}, "--sigma_begin=nan must be a finite number"),
    ({"step_lr": float("inf")}, "--step_lr=inf must be a finite number"),
    ({"ngf": 8.0}, "--ngf=8.0 must be an integer"),
])
def test_bad_values_are_rejected_with_the_flag_name(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        flags.resolve_config("cifar10", overrides=overrides)


@pytest.mark.parametrize("argv", [["--precision=fp8"], ["--arch=unet"], ["--batch_size=big"],
                                  ["--sigma_dist=linear"]])
def test_unknown_choices_fail_at_parse_time(argv):
    with pytest.raises(absl_flags.IllegalFlagValueError):
        _flag_values(argv)


def test_bad_config_files_are_rejected(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("training: {batch_sise: 8}\n")
    with pytest.raises(ValueError, match="batch_sise"):
        flags.resolve_config("cifar10", str(unknown))
    flat = tmp_path / "flat.yaml"
    flat.write_text("batch_size: 8\n")
    with pytest.raises(ValueError, match="sections"):
        flags.resolve_config("cifar10", str(flat))
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text("precision_section: 1\n")
    with pytest.raises(ValueError):
        flags.resolve_config("cifar10", str(wrong_type))
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("training: {precision: fp8, batch_size: 0}\n")
    with pytest.raises(ValueError, match="precision.*\n.*batch_size|batch_size.*\n.*precision"):
        flags.resolve_config("cifar10", str(bad_value))
    with pytest.raises(FileNotFoundError):
        flags.resolve_config("cifar10", str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("content, message", [
    ("- 1\n- 2\n", "must hold a mapping such as 'training: {batch_size: 64}', not a list"),
    (b"model:\n  ngf: \xff\n", "is not UTF-8 text (invalid start byte at byte 14)"),
    ("training: {batch_size: [\n", "is not valid YAML"),
    # 423 bytes of nested aliases expand to about a gigabyte ("billion laughs").
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))
     + "data: {dataset: *i}\n", "aliases (*name) are not allowed"),
])
def test_unreadable_config_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(ValueError) as error:
        flags.resolve_config("cifar10", str(path))
    assert str(path) in str(error.value) and message in str(error.value)
    with pytest.raises(ValueError, match="is a directory; pass a YAML file"):
        flags.resolve_config("cifar10", str(tmp_path))


def test_define_config_flags_is_idempotent_and_help_lists_every_field():
    fv = absl_flags.FlagValues()
    flags.define_config_flags(fv)
    flags.define_config_flags(fv)  # a second CLI module of the same program: no DuplicateFlagError
    help_text = fv.get_help()
    for _, field in _all_fields():
        assert f"--{field}:" in help_text or f"--[no]{field}:" in help_text, field


def test_choices_come_from_the_registries_of_the_implementations():
    from ncsn_tf import models, noise, sampling
    from ncsn_tf.config import schema
    fv = _flag_values([])
    registries = {"sampler": tuple(sampling.SAMPLERS), "sigma_dist": noise.SIGMA_DISTS,
                  "precision": tuple(models.PRECISION_POLICIES),
                  "arch": ("auto", *models.ARCHITECTURES)}
    for field, names in registries.items():
        assert schema.choices(schema.fields()[field][1]) == names, field
        assert fv[field].parser.enum_values == list(names), field
    # A field declared with a range gets it from the one declaration, as the message says.
    declared = schema.fields()["beta1"][1]
    assert (declared.metadata["min"], declared.metadata["max"]) == (0, 1)
    assert schema.range_problem(declared, 1.0) == "must be < 1"
    assert schema.range_problem(declared, 0.0) is None

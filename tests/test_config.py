"""The config tree: presets, params overlay, overrides and their errors."""

import pytest

from mme.config import SPEED_ONLY, ConfigError, config_from_dict, load_config, result_tree


def test_presets_differ_where_documented():
    smoke, mini, paper = (load_config(p) for p in ("smoke", "mini", "paper"))
    assert (smoke.data.num_frames, smoke.data.input_size) == (8, 64)
    assert (mini.data.num_frames, mini.data.input_size) == (16, 112)
    assert (paper.data.input_size, paper.model.name) == (224, "base")
    # the paper's pre-training settings (section 4 and Table 7 defaults)
    assert paper.mask.kind == "tube" and paper.mask.ratio == pytest.approx(0.7)
    assert (paper.target.length, paper.target.points_per_patch) == (6, 4)
    assert paper.pretrain.betas == (0.9, 0.95) and paper.pretrain.weight_decay == pytest.approx(0.05)
    assert paper.pretrain.base_lr == pytest.approx(1.5e-4)


def test_overrides_are_typed():
    cfg = load_config("mini", ["target.kind=pixel", "target.length=8", "mask.ratio=0.9",
                               "target.patch_norm=false", "pretrain.betas=[0.8, 0.9]",
                               "pretrain.base_lr=4e-3"])
    assert cfg.pretrain.base_lr == pytest.approx(4e-3)
    assert cfg.target.kind == "pixel" and cfg.target.length == 8
    assert cfg.mask.ratio == pytest.approx(0.9) and cfg.target.patch_norm is False
    assert cfg.pretrain.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("target.kinds=traj", "unknown config key 'target.kinds'"),
        ("target.kind=optical", "target.kind='optical' is not allowed; choose one of pixel"),
        ("target.length=six", "target.length must be an integer"),
        ("mask.ratio=1.5", "mask.ratio=1.5 is out of range"),
        ("target.points_per_patch=3", "must be a square"),
        ("data.num_frames=15", "multiple of model.tubelet_size"),
        ("targetkind", "must look like key=value"),
    ],
)
def test_bad_values_name_the_key_and_the_choices(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("mini", [override])
    assert needle in str(err.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="choose one of smoke, mini, paper"):
        load_config("huge")


def test_params_file_sits_between_preset_and_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("preset: smoke\ntarget:\n  length: 5\nmask:\n  ratio: 0.5\n")
    cfg = load_config(None, ["mask.ratio=0.6"], params=params)
    assert cfg.preset == "smoke" and cfg.data.input_size == 64  # preset from params
    assert cfg.target.length == 5  # params beat the preset
    assert cfg.mask.ratio == pytest.approx(0.6)  # --set beats params
    bad = tmp_path / "bad.yaml"
    bad.write_text("target:\n  lenght: 5\n")
    with pytest.raises(ConfigError, match="target.lenght"):
        load_config(None, params=bad)


def test_round_trip_through_dict_and_digest():
    cfg = load_config("smoke", ["target.kind=hog+mbh", "seed=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.digest() == cfg.digest()
    assert load_config("smoke").digest() != cfg.digest()
    assert cfg.flat()["target.kind"] == "hog+mbh"


def test_string_fields_take_text_as_written(tmp_path):
    assert load_config("mini", ["data.flip=off"]).data.flip == "off"
    assert load_config("mini", ["data.flip=on"]).data.flip == "on"
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  flip: off\n")  # YAML 1.1 reads this as a boolean
    assert load_config(None, params=params).data.flip == "off"


def test_model_dimensions_default_to_the_named_size_and_explicit_values_win():
    from mme.models.registry import model_args

    assert model_args(load_config("mini"))["embed_dim"] == 192  # tiny
    assert model_args(load_config("mini", ["model.name=small"]))["embed_dim"] == 384
    # an explicit value equal to the old default still overrides the named size
    args = model_args(load_config("mini", ["model.name=small", "model.embed_dim=192"]))
    assert (args["embed_dim"], args["num_heads"]) == (192, 6)
    assert load_config("mini", ["model.depth=4", "model.depth=null"]).model.depth is None
    with pytest.raises(ConfigError, match="model.depth must be an integer"):
        load_config("mini", ["model.depth=deep"])


def test_result_tree_drops_exactly_the_speed_only_keys_and_the_idle_fallbacks():
    from mme.config import FALLBACKS, flatten

    cfg = load_config("mini", ["pretrain.compile=true", "data.num_workers=5"])
    full, kept = cfg.flat(), flatten(result_tree(cfg))
    assert set(full) - set(kept) == SPEED_ONLY | set(FALLBACKS)  # pretrain.stride 0: takes data.stride
    for stride, kept_key in ((3, False), (2, True), (0, False)):  # data.stride is 3 on mini
        assert ("pretrain.stride" in flatten(result_tree(load_config("mini", [f"pretrain.stride={stride}"])))) \
            is kept_key
    assert all(kept[k] == full[k] for k in kept)
    partial = flatten(result_tree(cfg, keep=frozenset({"data.num_workers"})))
    assert partial["data.num_workers"] == 5 and "pretrain.compile" not in partial
    assert cfg.flat() == full  # the config itself is untouched


def test_a_fallback_key_left_at_zero_takes_its_fallbacks_value_where_the_stages_read_it():
    from mme.targets.base import TargetGeometry

    for overrides, stride in (([], 3), (["pretrain.stride=1"], 1), (["data.stride=2"], 2),
                              (["data.stride=2", "pretrain.stride=4"], 4)):
        cfg = load_config("mini", overrides)
        assert cfg.value("pretrain.stride") == TargetGeometry.from_cfg(cfg).stride == stride, overrides
        assert cfg.value("data.stride") == cfg.data.stride  # not a FALLBACKS key: its own value

import pytest

from dladiff.config import builtin_config_names, config_to_dict, load_config, with_overrides
from dladiff.errors import ConfigError


def test_every_builtin_config_loads():
    names = builtin_config_names()
    assert {"default", "smoke", "ablation_no_dsur", "ablation_no_adft"} <= set(names)
    for name in names:
        load_config(name)


def test_default_is_the_paper_setting():
    cfg = load_config()
    assert cfg.model.id == "stabilityai/stable-diffusion-2-1-base" and cfg.model.resolution == 512
    assert cfg.layer1.stage1_steps + cfg.layer1.stage2_steps == 6 and cfg.layer1.stage3_steps == 3
    assert cfg.layer1.dsur and cfg.layer1.adft


def test_ablations_are_config_switches():
    assert not load_config("ablation_no_dsur").layer1.dsur
    assert load_config("ablation_no_dsur").layer1.stage2_steps == 6
    assert not load_config("ablation_no_adft").layer1.adft


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layer1:\n  epsilom: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*layer1.*epsilom"):
        load_config(path)


def test_wrong_type_is_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layer1:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"layer1.epochs: expected an integer"):
        load_config(path)


def test_bad_literal_and_yaml(tmp_path):
    (tmp_path / "lit.yaml").write_text("runtime:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match="precision"):
        load_config(tmp_path / "lit.yaml")
    (tmp_path / "broken.yaml").write_text("layer1: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_inherit_merges_sections(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("inherit: smoke\nlayer1:\n  epochs: 7\n")
    cfg = load_config(path)
    assert cfg.layer1.epochs == 7 and cfg.model.id == "builtin:tiny-sd"


def test_missing_config_lists_builtins():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no-such-config")


def test_overrides_validate():
    cfg = with_overrides(load_config("smoke"), model={"id": "x"})
    assert cfg.model.id == "x"
    assert config_to_dict(cfg)["layer1"]["attention"]["resolutions"] == [4, 8]
    with pytest.raises(ConfigError):
        with_overrides(cfg, layer1={"epsilon": "big"})


def test_parse_overrides_reads_yaml_values():
    from dladiff.config import parse_overrides

    assert parse_overrides(["layer2.epsilon=0.05", "layer2.full_resolution=true", "model.id=x"]) == {
        "layer2": {"epsilon": 0.05, "full_resolution": True}, "model": {"id": "x"}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["epsilon=0.1"])

from pathlib import Path

import numpy as np
import pytest

from dladiff.config import builtin_config_names, config_to_dict, load_config, with_overrides
from dladiff.errors import ConfigError
from dladiff.methods.registry import method_class
from dladiff.protect import allowed_linf_255

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_builtin_config_loads():
    names = builtin_config_names()
    assert {"default", "smoke", "ablation_no_dsur", "ablation_no_adft"} <= set(names)
    for name in names:
        load_config(name)


def test_default_is_the_paper_setting():
    cfg = load_config()
    assert cfg.model.id == "stabilityai/stable-diffusion-2-1-base" and cfg.model.resolution == 512
    l1, l2 = cfg.layer1, cfg.layer2
    assert (l1.epsilon, l1.step_size, l1.epochs) == (0.05, 0.005, 50)
    assert (l1.stage1_steps, l1.stage2_steps, l1.stage3_steps) == (3, 3, 3)
    assert l1.dsur and l1.adft and cfg.method.name == "dladiff" and not cfg.eot.on(1)  # EOT: layer 2 only
    assert cfg.prompt.instance == "a photo of sks person" and cfg.prompt.trigger == "sks"
    assert (l2.epsilon, l2.step_size, l2.steps) == (0.063, 0.01, 50)  # 8/255: the in-loop targets of docs/layer2.md
    assert l2.weighting == "normalized" and l2.encoders == "auto"
    paper = load_config("layer2_paper").layer2
    assert (paper.epsilon, paper.weighting, paper.momentum, paper.ti_kernel) == (0.05, "fixed", 0.0, 0)


def test_readme_states_the_default_config():
    """The README's `default` row names each default; layer 2's MI+DI+TI is said to be ours, not the paper's."""
    row = next(line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| `default` |"))
    cfg = load_config()
    l1, l2 = cfg.layer1, cfg.layer2
    stated = {"η1 = ": l1.epsilon, "α1 = ": l1.step_size, "E = ": l1.epochs, "n1 = n2 = n3 = ": l1.stage3_steps,
              "η2 = ": l2.epsilon, "α2 = ": l2.step_size, "momentum ": l2.momentum,
              "input diversity p = ": l2.diversity_probability, "TI kernel ": l2.ti_kernel}
    for text, value in stated.items():
        assert f"{text}{value:g}" in row, text
    assert f"{l2.steps} steps" in row and "MI+DI+TI" in row and "paper does not use" in row
    assert l1.stage1_steps == l1.stage2_steps == l1.stage3_steps


def test_readme_states_the_combined_bound():
    cfg = load_config()
    combined = np.floor(cfg.layer1.epsilon * 127.5 + 1e-6) + np.floor(cfg.layer2.epsilon * 127.5 + 1e-6)
    assert combined == allowed_linf_255(cfg, (1, 2)) == 14
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "floor(η1·127.5) + floor(η2·127.5) in 0-255 units: 14/255 by default" in text


def test_ablations_are_config_switches():
    assert not load_config("ablation_no_dsur").layer1.dsur
    dladiff = method_class("dladiff")
    assert dladiff(load_config("ablation_no_dsur")).pgd_steps == (0, 6)  # the PGD budget of the full method
    assert dladiff(load_config("default")).pgd_steps == (3, 3)
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


def test_eot_layers_choose_where_eot_applies():
    cfg = load_config("smoke")
    assert not cfg.eot.on(1) and cfg.eot.on(2)  # the default
    both = load_config("eot").eot
    assert both.on(1) and both.on(2)
    layer2 = with_overrides(cfg, eot={"enabled": True, "layers": [2]})
    assert not layer2.eot.on(1) and layer2.eot.on(2)
    assert not with_overrides(cfg, eot={"enabled": False, "layers": [2]}).eot.on(2)
    for bad in ([], [3]):
        with pytest.raises(ConfigError, match="eot.layers"):
            with_overrides(cfg, eot={"layers": bad})


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


def test_a_file_without_inherit_gets_the_default_yaml_values(tmp_path):
    """The dataclass defaults are the shipped default.yaml: a partial config means the same either way."""
    path = tmp_path / "partial.yaml"
    path.write_text("layer2:\n  steps: 2\n")
    assert config_to_dict(load_config(path)) == config_to_dict(with_overrides(load_config(), layer2={"steps": 2}))

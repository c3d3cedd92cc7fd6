"""Every shipped config parses into a SAELens runner config with an ITDA training config."""

from pathlib import Path

import pytest

from sae_lens_itda import ITDATrainingSAEConfig
from sae_lens_itda.cli import load_runner_config

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if not p.name.startswith("layer-matching"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    cfg = load_runner_config(path)
    assert isinstance(cfg.sae, ITDATrainingSAEConfig)
    assert cfg.hook_name and cfg.model_name and cfg.sae.d_in > 0


def test_bad_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: x\nsae:\n  d_in: 8\n  not_a_field: 1\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_runner_config(bad)
    (tmp_path / "nosae.yaml").write_text("model_name: x\n")
    with pytest.raises(ValueError, match="sae:"):
        load_runner_config(tmp_path / "nosae.yaml")


# Datasets that need a loading script, which datasets >= 4 refuses.
LOADING_SCRIPT_DATASETS = {"Skylion007/openwebtext", "openwebtext", "the_pile", "EleutherAI/pile"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_load_with_todays_datasets_and_transformers(path):
    cfg = load_runner_config(path)
    assert cfg.dataset_path not in LOADING_SCRIPT_DATASETS
    # transformers 5 lets `dtype` win over `torch_dtype`: configs say `dtype`.
    assert "torch_dtype" not in (cfg.model_from_pretrained_kwargs or {})

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


@pytest.mark.parametrize(
    "text, message",
    [("model_name: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "must hold a mapping of settings, not a list"),
     ("just a string\n", "not a str"), ("model_name: x\nsae:\n  d_in: 8\n  k: 0\n", "k must be a positive integer")],
)
def test_malformed_or_nonsense_yaml_is_named(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        load_runner_config(tmp_path / "c.yaml")
    assert "c.yaml" in str(e.value)


def test_eval_without_a_model_name_or_with_no_tokens_is_refused_early(tmp_path):
    import argparse

    import torch

    from sae_lens_itda import ITDA
    from sae_lens_itda.cli import evaluate_cmd

    ITDA.from_atoms(torch.randn(10, 8), k=2).save_model(tmp_path / "d")  # no metadata.model_name
    args = argparse.Namespace(path=str(tmp_path / "d"), model=None, eval_tokens=100, ce_batches=0, device="cpu",
                              dataset="shakespeare", split="test", model_class_name=None)
    with pytest.raises(ValueError, match="does not record the model it was built on: pass --model"):
        evaluate_cmd(args)
    args.eval_tokens = 0
    with pytest.raises(ValueError, match="--eval-tokens"):
        evaluate_cmd(args)
# Datasets that need a loading script, which datasets >= 4 refuses.
LOADING_SCRIPT_DATASETS = {"Skylion007/openwebtext", "openwebtext", "the_pile", "EleutherAI/pile"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_load_with_todays_datasets_and_transformers(path):
    cfg = load_runner_config(path)
    assert cfg.dataset_path not in LOADING_SCRIPT_DATASETS
    # transformers 5 lets `dtype` win over `torch_dtype`: configs say `dtype`.
    assert "torch_dtype" not in (cfg.model_from_pretrained_kwargs or {})


def test_help_of_the_command_line_and_of_every_command_prints():
    """``--help`` %-formats every help text: a bare "1%" once crashed ``sae-lens-itda --help``."""
    import argparse

    from sae_lens_itda.cli import COMMANDS, build_parser

    parser = build_parser()
    top = parser.format_help()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMANDS) | {"train", "demo", "eval"} <= set(sub.choices)
    assert "1% and 10%" in top  # the converged-sae line, unescaped
    for name, command in sub.choices.items():
        assert command.format_help().startswith(f"usage: sae-lens-itda {name}")

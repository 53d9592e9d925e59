"""The command line shows what it runs with: `--version`, `mme config --show`, each stage's keys in its
`--help`, and a params.yaml whose `preset:` label was edited without its values fails with the fix."""

from __future__ import annotations

import pytest
import yaml

import mme
from mme.cli import STAGE_KEYS, main
from mme.config import load_config, params_tree


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mme {mme.__version__}"


def test_config_show_prints_the_resolved_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--show", "--preset", "smoke", "--set", "seed=3", "--set", "probe.lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == params_tree(load_config("smoke", ["seed=3", "probe.lr=0.5"]))
    assert shown["data"]["input_size"] == 64 and shown["probe"]["lr"] == 0.5


def test_stage_help_lists_its_keys_with_values(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    out = capsys.readouterr().out
    flat = load_config("mini").flat()
    for key in STAGE_KEYS["probe"]:
        assert f"  {key} = {flat[key]!r}" in out
    assert "finetune.base_lr" not in out and "data.num_workers" in out.split("speed only")[1]


def test_a_relabelled_params_file_fails_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["params", "--preset", "mini"]) == 0
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("preset: mini", "preset: smoke"))
    capsys.readouterr()
    assert main(["config", "--show"]) == 2
    err = capsys.readouterr().err
    assert "'mini' preset's values" in err and "mme params --preset smoke" in err


def test_an_edited_params_file_of_its_own_preset_applies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["params", "--preset", "smoke"]) == 0
    tree = yaml.safe_load((tmp_path / "params.yaml").read_text())
    tree["pretrain"]["epochs"], tree["data"]["input_size"] = 3, 32  # user edits, a few keys
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    capsys.readouterr()
    assert main(["config", "--show"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["pretrain"]["epochs"] == 3 and shown["data"]["input_size"] == 32 and shown["preset"] == "smoke"
    # Relabelled, with an edit on a key all presets share, it still holds smoke's values: refused.
    tree = yaml.safe_load((tmp_path / "params.yaml").read_text()) | {"seed": 4}
    tree["pretrain"]["epochs"], tree["data"]["input_size"] = 1, 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree | {"preset": "mini"}, sort_keys=False))
    assert main(["config", "--show"]) == 2 and "'smoke' preset's values" in capsys.readouterr().err

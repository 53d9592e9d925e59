"""The command line: shared options, config errors as one clear line, exit codes."""

import subprocess
import sys

from mme.cli import build_parser, main


def test_every_stage_takes_the_shared_options():
    parser = build_parser()
    for command in ("download", "extract", "pretrain", "finetune", "probe", "evaluate", "report"):
        args = parser.parse_args([command, "--preset", "smoke", "--set", "seed=1", "--set", "mask.ratio=0.5",
                                  "--workdir", "/tmp/x"])
        assert args.preset == "smoke" and args.overrides == ["seed=1", "mask.ratio=0.5"]
        assert str(args.workdir) == "/tmp/x"


def test_bad_override_fails_with_exit_2_and_names_the_key(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--set", "target.kind=optical"]) == 2
    err = capsys.readouterr().err
    assert "target.kind='optical' is not allowed" in err and "traj" in err


def test_python_dash_m_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mme", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "inspect-targets" in out.stdout


def test_params_file_round_trips_and_applies_only_to_its_preset(tmp_path, monkeypatch, capsys):
    from mme.cli import resolve_params
    from mme.config import load_config

    monkeypatch.chdir(tmp_path)
    assert main(["params", "--preset", "smoke", "--set", "target.length=5"]) == 0
    assert load_config(None, params=tmp_path / "params.yaml") == load_config("smoke", ["target.length=5"])
    parser = build_parser()
    assert resolve_params(parser.parse_args(["pretrain"])) is not None
    assert resolve_params(parser.parse_args(["pretrain", "--preset", "smoke"])) is not None
    assert resolve_params(parser.parse_args(["pretrain", "--preset", "mini"])) is None
    assert "ignoring it for --preset mini" in capsys.readouterr().err

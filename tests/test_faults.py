"""Faults and bad input: nothing trained is lost, every dropped input is named, every failure is one line.

Each test reproduces one way a new user broke a smoke workdir (a negative count, a truncated flow cache,
a symlink / pipe / `-` / directory output, a broken params.yaml, a non-checkpoint `--init`, a read-only
reports/, a resume with other settings, a checkpoint of another depth, Ctrl-C, file modes) and checks
the outcome: exit code, one stderr line naming the key or file, and files left as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from mme.cli import build_parser, main, resolve_params
from mme.config import ConfigError, load_config
from mme.data.lists import read_list
from mme.engine.checkpointing import FINAL, LAST, resume_mismatches, save_checkpoint
from mme.engine.tracking import EpochRecorder
from mme.models import build_classifier, read_checkpoint
from mme.models.checkpoint import CheckpointError, load_checkpoint
from mme.motion.cache import flow_cache_path
from mme.paths import Paths
from mme.utils import atomic_path, read_metrics, report_skipped, write_json, write_text_atomic


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {err!r}"
    return lines[0]


def error_line(err: str) -> str:
    """The one `mme ...:` line of a stage's stderr (progress bars may come before it), and no traceback."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("mme")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def own_store(monkeypatch):
    """Each run logs to its workdir's store: `mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which an
    earlier in-process run of another workdir would otherwise leave behind."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, extracted_workdir) -> Path:
    """The extracted smoke workdir after one `mme pretrain` (treat as read-only; copy it to modify)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    workdir = tmp_path_factory.mktemp("pretrained")
    shutil.copytree(extracted_workdir / "data", workdir / "data")
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(workdir)]) == 0
    return workdir


@pytest.fixture
def work(tmp_path, pretrained, monkeypatch) -> Path:
    """A private copy of the pre-trained workdir; the cwd is an empty folder (no params.yaml)."""
    shutil.copytree(pretrained, tmp_path / "w")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "w"


# --- bug 1: counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, low", [
    ("pretrain.epochs=-1", 1), ("pretrain.epochs=0", 1), ("finetune.batch_size=0", 1), ("probe.epochs=0", 1),
    ("data.num_workers=-1", 0), ("evaluate.num_clips=0", 1), ("evaluate.num_crops=0", 1),
    ("pretrain.accum_steps=0", 1), ("finetune.warmup_epochs=-2", 0), ("data.synthetic.num_videos=0", 1),
])
def test_every_count_is_validated(override, low):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=-?\d+ is out of range: it must be an integer >= {low}$"):
        load_config("smoke", [override])


def test_negative_epochs_fail_at_once_and_keep_the_trained_model(work, capsys):
    final = work / "models/pretrain" / FINAL
    before = final.read_bytes()
    capsys.readouterr()
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(work), "--set", "pretrain.epochs=-1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "pretrain.epochs=-1" in line and ">= 1" in line
    assert final.read_bytes() == before


def test_an_untrained_final_checkpoint_never_replaces_a_trained_one(tmp_path):
    model = torch.nn.Linear(2, 2)
    final = tmp_path / FINAL
    save_checkpoint(final, model=model, epoch=1, step=4)
    with pytest.raises(CheckpointError, match="refusing to replace .*trained for 4 updates"):
        save_checkpoint(final, model=torch.nn.Linear(2, 2), epoch=0, step=0)
    assert torch.equal(read_checkpoint(final)["model"]["weight"], model.weight.detach())
    save_checkpoint(final, model=model, epoch=2, step=8)  # a trained run replaces it
    assert read_checkpoint(final)["step"] == 8
    save_checkpoint(tmp_path / "fresh" / FINAL, model=model, epoch=0, step=0)  # nothing to protect
    save_checkpoint(tmp_path / LAST, model=model, epoch=0, step=0)  # only the final file is guarded


# --- bug 2: dropped inputs ----------------------------------------------------------------------------


def test_a_truncated_flow_cache_is_named_listed_and_counted(work, capsys):
    rel = read_list(Paths(work).list_file("synthetic", "train"))[0][0]
    cache = flow_cache_path(work, "synthetic", rel)
    os.truncate(cache, cache.stat().st_size // 2)
    capsys.readouterr()
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert sum(f"pretrain: skipped {rel}: " in line for line in err.splitlines()) == 1
    lines = Paths(work).skipped_file.read_text().splitlines()
    assert [line.split("\t")[:2] for line in lines if line.startswith("pretrain\t")] == [["pretrain", rel]]
    metrics = read_metrics(Paths(work).metrics_dir / "pretrain.json")
    assert metrics["num_skipped"] == 1 and metrics["skipped"][0]["video"] == rel
    assert str(cache) in metrics["skipped"][0]["reason"]


def test_a_stage_rerun_without_drops_clears_its_block_only(tmp_path, capsys):
    skip_file = tmp_path / "skipped.txt"
    report_skipped(skip_file, "extract", [("a.mp4", "broken")], log=False)
    assert report_skipped(skip_file, "pretrain", [("b.mp4", "flow cache truncated")]) == {
        "num_skipped": 1, "skipped": [{"video": "b.mp4", "reason": "flow cache truncated"}]}
    assert capsys.readouterr().err == "pretrain: skipped b.mp4: flow cache truncated\n"
    assert report_skipped(skip_file, "pretrain", [])["num_skipped"] == 0
    assert skip_file.read_text() == "extract\ta.mp4\tbroken\n"


# --- bug 3 and 7: special targets and file modes --------------------------------------------------------


def test_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.yaml"
    target.write_text("old")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "sub" / "made.yaml")
    write_text_atomic(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "sub" / "made.yaml").read_text() == "made"


def test_pipes_and_descriptor_links_are_written_to_not_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_text_atomic(fifo, "through the pipe")
    reader.join(timeout=10)
    assert received == ["through the pipe"] and fifo.is_fifo()
    # /dev/stdout is a link to /proc/self/fd/1; the same kind of link to a file must not replace the file.
    out = tmp_path / "captured.txt"
    with open(out, "w") as handle:
        link = tmp_path / "stdout"
        link.symlink_to(f"/proc/self/fd/{handle.fileno()}")
        write_text_atomic(link, "via the descriptor")
        assert link.is_symlink()
    assert out.read_text() == "via the descriptor"


def test_params_out_dash_is_stdout_and_a_directory_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["params", "--preset", "smoke", "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert not (tmp_path / "-").exists()
    assert load_config(None, params=_write(tmp_path / "p.yaml", captured.out)) == load_config("smoke")
    assert json.loads(captured.err)["written"] == "-"
    assert main(["params", "--preset", "smoke", "--out", str(tmp_path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(tmp_path) in line and "is a directory" in line


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        save_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(1, 1), epoch=1, step=1)
        stale = tmp_path / "stale.txt"
        stale.write_text("x")
        os.chmod(stale, 0o600)  # what the temp-file default left behind before
        write_text_atomic(stale, "y")
        with atomic_path(tmp_path / "raw.bin") as tmp:
            tmp.write_bytes(b"\0")
    finally:
        os.umask(old)
    for name in ("m.json", "c.pt", "stale.txt", "raw.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# --- bug 4: one line instead of tracebacks --------------------------------------------------------------


def test_a_broken_params_yaml_is_one_line_and_ignored_for_another_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("preset: smoke\ndata:\n  stride: [2\n")
    assert main(["pretrain", "--workdir", str(tmp_path / "w")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "params.yaml is not valid YAML at line" in line and "mme params" in line
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(tmp_path / "w")]) == 2  # the file is for smoke
    one_line(capsys.readouterr().err)
    assert resolve_params(build_parser().parse_args(["pretrain", "--preset", "mini"])) is None  # not parsed
    assert "ignoring it" in capsys.readouterr().err


@pytest.mark.parametrize("content, expected", [(b"", "is empty"), (b"hello, not weights\n", "is not a PyTorch")])
def test_a_non_checkpoint_init_is_one_line(work, capsys, content, expected):
    bad = work / "bad.pt"
    bad.write_bytes(content)
    capsys.readouterr()
    assert main(["finetune", "--preset", "smoke", "--workdir", str(work), "--init", str(bad)]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(bad) in line and expected in line
    assert not (work / "models/finetune" / FINAL).exists()


def test_a_read_only_reports_folder_fails_before_the_work(work, capsys):
    shutil.rmtree(work / "reports")
    (work / "reports").symlink_to("/sys/kernel")  # read-only for every user, root included
    last = work / "models/pretrain" / LAST
    before = last.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(work)]) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot write to" in line and "reports/metrics" in line and "--workdir" in line
    assert last.stat().st_mtime_ns == before  # no epoch was trained


def test_resume_with_another_model_or_batch_is_refused_naming_the_key(work, capsys):
    last = work / "models/pretrain" / LAST
    before = last.read_bytes()
    capsys.readouterr()
    for override, key in (("model.depth=3", "model.depth"), ("pretrain.batch_size=2", "pretrain.batch_size")):
        assert main(["pretrain", "--preset", "smoke", "--workdir", str(work), "--resume", "--set", override]) == 1
        line = one_line(capsys.readouterr().err)
        assert f"{key}=" in line and f"--set {key}=" in line and "without --resume" in line
    assert last.read_bytes() == before
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(work), "--resume",
                 "--set", "pretrain.base_lr=1e-3"]) == 0  # a learning rate may change on resume


def test_resume_keys_cover_model_geometry_and_the_stage_batch():
    saved = load_config("smoke").to_dict()
    for override, key in (("finetune.accum_steps=2", "finetune.accum_steps"), ("data.input_size=32", "data.input_size"),
                          ("model.embed_dim=96", "model.embed_dim"), ("data.num_frames=4", "data.num_frames")):
        changed = resume_mismatches(saved, load_config("smoke", [override]).to_dict(), "finetune")
        assert [k for k, _, _ in changed] == [key]
    assert resume_mismatches(saved, load_config("smoke", ["pretrain.batch_size=2"]).to_dict(), "finetune") == []
    assert resume_mismatches(saved, load_config("smoke", ["finetune.epochs=3"]).to_dict(), "finetune") == []


def test_ctrl_c_is_one_line_exit_130_run_killed_last_kept(work, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    record = EpochRecorder.record

    def interrupted(self, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt
        record(self, epoch, metrics)

    monkeypatch.setattr(EpochRecorder, "record", interrupted)
    shutil.rmtree(work / "models/pretrain")
    capsys.readouterr()
    assert main(["pretrain", "--preset", "smoke", "--workdir", str(work), "--set", "pretrain.epochs=3"]) == 130
    line = error_line(capsys.readouterr().err)
    assert "interrupted" in line and "--resume" in line
    assert read_checkpoint(work / "models/pretrain" / LAST, full=True)["epoch"] == 1
    assert not (work / "models/pretrain" / FINAL).exists()
    client = MlflowClient(Paths(work).mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("mme-synthetic").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs[0].info.status == "KILLED"


# --- bug 7: a checkpoint of another depth ------------------------------------------------------------------


def test_init_of_another_depth_is_refused_unless_allow_partial(work, capsys):
    ckpt = work / "models/pretrain" / FINAL
    depth = read_checkpoint(ckpt)["model_args"]["depth"]
    capsys.readouterr()
    args = ["finetune", "--preset", "smoke", "--workdir", str(work), "--set", f"model.depth={depth + 1}"]
    assert main(args) == 1
    line = one_line(capsys.readouterr().err)
    assert str(ckpt) in line and "encoder weights missing" in line and "--allow-partial" in line
    assert f"the file has {depth} blocks, the model {depth + 1}" in line
    deeper = build_classifier(load_config("smoke", [f"model.depth={depth + 1}"]), 12)
    report = load_checkpoint(deeper, ckpt, verbose=False, allow_partial=True)
    assert report.missing and all(k.startswith(f"blocks.{depth}.") or k.startswith("head") or "norm" in k
                                  for k in report.missing)
    shallower = build_classifier(load_config("smoke", [f"model.depth={depth - 1}"]), 12)  # smoke: 2 blocks
    with pytest.raises(CheckpointError, match=r"0 encoder weights missing, \d+ unexpected, e.g. blocks\."):
        load_checkpoint(shallower, ckpt, verbose=False)
    assert main(args + ["--allow-partial"]) == 0

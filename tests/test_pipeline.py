"""End to end: `dvc repro` on the smoke preset in a temporary copy of the repository.

Checks every stage's outputs, the metrics JSON, the MLflow runs in the workdir's mlflow.db, that
changing only worker counts leaves `dvc status` clean, that changing one fine-tuning parameter re-runs
only the stages downstream of fine-tuning, and the remote workflow: `dvc push` to a local-directory
remote, a second `git clone`, `dvc pull` there brings the flow caches and checkpoints without running a
stage. (`report` is `always_changed`, so `dvc status` always names it.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _copy_repo(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("reports/", "data/", "models/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _status(dvc: str, repo: Path) -> dict:
    """`dvc status` without the `report` stage, which is always changed by design."""
    status = json.loads(_run([dvc, "status", "--json"], repo).stdout or "{}")
    assert "always changed" in json.dumps(status.get("report", "always changed")), status
    return {stage: what for stage, what in status.items() if stage != "report"}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dvc_repro_smoke_pipeline(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    mme = str(Path(sys.executable).parent / "mme")
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([mme, "params", "--preset", "smoke"], repo)
    _run([dvc, "repro"], repo)

    for rel in ("data/lists/synthetic/train.csv", "models/pretrain/checkpoint.pt", "models/finetune/checkpoint.pt",
                "reports/plots/pretrain.csv", "reports/figures/confusion.png", "dvc.lock"):
        assert (repo / rel).exists(), rel
    flows = list((repo / "data/flow/synthetic").rglob("*.npz"))
    train = (repo / "data/lists/synthetic/train.csv").read_text().split()[::2]  # flow is made for train only
    assert len(flows) == len(train) == 16
    metrics = {name: json.loads((repo / f"reports/metrics/{name}.json").read_text())
               for name in ("download", "extract", "pretrain", "finetune", "probe", "evaluate", "probe_random",
                            "finetune_scratch", "evaluate_scratch", "baselines")}
    assert metrics["extract"]["extracted"] + metrics["extract"].get("reused", 0) == 16
    assert metrics["baselines"]["random_init_probe_top1"] == pytest.approx(metrics["probe_random"]["top1"])
    assert 0.0 <= metrics["evaluate"]["top1"] <= 100.0 and metrics["evaluate"]["top5"] >= metrics["evaluate"]["top1"]

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("mme-synthetic")
    runs = client.search_runs([experiment.experiment_id])
    stages = {run.data.tags["stage"] for run in runs if run.info.status == "FINISHED"}
    assert {"download", "extract", "pretrain", "finetune", "probe", "evaluate"} <= stages
    assert len({run.data.tags["pipeline"] for run in runs}) == 1  # one dvc repro, one pipeline tag
    del mlflow

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["num_workers"], params["flow"]["workers"], params["data"]["synthetic"]["workers"] = 1, 3, 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _status(dvc, repo) == {}, "changing only worker counts must not invalidate a stage"

    params["finetune"]["base_lr"] = params["finetune"]["base_lr"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([dvc, "status", "--json"], repo).stdout
    changed = set(json.loads(status))
    assert "finetune" in changed and not changed & {"download", "extract", "pretrain", "probe"}
    out = _run([dvc, "repro"], repo).stdout
    for stage in ("download", "extract", "pretrain", "probe"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Running stage 'finetune'" in out and "Running stage 'evaluate'" in out

    _push_clone_pull(repo, tmp_path / "remote", tmp_path / "clone", dvc)


def _push_clone_pull(repo: Path, remote: Path, clone: Path, dvc: str) -> None:
    """The remote workflow: commit what git tracks (.dvc/config with the remote included), push the cache,
    clone again and pull instead of recomputing; the clone is then up to date."""
    _run([dvc, "remote", "add", "-d", "local", str(remote)], repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "pipeline results and the remote")
    _run([dvc, "push"], repo)
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "models").exists()
    _run([dvc, "pull"], clone)
    assert len(list((clone / "data/flow/synthetic").rglob("*.npz"))) == 16
    for rel in ("models/pretrain/checkpoint.pt", "models/pretrain/last.pt", "models/finetune/checkpoint.pt",
                "models/probe/checkpoint.pt", "data/lists/synthetic/train.csv"):
        assert (clone / rel).is_file(), rel
    assert _status(dvc, clone) == {}
    out = _run([dvc, "repro"], clone).stdout
    assert "Running stage" not in out.replace("Running stage 'report'", ""), out

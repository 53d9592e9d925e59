"""What a smoke pretrain -> finetune leaves in MLflow: the encoder and the classifier as `mlflow.pytorch`
models (the classifier registered, loading back with the checkpoint's outputs), the video lists as
dataset inputs with their digest, system metrics, and run names that say what ran."""

from __future__ import annotations

import hashlib
import os
import shutil

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mme.config import load_config
from mme.engine.tracking import registered_name, tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, extracted_workdir):
    """A smoke workdir after `pretrain` and `finetune` (read-only for the tests): (workdir, results)."""
    from mme.stages import finetune, pretrain

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    workdir = tmp_path_factory.mktemp("trained")
    shutil.copytree(extracted_workdir / "data", workdir / "data")
    cfg = load_config("smoke")
    return workdir, {"pretrain": pretrain.run(cfg, workdir), "finetune": finetune.run(cfg, workdir)}


def _run(workdir, stage, results):
    return MlflowClient(tracking_uri(workdir)).get_run(results[stage]["mlflow_run_id"])


def test_registered_classifier_gives_the_checkpoint_outputs(trained):
    from mme.models.checkpoint import read_checkpoint
    from mme.models.registry import build_classifier

    workdir, results = trained
    cfg = load_config("smoke")
    assert registered_name(cfg) == "mme-synthetic-traj"
    mlflow.set_tracking_uri(tracking_uri(workdir))
    loaded = mlflow.pytorch.load_model("models:/mme-synthetic-traj/1").eval()
    ckpt = read_checkpoint(workdir / "models/finetune/checkpoint.pt")
    reference = build_classifier(cfg, ckpt["num_classes"])
    reference.load_state_dict(ckpt["model"])
    reference.eval()
    assert type(loaded) is type(reference)
    video = torch.randn(2, 3, cfg.data.num_frames, cfg.data.input_size, cfg.data.input_size,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(video), loaded(video)
    assert expected.shape == (2, ckpt["num_classes"]) and torch.equal(got, expected)
    version = MlflowClient(tracking_uri(workdir)).get_model_version("mme-synthetic-traj", "1")
    assert version.run_id == results["finetune"]["mlflow_run_id"]


def test_pretrain_logs_the_encoder_as_a_model(trained):
    from mme.models.checkpoint import read_checkpoint
    from mme.models.vit import VisionTransformer

    workdir, results = trained
    mlflow.set_tracking_uri(tracking_uri(workdir))
    run = _run(workdir, "pretrain", results)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    encoder = next(m for m in models if m.source_run_id == run.info.run_id)
    assert encoder.name == "encoder"
    loaded = mlflow.pytorch.load_model(encoder.model_uri)
    assert isinstance(loaded, VisionTransformer)
    weights = read_checkpoint(workdir / "models/pretrain/checkpoint.pt")["model"]
    encoder_weights = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    assert set(encoder_weights) == set(loaded.state_dict())
    assert all(torch.equal(encoder_weights[k], v) for k, v in loaded.state_dict().items())


def test_runs_carry_the_video_lists_with_their_digest(trained):
    workdir, results = trained
    list_dir = workdir / "data/lists/synthetic"
    for stage, splits in (("pretrain", {"train"}), ("finetune", {"train", "val"})):
        inputs = _run(workdir, stage, results).inputs.dataset_inputs
        by_name = {i.dataset.name: i for i in inputs}
        assert set(by_name) == {f"synthetic-{split}" for split in splits}, stage
        for split in splits:
            digest = hashlib.sha1((list_dir / f"{split}.csv").read_bytes()).hexdigest()[:16]
            assert by_name[f"synthetic-{split}"].dataset.digest == digest
            context = {t.key: t.value for t in by_name[f"synthetic-{split}"].tags}["mlflow.data.context"]
            assert context == ("training" if split == "train" else split)


def test_logging_the_lists_raises_no_schema_hints(extracted_workdir, tmp_path):
    """MLflow hints at integer columns when it infers the list's schema; the lists have no missing labels,
    so the hint is noise in every stage's log. In a child process: MLflow's tracking state is global."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import warnings, mlflow
        from mme.config import load_config
        from mme.engine.tracking import log_dataset_lists
        from mme.paths import Paths
        mlflow.set_tracking_uri(r"sqlite:///{tmp_path / 'hints.db'}")
        with mlflow.start_run(experiment_id=mlflow.create_experiment("hints")):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                log_dataset_lists(load_config("smoke"), Paths(r"{extracted_workdir}"), ("train", "val"))
        print("HINTS", sum("schema" in str(w.message) for w in caught))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HINTS 0" in out.stdout, out.stdout[-2000:]


def test_training_runs_have_system_metrics_and_say_what_ran(trained):
    workdir, results = trained
    for stage in ("pretrain", "finetune"):
        run = _run(workdir, stage, results)
        assert any(key.startswith("system/") for key in run.data.metrics), (stage, sorted(run.data.metrics))
        assert run.info.run_name == f"{stage} traj L=4 s=2 seed0"


def test_killed_then_resumed_pretrain_continues_the_same_run(tmp_path, extracted_workdir, monkeypatch):
    """Ctrl-C after epoch 1 leaves the run KILLED (not RUNNING); `--resume` continues that very run, so
    its loss history has every epoch once."""
    from mme.engine import fit
    from mme.engine.checkpointing import save_checkpoint
    from mme.stages import pretrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(extracted_workdir / "data", tmp_path / "data")
    cfg = load_config("smoke", ["pretrain.epochs=3"])

    def save_then_stop(path, **kw):
        save_checkpoint(path, **kw)
        if path.name == "last.pt" and kw["epoch"] == 1:
            raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(fit, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(cfg, tmp_path)
    client = MlflowClient(tracking_uri(tmp_path))
    [killed] = client.search_runs([client.get_experiment_by_name("mme-synthetic").experiment_id])
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(fit, "save_checkpoint", save_checkpoint)
    result = pretrain.run(cfg, tmp_path, resume=True)
    assert result["mlflow_run_id"] == killed.info.run_id
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(cfg.pretrain.epochs))

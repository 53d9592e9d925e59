"""Shared fixtures: the real config, CPU only, tmp work directories, a generated smoke dataset.

The session-scoped workdirs are built once by the real stages (download -> extract) and must be
treated as read-only by tests; copy what you need to modify into `tmp_path`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# The test machine (and CI) has no internet: MLflow's usage telemetry would try to send events at process exit.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mme.config import Config, load_config  # noqa: E402


@pytest.fixture
def smoke_cfg() -> Config:
    return load_config("smoke")


@pytest.fixture(scope="session")
def synthetic_workdir(tmp_path_factory) -> Path:
    """A workdir holding the smoke synthetic dataset (videos + lists), made by `mme download`."""
    from mme.stages import download

    workdir = tmp_path_factory.mktemp("synthetic")
    download.run(load_config("smoke"), workdir)
    return workdir


@pytest.fixture(scope="session")
def extracted_workdir(tmp_path_factory, synthetic_workdir) -> Path:
    """The smoke dataset plus its flow cache, made by `mme download` then `mme extract`."""
    import shutil

    from mme.stages import extract

    workdir = tmp_path_factory.mktemp("extracted")
    shutil.copytree(synthetic_workdir / "data", workdir / "data")
    extract.run(load_config("smoke"), workdir)
    return workdir

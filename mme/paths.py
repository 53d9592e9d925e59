"""Where every file of a work directory lives (docs/architecture.md, data flow).

All stages resolve their inputs and outputs through `Paths(workdir)`, so one `--workdir` moves a whole
pipeline (data, models, reports, MLflow and Optuna stores) to another root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    workdir: Path

    def __init__(self, workdir: str | Path = "."):
        object.__setattr__(self, "workdir", Path(workdir).resolve())

    def raw_dir(self, dataset: str) -> Path:
        return self.workdir / "data" / "raw" / dataset

    def downloads_dir(self, dataset: str) -> Path:
        return self.workdir / "data" / "downloads" / dataset

    def lists_dir(self, dataset: str) -> Path:
        return self.workdir / "data" / "lists" / dataset

    def list_file(self, dataset: str, split: str) -> Path:
        return self.lists_dir(dataset) / f"{split}.csv"

    def flow_dir(self, dataset: str) -> Path:
        return self.workdir / "data" / "flow" / dataset

    def decoded_dir(self, dataset: str) -> Path:
        return self.workdir / "data" / "decoded" / dataset

    def models_dir(self, stage: str) -> Path:
        return self.workdir / "models" / stage

    @property
    def reports(self) -> Path:
        return self.workdir / "reports"

    @property
    def metrics_dir(self) -> Path:
        return self.reports / "metrics"

    @property
    def plots_dir(self) -> Path:
        return self.reports / "plots"

    @property
    def results_dir(self) -> Path:
        """The ablation trials' stored parts (`mme.stages.chain`): the committed evidence behind the tables."""
        return self.reports / "results"

    @property
    def tables_dir(self) -> Path:
        return self.reports / "tables"

    @property
    def figures_dir(self) -> Path:
        return self.reports / "figures"

    @property
    def skipped_file(self) -> Path:
        return self.reports / "skipped.txt"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.workdir / "mlartifacts"

    @property
    def optuna_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'optuna.db'}"

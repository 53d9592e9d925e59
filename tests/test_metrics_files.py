"""`write_metrics` keeps DVC's metrics files numeric and loses nothing: the rest goes to `<stage>.info.json`."""

from __future__ import annotations

import json
import math

from mme.utils import info_path, read_metrics, write_metrics


def test_numbers_in_the_metrics_file_the_rest_beside_it(tmp_path):
    result = {"top1": 51.5, "num_videos": 24, "flag": True, "mlflow_run_id": "abc", "missing": float("nan"),
              "per_class_accuracy": {"a": 50.0, "b": 53.0}, "settings": {"workers": 2, "backend": "dis"},
              "confusion": [[1, 0], [0, 1]], "pretrain_run_id": None}
    path = tmp_path / "evaluate.json"
    write_metrics(path, result, details=("per_class_accuracy",))
    numbers = json.loads(path.read_text())
    assert numbers == {"top1": 51.5, "num_videos": 24, "settings": {"workers": 2}}
    info = json.loads(info_path(path).read_text())
    assert info["confusion"] == [[1, 0], [0, 1]] and info["per_class_accuracy"] == {"a": 50.0, "b": 53.0}
    back = read_metrics(path)
    assert back.keys() == result.keys() and math.isnan(back.pop("missing"))
    assert back == {k: v for k, v in result.items() if k != "missing"}


def test_an_all_numeric_result_still_writes_its_info_file(tmp_path):
    write_metrics(tmp_path / "pretrain.json", {"loss": 0.5})
    assert json.loads((tmp_path / "pretrain.info.json").read_text()) == {}

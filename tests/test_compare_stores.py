"""experiments/compare_stores.py: the paired difference between two stores of the same trial parts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mme.reports import per_clip

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "compare_stores.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_stores_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_stores_script"] = module
    spec.loader.exec_module(module)
    return module


def _store(root: Path, correct: np.ndarray, platform: dict | None) -> Path:
    clips = [f"clip{i:03d}" for i in range(len(correct))]
    record = per_clip.PerClip(tuple(clips), {"ft_top1": correct})
    root.mkdir(parents=True)
    data = {"metrics": {"ft_top1": 100 * correct.mean()}, "per_clip": per_clip.encode(record), "trial_dir": "t"}
    if platform:
        data["platform"] = platform
    (root / "finetune-abc.json").write_text(json.dumps(data))
    (root / f"probe-only-in-{root.name}.json").write_text(json.dumps({"metrics": {}, "per_clip": None}))
    return root


def test_identical_stores_differ_by_nothing_and_a_known_flip_is_measured(tmp_path, script, capsys):
    base = (np.arange(200) % 2).astype(np.float64)  # 100 of 200 right
    flipped = base.copy()
    flipped[:20] = 1.0  # 10 of the 20 were wrong: b is right on 10 more clips, +5 points, same answer on 190
    a = _store(tmp_path / "a", base, {"cpu": "X", "bf16": "amx"})
    same = script.compare(a, _store(tmp_path / "same", base, None))
    assert [(r["delta"], r["low"], r["high"], r["agree"]) for r in same] == [(0.0, 0.0, 0.0, 100.0)]
    other = script.compare(a, _store(tmp_path / "b", flipped, {"gpu": "G"}))
    (row,) = other
    assert row["part"] == "finetune-abc.json" and row["clips"] == 200
    assert row["delta"] == pytest.approx(5.0) and row["low"] > 0 and row["agree"] == pytest.approx(95.0)
    assert "a = X (amx bf16), b = G" in capsys.readouterr().out


def test_a_missing_store_is_named(tmp_path, script, capsys):
    assert script.main([str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "nope is not a directory" in capsys.readouterr().err

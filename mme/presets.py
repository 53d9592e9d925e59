"""The named presets: overlays on the config's defaults (`mme.config`), keyed by name.

Each preset lists only the keys that differ from the defaults; `load_config` applies it before params.yaml
and `--set`. Pure data, so the config module stays the only code that interprets it.
"""

from __future__ import annotations

from typing import Any

# Named overlays (their sizing: docs/deviations.md, Scale). Only the keys that differ from the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": {
            "short_side": 64, "input_size": 64, "num_frames": 8, "stride": 2, "num_workers": 0,
            "synthetic": {"num_videos": 24, "num_frames": 32, "size": 64, "workers": 1},
        },
        "target": {"length": 4},
        "model": {"name": "smoke", "drop_path": 0.0},
        "pretrain": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0},
        "finetune": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "mixup": 0.0, "cutmix": 0.0},
        "probe": {"epochs": 5, "batch_size": 8},
        "evaluate": {"num_clips": 1, "num_crops": 1, "batch_size": 4},
    },
    # Why the generated set is shaped this way (one shared look, magnified, no pan): docs/deviations.md.
    "mini": {
        "data": {"decoded_cache": True, "synthetic": {"num_frames": 48, "distractors": 0, "camera_pan": False,
                 "appearance": "shared", "zoom": 1.6, "num_videos": 3072, "val_videos": 1200, "test_videos": 1200}},
        "model": {"name": "tiny", "depth": 6, "drop_path": 0.05},
        "pretrain": {"epochs": 16, "base_lr": 4e-3, "warmup_epochs": 1},
        "finetune": {"epochs": 10, "batch_size": 8, "base_lr": 8e-3, "warmup_epochs": 1, "mixup": 0.0,
                     "cutmix": 0.0, "val_every": 5},
        "evaluate": {"num_clips": 1, "num_crops": 1}},
    "paper": {
        "data": {"short_side": 256, "input_size": 224, "num_frames": 16, "stride": 3, "num_workers": 10},
        "flow": {"backend": "farneback"},
        "model": {"name": "base", "drop_path": 0.1},
        "pretrain": {"epochs": 400, "batch_size": 32, "warmup_epochs": 40},
        "finetune": {"epochs": 40, "batch_size": 24, "base_lr": 5e-4, "warmup_epochs": 5, "layer_decay": 0.75},
        "probe": {"epochs": 20},
        "evaluate": {"num_clips": 2, "num_crops": 3},
    },
}

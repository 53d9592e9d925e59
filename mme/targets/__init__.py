"""The reconstruction-target registry: one entry per `target.kind`, each declaring its parts and inputs.

| kind           | parts (per token; K=4, L=6, 16 px patches, tubelet 2)                    | flow |
|----------------|----------------------------------------------------------------------------|------|
| `pixel`        | pixel 1536 (VideoMAE)                                                      | no   |
| `motionmae`    | pixel 1536, diff 1536 (frame difference with the next original frame)    | no   |
| `hog`          | hog 36 (middle frame; x tubelet*s frames with target.interpolate)         | no   |
| `hog+flow`     | hog, flow 32 per frame                                                     | yes  |
| `hog+hof`      | hog, hof 40 per frame                                                      | yes  |
| `hog+mbh`      | hog, mbh 72 per frame                                                      | yes  |
| `hog+traj_pos` | hog 36 (middle frame), pos K*L*2 = 48                                      | yes  |
| `traj` (MME)   | pos K*L*2 = 48, shape K*L*9 = 216 (total 264)                              | yes  |
| `traj_official`| hog 108 (middle frame, per RGB channel), pos 2*L*K = 48 (the released code) | yes  |

`target.density` max/mean reduce K to 1 in `pos` and `shape`. Definitions: docs/targets.md; code:
`mme.targets.trajectory` (MME), `mme.targets.appearance` (baselines), `mme.targets.base` (the geometry,
the inputs (one clip: `TargetInputs`; a batch of clips on any device: `TargetBatch`, built in one call by
`TargetSpec.build_batch`) and the patch norm).
"""

from mme.targets import appearance, official, trajectory  # noqa: F401  (registers the kinds)
from mme.targets.base import (
    PATCH_NORM_EPS,
    TARGETS,
    PartValue,
    TargetBatch,
    TargetGeometry,
    TargetInputs,
    TargetSpec,
    get_target,
    pad_flow,
    standardize,
    target_parts,
)
from mme.targets.trajectory import Trajectories, track_tokens

__all__ = ["PATCH_NORM_EPS", "TARGETS", "PartValue", "TargetGeometry", "TargetBatch", "TargetInputs", "TargetSpec",
           "Trajectories", "get_target", "pad_flow", "standardize", "target_parts", "track_tokens"]

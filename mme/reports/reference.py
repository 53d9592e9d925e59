"""The paper's published numbers (Sun et al., "Masked Motion Encoding for Self-Supervised Video
Representation Learning", CVPR 2023): Tables 1-7 and Fig. 3, as the project's own copy.

The text below is kept byte-for-byte in sync with `shared/paper/reference_tables.csv` (a test compares
them when that file is present). Values are percentages as printed in the paper. These numbers are only
ever shown *beside* measured ones; nothing here is used to fill in or correct a measurement.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache

REFERENCE_CSV = """\
table,study,setting,metric,paper_value,notes
5,content,Pixel,top1,61.1,SSv2 ablation setting (smaller pretrain set; reduced fine-tune patches)
5,content,Pixel,top5,86.6,
5,content,HOG,top1,61.1,
5,content,HOG,top5,86.9,
5,content,HOG+Flow,top1,60.9,
5,content,HOG+Flow,top5,86.4,
5,content,HOG+HOF,top1,61.3,
5,content,HOG+HOF,top5,86.6,
5,content,HOG+MBH,top1,61.4,
5,content,HOG+MBH,top5,86.8,
5,content,HOG+Traj w/o shape,top1,63.5,
5,content,HOG+Traj w/o shape,top5,88.2,
5,content,Traj,top1,64.1,
5,content,Traj,top5,88.4,
6,interpolation,HOG no-interp,top1,61.1,
6,interpolation,HOG no-interp,top5,86.9,
6,interpolation,HOG interp,top1,60.9,
6,interpolation,HOG interp,top5,86.8,
6,interpolation,HOG+MBH no-interp,top1,61.3,
6,interpolation,HOG+MBH no-interp,top5,86.8,
6,interpolation,HOG+MBH interp,top1,61.4,
6,interpolation,HOG+MBH interp,top5,86.8,
6,interpolation,Traj no-interp,top1,62.2,
6,interpolation,Traj no-interp,top5,87.5,
6,interpolation,Traj interp,top1,64.1,
6,interpolation,Traj interp,top5,88.4,
7a,length,L=4,top1,63.2,
7a,length,L=4,top5,88.0,
7a,length,L=6,top1,64.1,default
7a,length,L=6,top5,88.4,default
7a,length,L=8,top1,63.3,
7a,length,L=8,top5,88.0,
7b,norm,w/o patch norm,top1,62.1,
7b,norm,w/o patch norm,top5,87.44,
7b,norm,w/ patch norm,top1,64.1,default
7b,norm,w/ patch norm,top5,88.4,default
7c,density,Dense,top1,64.1,default (K=4 trajectories per patch)
7c,density,Dense,top5,88.4,default
7c,density,Sparse (Max),top1,60.2,keep the most salient of the K trajectories
7c,density,Sparse (Max),top5,86.3,
7c,density,Sparse (Mean),top1,61.8,average the K trajectories
7c,density,Sparse (Mean),top5,87.1,
7d,stride,s=4,top1,62.9,
7d,stride,s=4,top5,87.7,
7d,stride,s=3,top1,64.1,default
7d,stride,s=3,top5,88.4,default
7d,stride,s=2,top1,63.5,
7d,stride,s=2,top5,88.3,
7d,stride,s=1,top1,62.7,
7d,stride,s=1,top5,87.7,
7e,masking,90% tube,top1,62.7,
7e,masking,90% tube,top5,87.8,
7e,masking,70% tube,top1,64.1,default
7e,masking,70% tube,top5,88.4,default
7e,masking,40% tube,top1,61.3,
7e,masking,40% tube,top5,86.9,
7e,masking,40% cube,top1,61.2,
7e,masking,40% cube,top5,86.9,
7f,decoder,Joint depth 1,top1,64.1,default; 51 GFLOPs
7f,decoder,Joint depth 1,top5,88.4,
7f,decoder,Joint depth 2,top1,63.4,55 GFLOPs
7f,decoder,Joint depth 2,top5,88.3,
7f,decoder,Separate depth 1,top1,63.4,56 GFLOPs
7f,decoder,Separate depth 1,top5,88.4,
7f,decoder,Separate depth 2,top1,63.3,65 GFLOPs
7f,decoder,Separate depth 2,top5,88.0,
fig3,shuffle,VideoMAE raw video,top1,60.9,downstream accuracy after pre-training on raw vs frame-shuffled video
fig3,shuffle,VideoMAE shuffled video,top1,60.9,approximately equal to raw per the text (competitive)
fig3,shuffle,MME raw video,top1,64.1,
fig3,shuffle,MME shuffled video,top1,60.7,
4,linear_probe,TimeSformer IN-21K,top1,14.0,SSv2 linear probing (frozen backbone; linear layer 20 epochs)
4,linear_probe,SVT IN-21K+K400,top1,18.3,
4,linear_probe,VideoMAE SSv2,top1,24.3,
4,linear_probe,MME SSv2,top1,29.2,
1,ssv2_sota,VideoMAE ViT-B SSv2 400ep,top1,67.6,16 frames; 180x2x3 GFLOPs; 87M params
1,ssv2_sota,VideoMAE ViT-B SSv2 800ep,top1,69.3,
1,ssv2_sota,VideoMAE ViT-B K400 800ep,top1,68.2,
1,ssv2_sota,MME ViT-B SSv2 400ep,top1,69.2,
1,ssv2_sota,MME ViT-B SSv2 800ep,top1,70.0,
1,ssv2_sota,MME ViT-B K400 400ep,top1,69.3,
1,ssv2_sota,MME ViT-B K400 800ep,top1,70.5,
2,k400_sota,VideoMAE ViT-B K400 1600ep,top1,80.9,16x5x3 views
2,k400_sota,ST-MAE ViT-B K400 1600ep,top1,81.3,16x7x3 views
2,k400_sota,MME ViT-B K400 1600ep,top1,81.8,16x7x3 views
3,transfer,VideoMAE ViT-B K400 -> UCF101,top1,96.1,
3,transfer,VideoMAE ViT-B K400 -> HMDB51,top1,73.3,
3,transfer,MME ViT-B K400 -> UCF101,top1,96.5,
3,transfer,MME ViT-B K400 -> HMDB51,top1,78.0,
"""


@dataclass(frozen=True)
class PaperValue:
    """One published number: `table` ("5", "7a", "fig3", ...), `study` (the csv's study column),
    `setting` (the row label as printed), `metric` ("top1" | "top5"), `value` (percent)."""

    table: str
    study: str
    setting: str
    metric: str
    value: float
    notes: str = ""


@cache
def paper_values() -> tuple[PaperValue, ...]:
    """Every row of the reference table, in the paper's order."""
    rows = csv.DictReader(io.StringIO(REFERENCE_CSV))
    return tuple(PaperValue(r["table"], r["study"], r["setting"], r["metric"], float(r["paper_value"]),
                            r["notes"]) for r in rows)


def paper_table(study: str) -> dict[str, dict[str, float]]:
    """`{setting: {metric: value}}` for one csv study (e.g. "length", "linear_probe"), in paper order.

    An unknown study name raises a `KeyError` that lists the known ones.
    """
    table: dict[str, dict[str, float]] = {}
    for row in paper_values():
        if row.study == study:
            table.setdefault(row.setting, {})[row.metric] = row.value
    if not table:
        known = sorted({row.study for row in paper_values()})
        raise KeyError(f"no paper values for study {study!r}; known studies: {', '.join(known)}")
    return table


def paper_value(study: str, setting: str | None, metric: str) -> float | None:
    """The paper's number for one setting and metric, or None where the paper has none."""
    if setting is None:
        return None
    return paper_table(study).get(setting, {}).get(metric)

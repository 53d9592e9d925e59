"""Manifests of the real datasets: where each file comes from, what kind of archive it is, its checksum.

Checksums: the dataset hosts publish none. The sha256 values below for UCF101 and HMDB51 are the ones
torchvision's prototype datasets (`torchvision/prototype/datasets/_builtin/{ucf101,hmdb51}.py`) pin for
the same URLs; a mismatch may also mean the host re-uploaded the file. Where no value is recorded
anywhere we know of (Kinetics tars, annotations) the checksum is None and only the size reported by the
server is checked. Never fill in a checksum that was not computed from the real file.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Resource:
    """One file to fetch: URL, local name, archive kind (zip, tar, rar, file) and checksum if published."""

    url: str
    filename: str
    kind: str
    sha256: str | None = None
    md5: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    homepage: str
    resources: tuple[Resource, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)


UCF101 = Manifest(
    name="ucf101",
    homepage="https://www.crcv.ucf.edu/data/UCF101.php",
    resources=(
        Resource("https://www.crcv.ucf.edu/data/UCF101/UCF101.rar", "UCF101.rar", "rar",
                 sha256="ca8dfadb4c891cb11316f94d52b6b0ac2a11994e67a0cae227180cd160bd8e55",
                 note="6.5 GB; extracts to UCF-101/<class>/<video>.avi"),
        Resource("https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip",
                 "UCF101TrainTestSplits-RecognitionTask.zip", "zip",
                 sha256="5c0d1a53b8ed364a2ac830a73f405e51bece7d98ce1254fd19ed4a36b224bd27",
                 note="ucfTrainTestlist/{classInd,trainlist0K,testlist0K}.txt"),
    ),
    notes="3 official train/test splits (data.split); there is no official val split, so val = test.",
)

HMDB51 = Manifest(
    name="hmdb51",
    homepage="https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/",
    resources=(
        Resource("http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/hmdb51_org.rar", "hmdb51_org.rar", "rar",
                 sha256="9e714a0d8b76104d76e932764a7ca636f929fff66279cda3f2e326fa912a328e",
                 note="2 GB; holds one <class>.rar per class"),
        Resource("http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/test_train_splits.rar",
                 "test_train_splits.rar", "rar",
                 sha256="229c94f845720d01eb3946d39f39292ea962d50a18136484aa47c1eba251d2b7",
                 note="testTrainMulti_7030_splits/<class>_test_splitK.txt: `video 1|2|0` (train|test|unused)"),
    ),
    notes="3 official splits (data.split); val = test.",
)

K400_BASE = "https://s3.amazonaws.com/kinetics/400"
K400 = Manifest(
    name="k400",
    homepage="https://github.com/cvdfoundation/kinetics-dataset",
    resources=(
        Resource(f"{K400_BASE}/annotations/train.csv", "train.csv", "file"),
        Resource(f"{K400_BASE}/annotations/val.csv", "val.csv", "file"),
        Resource(f"{K400_BASE}/train/k400_train_path.txt", "k400_train_path.txt", "file",
                 note="one URL of a train/part_N.tar.gz per line (CVDF mirror, ~440 GB in all)"),
        Resource(f"{K400_BASE}/val/k400_val_path.txt", "k400_val_path.txt", "file"),
        Resource(f"{K400_BASE}/replacement_for_corrupted_k400.tgz", "replacement_for_corrupted_k400.tgz", "tar",
                 note="replacements for train videos that are corrupt in the part tars"),
    ),
    notes="CSV columns label,youtube_id,time_start,time_end,split; videos are "
          "<youtube_id>_<start:06d>_<end:06d>.mp4. The paper reports the val set, so test = val.",
)

SSV2 = Manifest(
    name="ssv2",
    homepage="https://developer.qualcomm.com/software/ai-datasets/something-something",
    notes="Not downloadable anonymously: needs a (free) Qualcomm account and licence acceptance.",
    extra={"labels": "something-something-v2-labels.json", "train": "something-something-v2-train.json",
           "validation": "something-something-v2-validation.json"},
)

SSV2_HOW_TO = """Something-Something v2 cannot be downloaded anonymously. To use it:
  1. Create a free account at https://developer.qualcomm.com/software/ai-datasets/something-something,
     accept the licence, and download the video parts (20bn-something-something-v2-00 ... -19) and the
     label archive (something-something-v2-labels, with train/validation/labels JSON files).
  2. Unpack: `cat 20bn-something-something-v2-?? | tar -xvzf - -C DIR` and unzip the labels into DIR.
  3. Run: mme download --dataset ssv2 --set data.folder=DIR
     (DIR must contain the *.webm videos and something-something-v2-{labels,train,validation}.json,
     in any sub-folders). The paper reports the validation set, so val = test = validation."""

MANIFESTS = {m.name: m for m in (UCF101, HMDB51, K400, SSV2)}

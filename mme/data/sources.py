"""Real dataset sources: resumable verified downloads, archive extraction, lists from the official splits.

Download contract (`download`): bytes go to `<name>.part`, resumed with an HTTP Range request after
an interruption (in the same call up to `retries` times, or by the next run); the final name appears
only after the size and the checksum (when the manifest has one) are verified. A checksum mismatch
moves the part aside to `<name>.corrupt` (never trusted, never resumed) and raises `ChecksumError`
naming the URL, the expected and the computed digest.

Extraction (`extract`): zip and tar through the standard library, rar through `unar` or `bsdtar`
when one is on PATH. Each archive is unpacked into a temp folder, merged into the destination, and
marked done, so an interrupted extraction is redone rather than trusted.

List builders return `Prepared(splits, classes, skipped)`; the download stage writes the list files.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mme.data.lists import VIDEO_SUFFIXES, relative_to_workdir, stratified_split
from mme.data.manifests import MANIFESTS, SSV2_HOW_TO, Resource
from mme.data.manifests.splits import hmdb51_split, k400_entries, ssv2_split, ucf101_split
from mme.data.video import VideoError, probe_video
from mme.paths import Paths

CHUNK = 1 << 20
USER_AGENT = "mme-download/0.1 (+https://github.com/; research dataset fetcher)"
RETRY_HTTP_CODES = (408, 429, 500, 502, 503, 504)
DONE_DIR = ".extracted"


class DownloadError(RuntimeError):
    """A download that failed; the message names the URL and how to resume."""


class ChecksumError(DownloadError):
    """Downloaded bytes whose digest differs from the manifest's."""


class ExtractError(RuntimeError):
    """An archive that cannot be unpacked (missing tool, corrupt archive)."""


@dataclass
class Prepared:
    """What a source produced: list rows per split (list-file paths), class names, skipped files."""

    splits: dict[str, list[tuple[str, int]]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------- download

def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(path: Path, url: str, sha256: str | None, md5: str | None) -> None:
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algorithm)
            if got.lower() != expected.lower():
                bad = path.with_name(path.name.removesuffix(".part") + ".corrupt")
                os.replace(path, bad)
                raise ChecksumError(f"checksum mismatch for {url}: expected {algorithm} {expected}, got {got}; "
                                    f"the bytes were moved to {bad} and will not be used (run again to re-download)")


def _content_total(response, offset: int) -> int | None:
    """Full file size from Content-Range (206) or Content-Length (200)."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + offset if length is not None else None


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `part` (Range from its current size); raises if the stream ends early."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part is already complete
            return
        raise
    with response:
        if offset and response.status != 206:  # the server ignored Range: start again
            offset = 0
        total = _content_total(response, offset)
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                     disable=not progress, leave=False) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"{url}: got {size} bytes but the server announced {total}; the partial file was "
                            "deleted, run again to download from scratch")


def download(url: str, dest: str | Path, sha256: str | None = None, md5: str | None = None, retries: int = 5,
             timeout: float = 60.0, backoff: float = 1.0, progress: bool = True) -> Path:
    """Download `url` to `dest`, resuming a `.part` file, verifying size and checksum before the final rename.

    Args:
        url: http(s) URL.
        dest: final file; kept as is if it exists (re-verified when a checksum is given).
        sha256, md5: expected digests (None: not published; only the announced size is checked).
        retries: reconnections within this call after a dropped connection or a 5xx answer.
        timeout: socket timeout in seconds.
        backoff: seconds before the first retry (doubles each time).
    Raises:
        DownloadError: the file could not be fetched (the `.part` stays for the next run to resume).
        ChecksumError: the bytes do not match the expected digest (they are moved to `.corrupt`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if sha256 or md5:
            part = dest.with_name(dest.name + ".part")
            os.replace(dest, part)
            _check_digest(part, url, sha256, md5)
            os.replace(part, dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRY_HTTP_CODES or attempt == retries:
                raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
            if attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"download of {url} failed after {retries + 1} tries ({exc}); {have} bytes are "
                                    f"kept in {part}: run the command again to resume") from exc
        time.sleep(backoff * 2 ** attempt)
    _check_digest(part, url, sha256, md5)
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------- extraction

def archive_kind(name: str) -> str:
    """zip, tar or rar from a file name."""
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(".rar"):
        return "rar"
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    raise ExtractError(f"cannot tell the archive kind of {name} (expected .zip, .rar, .tar[.gz|.bz2|.xz] or .tgz)")


def rar_command(archive: Path, out_dir: Path) -> list[str]:
    """The command that unpacks a rar archive with the first tool found (unar, then bsdtar)."""
    if shutil.which("unar"):
        return ["unar", "-quiet", "-force-overwrite", "-no-directory", "-output-directory", str(out_dir), str(archive)]
    if shutil.which("bsdtar"):
        return ["bsdtar", "-x", "-f", str(archive), "-C", str(out_dir)]
    raise ExtractError(f"cannot unpack {archive}: rar archives need `unar` or `bsdtar` on PATH; install one "
                       "(Debian/Ubuntu: `apt-get install unar` or `apt-get install libarchive-tools`) and run again")


def _merge_into(src: Path, dst: Path) -> None:
    """Move the contents of folder `src` into folder `dst`, merging sub-folders."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            _merge_into(item, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)


def is_extracted(archive: str | Path, dest: str | Path) -> bool:
    return (Path(dest) / DONE_DIR / (Path(archive).name + ".done")).is_file()


def extract(archive: str | Path, dest: str | Path, kind: str | None = None) -> Path:
    """Unpack `archive` into `dest` (skipped when already done); returns `dest`."""
    archive, dest = Path(archive), Path(dest)
    if is_extracted(archive, dest):
        return dest
    kind = kind or archive_kind(archive.name)
    tmp = dest / f".extracting-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(tmp)
        elif kind == "tar":
            with tarfile.open(archive) as handle:
                if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links leaving `tmp`
                    handle.extractall(tmp, filter="data")
                else:
                    handle.extractall(tmp)
        elif kind == "rar":
            result = subprocess.run(rar_command(archive, tmp), capture_output=True, text=True)
            if result.returncode != 0:
                raise ExtractError(f"cannot unpack {archive}: {result.stderr.strip()[-500:]} (re-download it)")
        else:
            raise ExtractError(f"unknown archive kind {kind!r} for {archive}")
        _merge_into(tmp, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise ExtractError(f"cannot unpack {archive}: {exc} (the archive is corrupt: delete it and run again)") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = dest / DONE_DIR / (archive.name + ".done")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(f"{archive.name}\n")
    return dest


def fetch_resource(resource, downloads_dir: Path, progress: bool = True) -> Path:
    """Download one manifest resource into `downloads_dir` (verified, resumable); returns the file."""
    return download(resource.url, Path(downloads_dir) / resource.filename, sha256=resource.sha256, md5=resource.md5,
                    progress=progress)


def _fetch_and_extract(resource, downloads_dir: Path, out_dir: Path, progress: bool, keep: bool = True) -> Path:
    """Download (unless already extracted) and unpack one archive resource into `out_dir`."""
    archive = Path(downloads_dir) / resource.filename
    if resource.kind != "file" and is_extracted(archive, out_dir):
        return out_dir
    fetch_resource(resource, downloads_dir, progress)
    if resource.kind == "file":
        return archive
    extract(archive, out_dir, resource.kind)
    if not keep:
        archive.unlink()
    return out_dir


# ---------------------------------------------------------------- lists from official splits

def index_files(root: Path, suffixes: tuple[str, ...] = VIDEO_SUFFIXES) -> dict[str, Path]:
    """{lower-case path relative to root: file} of every video under `root` (also keyed by bare file name)."""
    index: dict[str, Path] = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.suffix.lower() in suffixes and DONE_DIR not in path.parts:
            index.setdefault(path.relative_to(root).as_posix().lower(), path)
            index.setdefault(path.name.lower(), path)
    return index


def resolve_rows(entries, index: dict[str, Path], workdir: Path) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Turn `(name in the split file, label)` into list rows; names with no file become skipped entries."""
    rows, skipped = [], []
    for name, label in entries:
        key = name.replace("\\", "/").lower()
        path = index.get(key) or index.get(key.rsplit("/", 1)[-1])
        if path is None:
            skipped.append((name, "listed in the official split but not found after extraction"))
        else:
            rows.append((relative_to_workdir(workdir, path), int(label)))
    return rows, skipped


def find_file(root: Path, name: str) -> Path:
    """The first file called `name` under `root` (sorted walk)."""
    for path in sorted(Path(root).rglob(name)):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found under {root}; the archive may be incomplete (delete "
                            f"{root} and run `mme download` again)")


def _resolve_splits(workdir: Path, train, test, val=None):
    """Resolve `(split entries, index)` pairs into a `Prepared` (val = test unless given)."""
    splits, skipped = {}, []
    for name, (entries, index) in (("train", train), ("val", val or test), ("test", test)):
        splits[name], missing = resolve_rows(entries, index, workdir)
        if name != "val" or val is not None:
            skipped += missing
    return splits, skipped


def prepare_ucf101(workdir: Path, split: int, progress: bool = True) -> Prepared:
    """UCF101 split `split` (1-3): train = trainlist0K, val = test = testlist0K."""
    paths = Paths(workdir)
    raw, downloads = paths.raw_dir("ucf101"), paths.downloads_dir("ucf101")
    for resource in MANIFESTS["ucf101"].resources:
        _fetch_and_extract(resource, downloads, raw, progress)
    lists_dir = find_file(raw, "classInd.txt").parent
    classes, train, test = ucf101_split(lists_dir, split)
    index = index_files(raw)
    splits, skipped = _resolve_splits(paths.workdir, (train, index), (test, index))
    return Prepared(splits, classes, skipped)


def prepare_hmdb51(workdir: Path, split: int, progress: bool = True) -> Prepared:
    """HMDB51 split `split` (1-3): `1` lines train, `2` lines val = test (classes sorted by name)."""
    paths = Paths(workdir)
    raw, downloads = paths.raw_dir("hmdb51"), paths.downloads_dir("hmdb51")
    videos_rar, splits_rar = MANIFESTS["hmdb51"].resources
    _fetch_and_extract(splits_rar, downloads, raw / "splits", progress)
    _fetch_and_extract(videos_rar, downloads, raw / "class_rars", progress)
    for class_rar in sorted((raw / "class_rars").rglob("*.rar")):
        extract(class_rar, raw / "videos", "rar")
    split_dir = find_file(raw / "splits", f"brush_hair_test_split{split}.txt").parent
    classes, train, test = hmdb51_split(split_dir, split)
    index = index_files(raw / "videos")
    splits, skipped = _resolve_splits(paths.workdir, (train, index), (test, index))
    return Prepared(splits, classes, skipped)


def prepare_k400(workdir: Path, progress: bool = True) -> Prepared:
    """Kinetics-400 from the CVDF mirror: train and val tars (each deleted once unpacked), csv lists; test = val."""
    paths = Paths(workdir)
    raw, downloads = paths.raw_dir("k400"), paths.downloads_dir("k400")
    files = {r.filename: r for r in MANIFESTS["k400"].resources}
    for split in ("train", "val"):
        path_list = fetch_resource(files[f"k400_{split}_path.txt"], downloads, progress)
        for url in path_list.read_text().split():
            part = Resource(url, url.rsplit("/", 1)[-1], "tar")
            _fetch_and_extract(part, downloads / split, raw / split, progress, keep=False)
    _fetch_and_extract(files["replacement_for_corrupted_k400.tgz"], downloads, raw / "train", progress)
    train_csv = fetch_resource(files["train.csv"], downloads, progress)
    val_csv = fetch_resource(files["val.csv"], downloads, progress)
    classes = sorted({label for label, _ in k400_entries(train_csv)})
    ids = {name: i for i, name in enumerate(classes)}
    train = [(name, ids[label]) for label, name in k400_entries(train_csv)]
    val = [(name, ids[label]) for label, name in k400_entries(val_csv) if label in ids]
    splits, skipped = _resolve_splits(paths.workdir, (train, index_files(raw / "train")),
                                      (val, index_files(raw / "val")))
    return Prepared(splits, classes, skipped)


def prepare_ssv2(workdir: Path, folder: str) -> Prepared:
    """Something-Something v2 from a local copy in `folder` (see SSV2_HOW_TO); val = test = validation."""
    if not folder:
        raise FileNotFoundError("ssv2 needs a local copy: set data.folder=DIR.\n" + SSV2_HOW_TO)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder={folder} is not a directory.\n" + SSV2_HOW_TO)
    names = MANIFESTS["ssv2"].extra
    classes, train, val = ssv2_split(find_file(root, names["labels"]), find_file(root, names["train"]),
                                     find_file(root, names["validation"]))
    index = {path.stem: path for path in root.rglob("*.webm")}
    splits, skipped = _resolve_splits(Path(workdir), (train, index), (val, index))
    return Prepared(splits, classes, skipped)


def prepare_folder(workdir: Path, folder: str, val_fraction: float, test_fraction: float, seed: int,
                   progress: bool = True) -> Prepared:
    """Any `DIR/<class>/<video>` tree: every file probed (broken ones skipped and named), class ids by
    sorted class name, a seeded stratified train/val/test split. Hidden files are ignored. A tree too small
    to give every split with a non-zero fraction one video raises ValueError."""
    if not folder:
        raise FileNotFoundError("the folder dataset needs data.folder=DIR (a DIR/<class>/<video> tree)")
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder={folder} is not a directory (expected DIR/<class>/<video> files)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"data.folder={folder} has no class sub-folders (expected DIR/<class>/<video> files)")
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((root / name).rglob("*"))
             if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)]
    rows, skipped = [], []
    for path, label in tqdm(files, desc="probing videos", unit="video", disable=not progress):
        try:
            probe_video(path)
        except VideoError as exc:
            skipped.append((str(path), str(exc)))
            continue
        rows.append((relative_to_workdir(workdir, path), label))
    if not rows:
        raise FileNotFoundError(f"no readable video under data.folder={folder} ({len(skipped)} files failed)")
    splits = stratified_split(rows, val_fraction, test_fraction, seed)
    wanted = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    empty = [name for name, fraction in wanted.items() if fraction > 0 and not splits[name]]
    if empty:
        raise ValueError(f"data.folder={folder} has {len(rows)} readable video(s): too few for a non-empty "
                         f"{' and '.join(empty)} split; add videos (train, val and test need one each at least)")
    return Prepared(splits, classes, skipped)


def prepare(cfg, workdir: str | Path, progress: bool = True) -> Prepared:
    """Get the real dataset `cfg.data.dataset` and read its splits (the download stage writes the lists)."""
    workdir = Path(workdir)
    name = cfg.data.dataset
    if name == "ucf101":
        return prepare_ucf101(workdir, cfg.data.split, progress)
    if name == "hmdb51":
        return prepare_hmdb51(workdir, cfg.data.split, progress)
    if name == "k400":
        return prepare_k400(workdir, progress)
    if name == "ssv2":
        return prepare_ssv2(workdir, cfg.data.folder)
    if name == "folder":
        return prepare_folder(workdir, cfg.data.folder, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed,
                              progress)
    raise ValueError(f"unknown dataset {name!r} for sources.prepare; choose ucf101, hmdb51, k400, ssv2 or folder")

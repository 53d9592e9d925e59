"""The decoded-video cache: a train video's decoded frames and raw flow codes, uncompressed and memory-mapped.

Why it exists: a pre-training item that decodes its clip and inflates its flow window from the `.npz` flow
cache spends most of its time there (benchmarks/bench_pipeline.py); slicing the same numbers out of plain
`.npy` files through `np.load(..., mmap_mode="r")` costs a fraction of it, and every loader worker shares
one copy of the pages through the page cache. It is optional (`data.decoded_cache`): the extract stage
writes it, the datasets read it, and an item is exactly the one the decode + `.npz` path gives.

One entry per video, a directory `data/decoded/<dataset>/<video_key>/` (format version 1):
- `frames.npy`: uint8 (F, H, W, 3), every frame of the video as
  `read_frames(video, range(F), short_side=data.short_side)` returns it (what `read_clip` returns too);
- `flow.npy`: the flow cache's int16 codes of every pair, pair-major and interleaved (S, H, W, 2), so a
  window `[a, b)` is one contiguous run of the file and maps back to pixels with one multiply;
- `back.npy`: the backward codes in the same layout, only when the flow cache stores backward flow;
- `meta.json` (written last): `format_version`, `short_side`, `frames` and `pairs` shapes, `backward`,
  `flow` (the flow cache's metadata, cuts included: an entry made from another flow cache is stale),
  `source` (the video's `bytes` and `sha1`) and `crc32` of each `.npy` file. No time stamps: the same
  videos give byte-identical entries on any machine, so DVC's hash of the cache (and with it every stage
  downstream of `extract`) does not change when the cache is rebuilt elsewhere.

An entry is written into a temp directory beside it and renamed into place, so an interrupted writer leaves
only a `.<name>.*.tmp` directory, which no reader looks at. A reader checks the metadata, the source video
(size, then content hash, once per video and process: a checkout that only touched the file keeps the entry)
and every file's header and length against the metadata (`open_entry`);
the extract stage also checks the CRCs (`entry_problem(deep=True)`) before reusing an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mme.data.lists import video_key
from mme.motion.cache import FlowCache
from mme.paths import Paths
from mme.utils import default_file_mode

FORMAT_VERSION = 1
FRAMES, FLOW, BACK, META = "frames.npy", "flow.npy", "back.npy", "meta.json"
TEMP_SUFFIX = ".tmp"
_HASH_BLOCK = 1 << 20


class DecodedError(ValueError):
    """A decoded-cache entry that cannot be used; the message names the entry and the fix."""


def decoded_entry_path(workdir: str | Path, dataset: str, rel_video_path: str) -> Path:
    """`data/decoded/<dataset>/<video_key>/` under the workdir for a video as written in a list."""
    return Paths(workdir).decoded_dir(dataset) / video_key(rel_video_path, dataset)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def source_stamp(video: Path) -> dict[str, Any]:
    """What identifies the video an entry was decoded from: size and content hash."""
    return {"bytes": video.stat().st_size, "sha1": _sha1(video)}


def _source_problem(stamp: dict[str, Any], video: Path) -> str | None:
    try:
        stat = video.stat()
    except OSError as exc:
        return f"its video {video} cannot be read ({exc})"
    if stat.st_size != stamp.get("bytes"):
        return f"its video {video} changed size ({stamp.get('bytes')} -> {stat.st_size} bytes)"
    if _sha1(video) != stamp.get("sha1"):
        return f"its video {video} changed (another content hash)"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _flow_codes(flow: FlowCache, backward: bool) -> np.ndarray:
    """The cache's int16 codes of every pair, (S, H, W, 2): its pixels times its scale are the codes exactly
    (the scale is a power of two and |code| < 2**15, so the round trip through float32 loses nothing)."""
    pixels = flow.window(0, flow.num_pairs, backward=backward)
    return np.rint(pixels * np.float32(flow.meta["scale"])).astype(np.int16)


def remove_stale_temps(entry: Path) -> None:
    """Temp directories of a writer killed before its rename (see `write_entry`)."""
    for stale in entry.parent.glob(f".{entry.name}.*{TEMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def write_entry(entry: Path, video: Path, frames: np.ndarray, flow: FlowCache, short_side: int) -> Path:
    """Write one video's entry atomically: `frames` (F, H, W, 3) uint8 as decoded at `short_side`, and the
    codes of the flow cache `flow` of the same video (backward too when it holds them)."""
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames for {entry} must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if (len(frames) - 1, *frames.shape[1:3], 2) != flow.shape:
        raise ValueError(f"frames {frames.shape} for {entry} do not fit the flow cache {flow.path} {flow.shape}; "
                         "re-run `mme extract`")
    arrays = {FRAMES: frames, FLOW: _flow_codes(flow, False)}
    if flow.has_backward:
        arrays[BACK] = _flow_codes(flow, True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=TEMP_SUFFIX))
    try:
        for name, array in arrays.items():
            np.save(tmp / name, array, allow_pickle=False)
        meta = {"format_version": FORMAT_VERSION, "short_side": int(short_side), "frames": list(frames.shape),
                "pairs": list(flow.shape), "backward": flow.has_backward, "flow": flow.meta,
                "source": source_stamp(video), "crc32": {name: _crc32(tmp / name) for name in arrays}}
        (tmp / META).write_text(json.dumps(meta, sort_keys=True))
        file_mode = default_file_mode()  # a new directory's mode, not mkdtemp's 0700: a group can share the cache
        os.chmod(tmp, file_mode | (file_mode & 0o444) >> 2)
        _swap_in(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _swap_in(tmp: Path, entry: Path) -> None:
    """Rename the finished `tmp` to `entry`; an old entry is moved aside first and deleted after."""
    old = None
    if entry.exists():
        old = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.old.", suffix=TEMP_SUFFIX))
        os.replace(entry, old / "entry")
    os.replace(tmp, entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class DecodedEntry:
    """One video's memory-mapped entry (`open_entry`); items slice only the frames and pairs they need."""

    def __init__(self, path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.path = path
        self.meta = meta
        self._arrays = arrays
        self._step = np.float32(1.0 / float(meta["flow"]["scale"]))

    @property
    def num_frames(self) -> int:
        return int(self.meta["frames"][0])

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) frames `indices` (any order, repeats allowed), as `read_clip` returns them."""
        return np.ascontiguousarray(self._arrays[FRAMES][np.asarray(indices, dtype=np.intp)])

    def window(self, start: int, stop: int, backward: bool = False) -> np.ndarray:
        """Flow pairs `start .. stop-1` as float32 pixels (stop - start, H, W, 2), equal to `FlowCache.window`."""
        codes = self._arrays[BACK if backward else FLOW]
        if not 0 <= start <= stop <= len(codes):
            raise IndexError(f"flow window [{start}, {stop}) is outside the {len(codes)} pairs of {self.path}")
        # One pass: int16 -> float32 then times the step, the same rounding as FlowCache's two steps.
        return np.multiply(codes[start:stop], self._step, dtype=np.float32)


def _read_meta(entry: Path) -> dict[str, Any]:
    if not (entry / META).is_file():
        raise DecodedError("missing")
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError) as exc:
        raise DecodedError(f"meta.json is unreadable ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DecodedError(f"format version is {meta.get('format_version') if isinstance(meta, dict) else None}, "
                           f"this code reads {FORMAT_VERSION}")
    return meta


def _mapped(entry: Path, name: str, shape: list[int], dtype: type) -> np.ndarray:
    """The memory-mapped array `name`, checked against the shape and dtype the metadata promise."""
    path = entry / name
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DecodedError(f"{name} is unreadable ({exc})") from exc
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise DecodedError(f"{name} is {array.shape} {array.dtype}, expected {tuple(shape)} {np.dtype(dtype)}")
    if array.offset + array.nbytes != path.stat().st_size:
        raise DecodedError(f"{name} has {path.stat().st_size - array.offset - array.nbytes} bytes too many")
    return array


def _check_and_map(entry: Path, video: Path, short_side: int, flow_meta: dict[str, Any] | None,
                   backward: bool) -> DecodedEntry:
    meta = _read_meta(entry)
    try:
        if meta["short_side"] != short_side:
            raise DecodedError(f"short_side is {meta['short_side']}, expected {short_side}")
        problem = _source_problem(meta["source"], video)
        if problem is not None:
            raise DecodedError(problem)
        arrays = {FRAMES: _mapped(entry, FRAMES, meta["frames"], np.uint8)}
        if flow_meta is not None:
            if meta["flow"] != flow_meta:
                raise DecodedError("it was made from another flow cache of this video")
            if meta["pairs"][0] != meta["frames"][0] - 1:
                raise DecodedError(f"{meta['pairs'][0]} pairs for {meta['frames'][0]} frames")
            arrays[FLOW] = _mapped(entry, FLOW, meta["pairs"], np.int16)
            if backward:
                if not meta["backward"]:
                    raise DecodedError("it holds no backward flow (target.fb_check needs it)")
                arrays[BACK] = _mapped(entry, BACK, meta["pairs"], np.int16)
    except (KeyError, TypeError, IndexError) as exc:
        raise DecodedError(f"meta.json lacks or garbles {exc}") from exc
    return DecodedEntry(entry, meta, arrays)


def open_entry(entry: Path, video: Path, short_side: int, flow_meta: dict[str, Any] | None = None,
               backward: bool = False) -> DecodedEntry:
    """Map a valid entry of `video` decoded at `short_side`; with `flow_meta` (the video's current flow cache
    metadata) its flow too, and its backward flow with `backward`.

    Raises:
        DecodedError: the entry is missing, stale or damaged; the message names it and the fix (`mme extract`).
    """
    try:
        return _check_and_map(entry, video, short_side, flow_meta, backward)
    except DecodedError as exc:
        raise DecodedError(f"decoded cache entry {entry}: {exc}; re-run `mme extract` with "
                           "data.decoded_cache=true to rebuild it") from exc


def entry_problem(entry: Path, video: Path, short_side: int, flow: FlowCache, deep: bool = True) -> str | None:
    """Why the entry cannot serve `video` with the flow cache `flow` (None: it can); `deep` also checks the
    files' CRCs (the extract stage, before reusing an entry)."""
    try:
        opened = _check_and_map(entry, video, short_side, flow.meta, flow.has_backward)
    except DecodedError as exc:
        return str(exc)
    if deep:
        for name, crc in opened.meta["crc32"].items():
            if _crc32(entry / name) != crc:
                return f"{name} fails its CRC check"
    return None


class DecodedEntries:
    """The entries a dataset reads, each opened on its first use in a process (nothing is opened before the
    loader workers fork). A missing, stale or damaged entry gives None, so the caller decodes the video and
    reads its `.npz` flow instead; the first such entry of each process warns, naming it and the fix."""

    def __init__(self, workdir: str | Path, dataset: str, short_side: int):
        self.workdir = Path(workdir)
        self.dataset = dataset
        self.short_side = short_side
        self._entries: dict[tuple[str, bool], DecodedEntry | None] = {}
        self.problems: list[str] = []  # this process's unusable entries (the first one warned)

    def __getstate__(self) -> dict[str, Any]:
        # A pickled copy (a spawned worker) reopens its entries: pickling a map would copy all of its data.
        return {**self.__dict__, "_entries": {}}

    def get(self, rel: str, video: Path, flow_meta: dict[str, Any] | None = None,
            backward: bool = False) -> DecodedEntry | None:
        """The valid entry of the listed video `rel` (file `video`), or None; `flow_meta`, `backward`: as
        `open_entry` takes them."""
        key = (rel, flow_meta is not None)
        if key not in self._entries:
            try:
                entry = open_entry(decoded_entry_path(self.workdir, self.dataset, rel), video, self.short_side,
                                   flow_meta, backward)
            except DecodedError as exc:
                entry = None
                if not self.problems:
                    warnings.warn(f"{exc}; until then this and any other such video is decoded and its flow "
                                  "read from the .npz cache (the same items, slower)", stacklevel=2)
                self.problems.append(str(exc))
            self._entries[key] = entry
        return self._entries[key]

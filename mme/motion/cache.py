"""The flow cache: one compressed `.npz` file per video, written by the extract stage, read by the datasets.

File format (version 1): an `.npz` archive as `np.savez_compressed` writes it (a zip of deflated `.npy`
members, no pickles, read with `np.load`), written at zlib level 1 instead of numpy's fixed 6:
- `meta`: a 0-d unicode array holding a JSON object: `format_version`, `num_pairs`, `num_frames`,
  `height`, `width`, `scale` (codes per pixel), `chunk_pairs`, `clamped` (values clamped on save),
  `backward` (whether backward flow is stored), and what the writer adds (the extract stage: `backend`,
  `compensate_camera`, `short_side`, `source`, `source_bytes`, `shot_detector`, `cuts`).
- `flow_00000`, `flow_00001`, ...: int16 codes of consecutive chunks of `chunk_pairs` frame pairs (the last
  chunk may be shorter), stored component-planar `(n, 2, H, W)` (all dx, then all dy), so reading a window
  decompresses only the chunks it overlaps, each only up to the last pair it needs.
- `back_00000`, ... (only when `backward`): the backward flow in the same layout; backward pair `i` maps
  frame `i + 1` back to frame `i` (`FlowCache.window(..., backward=True)`). The forward-backward check of
  the targets reads it; extract stores it when `target.fb_check` is on.

Shot cuts: `meta["cuts"]` lists the cut indices `c` (frames `c-1` and `c` are different shots, see
`mme.motion.shots`), `meta["shot_detector"]` the detector version that found them. A cache written before
cut detection has neither: `FlowCache.cuts` is then None ("unknown") and warns once per process; re-running
`mme extract` redoes such caches (the stage expects the detector version).

Why level 1 and planar: on mini videos (DIS, 128 px) level 6 took 4-5x longer than the flow itself, and
planar codes at level 1 are as small as interleaved ones at level 6 (benchmarks/bench_extract.py).

Precision: a code is `round(flow * FLOW_SCALE)` with `FLOW_SCALE = 64`, so the quantisation error is at most
1/128 px (the issue's bound is 0.05 px). int16 codes cover +-32767/64 = +-511.98 px; larger values, which
no frame under 512 px can hold, are clamped to that range (not an error) and counted in `meta["clamped"]`.
Non-finite flow is refused. `FlowCache.window` maps the codes back to pixels (float32).
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from mme.data.lists import video_key
from mme.paths import Paths
from mme.utils import atomic_path

FORMAT_VERSION = 1
FLOW_SCALE = 64  # int16 codes per pixel: error <= 0.5 / 64 px
FLOW_LIMIT = np.iinfo(np.int16).max / FLOW_SCALE  # +-511.98 px
CHUNK_PAIRS = 16  # frame pairs per zip member
ZLIB_LEVEL = 1

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local file header (PKWARE APPNOTE 4.3.7)
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NPY_HEADER_MAX = 4096  # bytes: a `.npy` header of these shapes takes 128

# What a damaged or foreign file can raise while being opened or read.
READ_ERRORS = (zipfile.BadZipFile, zlib.error, struct.error, OSError, EOFError, ValueError, KeyError, TypeError)


class CacheError(ValueError):
    """A flow cache file that cannot be used; the message names the file and the fix."""


def flow_cache_path(workdir: str | Path, dataset: str, rel_video_path: str) -> Path:
    """`data/flow/<dataset>/<video_key>.npz` under the workdir for a video as written in a list."""
    return Paths(workdir).flow_dir(dataset) / f"{video_key(rel_video_path, dataset)}.npz"


def expected_meta(backend: str, compensate_camera: bool, short_side: int, *, backward: bool = False,
                  shot_detector: int | None = None) -> dict[str, Any]:
    """The metadata a cache made with these settings carries; pass it to `cache_problem`/`is_valid_cache`
    as `expected` so a cache made with another backend or at another resolution is not taken.

    `backward`: also require stored backward flow (a cache with it serves a reader without the need too).
    `shot_detector`: also require cuts found by this detector version (`mme.motion.shots.SHOT_DETECTOR`);
    None accepts a cache without cuts, whose `FlowCache.cuts` is then None.
    """
    expected = {"format_version": FORMAT_VERSION, "backend": backend, "compensate_camera": bool(compensate_camera),
                "short_side": int(short_side)}
    if backward:
        expected["backward"] = True
    if shot_detector is not None:
        expected["shot_detector"] = int(shot_detector)
    return expected


def quantize_flow(flow: np.ndarray) -> tuple[np.ndarray, int]:
    """float flow in pixels -> (int16 codes, number of values clamped to +-FLOW_LIMIT)."""
    scaled = np.rint(np.asarray(flow, np.float32) * FLOW_SCALE)
    limit = np.iinfo(np.int16).max
    clamped = int(np.count_nonzero(np.abs(scaled) > limit))
    return np.clip(scaled, -limit, limit).astype(np.int16), clamped


FORWARD, BACKWARD = "flow", "back"  # chunk member prefixes


def _chunk_name(index: int, prefix: str = FORWARD) -> str:
    return f"{prefix}_{index:05d}"


def _chunks(codes: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    planar = np.moveaxis(codes, -1, 1)  # (S, 2, H, W)
    return {_chunk_name(k, prefix): np.ascontiguousarray(planar[start:start + CHUNK_PAIRS])
            for k, start in enumerate(range(0, len(codes), CHUNK_PAIRS))}


def _checked_flow(path: str | Path, flow: np.ndarray, what: str) -> np.ndarray:
    flow = np.asarray(flow)
    if flow.ndim != 4 or flow.shape[-1] != 2 or len(flow) == 0:
        raise ValueError(f"{what} for {path} must have shape (S>=1, H, W, 2), got {flow.shape}")
    if not np.all(np.isfinite(flow)):
        raise ValueError(f"{what} for {path} holds NaN or infinite values; refusing to cache it")
    return flow


def save_flow(path: str | Path, flow: np.ndarray, meta: dict[str, Any], backward: np.ndarray | None = None) -> None:
    """Write flow (S, H, W, 2) float pixels and `meta` (JSON-serialisable) atomically to `path`.

    `backward`: optional backward flow of the same shape (pair i maps frame i+1 to frame i), stored too.
    """
    flow = _checked_flow(path, flow, "flow")
    codes, clamped = quantize_flow(flow)
    num_pairs, height, width = codes.shape[:3]
    members = _chunks(codes, FORWARD)
    if backward is not None:
        backward = _checked_flow(path, backward, "backward flow")
        if backward.shape != flow.shape:
            raise ValueError(f"backward flow for {path} is {backward.shape}, the forward flow {flow.shape}")
        back_codes, back_clamped = quantize_flow(backward)
        members |= _chunks(back_codes, BACKWARD)
        clamped += back_clamped
    layout = {"format_version": FORMAT_VERSION, "num_pairs": num_pairs, "num_frames": num_pairs + 1,
              "height": height, "width": width, "scale": FLOW_SCALE, "chunk_pairs": CHUNK_PAIRS,
              "clamped": clamped, "backward": backward is not None}
    for key in ("num_pairs", "num_frames", "height", "width", "backward"):
        if key in meta and meta[key] != layout[key]:
            raise ValueError(f"meta[{key!r}]={meta[key]} for {path} disagrees with the flow's {layout[key]}")
    members["meta"] = np.array(json.dumps({**meta, **layout}, sort_keys=True))
    with atomic_path(path) as tmp:
        _write_npz(tmp, members)


def _write_npz(path: Path, members: dict[str, np.ndarray]) -> None:
    """The archive `np.savez_compressed(path, **members)` writes, deflated at ZLIB_LEVEL."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZLIB_LEVEL) as archive:
        for name, array in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


class FlowCache:
    """One cached video's flow: metadata read at once, pixels read per window.

    Attributes:
        path: the `.npz` file.
        meta: the metadata dict (see the module docstring).
        num_pairs: number of consecutive frame pairs (frames - 1).
        shape: (num_pairs, H, W, 2).
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.meta = meta
        self.num_pairs = int(meta["num_pairs"])
        self.shape = (self.num_pairs, int(meta["height"]), int(meta["width"]), 2)
        self._chunk = int(meta["chunk_pairs"])
        self._scale = float(meta["scale"])

    @property
    def has_backward(self) -> bool:
        return bool(self.meta.get("backward", False))

    @property
    def cuts(self) -> list[int] | None:
        """Shot-cut indices of the video (see the module docstring), or None when the cache predates cut
        detection ("unknown"; warns once per process)."""
        cuts = self.meta.get("cuts")
        if cuts is None:
            _warn_no_cuts(self.path)
            return None
        return [int(c) for c in cuts]

    def window(self, start: int, stop: int, backward: bool = False) -> np.ndarray:
        """Flow of pairs `start .. stop-1` as float32 pixels, (stop - start, H, W, 2).

        Pair `i` is the flow from frame `i` to frame `i + 1` of the video; with `backward`, from frame
        `i + 1` back to frame `i`.
        """
        if backward and not self.has_backward:
            raise CacheError(f"flow cache {self.path} holds no backward flow; re-run `mme extract` with "
                             "target.fb_check=true")
        if not 0 <= start <= stop <= self.num_pairs:
            raise IndexError(f"flow window [{start}, {stop}) is outside the {self.num_pairs} pairs of {self.path}")
        if start == stop:
            return np.zeros((0, *self.shape[1:]), np.float32)
        height, width = self.shape[1:3]
        flow = np.empty((stop - start, height, width, 2), np.float32)
        try:
            with open(self.path, "rb") as file, zipfile.ZipFile(file) as archive:
                for k in range(start // self._chunk, (stop - 1) // self._chunk + 1):
                    first = k * self._chunk
                    skip, end = max(start - first, 0), min(stop - first, self._chunk)
                    member = archive.getinfo(f"{_chunk_name(k, BACKWARD if backward else FORWARD)}.npy")
                    codes = _read_pairs(file, member, skip, end, (2, height, width))
                    _dequantize(codes, np.float32(1.0 / self._scale), flow[first + skip - start:first + end - start])
        except READ_ERRORS as exc:
            raise CacheError(f"flow cache {self.path} is unreadable ({exc}); re-run `mme extract`") from exc
        return flow

    def __repr__(self) -> str:
        return f"FlowCache({str(self.path)!r}, shape={self.shape}, backend={self.meta.get('backend')!r})"


_WARNED_NO_CUTS: list[Path] = []


def _warn_no_cuts(path: Path) -> None:
    if not _WARNED_NO_CUTS:
        _WARNED_NO_CUTS.append(path)
        warnings.warn(f"flow cache {path} (and maybe others) was written without shot-cut detection: its cuts "
                      "are unknown and trajectories across a cut are not masked; re-run `mme extract` to "
                      "redo such caches", stacklevel=3)


def _read_pairs(file: BinaryIO, info: zipfile.ZipInfo, skip: int, end: int, pair_shape: tuple[int, ...]) -> np.ndarray:
    """int16 codes of pairs `skip .. end-1` of one chunk member of the open archive `file`, (end - skip, *pair_shape).

    Inflates the member's deflate stream in one call (`zipfile`'s reader inflates in 4 KiB steps and computes a
    CRC), and only up to pair `end` (a window rarely needs a chunk's tail); the `.npy` header is read as `np.load`
    would. A partial read cannot check the member's CRC: `cache_problem(deep=True)` does (the extract stage).
    """
    name = info.filename
    file.seek(info.header_offset)
    signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if signature != _LOCAL_SIGNATURE:
        raise zipfile.BadZipFile(f"member {name} has no local header")
    file.seek(name_length + extra_length, 1)
    compressed = file.read(info.compress_size)
    pair_bytes = int(np.prod(pair_shape)) * np.dtype(np.int16).itemsize
    wanted = _NPY_HEADER_MAX + end * pair_bytes
    if info.compress_type == zipfile.ZIP_DEFLATED:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(compressed, wanted)
    elif info.compress_type == zipfile.ZIP_STORED:
        data = compressed[:wanted]
    else:
        raise ValueError(f"member {name} uses zip compression {info.compress_type}, expected deflate")
    header = io.BytesIO(data[:_NPY_HEADER_MAX])
    major, _ = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(header)
    if fortran or dtype != np.int16 or len(shape) != 4 or tuple(shape[1:]) != pair_shape or shape[0] < end:
        raise ValueError(f"member {name} is {shape} {dtype}, expected (>= {end}, {pair_shape}) int16")
    offset = header.tell() + skip * pair_bytes
    if len(data) < offset + (end - skip) * pair_bytes:
        raise ValueError(f"member {name} ends early")
    return np.frombuffer(data, np.int16, (end - skip) * pair_bytes // 2, offset).reshape(end - skip, *pair_shape)


def _dequantize(codes: np.ndarray, scale: np.float32, out: np.ndarray) -> None:
    """Planar int16 codes (n, 2, H, W) -> pixels (n, H, W, 2) float32 into `out` (codes * scale, interleaved)."""
    planes = codes.astype(np.float32)
    planes *= scale
    for pair, (dx, dy) in zip(out, planes):
        cv2.merge([dx, dy], dst=pair)


def _read_meta(archive: np.lib.npyio.NpzFile, path: Path) -> dict[str, Any]:
    meta = json.loads(archive["meta"].item())
    if not isinstance(meta, dict):
        raise CacheError(f"flow cache {path}: meta is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"flow cache {path} has format version {version}, this code reads {FORMAT_VERSION}; "
                         "re-run `mme extract` to rebuild it")
    return meta


def load_flow(path: str | Path) -> FlowCache:
    """Open a flow cache (reads only its metadata); fails with `CacheError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no flow cache {path}; run `mme extract` for its dataset first")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return FlowCache(path, _read_meta(archive, path))
    except READ_ERRORS as exc:
        if isinstance(exc, CacheError):
            raise
        raise CacheError(f"flow cache {path} is unreadable ({exc}); re-run `mme extract` to rebuild it") from exc


def _member_header(archive: np.lib.npyio.NpzFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one `.npy` member from its header, without decompressing the data."""
    with archive.zip.open(f"{name}.npy") as member:
        major, _ = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
    return shape, dtype


def cache_problem(path: str | Path, expected: dict[str, Any] | None = None, deep: bool = True) -> str | None:
    """Why a cache file cannot be reused, or None when it can.

    Checks that the file opens, its metadata has this format version and matches `expected` (e.g.
    `{"backend": "dis", "short_side": 128}`), and every chunk has the recorded shape and dtype. `deep`
    also verifies the CRC of every member (one decompression pass), which catches corruption inside a
    file of the right length.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = _read_meta(archive, path)
            for key, value in (expected or {}).items():
                if meta.get(key) != value:
                    return f"{key} is {meta.get(key)!r}, expected {value!r}"
            height, width, chunk = meta["height"], meta["width"], meta["chunk_pairs"]
            for prefix in (FORWARD, BACKWARD) if meta.get("backward") else (FORWARD,):
                remaining = meta["num_pairs"]
                for k in range((remaining + chunk - 1) // chunk):
                    shape, dtype = _member_header(archive, _chunk_name(k, prefix))
                    want = (min(chunk, remaining), 2, height, width)
                    if shape != want or dtype != np.int16:
                        return f"chunk {_chunk_name(k, prefix)} is {shape} {dtype}, expected {want} int16"
                    remaining -= chunk
            if deep:
                bad = archive.zip.testzip()
                if bad is not None:
                    return f"member {bad} fails its CRC check"
    except CacheError as exc:
        return str(exc)
    except READ_ERRORS as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def is_valid_cache(path: str | Path, expected: dict[str, Any] | None = None, deep: bool = True) -> bool:
    """True when `path` is a complete, readable cache whose metadata matches `expected`."""
    return cache_problem(path, expected, deep) is None

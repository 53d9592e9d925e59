"""Video decoding: decord first, OpenCV as the fallback, exact frame indices, one error type.

Owns every read of a video file in the project (the flow extractor, the datasets, the folder probe).
`read_frames` returns exactly the frames asked for, as RGB uint8, optionally resized so that the
short side equals `short_side` (cv2.INTER_AREA, deterministic), so every caller that passes the
same `short_side` sees the same pixels.

decord is fast and seeks, but it can over-report a container's frame count (and then hang or fail
near the end), and it grows in memory on long videos. So: `video_info` verifies the last reported
frame is decodable and steps back to the last one that is; readers `seek(0)` after each batch; when
decord cannot open or read a file, OpenCV decodes it sequentially (exact, slower). A file neither
can read raises `VideoError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# decord decoding threads per reader; 1 because callers already run one reader per worker process.
DECORD_THREADS = 1
# How many frames `video_info` steps back from an over-reported end before counting with OpenCV.
MAX_END_PROBE = 4


class VideoError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file and what failed."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def resized_shape(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(H, W) after scaling so the short side equals `short_side` (aspect kept, rounded); None keeps the size."""
    if short_side is None or short_side <= 0:
        return height, width
    if height <= width:
        return short_side, max(1, int(round(width * short_side / height)))
    return max(1, int(round(height * short_side / width))), short_side


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoError(f"video {path} does not exist (check the list file or data.folder)")
    if path.stat().st_size == 0:
        raise VideoError(f"video {path} is empty (0 bytes); delete it or download it again")


def _open_decord(path: Path):
    """A decord VideoReader, or None when decord cannot open the file."""
    try:
        import decord
    except ImportError:
        return None
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=DECORD_THREADS)
    except Exception:  # decord raises DECORDError / RuntimeError subclasses for unreadable files
        return None


def _decord_batch(reader, indices: list[int]) -> np.ndarray | None:
    """(T, H, W, 3) uint8 RGB from decord, or None if decord fails on these indices."""
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception:
        return None
    finally:
        try:
            reader.seek(0)  # decord keeps decoded state and grows in memory without this
        except Exception:
            pass
    if frames.ndim != 4 or frames.shape[0] != len(indices):
        return None
    return frames


def _opencv_info(path: Path) -> VideoInfo:
    """Frame count by sequential decoding (exact even when the container header is wrong)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"corrupt or unsupported video {path}: neither decord nor OpenCV can open it "
                             "(re-download or re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        count, shape = 0, None
        while cap.grab():
            if shape is None:
                ok, frame = cap.retrieve()
                if not ok:
                    break
                shape = frame.shape
            count += 1
    finally:
        cap.release()
    if count == 0 or shape is None:
        raise VideoError(f"corrupt video {path}: no decodable frame (re-download or re-encode it)")
    return VideoInfo(count, fps, int(shape[0]), int(shape[1]))


def _reader_info(reader, path: Path) -> VideoInfo:
    """`video_info` of an open decord reader (the count verified by decoding the last frame)."""
    reported = len(reader)
    fps = float(reader.get_avg_fps() or 0.0)
    for last in range(reported - 1, max(reported - 1 - MAX_END_PROBE, -1), -1):
        frame = _decord_batch(reader, [last])
        if frame is not None:
            return VideoInfo(last + 1, fps, int(frame.shape[1]), int(frame.shape[2]))
    info = _opencv_info(path)  # decord's count is unusable: count by decoding
    return VideoInfo(info.num_frames, fps or info.fps, info.height, info.width)


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, fps and size of a video; the count is verified by decoding the last frame.

    Raises:
        VideoError: missing, empty, corrupt or non-video file.
    """
    path = Path(path)
    _check_file(path)
    reader = _open_decord(path)
    if reader is None:
        return _opencv_info(path)
    return _reader_info(reader, path)


def _opencv_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Decode sequentially up to max(indices) and keep the wanted frames, (T, H, W, 3) RGB."""
    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"corrupt or unsupported video {path}: neither decord nor OpenCV can open it "
                             "(re-download or re-encode it)")
        for index in range(max(indices) + 1):
            if not cap.grab():
                raise VideoError(f"corrupt video {path}: decord and OpenCV both failed to read frame {index} "
                                 f"(the video ends early; re-download or re-encode it)")
            if index in wanted:
                ok, frame = cap.retrieve()
                if not ok:
                    raise VideoError(f"corrupt video {path}: decord and OpenCV both failed to decode frame {index}")
                kept[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    return np.stack([kept[i] for i in indices])


def _resize(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """(T, H, W, 3) -> (T, H', W', 3) with the short side = short_side (cv2.INTER_AREA)."""
    height, width = frames.shape[1:3]
    out_h, out_w = resized_shape(height, width, short_side)
    if (out_h, out_w) == (height, width):
        return frames
    return np.stack([cv2.resize(f, (out_w, out_h), interpolation=cv2.INTER_AREA) for f in frames])


def _checked_indices(path: Path, indices) -> list[int]:
    index_list = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not index_list:
        raise VideoError(f"no frame indices requested from {path}")
    if min(index_list) < 0:
        raise VideoError(f"negative frame index {min(index_list)} requested from {path}")
    return index_list


def _read_with(reader, path: Path, index_list: list[int]) -> np.ndarray:
    """The frames (at the file's size) from an open decord reader (None: OpenCV)."""
    frames = None
    if reader is not None:
        if max(index_list) >= len(reader):
            raise VideoError(f"frame {max(index_list)} requested from {path}, which has {len(reader)} frames "
                             "(clamp the indices with mme.data.sampling.clip_indices)")
        frames = _decord_batch(reader, index_list)
    if frames is None:
        frames = _opencv_frames(path, index_list)
    return np.ascontiguousarray(frames)


def read_frames(path: str | Path, indices, short_side: int | None = None) -> np.ndarray:
    """Decode exactly the frames `indices` (any order, repeats allowed) of a video.

    Args:
        path: video file.
        indices: 0-based frame indices (sequence or 1-D array of ints).
        short_side: resize so the short side has this many pixels (cv2.INTER_AREA); None keeps the size.
    Returns:
        np.ndarray uint8 (T, H, W, 3), RGB, T = len(indices).
    Raises:
        VideoError: the file cannot be read, or an index is out of range.
    """
    path = Path(path)
    index_list = _checked_indices(path, indices)
    _check_file(path)
    return _resize(_read_with(_open_decord(path), path, index_list), short_side)


def read_clip(path: str | Path, indices_fn: Callable[[int], Any], short_side: int | None = None,
              num_frames: int | None = None) -> tuple[VideoInfo, np.ndarray]:
    """Open a video once: its `video_info` and the frames `indices_fn(info.num_frames)` (as `read_frames`).

    What a dataset item needs when the frame count decides which frames to take. `num_frames`: the count
    when the caller already knows it (verified before, e.g. by an earlier item), which skips the probe of
    the last frame; fps and size are then those decord reports.
    """
    path = Path(path)
    _check_file(path)
    reader = _open_decord(path)
    if num_frames is not None:
        count = num_frames
    else:
        info = _opencv_info(path) if reader is None else _reader_info(reader, path)
        count = info.num_frames
    frames = _read_with(reader, path, _checked_indices(path, indices_fn(count)))
    if num_frames is not None:
        fps = float(reader.get_avg_fps() or 0.0) if reader is not None else 0.0
        info = VideoInfo(count, fps, int(frames.shape[1]), int(frames.shape[2]))
    return info, _resize(frames, short_side)


def probe_video(path: str | Path) -> VideoInfo:
    """`video_info` plus a decode of the first, middle and last frame: a full health check of one file."""
    info = video_info(path)
    read_frames(path, sorted({0, info.num_frames // 2, info.num_frames - 1}))
    return info

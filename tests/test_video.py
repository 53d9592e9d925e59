"""Decoding: exact indices, info, deterministic resizing, the OpenCV fallback, and clear errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mme.data import video
from mme.data.video import VideoError, probe_video, read_frames, resized_shape, video_info

NUM_FRAMES, HEIGHT, WIDTH = 20, 48, 80


def _frame(i: int) -> np.ndarray:
    """RGB frame i: red level 10*i everywhere, a white 8x8 square at x = 3*i."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame[..., 0] = 10 * i
    frame[8:16, 3 * i:3 * i + 8] = 255
    return frame


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (WIDTH, HEIGHT))
    for i in range(NUM_FRAMES):
        writer.write(cv2.cvtColor(_frame(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _red_level(frames: np.ndarray) -> np.ndarray:
    return frames[:, 30:, :, 0].reshape(len(frames), -1).mean(1) / 10


def test_info_counts_frames_and_size(clip_file):
    info = video_info(clip_file)
    assert (info.num_frames, info.height, info.width) == (NUM_FRAMES, HEIGHT, WIDTH)
    assert info.fps == pytest.approx(25.0)


def test_exact_indices_any_order_with_repeats(clip_file):
    indices = [5, 0, 5, 19, 12]
    frames = read_frames(clip_file, indices)
    assert frames.shape == (5, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(_red_level(frames), indices, atol=0.6)  # RGB order: red carries the index
    square_x = [int(np.argmax(f[12, :, 2] > 200)) for f in frames]
    assert square_x == [3 * i for i in indices]


def test_short_side_resize_is_inter_area_of_full_frames(clip_file):
    full = read_frames(clip_file, [3, 7])
    small = read_frames(clip_file, [3, 7], short_side=24)
    assert small.shape == (2, 24, 40, 3)
    expected = np.stack([cv2.resize(f, (40, 24), interpolation=cv2.INTER_AREA) for f in full])
    np.testing.assert_array_equal(small, expected)
    np.testing.assert_array_equal(small, read_frames(clip_file, [3, 7], short_side=24))


def test_resized_shape_keeps_aspect():
    assert resized_shape(240, 320, 128) == (128, 171)
    assert resized_shape(320, 240, 128) == (171, 128)
    assert resized_shape(100, 100, None) == (100, 100)


def test_opencv_fallback_matches_decord(clip_file, monkeypatch):
    indices = [0, 9, 4, 19]
    reference = read_frames(clip_file, indices).astype(int)
    monkeypatch.setattr(video, "_open_decord", lambda *_: None)
    fallback = read_frames(clip_file, indices).astype(int)
    assert np.abs(fallback - reference).max() <= 3
    assert video_info(clip_file).num_frames == NUM_FRAMES


def test_fallback_when_decord_fails_to_read(clip_file, monkeypatch):
    monkeypatch.setattr(video, "_decord_batch", lambda *_: None)
    frames = read_frames(clip_file, [2, 17])
    np.testing.assert_allclose(_red_level(frames), [2, 17], atol=0.6)


class _OverReporting:
    """A decord reader that claims 3 frames more than the file has and fails on them."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader) + 3

    def get_avg_fps(self):
        return self.reader.get_avg_fps()

    def get_batch(self, indices):
        if max(indices) >= len(self.reader):
            raise RuntimeError("seek past the end")
        return self.reader.get_batch(indices)

    def seek(self, index):
        self.reader.seek(index)


def test_over_reported_frame_count_is_corrected(clip_file, monkeypatch):
    real_open = video._open_decord
    monkeypatch.setattr(video, "_open_decord", lambda path: _OverReporting(real_open(path)))
    assert video_info(clip_file).num_frames == NUM_FRAMES


def test_out_of_range_index_names_file(clip_file):
    with pytest.raises(VideoError, match="clip.mp4.*20 frames"):
        read_frames(clip_file, [0, NUM_FRAMES])


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "missing"])
def test_broken_files_raise_video_error_naming_the_file(clip_file, tmp_path, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 20)
    elif kind == "truncated":
        data = clip_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=f"{kind}.mp4"):
        video_info(path)
    with pytest.raises(VideoError, match=f"{kind}.mp4"):
        read_frames(path, [0])
    with pytest.raises(VideoError, match=f"{kind}.mp4"):
        probe_video(path)


def test_reads_without_decord_installed(clip_file, monkeypatch):
    """Where decord has no wheel (aarch64, Apple silicon) it is not installed: importing it fails and every read
    goes through OpenCV with the same frames and count."""
    import sys

    indices = [0, 9, 4, 19]
    reference = read_frames(clip_file, indices).astype(int)
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    assert video._open_decord(clip_file) is None
    assert np.abs(read_frames(clip_file, indices).astype(int) - reference).max() <= 3
    assert video_info(clip_file).num_frames == NUM_FRAMES

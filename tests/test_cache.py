"""The flow cache keeps pixels within 1/128 px, reads any window, and tells a broken file from a good one."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from mme.motion import cache
from mme.motion.cache import CacheError, flow_cache_path, is_valid_cache, load_flow, save_flow

META = {"backend": "dis", "compensate_camera": False, "short_side": 64, "source": "data/raw/x/a.mp4"}


def random_flow(num_pairs: int = 37, height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """Flow in +-30 px at arbitrary sub-pixel values (37 pairs = 3 chunks, the last one short)."""
    return np.random.default_rng(seed).uniform(-30, 30, (num_pairs, height, width, 2)).astype(np.float32)


@pytest.fixture
def saved(tmp_path):
    flow = random_flow()
    path = tmp_path / "flow" / "videos" / "a.npz"
    save_flow(path, flow, META)
    return path, flow


def test_round_trip_in_pixels_within_quantisation_bound(saved):
    path, flow = saved
    stored = load_flow(path)
    assert stored.num_pairs == 37 and stored.shape == (37, 24, 32, 2)
    restored = stored.window(0, stored.num_pairs)
    assert restored.dtype == np.float32
    error = np.abs(restored - flow).max()
    assert error <= 0.5 / cache.FLOW_SCALE + 1e-6  # 1/128 px, well below the 0.05 px
    assert error > 0  # it is quantised (the bound above is the real one, not a lossless accident)
    # Pixels, not codes: the official loader returned codes; a mean |flow| of ~15 px must stay ~15 px.
    assert abs(np.abs(restored).mean() - np.abs(flow).mean()) < 0.01


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (5, 21), (15, 17), (16, 32), (30, 37), (36, 37), (4, 4)])
def test_windows_across_chunk_boundaries_match_the_whole(saved, start, stop):
    path, _ = saved
    stored = load_flow(path)
    whole = stored.window(0, stored.num_pairs)
    np.testing.assert_array_equal(stored.window(start, stop), whole[start:stop])


def test_window_outside_the_video_names_the_file(saved):
    path, _ = saved
    with pytest.raises(IndexError, match=str(path)):
        load_flow(path).window(30, 38)


def test_metadata_recorded(saved):
    path, _ = saved
    meta = load_flow(path).meta
    assert {k: meta[k] for k in META} == META
    assert (meta["num_pairs"], meta["num_frames"], meta["height"], meta["width"]) == (37, 38, 24, 32)
    assert meta["format_version"] == cache.FORMAT_VERSION and meta["scale"] == cache.FLOW_SCALE
    assert meta["clamped"] == 0


def test_out_of_range_values_are_clamped_and_counted(tmp_path):
    flow = np.zeros((2, 8, 8, 2), np.float32)
    flow[0, 1, 2] = (600.0, -1000.0)
    save_flow(tmp_path / "big.npz", flow, {})
    stored = load_flow(tmp_path / "big.npz")
    np.testing.assert_allclose(stored.window(0, 1)[0, 1, 2], (cache.FLOW_LIMIT, -cache.FLOW_LIMIT), atol=1e-6)
    assert stored.meta["clamped"] == 2


def test_refuses_nonfinite_and_misshapen_flow(tmp_path):
    flow = np.zeros((2, 8, 8, 2), np.float32)
    flow[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        save_flow(tmp_path / "nan.npz", flow, {})
    with pytest.raises(ValueError, match="shape"):
        save_flow(tmp_path / "bad.npz", np.zeros((2, 8, 8)), {})
    with pytest.raises(ValueError, match="num_pairs"):
        save_flow(tmp_path / "bad.npz", np.zeros((2, 8, 8, 2)), {"num_pairs": 3})
    assert list(tmp_path.iterdir()) == []  # nothing, not even a temp file


def test_failed_write_keeps_the_previous_file(saved, monkeypatch):
    path, flow = saved
    before = path.read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(OSError):
        save_flow(path, flow * 2, META)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.npz"]


def test_validity_checks(saved, tmp_path):
    path, _ = saved
    assert is_valid_cache(path)
    assert is_valid_cache(path, expected={"backend": "dis", "short_side": 64})
    assert not is_valid_cache(path, expected={"backend": "farneback"})
    assert is_valid_cache(path, expected=cache.expected_meta("dis", False, 64))
    assert not is_valid_cache(path, expected=cache.expected_meta("dis", True, 64))
    assert cache.cache_problem(path, expected={"short_side": 128}) == "short_side is 64, expected 128"
    assert cache.cache_problem(tmp_path / "nope.npz") == "missing"

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not is_valid_cache(truncated, deep=False)
    with pytest.raises(CacheError, match="truncated.npz"):
        load_flow(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all" * 100)
    assert not is_valid_cache(garbage)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert not is_valid_cache(empty)


def test_deep_check_catches_a_flipped_byte_inside_the_data(saved, tmp_path):
    path, _ = saved
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("flow_00001.npy")
    data = bytearray(path.read_bytes())
    # Local header: 30 fixed bytes, then the name and extra field whose lengths sit at offsets 26 and 28.
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    data[middle] ^= 0xFF
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(bytes(data))
    assert is_valid_cache(flipped, deep=False)  # same length, headers intact: only the CRC can tell
    assert not is_valid_cache(flipped)


def test_old_format_version_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "FORMAT_VERSION", 0)
    save_flow(tmp_path / "old.npz", random_flow(2, 8, 8), META)
    monkeypatch.setattr(cache, "FORMAT_VERSION", 1)
    assert not is_valid_cache(tmp_path / "old.npz")
    with pytest.raises(CacheError, match="format version 0"):
        load_flow(tmp_path / "old.npz")


def test_cache_path_follows_the_video_key(tmp_path):
    path = flow_cache_path(tmp_path, "synthetic", "data/raw/synthetic/videos/000123.mp4")
    assert path == tmp_path.resolve() / "data" / "flow" / "synthetic" / "videos" / "000123.npz"

"""The decoded cache (`data.decoded_cache`, mme/motion/decoded.py): extract writes one entry per train video,
the datasets' items read from it equal the decode + `.npz` items exactly, and an entry that is missing, stale,
damaged or half-written is never used (the video is decoded instead, with a warning)."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import mme.motion.decoded as decoded
from mme.config import load_config
from mme.data.lists import read_list, resolve_video
from mme.data.video import read_frames
from mme.datasets import PretrainDataset, VideoClsDataset
from mme.motion.cache import flow_cache_path, load_flow, save_flow
from mme.motion.decoded import DecodedEntries, decoded_entry_path, entry_problem, open_entry, write_entry
from mme.paths import Paths
from mme.stages import extract

ON = ["data.decoded_cache=true", "data.flip=on"]
OFF = ["data.decoded_cache=false", "data.flip=on"]
CUT = 16  # a shot cut put into every other train video's flow cache, so cut-free starts and cut flags matter


def train_videos(workdir) -> list[str]:
    return [rel for rel, _ in read_list(Paths(workdir).list_file("synthetic", "train"))]


@pytest.fixture(scope="module")
def cached_workdir(tmp_path_factory, extracted_workdir):
    """The smoke set with backward flow, a cut in every other video, and a decoded-cache entry per train video."""
    workdir = tmp_path_factory.mktemp("decoded")
    shutil.copytree(extracted_workdir / "data", workdir / "data")
    extract.run(load_config("smoke", ["target.fb_check=true"]), workdir)
    for rel in train_videos(workdir)[::2]:
        path = flow_cache_path(workdir, "synthetic", rel)
        stored = load_flow(path)
        save_flow(path, stored.window(0, stored.num_pairs), {**stored.meta, "cuts": [CUT]},
                  backward=stored.window(0, stored.num_pairs, backward=True))
    metrics = extract.run(load_config("smoke", ["target.fb_check=true", "data.decoded_cache=true"]), workdir)
    assert metrics["reused"] == metrics["decoded_written"] == len(train_videos(workdir)) == 16
    return workdir


@pytest.fixture
def workdir_copy(tmp_path, cached_workdir):
    shutil.copytree(cached_workdir / "data", tmp_path / "data")
    return tmp_path


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def pretrain_pair(workdir, extra: list[str], targets: bool = False) -> tuple[PretrainDataset, PretrainDataset]:
    on = PretrainDataset(load_config("smoke", [*ON, *extra]), workdir, targets=targets)
    off = PretrainDataset(load_config("smoke", [*OFF, *extra]), workdir, targets=targets)
    return on, off


def assert_equal_items(on, off, epochs=(0, 3), indices=range(0, 16, 3)) -> None:
    for epoch in epochs:
        on.set_epoch(epoch)
        off.set_epoch(epoch)
        for index in indices:
            assert_same(on[index], off[index])


@pytest.mark.parametrize("extra", [["target.fb_check=true"], [], ["data.avoid_cuts=false"]])
def test_pretrain_items_equal_the_decode_path(cached_workdir, extra):
    on, off = pretrain_pair(cached_workdir, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry is valid: no fallback, no warning
        assert_equal_items(on, off)
    assert not on.decoded.problems and off.decoded is None
    assert len(on.decoded._entries) == 6  # the items did come from the entries
    cut_video = on.items[0][0]
    assert load_flow(flow_cache_path(cached_workdir, "synthetic", cut_video)).cuts == [CUT]


def test_pretrain_items_with_targets_and_flips_equal_the_decode_path(cached_workdir):
    on, off = pretrain_pair(cached_workdir, ["target.fb_check=true"], targets=True)
    assert_equal_items(on, off, epochs=(1,), indices=(0, 5, 10))
    flipped = [on.load(i, np.random.default_rng([0, 1, i])).crop.flip for i in range(16)]
    assert any(flipped) and not all(flipped)  # both branches of the flip were compared


def test_pretrain_items_of_a_kind_without_flow_equal_the_decode_path(cached_workdir):
    on, off = pretrain_pair(cached_workdir, ["target.kind=pixel"], targets=True)
    assert_equal_items(on, off, epochs=(0, 2), indices=(1, 7))
    assert not on.decoded.problems


def test_items_are_the_same_in_dataloader_workers_and_a_pickled_dataset_carries_no_mapped_data(cached_workdir):
    on, off = pretrain_pair(cached_workdir, ["target.fb_check=true"])
    on.set_epoch(2)
    off.set_epoch(2)
    first = on[0]  # opens entry 0 in this process
    assert len(pickle.dumps(on)) < 100_000  # one smoke entry is ~1.4 MB
    loaded = next(iter(DataLoader(on, batch_size=2, num_workers=2)))
    for i in range(2):
        assert_same({k: v[i] for k, v in loaded.items()}, off[i])
    assert_same(first, off[0])


@pytest.mark.parametrize("extra", [[], ["finetune.token_drop=0.5"], ["data.sampling=segment"]])
def test_finetune_train_items_equal_the_decode_path(cached_workdir, extra):
    on = VideoClsDataset(load_config("smoke", [*ON, *extra]), cached_workdir, "train", "train")
    off = VideoClsDataset(load_config("smoke", [*OFF, *extra]), cached_workdir, "train", "train")
    assert_equal_items(on, off, epochs=(0, 2, 5), indices=range(0, 16, 4))
    assert not on.decoded.problems and len(on.decoded._entries) == 4
    assert VideoClsDataset(load_config("smoke", ON), cached_workdir, "val", "train").decoded is None
    assert VideoClsDataset(load_config("smoke", ON), cached_workdir, "train", "test").decoded is None


def test_an_entry_holds_the_decoded_frames_and_the_exact_flow(cached_workdir):
    rel = train_videos(cached_workdir)[0]
    video = resolve_video(cached_workdir, rel)
    flow = load_flow(flow_cache_path(cached_workdir, "synthetic", rel))
    entry = open_entry(decoded_entry_path(cached_workdir, "synthetic", rel), video, 64, flow.meta, backward=True)
    assert entry.num_frames == flow.num_pairs + 1 == 32
    picks = np.array([5, 0, 31, 5])
    assert np.array_equal(entry.frames(picks), read_frames(video, picks, short_side=64))
    for start, stop in ((0, 31), (3, 9), (30, 31), (7, 7)):
        for backward in (False, True):
            assert np.array_equal(entry.window(start, stop, backward), flow.window(start, stop, backward))
    assert entry.window(3, 9).dtype == np.float32 and entry.window(3, 9).shape == (6, 64, 64, 2)
    assert entry.window(0, 31).flags.writeable and entry.frames(picks).flags.writeable  # copies, not the map


def stale_dataset(workdir, break_entry, kind: str = "pretrain"):
    """Datasets with and without the cache after `break_entry(workdir, rel, entry, video)` on train video 0."""
    rel = train_videos(workdir)[0]
    break_entry(workdir, rel, decoded_entry_path(workdir, "synthetic", rel), resolve_video(workdir, rel))
    if kind == "pretrain":
        return pretrain_pair(workdir, ["target.fb_check=true"])
    return tuple(VideoClsDataset(load_config("smoke", cfg), workdir, "train", "train") for cfg in (ON, OFF))


def replace_video(workdir, rel, entry, video):  # noqa: ARG001
    other = next(p for p in sorted(video.parent.glob("*.mp4")) if p.stat().st_size != video.stat().st_size)
    shutil.copyfile(other, video)


def truncate_frames(workdir, rel, entry, video):  # noqa: ARG001
    with open(entry / decoded.FRAMES, "r+b") as file:
        file.truncate(os.path.getsize(entry / decoded.FRAMES) - 100)


def garble_header(workdir, rel, entry, video):  # noqa: ARG001
    with open(entry / decoded.FLOW, "r+b") as file:
        file.write(b"not an npy")
    with open(entry / decoded.FRAMES, "r+b") as file:
        file.write(b"not an npy")


def other_flow_cache(workdir, rel, entry, video):  # noqa: ARG001  the .npz was redone after the entry
    path = flow_cache_path(workdir, "synthetic", rel)
    stored = load_flow(path)
    save_flow(path, stored.window(0, stored.num_pairs), {**stored.meta, "cuts": [3]},
              backward=stored.window(0, stored.num_pairs, backward=True))


# Fine-tuning reads no flow, so a redone flow cache does not concern its entries (pretrain only).
BROKEN = [(kind, fn) for fn in (replace_video, truncate_frames, garble_header) for kind in ("pretrain", "finetune")]


@pytest.mark.parametrize(("kind", "break_entry"), [*BROKEN, ("pretrain", other_flow_cache)])
def test_a_stale_or_damaged_entry_falls_back_with_one_warning(workdir_copy, break_entry, kind):
    on, off = stale_dataset(workdir_copy, break_entry, kind)
    with pytest.warns(UserWarning, match=r"decoded cache entry .*videos/.* re-run `mme extract`") as caught:
        assert_equal_items(on, off, epochs=(0, 1), indices=(0, 0, 1, 2))
    assert len([w for w in caught if "decoded cache" in str(w.message)]) == 1 and len(on.decoded.problems) == 1
    assert on.decoded._entries[(on.items[0][0], kind == "pretrain")] is None
    assert on.decoded._entries[(on.items[1][0], kind == "pretrain")] is not None


def test_a_touched_video_keeps_its_entry(workdir_copy):
    def touch(workdir, rel, entry, video):  # noqa: ARG001  same content, new mtime (a checkout)
        os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))

    on, off = stale_dataset(workdir_copy, touch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_equal_items(on, off, epochs=(0,), indices=(0, 1))
    assert on.decoded._entries[(on.items[0][0], True)] is not None


def test_an_entry_rewritten_after_a_touch_is_byte_identical(workdir_copy):
    """No time stamps in an entry: rebuilt from the same video elsewhere, it hashes the same (DVC)."""
    rel = train_videos(workdir_copy)[0]
    video = resolve_video(workdir_copy, rel)
    flow = load_flow(flow_cache_path(workdir_copy, "synthetic", rel))
    entry = decoded_entry_path(workdir_copy, "synthetic", rel)
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))
    write_entry(entry, video, read_frames(video, range(flow.num_pairs + 1), short_side=64), flow, 64)
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before


def test_extract_redoes_a_damaged_or_stale_entry_and_reuses_the_rest(workdir_copy):
    videos = train_videos(workdir_copy)
    entry = decoded_entry_path(workdir_copy, "synthetic", videos[1])
    frames_file = entry / decoded.FRAMES
    data = bytearray(frames_file.read_bytes())
    data[-1] ^= 0xFF  # same size and header: only the CRC sees it
    frames_file.write_bytes(bytes(data))
    flow = load_flow(flow_cache_path(workdir_copy, "synthetic", videos[1]))
    video = resolve_video(workdir_copy, videos[1])
    assert entry_problem(entry, video, 64, flow, deep=False) is None
    assert "CRC" in entry_problem(entry, video, 64, flow)
    shutil.rmtree(decoded_entry_path(workdir_copy, "synthetic", videos[2]))
    flow_cache_path(workdir_copy, "synthetic", videos[3]).unlink()  # flow and entry made in one pass
    metrics = extract.run(load_config("smoke", ["target.fb_check=true", "data.decoded_cache=true"]), workdir_copy)
    assert metrics["decoded_written"] == 3 and (metrics["reused"], metrics["extracted"]) == (15, 1)
    assert metrics["decoded_bytes"] == sum(f.stat().st_size for f in Paths(workdir_copy).decoded_dir("synthetic")
                                           .rglob("*.*"))
    assert entry_problem(entry, video, 64, flow) is None
    fresh = videos[3]
    fresh_flow = load_flow(flow_cache_path(workdir_copy, "synthetic", fresh))
    fresh_video = resolve_video(workdir_copy, fresh)
    opened = open_entry(decoded_entry_path(workdir_copy, "synthetic", fresh), fresh_video, 64, fresh_flow.meta, True)
    assert np.array_equal(opened.frames(np.arange(32)), read_frames(fresh_video, range(32), short_side=64))
    assert np.array_equal(opened.window(0, 31, backward=True), fresh_flow.window(0, 31, backward=True))


def test_an_interrupted_write_leaves_no_valid_looking_entry(workdir_copy, monkeypatch):
    rel = train_videos(workdir_copy)[3]
    video = resolve_video(workdir_copy, rel)
    entry = decoded_entry_path(workdir_copy, "synthetic", rel)
    flow = load_flow(flow_cache_path(workdir_copy, "synthetic", rel))
    frames = read_frames(video, range(32), short_side=64)
    shutil.rmtree(entry)
    real_save, calls = np.save, []

    def dying_save(path, array, **kwargs):  # the writer dies after frames.npy is complete
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(path, array, **kwargs)

    monkeypatch.setattr(decoded.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_entry(entry, video, frames, flow, 64)
    monkeypatch.undo()
    assert not entry.exists() and not list(entry.parent.glob(f".{entry.name}.*"))  # cleaned up on the way out
    # A writer killed outright leaves its temp directory; no reader looks there, and extract removes it.
    write_entry(entry, video, frames, flow, 64)
    killed = entry.parent / f".{entry.name}.x1y2{decoded.TEMP_SUFFIX}"
    os.replace(entry, killed)
    entries = DecodedEntries(workdir_copy, "synthetic", 64)
    with pytest.warns(UserWarning, match="missing"):
        assert entries.get(rel, video, flow.meta) is None
    metrics = extract.run(load_config("smoke", ["target.fb_check=true", "data.decoded_cache=true"]), workdir_copy)
    assert metrics["decoded_written"] == 1 and not killed.exists()
    assert entry_problem(entry, video, 64, flow) is None


def test_extract_with_the_key_off_writes_nothing_under_data_decoded(extracted_workdir):
    # The session's smoke extract ran with data.decoded_cache=false (the smoke preset's value).
    assert load_config("smoke").data.decoded_cache is False and load_config("mini").data.decoded_cache is True
    assert load_config("paper").data.decoded_cache is False
    root = extracted_workdir / "data" / "decoded"
    assert (root / "synthetic").is_dir()  # the declared DVC output exists
    assert [p for p in root.rglob("*")] == [root / "synthetic"]

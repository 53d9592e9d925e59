"""Trajectory targets on real footage: shot cuts invalidate crossing trajectories, `target.fb_check` ends
occluded ones, `target.prune` drops jumps; batched equals per clip; `traj_official` ignores all three.

Every clip is built directly as a `TargetBatch` / `TargetInputs` with analytic flows (smoke geometry: 64 px
frames, 16 px patches, K = 4, L = 4, slots at offsets 0, 4, 8, 12, stride 2).
"""

from __future__ import annotations

import pytest
import torch

from mme.config import load_config
from mme.motion.shots import crosses_cut, cut_pair_flags
from mme.targets import TARGETS, TargetBatch, TargetGeometry, TargetInputs, track_tokens
from mme.targets.trajectory import span_has_cut

SIZE, PAIRS = 64, 20  # 20 pairs: enough for the sparse steps too (last slot 12 + L*s = 20)
CUT = 6  # the clip's frames 0..5 are one scene, 6.. another: flow pair 5 spans the cut
I0 = 30  # the clip's first frame in the video


def config(*overrides: str):
    return load_config("smoke", list(overrides))


def offsets_for(cfg) -> torch.Tensor:
    geo = TargetGeometry.from_cfg(cfg)
    return torch.tensor(sorted(set(geo.input_offsets) | TARGETS["traj"].frame_offsets(geo)))


def texture(seed: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, SIZE, SIZE, 3, generator=generator) * 255


def cut_clip(cfg, cut_pairs: bool = True, cut: int = CUT) -> TargetInputs:
    """Two textured scenes joined by a cut at offset CUT; a gentle 0.25 px/frame pan within the shots and a
    random +-0.5 px field across the cut (so that without cut information nothing leaves the frame)."""
    offsets = offsets_for(cfg)
    frames = torch.where((offsets < cut).view(-1, 1, 1, 1), texture(1, len(offsets)), texture(2, len(offsets)))
    flow = torch.zeros(PAIRS, SIZE, SIZE, 2)
    flow[..., 0] = 0.25
    flow[cut - 1] = torch.rand(SIZE, SIZE, 2, generator=torch.Generator().manual_seed(3)) - 0.5
    flags = cut_pair_flags([I0 + cut], I0, PAIRS) if cut_pairs else None
    return TargetInputs(frames, offsets, flow, cut_pairs=flags)


@pytest.mark.parametrize("interpolate", ["true", "false"])
@pytest.mark.parametrize("cut", [4, 5, CUT, 13, 16])
def test_no_valid_trajectory_crosses_the_cut_and_the_others_stay_valid(interpolate, cut):
    cfg = config(f"target.interpolate={interpolate}")
    geo = TargetGeometry.from_cfg(cfg)
    clip = cut_clip(cfg, cut=cut)
    assert clip.cut_pairs.nonzero().view(-1).tolist() == [cut - 1]
    without = track_tokens(cut_clip(cfg, cut_pairs=False, cut=cut), geo, with_shape=False).valid
    assert without.all()  # the cut alone decides below
    valid = track_tokens(clip, geo, with_shape=False).valid  # (J, Hp, Wp, K)
    slot_start = torch.tensor(geo.slot_offsets)
    crossing = crosses_cut([I0 + cut], I0, slot_start, geo.length, geo.track_step)  # (J,)
    if cut == CUT:  # interpolate: only slot 1 (pairs 4..7) holds pair 5; sparse (pairs f..f+7): slots 0 and 1
        assert crossing.tolist() == ([False, True, False, False] if geo.track_step == 1 else [True, True, False, False])
    assert crossing.any() and not crossing.all()
    want = ~crossing.view(-1, 1, 1, 1).expand_as(valid)
    assert torch.equal(valid, want)
    # The built target: every column of a crossing slot's tokens is invalid, every other one valid.
    target, target_valid = TARGETS["traj"].build(clip, cfg)
    per_slot = target_valid.view(geo.slots, -1)
    assert not per_slot[crossing].any() and per_slot[~crossing].all()
    assert (target.view(geo.slots, -1)[crossing] == 0).all()
    # All-False flags change nothing.
    none_cut = TargetInputs(clip.frames, clip.offsets, clip.flow, cut_pairs=torch.zeros(PAIRS, dtype=torch.bool))
    plain = TargetInputs(clip.frames, clip.offsets, clip.flow)
    for kind in ("traj", "hog+traj_pos"):
        got, got_valid = TARGETS[kind].build(none_cut, cfg)
        want_t, want_valid = TARGETS[kind].build(plain, cfg)
        assert torch.equal(got_valid, want_valid) and torch.equal(got, want_t)


def test_cut_pair_flags_mark_the_pair_entering_each_cut_of_the_window():
    assert cut_pair_flags([3, 31, 36, 50], 30, 8).nonzero().view(-1).tolist() == [0, 5]  # 3, 50: outside
    assert not cut_pair_flags([30], 30, 8).any()  # a cut at the window's first frame: no pair of it crosses
    assert cut_pair_flags([38], 30, 8).tolist() == [False] * 7 + [True]
    assert cut_pair_flags(None, 30, 8) is None and not cut_pair_flags([], 0, 4).any()


def test_span_has_cut_counts_the_pairs_of_each_span():
    cut_pairs = torch.zeros(2, 10, dtype=torch.bool)
    cut_pairs[0, 3] = cut_pairs[1, 9] = True
    first = torch.tensor([0, 3, 4, 6, 9])
    assert span_has_cut(cut_pairs, first, 1).tolist() == [[False, True, False, False, False],
                                                          [False, False, False, False, True]]
    assert span_has_cut(cut_pairs, first, 4).tolist() == [[True, True, False, False, False],
                                                          [False, False, False, True, True]]


def test_hog_traj_pos_drops_crossing_trajectories_and_traj_official_keeps_them():
    cfg = config()
    clip, plain = cut_clip(cfg), cut_clip(cfg, cut_pairs=False)
    geo = TargetGeometry.from_cfg(cfg)
    parts = TARGETS["hog+traj_pos"].parts(cfg)
    _, valid = TARGETS["hog+traj_pos"].build(clip, cfg)
    pos = valid[:, parts["hog"]:].reshape(geo.slots, -1)
    assert not pos[1].any() and pos[[0, 2, 3]].all() and valid[:, :parts["hog"]].all()
    # The released code has none of the checks: the same numbers with or without the cut flags.
    got, got_valid = TARGETS["traj_official"].build(clip, config("target.kind=traj_official"))
    want, want_valid = TARGETS["traj_official"].build(plain, config("target.kind=traj_official"))
    assert torch.equal(got_valid, want_valid) and torch.equal(got, want)


# A textured 16 px square sliding right 2 px per frame over a static textured background. Its edges sit on
# odd pixels, so that no grid point (x, y = 3.5 mod 8, moving in steps of 2 px) reads flow across an edge.
TOP, SIDE, LEFT0, SPEED = 17, 16, 1, 2


def object_mask(frame: int) -> torch.Tensor:
    """bool (SIZE, SIZE): the object's pixels on `frame`."""
    left = LEFT0 + SPEED * frame
    rows = (torch.arange(SIZE) >= TOP) & (torch.arange(SIZE) < TOP + SIDE)
    cols = (torch.arange(SIZE) >= left) & (torch.arange(SIZE) < left + SIDE)
    return rows[:, None] & cols[None, :]


def sliding_clip(cfg) -> TargetInputs:
    forward, backward = torch.zeros(PAIRS, SIZE, SIZE, 2), torch.zeros(PAIRS, SIZE, SIZE, 2)
    for i in range(PAIRS):
        forward[i][object_mask(i)] = torch.tensor([float(SPEED), 0.0])
        backward[i][object_mask(i + 1)] = torch.tensor([-float(SPEED), 0.0])
    offsets = offsets_for(cfg)
    return TargetInputs(texture(4, len(offsets)), offsets, forward, backward=backward)


def covered_points(geo: TargetGeometry) -> torch.Tensor:
    """bool (J, Hp, Wp, K): background points the object covers within their L steps (analytic; a step of s
    frames is covered when any of its frames is)."""
    from mme.motion.tracking import patch_grid_points

    hp = SIZE // geo.patch
    start = patch_grid_points(hp, hp, geo.patch, geo.points).floor().long()  # the pixel every point reads
    out = []
    for f in geo.slot_offsets:
        on_object = object_mask(f)[start[:, 1], start[:, 0]]
        frames = range(1, geo.length * geo.track_step + 1)
        later = torch.stack([object_mask(f + t)[start[:, 1], start[:, 0]] for t in frames])
        out.append(~on_object & later.any(0))
    return torch.stack(out).view(geo.slots, hp, hp, geo.points)


@pytest.mark.parametrize("interpolate", ["true", "false"])
def test_fb_check_invalidates_the_points_the_object_covers_and_keeps_the_rest(interpolate):
    cfg = config("target.fb_check=true", f"target.interpolate={interpolate}")
    geo = TargetGeometry.from_cfg(cfg)
    clip = sliding_clip(cfg)
    covered = covered_points(geo)
    assert 4 <= covered.sum() < covered.numel() // 4  # some, not most
    # One-way tracking keeps every trajectory (the covered points drift onto the occluder) ...
    off = track_tokens(clip, TargetGeometry.from_cfg(config(f"target.interpolate={interpolate}")),
                       with_shape=False).valid
    assert off.all()
    # ... the check ends exactly the covered ones.
    valid = track_tokens(clip, geo, with_shape=False).valid
    assert torch.equal(valid, ~covered)
    _, target_valid = TARGETS["traj"].build(clip, cfg)
    per_point = target_valid[:, :geo.points * geo.length * 2].reshape(-1, geo.points, geo.length * 2)
    assert torch.equal(per_point.all(-1), ~covered.view(-1, geo.points))
    # Switched on without backward flow: an error naming the fix.
    with pytest.raises(ValueError, match="fb_check"):
        TARGETS["traj"].build(TargetInputs(clip.frames, clip.offsets, clip.flow), cfg)


def jumping_clip(cfg) -> TargetInputs:
    """A 0.5 px/frame pan; on pair 1 the top-left 16x16 pixels jump 10 px further right."""
    flow = torch.zeros(PAIRS, SIZE, SIZE, 2)
    flow[..., 0] = 0.5
    flow[1, :16, :16, 0] += 10.0
    offsets = offsets_for(cfg)
    return TargetInputs(texture(5, len(offsets)), offsets, flow)


def test_prune_drops_the_jumping_track_only():
    cfg = config("target.prune=true")
    geo = TargetGeometry.from_cfg(cfg)
    clip = jumping_clip(cfg)
    off = track_tokens(clip, TargetGeometry.from_cfg(config()), with_shape=False)
    assert off.valid.all()
    steps = (off.tracks[0, 0, 0, :, 1:] - off.tracks[0, 0, 0, :, :-1]).norm(dim=-1)  # slot 0, patch (0, 0)
    torch.testing.assert_close(steps, torch.tensor([[0.5, 10.5, 0.5, 0.5]]).expand(4, 4))
    valid = track_tokens(clip, geo, with_shape=False).valid
    want = torch.ones_like(valid)
    want[0, 0, 0] = False  # the four points of slot 0's top-left patch, and nothing else
    assert torch.equal(valid, want)


@pytest.mark.parametrize("kind", ["traj", "hog+traj_pos"])
@pytest.mark.parametrize("interpolate", ["true", "false"])
def test_batched_equals_per_clip_with_cuts_fb_check_and_prune(kind, interpolate):
    cfg = config(f"target.kind={kind}", f"target.interpolate={interpolate}", "target.fb_check=true",
                 "target.prune=true")
    clips = []
    for clip in (cut_clip(cfg), sliding_clip(cfg), jumping_clip(cfg)):
        backward = clip.backward if clip.backward is not None else -clip.flow
        cuts = clip.cut_pairs if clip.cut_pairs is not None else torch.zeros(PAIRS, dtype=torch.bool)
        clips.append(TargetInputs(clip.frames, clip.offsets, clip.flow, cut_pairs=cuts, backward=backward))
    short = clips[0]  # a window that ends early: its flags and backward flow are padded in the batch
    clips.append(TargetInputs(short.frames.flip(2).contiguous(), short.offsets, short.flow[:14],
                              cut_pairs=cut_pair_flags([I0 + 9], I0, 14), backward=short.backward[:14]))
    batch = TargetBatch.collate(clips)
    assert batch.cut_pairs.shape == (4, PAIRS) and batch.backward.shape == batch.flow.shape
    assert not batch.cut_pairs[3, 14:].any()
    target, valid = TARGETS[kind].build_batch(batch, cfg)
    for b, clip in enumerate(clips):
        alone, alone_valid = TARGETS[kind].build(clip, cfg)
        assert torch.equal(valid[b], alone_valid), b
        assert (target[b] - alone).abs().max() <= 1e-5, b
    # The checks did something in every clip (a broadcast of one clip's validity would not pass).
    assert all(not v.all() for v in valid)
    assert len({tuple(v.sum(-1).tolist()) for v in valid}) == len(clips)
    # A clip without cut information batched with clips that have it: its flags read as no cut.
    unknown = TargetInputs(clips[1].frames, clips[1].offsets, clips[1].flow, backward=clips[1].backward)
    mixed = TargetBatch.collate([clips[0], unknown])
    assert not mixed.cut_pairs[1].any() and mixed.cut_pairs[0].any()
    _, mixed_valid = TARGETS[kind].build_batch(mixed, cfg)
    assert torch.equal(mixed_valid[0], valid[0]) and torch.equal(mixed_valid[1], TARGETS[kind].build(unknown, cfg)[1])

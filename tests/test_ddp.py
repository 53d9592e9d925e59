"""DDP: two gloo processes on CPU make the same update as one process on the combined batch.

Every clip has the same number of masked tokens and all targets are valid, so the mean of the two ranks'
per-rank mean losses equals the combined batch's mean loss and DDP's averaged gradients equal the
single-process gradients; only float32 summation order differs (tolerance 1e-5 absolute / 1e-4 relative on
weights after one AdamW update, 1e-6 relative on the loss).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mme.engine.distributed import DistEnv, all_reduce_sum, init_distributed, make_sampler, process_group, wrap_ddp
from mme.engine.loops import make_loader, train_one_epoch
from mme.engine.optim import build_optimizer, build_scheduler
from mme.models import MaskedMotionPretrainer
from mme.stages.pretrain import masked_motion_loss

TOKENS, MASKED, WIDTH = 8, 5, 16


class FixedClips(torch.utils.data.Dataset):
    def __init__(self, size: int = 4):
        g = torch.Generator().manual_seed(3)
        self.video = torch.randn(size, 3, 4, 32, 32, generator=g)
        self.mask = torch.stack([torch.randperm(TOKENS, generator=g) < MASKED for _ in range(size)])
        self.target = torch.randn(size, TOKENS, WIDTH, generator=g)

    def __len__(self):
        return len(self.video)

    def __getitem__(self, i):
        return {"video": self.video[i], "mask": self.mask[i], "target": self.target[i],
                "target_valid": torch.ones(TOKENS, WIDTH, dtype=torch.bool)}


def one_update(env: DistEnv, batch_size: int, accum: int) -> tuple[dict[str, torch.Tensor], float]:
    torch.manual_seed(0)
    model = MaskedMotionPretrainer({"pos": 6, "shape": 10}, img_size=32, num_frames=4, embed_dim=32, depth=2,
                                   num_heads=2, decoder_dim=16, decoder_num_heads=2)
    loader = make_loader(FixedClips(), env, batch_size=batch_size, shuffle=False, seed=0, num_workers=0,
                         drop_last=True)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, 1, 0, 1e-3)
    stats = train_one_epoch(wrap_ddp(model, env), loader, optimizer, scheduler, masked_motion_loss, epoch=0,
                            updates_per_epoch=1, device=torch.device("cpu"), accum_steps=accum, clip_grad=1.0,
                            show_progress=False)
    return model.state_dict(), stats["loss"]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    results = {"sampler": list(make_sampler(FixedClips(), env, shuffle=True, seed=5))}
    results["plain"] = one_update(env, batch_size=2, accum=1)
    results["accum"] = one_update(env, batch_size=1, accum=2)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_combined_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    expected_state, expected_loss = one_update(DistEnv(), batch_size=4, accum=1)
    assert sorted(ranks[0]["sampler"] + ranks[1]["sampler"]) == [0, 1, 2, 3]  # disjoint shards
    for mode in ("plain", "accum"):
        for rank in ranks:
            state, loss = rank[mode]
            assert loss == pytest.approx(expected_loss, rel=1e-6)
            for key, value in expected_state.items():
                torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-4, msg=f"{mode} {key}")
    moved = [k for k, v in expected_state.items() if not torch.equal(v, one_update_initial()[k])]
    assert len(moved) > 10  # the update changed the weights (the comparison is not vacuous)


def one_update_initial() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MaskedMotionPretrainer({"pos": 6, "shape": 10}, img_size=32, num_frames=4, embed_dim=32, depth=2,
                                  num_heads=2, decoder_dim=16, decoder_num_heads=2).state_dict()


def _stage_group_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with process_group("cpu") as env:  # as a stage does: it creates the group ...
        inside = torch.distributed.is_initialized() and env.world_size == 2
        summed = all_reduce_sum(torch.tensor([float(rank + 1)]))
    after = torch.distributed.is_initialized()  # ... and destroys it when the stage ends
    torch.save({"inside": inside, "after": after, "sum": float(summed)}, os.path.join(out_dir, f"pg{rank}.pt"))


@pytest.mark.slow
def test_a_stage_destroys_the_process_group_it_created(tmp_path):
    mp.spawn(_stage_group_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"pg{rank}.pt", weights_only=False)
        assert result == {"inside": True, "after": False, "sum": 3.0}

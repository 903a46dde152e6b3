"""The same training loop under DDP (2 CPU ranks, gloo): ranks stay identical and share the epoch's cells."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_data import cellbench_sng, tiny_config


def _rank_main(rank: int, world: int, tmp: str, datasets_dir: str) -> None:
    from pathlib import Path

    from scpermut_dist.api import fit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        adata = cellbench_sng(Path(datasets_dir))
        ref = fit(adata, "cell_line", "batch", tiny_config("train.max_epochs=2"),
                  out_dir=os.path.join(tmp, "ckpt"))
        torch.save({"state": ref.module.state_dict(), "history": ref.history}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_train_one_identical_model(tmp_path, datasets_dir):
    mp.spawn(_rank_main, args=(2, str(tmp_path), str(datasets_dir)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # params AND BN statistics
    h0, h1 = r0["history"], r1["history"]
    assert [(r["stage"], r["steps"], r.get("val_balanced_accuracy")) for r in h0] == \
           [(r["stage"], r["steps"], r.get("val_balanced_accuracy")) for r in h1]
    n_train = 571 - 114  # SNG cells minus the stratified validation sample
    warm = [r for r in h0 if r["stage"] == "warmup_dann"]
    assert all(r["cells"] >= n_train for r in warm) and all(r["steps"] == 8 for r in warm)  # global batch 64: 32 per rank, ceil(457 / 2 / 32)
    assert (tmp_path / "ckpt" / "manifest.json").is_file()  # rank 0 writes the checkpoint

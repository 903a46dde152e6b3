"""Shards across DataLoader workers (spawn) and torch.distributed ranks (gloo): disjoint, complete, equal steps."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from streaming_data import SELECTION, grouped_adata, source_and_plan

from loaders.dataset import PairedCellDataset
from loaders.sampling import SamplingPlan
from loaders.sources import H5adSpec

N_CELLS, BATCH, IO = 2400, 60, 500


@pytest.fixture(scope="module")
def h5ad_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("dl") / "ref.h5ad"
    grouped_adata(n=N_CELLS).write_h5ad(path)
    return H5adSpec(str(path), SELECTION)


@pytest.fixture(scope="module")
def census_spec(tmp_path_factory):
    """A Census-shaped SOMA collection (opened through cellxgene_census.open_soma by CensusSpec)."""
    from loaders.selection import CellSelection
    from loaders.sources import spec_from_uri
    from loaders.synth import synthesize_census

    uri = tmp_path_factory.mktemp("census") / "census"
    synthesize_census(uri, N_CELLS, 30, seed=1, mouse_cells=100)
    return spec_from_uri(str(uri), CellSelection(label_key="cell_type", batch_keys=("dataset_id", "donor_id")))


def make_ds(spec, **kw):
    plan = SamplingPlan.from_source(spec.open(), seed=11, balance=kw.pop("balance", 0.0))
    return PairedCellDataset(spec, plan, batch_size=BATCH, io_batch_cells=IO, **kw)


def pairs(batches):
    """(anchor id, partner expression fingerprint) of every row."""
    cells = torch.cat([b.cell_n for b in batches]).tolist()
    partner = torch.cat([b.x_partner_ng.sum(1) for b in batches]).tolist()
    return sorted(zip(cells, partner))


def test_two_spawn_workers_same_multiset_as_in_process_and_exact_resume(h5ad_spec):
    ds0 = make_ds(h5ad_spec)
    in_proc = [b for b in ds0.loader(num_workers=0)]
    ds2 = make_ds(h5ad_spec)
    two = [b for b in ds2.loader(num_workers=2)]
    assert len(two) == len(in_proc) == len(ds2)
    assert pairs(two) == pairs(in_proc)  # same (anchor, partner) multiset, only interleaving differs
    assert ds2.state_dict()["epoch"] == 1  # the wrapper counted the epoch in the main process

    # exact resume through workers: stop after k minibatches, restore in a fresh dataset
    ds_a = make_ds(h5ad_spec)
    loader = ds_a.loader(num_workers=2)
    k = 7
    it = iter(loader)
    head = [next(it) for _ in range(k)]
    state = loader.state_dict()
    it.close()
    assert state["step"] == k and state["num_workers"] == 2
    ds_b = make_ds(h5ad_spec)
    ds_b.load_state_dict(state)
    tail = [b for b in ds_b.loader(num_workers=2)]
    full = head + tail
    assert len(full) == len(two)
    for x, y in zip(full, two):
        assert torch.equal(x.cell_n, y.cell_n) and torch.equal(x.x_partner_ng, y.x_partner_ng)


def test_rank_and_worker_shards_on_census_store_are_disjoint_and_cover_the_epoch(census_spec):
    assert type(census_spec).__name__ == "CensusSpec"
    per_rank = []
    for rank in range(2):
        ds = make_ds(census_spec, rank=rank, world_size=2)
        per_rank.append([b.cell_n for b in ds.loader(num_workers=2)])
        assert len(per_rank[-1]) == len(ds)
    assert len(per_rank[0]) == len(per_rank[1])
    cells = torch.cat([torch.cat(r) for r in per_rank]).numpy()
    # drop_last loses at most one minibatch per IO pool (N_CELLS is a whole number of global batches, so
    # nothing else is rounded away); the pools are those of the layout both ranks stream
    assert ds.plan.epoch_cells() == N_CELLS and N_CELLS % (2 * BATCH) == 0
    n_pools = sum(len(tasks) for tasks in ds.plan.layout(0, BATCH, IO, 2).tasks)
    assert n_pools >= 2
    assert len(np.unique(cells)) == len(cells) >= N_CELLS - n_pools * BATCH


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        src, plan = source_and_plan(grouped_adata(n=N_CELLS), seed=3, balance=0.0)
        ds = PairedCellDataset(src, plan, batch_size=BATCH, io_batch_cells=IO)  # rank/world from torch.distributed
        anchors = [b.cell_n.numpy() for b in ds]
        steps = torch.tensor([len(anchors), len(ds)])
        gathered = [torch.zeros_like(steps) for _ in range(world)]
        dist.all_gather(gathered, steps)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), anchors=np.concatenate(anchors),
                 steps=torch.stack(gathered).numpy(), world=ds.state_dict()["world_size"])
    finally:
        dist.destroy_process_group()


def test_torch_distributed_gloo_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    steps = res[0]["steps"]
    assert (steps == steps[0, 0]).all() and steps[0, 0] > 0  # every rank ran the same number of steps
    assert all(int(r["world"]) == world for r in res)
    a0, a1 = res[0]["anchors"], res[1]["anchors"]
    assert len(np.intersect1d(a0, a1)) == 0  # disjoint shards
    allc = np.concatenate([a0, a1])
    # complete up to drop_last: at most one minibatch lost per IO pool of the ranks' layout (same plan as a rank's)
    _, plan = source_and_plan(grouped_adata(n=N_CELLS), seed=3, balance=0.0)
    assert plan.epoch_cells() == N_CELLS and N_CELLS % (world * BATCH) == 0
    n_pools = sum(len(tasks) for tasks in plan.layout(0, BATCH, IO, world).tasks)
    assert n_pools >= world
    assert len(np.unique(allc)) == len(allc) == world * steps[0, 0] * BATCH >= N_CELLS - n_pools * BATCH

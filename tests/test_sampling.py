"""SamplingPlan: partners, class balance, determinism, shards and shuffle quality (obs only, no X reads)."""
from __future__ import annotations

import numpy as np
import pytest

from loaders.errors import DataError
from loaders.mixing import batch_entropy_ratio, minibatch_entropy
from loaders.sampling import SamplingPlan
from loaders.sharding import largest_remainder, round_robin_consumed


def grouped_codes(n=6000, n_batches=8, seed=0, chunk=64):
    """Labels/batches/chunks with rows grouped by batch, plus the partner corner cases."""
    rng = np.random.default_rng(seed)
    batches = np.sort(rng.integers(0, n_batches, n)).astype(np.int32)
    labels = rng.choice(5, size=n, p=[0.6, 0.25, 0.1, 0.04, 0.01]).astype(np.int32)
    labels[rng.random(n) < 0.05] = -1
    in_b0 = np.flatnonzero(batches == 0)
    labels[in_b0[:200]] = 5          # class 5: one batch, spread over several chunks
    labels[in_b0[300:310]] = 6       # class 6: one batch, one chunk (chunk size 64 -> 300..310 share one)
    labels[n // 2] = 7               # class 7: a singleton
    chunks = (np.arange(n) // chunk).astype(np.int64)
    return labels, batches, chunks


def collect(plan, epoch=0, batch_size=100, io=1024, world=1, rank=0, drop_last=True):
    pairs = list(plan.iter_minibatches(epoch, batch_size, io, world, rank, drop_last))
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    return a, b, pairs


def test_partners_same_type_not_self_other_batch_and_chunk():
    labels, batches, chunks = grouped_codes()
    plan = SamplingPlan(labels, batches, chunks, balance=0.5, seed=3)
    a, p, _ = collect(plan)
    lab = labels[a]
    assert np.all(labels[p] == lab)
    multi = np.isin(lab, [0, 1, 2, 3, 4])  # classes present in several batches
    assert np.all(p[multi] != a[multi])
    assert np.all(batches[p[multi]] != batches[a[multi]])
    assert np.all(chunks[p[multi]] != chunks[a[multi]])
    one_batch = lab == 5  # only one batch: at least another chunk
    assert one_batch.any() and np.all(chunks[p[one_batch]] != chunks[a[one_batch]])
    one_chunk = lab == 6  # one batch, one chunk: another cell still
    assert one_chunk.any() and np.all(p[one_chunk] != a[one_chunk])
    solo = lab == 7
    assert np.all(p[solo] == a[solo])
    unl = lab == -1
    assert unl.any() and np.all(p[unl] == a[unl])


def test_partners_redrawn_each_epoch_and_permute_off():
    labels, batches, chunks = grouped_codes()
    plan = SamplingPlan(labels, batches, chunks, seed=1)
    a0, p0, _ = collect(plan, epoch=0)
    a1, p1, _ = collect(plan, epoch=1)
    first0 = dict(zip(a0.tolist(), p0.tolist()))
    first1 = dict(zip(a1.tolist(), p1.tolist()))
    common = [c for c in first0 if c in first1 and labels[c] in (0, 1)]
    assert np.mean([first0[c] != first1[c] for c in common]) > 0.9
    off = SamplingPlan(labels, batches, chunks, seed=1, permute=False)
    a, p, _ = collect(off)
    assert np.array_equal(a, p)


def test_partners_only_from_the_selected_cells():
    labels, batches, chunks = grouped_codes()
    cells = np.flatnonzero(np.arange(len(labels)) % 3 != 0)
    plan = SamplingPlan(labels, batches, chunks, cells=cells, seed=0)
    a, p, _ = collect(plan)
    assert np.isin(a, cells).all() and np.isin(p, cells).all()


@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
def test_balance_exponent_gives_expected_class_freqs(balance):
    labels, batches, chunks = grouped_codes(n=20000, seed=2)
    plan = SamplingPlan(labels, batches, chunks, balance=balance, seed=0)
    counts = np.bincount(labels[labels >= 0], minlength=8).astype(float)
    expected = counts ** (1 - balance) / (counts ** (1 - balance)).sum()
    np.testing.assert_allclose(plan.target_class_freq, expected, rtol=1e-12)
    np.testing.assert_allclose(plan.sampled_class_freq, expected, rtol=1e-12)
    a, _, _ = collect(plan, batch_size=200, io=4096)
    lab = labels[a]
    got = np.bincount(lab[lab >= 0], minlength=8) / (lab >= 0).sum()
    assert 0.5 * np.abs(got - expected).sum() < 0.02
    # unlabelled cells keep their natural share of anchors
    assert abs((lab < 0).mean() - (labels < 0).mean()) < 0.01


def test_natural_epoch_is_a_permutation_without_repeats():
    labels, batches, chunks = grouped_codes(n=5000)
    plan = SamplingPlan(labels, batches, chunks, balance=0.0, seed=0)
    a, _, pairs = collect(plan, batch_size=128, io=1024)
    assert len(np.unique(a)) == len(a)  # pools emit whole minibatches they can fill without repeats
    assert 0.85 * (5000 // 128) <= len(pairs) == plan.layout(0, 128, 1024).steps
    assert all(len(x) == 128 for x, _ in pairs)
    assert {plan.layout(e, 128, 1024).steps for e in range(5)} == {5000 // 128 - 5}  # stable: -1 per pool
    for e in range(1, 4):
        again, _, _ = collect(plan, epoch=e, batch_size=128, io=1024)
        assert len(np.unique(again)) == len(again)


def test_determinism_and_per_epoch_reshuffle():
    labels, batches, chunks = grouped_codes()
    a = collect(SamplingPlan(labels, batches, chunks, seed=7), epoch=2)
    b = collect(SamplingPlan(labels, batches, chunks, seed=7), epoch=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = collect(SamplingPlan(labels, batches, chunks, seed=7), epoch=3)
    d = collect(SamplingPlan(labels, batches, chunks, seed=8), epoch=2)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    assert len(a[0]) == len(c[0])  # same epoch length, different order


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_disjoint_complete_equal_steps(world):
    labels, batches, chunks = grouped_codes(n=9000)
    plan = SamplingPlan(labels, batches, chunks, seed=0)
    per_rank = [collect(plan, batch_size=100, io=1024, world=world, rank=r) for r in range(world)]
    steps = [len(x[2]) for x in per_rank]
    assert len(set(steps)) == 1 and 0.85 * 9000 // (world * 100) <= steps[0] <= 9000 // (world * 100)
    anchors = [x[0] for x in per_rank]
    allc = np.concatenate(anchors)
    assert len(np.unique(allc)) == len(allc)  # disjoint (balance 0: no repeats)
    assert len(allc) == world * steps[0] * 100 >= 0.85 * 9000  # complete up to whole-minibatch rounding
    lay = plan.layout(0, 100, 1024, world)
    pools = [t.pool_id for r in range(world) for t in lay.rank_tasks(r)]
    assert len(pools) == len(set(pools))  # each IO pool is read by exactly one rank


def test_drop_last_false_keeps_every_cell_and_equal_steps():
    labels, batches, chunks = grouped_codes(n=1000)
    plan = SamplingPlan(labels, batches, chunks, seed=0)
    a, _, pairs = collect(plan, batch_size=430, io=4096, drop_last=False)
    assert [len(x) for x, _ in pairs] == [430, 430, 140]
    assert len(np.unique(a)) == 1000
    r = [len(collect(plan, batch_size=300, io=4096, world=2, rank=k, drop_last=False)[2]) for k in range(2)]
    assert r[0] == r[1] == 2


def test_cells_per_epoch_shorter_and_longer_than_the_data():
    labels, batches, chunks = grouped_codes(n=4000)
    short = SamplingPlan(labels, batches, chunks, seed=0, cells_per_epoch=1000)
    a, _, pairs = collect(short, batch_size=100, io=512)
    lay = short.layout(0, 100, 512)
    assert len(lay.tasks[0]) == 2  # only the 2 of 8 pools the epoch needs are drawn and read
    assert len(pairs) == lay.steps == 10 - 2 and len(np.unique(a)) == len(a)  # -1 minibatch per pool
    long = SamplingPlan(labels, batches, chunks, seed=0, cells_per_epoch=10000)
    a, _, pairs = collect(long, batch_size=100, io=512)
    assert len(pairs) == 100 - 20  # 2.5 passes of 8 pools: 20 pools read, -1 minibatch each
    reps = np.bincount(a, minlength=4000)
    assert reps.max() <= 3 and (reps >= 1).mean() > 0.95  # passes chain distinct permutations


def test_shuffle_mixes_dataset_grouped_rows_like_random():
    rng = np.random.default_rng(0)
    n = 120_000
    batches = np.sort(rng.integers(0, 30, n)).astype(np.int32)
    labels = rng.integers(0, 10, n).astype(np.int32)
    chunks = np.arange(n) // 2048
    plan = SamplingPlan(labels, batches, chunks, seed=0, block_cells=64)
    ours = [batches[a] for a, _ in plan.iter_minibatches(0, 430, 16384)]
    assert batch_entropy_ratio(ours, batches) >= 0.95
    contiguous = [batches[i:i + 430] for i in range(0, n - 430, 430)]
    assert batch_entropy_ratio(contiguous, batches) < 0.3


def test_entropy_helpers():
    assert minibatch_entropy(np.array([1, 1, 1])) == 0.0
    assert abs(minibatch_entropy(np.array([0, 1])) - np.log(2)) < 1e-12


def test_round_robin_inversion_matches_dataloader_rounds():
    counts = np.array([3, 1, 4])
    order = [w for t in range(4) for w in range(3) if counts[w] > t]
    for consumed in range(len(order) + 1):
        taken, nxt = round_robin_consumed(counts, consumed)
        assert np.array_equal(taken, np.bincount(order[:consumed], minlength=3))
        if consumed < len(order):
            assert nxt == order[consumed]
    assert largest_remainder(np.array([1.0, 1.0, 1.0]), 4).tolist() == [2, 1, 1]


def test_bad_inputs_have_clear_errors():
    labels, batches, chunks = grouped_codes(n=500)
    with pytest.raises(DataError, match="empty"):
        SamplingPlan(labels, batches, chunks, cells=np.array([], dtype=int))
    with pytest.raises(DataError, match="balance"):
        SamplingPlan(labels, batches, chunks, balance=1.5)
    with pytest.raises(DataError, match="one entry per source cell"):
        SamplingPlan(labels[:-1], batches, chunks)
    with pytest.raises(DataError, match=r"\[0, 500\)"):
        SamplingPlan(labels, batches, chunks, cells=np.array([3, 900]))
    plan = SamplingPlan(labels, batches, chunks)
    with pytest.raises(DataError, match="drop_last"):
        plan.layout(0, batch_size=430, io_batch_cells=1024, world=2)


def test_blocks_are_storage_aligned_runs():
    labels, batches, chunks = grouped_codes(n=3000, chunk=100)
    cells = np.flatnonzero(np.arange(3000) % 7 != 0)
    plan = SamplingPlan(labels, batches, chunks, cells=cells, block_cells=32)
    st = plan.blocks(32)
    sizes = np.diff(st)
    assert st[0] == 0 and st[-1] == len(cells) and sizes.min() >= 1 and sizes.max() <= 32
    assert all(len(np.unique(chunks[cells[lo:hi]])) == 1 for lo, hi in zip(st[:-1], st[1:]))
    lay = plan.layout(0, 50, 512)
    pooled = np.concatenate([plan.pool_cells(t, 32) for t in lay.rank_tasks(0)])
    assert len(np.unique(pooled)) == len(pooled)  # pools partition the selection


@pytest.mark.parametrize("permute", [True, False])
def test_a_plan_rebuilt_from_its_shared_arrays_streams_the_same_pairs_without_copying(permute):
    labels, batches, chunks = grouped_codes()
    cells = np.flatnonzero(np.arange(len(labels)) % 5 != 0)
    plan = SamplingPlan(labels, batches, chunks, cells=cells, balance=0.5, permute=permute, seed=3)
    arrays = plan.to_arrays(io_batch_cells=1024)
    for a in arrays.values():
        a.flags.writeable = False  # as they come out of Ray's object store
    shared = SamplingPlan.from_arrays(arrays, balance=0.5, permute=permute, seed=3)
    for epoch in (0, 1):
        for world, rank in ((1, 0), (2, 1)):
            a1, p1, _ = collect(shared, epoch, io=1024, world=world, rank=rank)
            a0, p0, _ = collect(plan, epoch, io=1024, world=world, rank=rank)
            assert np.array_equal(a1, a0) and np.array_equal(p1, p0)
    assert np.shares_memory(shared.cells, arrays["cells"]) and np.shares_memory(shared.labels, arrays["labels"])
    assert np.allclose(shared.sampled_class_freq, plan.sampled_class_freq)

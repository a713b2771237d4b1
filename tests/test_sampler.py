import pytest
import torch

from dizoo_imgcls.data.sampler import DistributedSampler, TrainBatchSampler


def test_two_ranks_cover_every_sample_exactly_once_and_reshuffle():
    n = 23  # odd: the shards differ in size by one
    orders = []
    for epoch in range(3):
        shards = []
        for rank in range(2):
            sampler = DistributedSampler(n, num_replicas=2, rank=rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler)
        assert sorted(shards[0] + shards[1]) == list(range(n))
        assert not set(shards[0]) & set(shards[1])
        orders.append(shards[0] + shards[1])
    assert orders[0] != orders[1] != orders[2]


def test_same_epoch_same_order_and_eval_order_is_stable():
    a = DistributedSampler(10, 1, 0, shuffle=True, seed=1)
    b = DistributedSampler(10, 1, 0, shuffle=True, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    ev = DistributedSampler(5, 2, 1, shuffle=False)
    assert list(ev) == [1, 3]


def test_train_batches_keep_every_sample_and_never_end_with_one():
    sampler = DistributedSampler(9, 1, 0, shuffle=False)
    batches = list(TrainBatchSampler(sampler, 4))
    assert [len(b) for b in batches] == [4, 3, 2]  # 4 + 4 + 1 -> the last two batches share their 5 samples
    assert len(TrainBatchSampler(sampler, 4)) == 3
    assert [i for b in batches for i in b] == list(range(9))  # in order, each once
    assert [len(b) for b in TrainBatchSampler(DistributedSampler(10, 1, 0, shuffle=False), 4)] == [4, 4, 2]


def test_every_rank_gets_the_same_number_of_batches():
    # 2 ranks: shards of 9 and 8 (batch 4 -> 3 batches each, not 3 and 2), of 10 and 9, 17 and 16, ...
    for num_samples in range(2, 60):
        for batch_size in (2, 3, 4, 8):
            shards = [DistributedSampler(num_samples, 2, rank, shuffle=True, seed=1) for rank in (0, 1)]
            batches = [list(TrainBatchSampler(shard, batch_size)) for shard in shards]
            assert len(batches[0]) == len(batches[1]) == len(TrainBatchSampler(shards[1], batch_size))
            assert sorted(i for rank in batches for b in rank for i in b) == list(range(num_samples))
            assert all(0 < len(b) <= batch_size for rank in batches for b in rank)
            if batch_size > 2 and num_samples >= 2 * 2 * batch_size:  # 2 full batches per rank: no batch of one
                assert all(len(b) >= 2 for rank in batches for b in rank), (num_samples, batch_size)


def test_loader_workers_see_sampler_epoch():
    dataset = torch.utils.data.TensorDataset(torch.arange(12))
    sampler = DistributedSampler(12, 1, 0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=TrainBatchSampler(sampler, 5))
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen.append([int(x) for (batch, ) in loader for x in batch])
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(12))
    assert seen[0] != seen[1]


def test_neighbouring_seeds_do_not_share_orders_an_epoch_apart():
    # with seed + epoch as the generator seed, seed 1's epoch 0 was seed 0's epoch 1
    def order(seed, epoch):
        sampler = DistributedSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) != order(0, 1) and order(2, 3) != order(3, 2)
    assert order(3, 2) == order(3, 2)


@pytest.mark.parametrize('num_samples, replicas, batch_size', [(5, 2, 1), (1, 2, 4), (3, 4, 2)])
def test_shards_that_cannot_run_the_same_number_of_steps_are_refused_up_front(num_samples, replicas, batch_size):
    # batch size 1 on uneven shards (3 and 2 samples: 3 and 2 steps), or fewer images than processes
    with pytest.raises(ValueError, match=f'{num_samples} training images over {replicas} processes cannot give '
                                         'every process the same'):
        for rank in range(replicas):
            TrainBatchSampler(DistributedSampler(num_samples, replicas, rank), batch_size)
    for rank in range(2):  # batch size 2 on the same uneven shards is fine: 2 batches each
        assert len(list(TrainBatchSampler(DistributedSampler(5, 2, rank), 2))) == 2


@pytest.mark.parametrize('num_samples, replicas, batch_size', [(43, 2, 8), (25, 3, 4), (16, 2, 8), (9, 1, 4)])
def test_global_batch_sizes_are_what_the_ranks_load_together(num_samples, replicas, batch_size):
    samplers = [TrainBatchSampler(DistributedSampler(num_samples, replicas, r), batch_size) for r in range(replicas)]
    loaded = [[len(batch) for batch in sampler] for sampler in samplers]
    expected = [sum(step) for step in zip(*loaded)]
    assert all(s.global_batch_sizes() == expected for s in samplers)
    assert sum(expected) == num_samples


def test_shutdown_workers_stops_persistent_workers_now():
    """``shutdown_workers`` relies on the DataLoader iterator's ``_shutdown_workers`` (a torch internal, used in
    this one place): if a torch release renames it, the workers would stay up until exit and this fails."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from dizoo_imgcls.data import shutdown_workers

    before = set(multiprocessing.active_children())
    loader = DataLoader(list(range(8)), batch_size=4, num_workers=1, persistent_workers=True)
    assert [batch.tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1 and all(w.is_alive() for w in workers)  # persistent: still up after the epoch
    shutdown_workers(loader)
    assert not any(w.is_alive() for w in workers) and loader._iterator is None
    assert [batch.tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a new iterator starts new ones
    shutdown_workers(loader)

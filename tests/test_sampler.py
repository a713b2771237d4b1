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
    assert [len(b) for b in batches] == [4, 5]  # 4 + 4 + 1 -> the lone sample joins the last batch
    assert len(TrainBatchSampler(sampler, 4)) == 2
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert [len(b) for b in TrainBatchSampler(DistributedSampler(10, 1, 0, shuffle=False), 4)] == [4, 4, 2]


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

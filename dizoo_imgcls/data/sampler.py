import torch
from torch.utils.data import BatchSampler, Sampler


class DistributedSampler(Sampler):
    """Shards ``range(num_samples)`` over ranks so each index is drawn exactly once per epoch in total.

    Unlike ``torch.utils.data.DistributedSampler`` it never pads with duplicates: rank r takes positions
    r, r + W, r + 2W, ... of the epoch's permutation, so shard sizes differ by at most one. Evaluation
    therefore counts every sample once, and sums all-reduced across ranks equal the single-process ones.
    ``set_epoch`` must be called before each epoch to get a new order (the seed is ``seed + epoch``, the
    same on every rank, so the shards stay disjoint).
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, {num_replicas}), got {rank}')
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))


class TrainBatchSampler(BatchSampler):
    """Batches a shard without dropping anything; a trailing batch of one sample (which BatchNorm cannot
    normalize in training mode) is folded into the batch before it."""

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self):
        batches = list(super().__iter__())
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2].extend(batches.pop())
        return iter(batches)

    def __len__(self) -> int:
        n = super().__len__()
        return n - 1 if n > 1 and len(self.sampler) % self.batch_size == 1 else n

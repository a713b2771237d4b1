import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from ..errors import SettingError


class DistributedSampler(Sampler):
    """Shards ``range(num_samples)`` over ranks so each index is drawn exactly once per epoch in total.

    Unlike ``torch.utils.data.DistributedSampler`` it never pads with duplicates: rank r takes positions
    r, r + W, r + 2W, ... of the epoch's permutation, so shard sizes differ by at most one. Evaluation
    therefore counts every sample once, and sums all-reduced across ranks equal the single-process ones.
    ``set_epoch`` must be called before each epoch to get a new order (seeded from ``seed`` and ``epoch``
    together, the same on every rank, so the shards stay disjoint; runs with seeds s and s + 1 do not share
    orders one epoch apart).
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, encode_epoch: bool = False) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, {num_replicas}), got {rank}')
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        # With encode_epoch, indices come out as epoch * num_samples + index, for EpochSeededDataset.
        self.encode_epoch = encode_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        shard = order[self.rank::self.num_replicas]
        if self.encode_epoch:
            offset = self.epoch * self.num_samples
            return iter([offset + i for i in shard])
        return iter(shard)

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))


class TrainBatchSampler(BatchSampler):
    """Batches a shard without dropping anything, into the same number of batches on every rank.

    Every rank makes ``ceil(longest shard / batch_size)`` batches (shards differ by at most one sample), so
    all ranks run the same number of steps, and their LR schedules, sized by that count, stay in step. Full
    batches come first; where the tail would be a batch of one sample (which BatchNorm cannot normalize in
    training mode), the last two batches share their samples evenly instead.

    ``skip_batches`` (set by the training loop before each epoch) resumes an epoch mid-way: the skipped
    batches are never loaded, and the rest come in the same order as in the uninterrupted epoch.
    """

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.skip_batches = 0
        num_samples, replicas = getattr(sampler, 'num_samples', None), getattr(sampler, 'num_replicas', 1)
        if num_samples is not None and num_samples // replicas < len(self):
            # batch size 1 on uneven shards, or fewer images than processes: some rank would run fewer steps
            # than the others, and its LR schedule (and so its weights) would drift from theirs
            raise SettingError(f'{num_samples} training images over {replicas} processes cannot give every process '
                               f'the same {len(self)} batches of at most {batch_size} image(s); use '
                               'policy.learn.batch_size >= 2 and at least 2 images per process')

    def __len__(self) -> int:
        num_samples, replicas = getattr(self.sampler, 'num_samples', None), getattr(self.sampler, 'num_replicas', 1)
        longest = -(-num_samples // replicas) if num_samples is not None else len(self.sampler)
        return max(1, -(-longest // self.batch_size))

    def batch_sizes(self, shard_size: int) -> list:
        count = len(self)
        if shard_size < count:
            raise ValueError(f'{shard_size} samples cannot fill {count} batches: the shard is too small')
        sizes = [self.batch_size] * (count - 1) + [shard_size - self.batch_size * (count - 1)]
        if count > 1 and sizes[-1] < 2:  # a lone sample (or, on a shorter shard, none): share the tail evenly
            k = 2
            while k < count and sum(sizes[-k:]) < 2 * k:
                k += 1
            total = sum(sizes[-k:])
            sizes[-k:] = [total // k + (1 if i < total % k else 0) for i in range(k)]
        return sizes

    def global_batch_sizes(self) -> list:
        """Images per step of an epoch summed over all ranks (a rank's shard may be one image shorter)."""
        num_samples, replicas = getattr(self.sampler, 'num_samples', None), getattr(self.sampler, 'num_replicas', 1)
        if num_samples is None:
            return [size * replicas for size in self.batch_sizes(len(self.sampler))]
        per_rank = [self.batch_sizes(len(range(r, num_samples, replicas))) for r in range(replicas)]
        return [sum(sizes) for sizes in zip(*per_rank)]

    def __iter__(self):
        indices = list(self.sampler)
        batches, start = [], 0
        for size in self.batch_sizes(len(indices)):
            batches.append(indices[start:start + size])
            start += size
        return iter(batches[self.skip_batches:])


class EpochSeededDataset(Dataset):
    """Makes every sample's augmentation a function of (seed, epoch, index) only.

    The train sampler yields ``epoch * len(dataset) + index``; this wrapper decodes it and draws the
    sample's random crop/flip from a torch generator seeded with (seed, epoch, index), restoring the
    process's RNG afterwards. So augmentation does not depend on the number of workers or on which worker
    gets a batch, and a run resumed mid-epoch or after an epoch sees exactly the same images as the
    uninterrupted run. Plain indices (< len(dataset)) pass through as epoch 0.

    ``epoch_hook(epoch)``, if given, is called (in whichever process loads the sample) whenever the epoch
    changes, e.g. to set that epoch's training size for progressive resizing.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch_hook=None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch_hook = epoch_hook
        self._hook_epoch = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # classes, targets, skipped_files, ... of the wrapped dataset
        # Never forward protocol names (e.g. torch's batched __getitems__, which would get encoded indices).
        if name in ('dataset', 'epoch_hook', '_hook_epoch') or name.startswith('__'):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, encoded: int):
        epoch, index = divmod(int(encoded), len(self.dataset))
        if self.epoch_hook is not None and epoch != self._hook_epoch:
            self.epoch_hook(epoch)
            self._hook_epoch = epoch
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also seed every CUDA device (~100x slower).
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]

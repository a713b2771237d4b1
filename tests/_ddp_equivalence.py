"""Worker for tests/test_distributed.py: K policy steps on a fixed global batch, either as one process on the
whole batch or as one of several ranks (the process group torchrun's environment variables describe) on its
slice. ``main(path)`` writes rank 0's parameters to path (and the initial ones to path + '.init'); the test forks
the processes, ``python tests/_ddp_equivalence.py PATH`` (alone or under torchrun) does the same by hand."""
import sys

import torch

from dizoo_imgcls.config import default_config
from dizoo_imgcls.policy import ImageClassificationPolicy
from dizoo_imgcls.runtime import init_distributed

GLOBAL_BATCH, STEPS = 8, 3


def main(out_path: str) -> None:
    rank, world = init_distributed(use_cuda=False)
    cfg = default_config().policy
    cfg.cuda = False
    cfg.model.num_classes = 4
    cfg.learn.update(dict(batch_size=GLOBAL_BATCH // world, iters_per_epoch=STEPS, train_epoch=1, warmup_epochs=0,
                          amp='none', bn_eval=True, multi_gpu=world > 1, lr_per_256=3.2, weight_decay=1e-4))
    torch.manual_seed(0)
    policy = ImageClassificationPolicy(cfg, enable_field=['learn'])
    if rank == 0:
        torch.save(policy._model.state_dict(), out_path + '.init')  # to check that the steps moved the weights
    data = torch.Generator().manual_seed(1)
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for _ in range(STEPS):
        images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), generator=data, dtype=torch.uint8)
        labels = torch.randint(0, 4, (GLOBAL_BATCH, ), generator=data)
        policy.learn_mode.forward([images[share], labels[share]])
    if rank == 0:
        torch.save(policy._model.state_dict(), out_path)


if __name__ == '__main__':
    main(sys.argv[1])

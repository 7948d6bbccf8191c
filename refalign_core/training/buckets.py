"""Buckets: every clip trains at the size whose aspect ratio is closest to its own and at the longest frame count it
can give, and a batch only ever holds clips of one bucket (one latent shape)."""

import math

import torch

Bucket = tuple[int, int, int]  # (width, height, frames)


def assign_bucket(width: int, height: int, available_frames: int, sizes, frame_counts) -> Bucket | None:
    """The bucket for a clip of width×height (after any crop) with `available_frames` at the training fps;
    None when the clip is shorter than every frame bucket."""
    fitting = [f for f in frame_counts if f <= available_frames]
    if not fitting:
        return None
    aspect = math.log(width / height)
    w, h = min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
    return int(w), int(h), max(fitting)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of dataset indices for one process, each batch from a single bucket (any hashable group
    key: a `Bucket`, or a bucket and a reference count).

    Epoch e is a fixed function of (seed, e): each bucket's indices (a clip appears `repeats` times) are shuffled
    and cut into batches of `batch_size` (the last one may be smaller), and the batches of all buckets are shuffled
    together; batch j goes to process j mod `world_size` (the list is topped up from its start so every process
    gets as many). `start` skips this process's first batches, so a resumed run draws what the uninterrupted run
    drew."""

    def __init__(self, buckets: list[tuple], repeats: list[int], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        super().__init__()
        if not buckets:
            raise ValueError("no samples to draw batches from")
        self.groups: dict[Bucket, list[int]] = {}
        for index, (bucket, repeat) in enumerate(zip(buckets, repeats)):
            self.groups.setdefault(tuple(bucket), []).extend([index] * repeat)
        self.batch_size, self.seed, self.rank, self.world_size, self.start = batch_size, seed, rank, world_size, start
        batches = sum(math.ceil(len(v) / batch_size) for v in self.groups.values())
        self.per_process = math.ceil(batches / world_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of one epoch, in order (process r takes r, r + world, …)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for key in sorted(self.groups):
            indices = self.groups[key]
            order = torch.randperm(len(indices), generator=generator).tolist()
            shuffled = [indices[i] for i in order]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        total = self.per_process * self.world_size
        return (batches * math.ceil(total / len(batches)))[:total]

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_process)
        while True:
            mine = self.epoch_batches(epoch)[self.rank::self.world_size]
            yield from mine[offset:]
            epoch, offset = epoch + 1, 0

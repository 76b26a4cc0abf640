"""Which positions of an epoch's global order each rank reads at each step (both readers use it).

The global order of an epoch is the same on every rank and for every world size. The global batch
G counts samples: step k takes positions [start + k*G, start + (k+1)*G); rank r takes the r-th
contiguous 1/world_size of them, split into `grad_accum_steps` micro-batches of
`micro_batch_size` positions. So a step's samples do not depend on the world size, and a run can
continue at any world size or global batch from `start` (the samples consumed in the epoch)
without repeating or skipping one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """What one rank reads from (epoch, start) to the end of the epoch."""

    epoch: int
    start: int
    num_rows: int
    rank: int
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    drop_tail: bool

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def num_steps(self) -> int:
        left = max(self.num_rows - self.start, 0)
        return left // self.global_batch if self.drop_tail else math.ceil(left / self.global_batch)

    @property
    def num_micro(self) -> int:
        return self.num_steps * self.grad_accum_steps

    def positions(self, m: int) -> range:
        """Order positions of this rank's micro-batch m (clipped at the epoch's end)."""
        k, a = divmod(m, self.grad_accum_steps)
        lo = (
            self.start
            + k * self.global_batch
            + (self.rank * self.grad_accum_steps + a) * self.micro_batch_size
        )
        return range(min(lo, self.num_rows), min(lo + self.micro_batch_size, self.num_rows))

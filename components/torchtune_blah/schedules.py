"""Learning-rate schedules with warm-up given as a fraction of the phase.

The recipe instantiates ``lr_scheduler`` like torchtune's recipes do:
``instantiate(cfg, optimizer, num_training_steps=..., last_epoch=...)``, so
torchtune's own ``get_cosine_schedule_with_warmup`` works too. These add what
llama-squad used: a constant rate (phase 1) and cosine with 3% warm-up (phase 2),
where the warm-up is a ratio because the number of steps depends on the data.
"""

import math
from typing import Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup_steps(num_training_steps: int, num_warmup_steps: Optional[int], warmup_ratio: float) -> int:
    if num_warmup_steps is not None:
        return int(num_warmup_steps)
    return int(math.ceil(warmup_ratio * num_training_steps))


def constant_schedule_with_warmup(
    optimizer: Optimizer, num_training_steps: int, num_warmup_steps: Optional[int] = None,
    warmup_ratio: float = 0.0, last_epoch: int = -1,
) -> LambdaLR:
    warmup = _warmup_steps(num_training_steps, num_warmup_steps, warmup_ratio)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return LambdaLR(optimizer, factor, last_epoch)


def cosine_schedule_with_warmup(
    optimizer: Optimizer, num_training_steps: int, num_warmup_steps: Optional[int] = None,
    warmup_ratio: float = 0.03, num_cycles: float = 0.5, last_epoch: int = -1,
) -> LambdaLR:
    """Linear warm-up, then cosine decay to 0 over the rest of the phase (as transformers')."""
    warmup = _warmup_steps(num_training_steps, num_warmup_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, num_training_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))

    return LambdaLR(optimizer, factor, last_epoch)

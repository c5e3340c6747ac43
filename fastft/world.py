"""This process's place in a job of several: the one reader of RANK / LOCAL_RANK / WORLD_SIZE.

    from fastft.world import World, split_batch, strategy
    world = World.from_env()          # World(rank=0, local_rank=0, size=1) outside torchrun
    strategy(recipe, world.size)      # "single" | "ddp" | "fsdp"
    split_batch(2, 4, 2)              # (2, 2): the same global batch of 8 over two processes

torchrun and accelerate launch set the three variables in every process they start; nothing else
in fastft reads them. Pure Python: importing this loads no torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class World:
    """This process's place in a data-parallel job (torchrun / accelerate launch set the env)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def strategy(recipe, world_size: int) -> str:
    """"single" for one process, else the recipe's ``distributed.strategy`` (auto: ddp)."""
    if world_size <= 1:
        return "single"
    want = recipe.distributed.strategy
    return "ddp" if want == "auto" else want


def split_batch(batch_size: int, grad_accum: int, n: int) -> tuple[int, int] | None:
    """(per-device batch, grad accum) keeping the global batch over ``n`` processes, as fastft.train
    splits it (the accumulation first, then the batch); None when it does not split evenly."""
    b, g = batch_size, grad_accum
    if n == 1:
        return b, g
    if g % n == 0:
        return b, g // n
    if b % n == 0:
        return b // n, g
    if (b * g) % n == 0:
        return b * g // n, 1
    return None

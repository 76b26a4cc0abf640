"""`train.compile`: torch.compile the model's transformer blocks, one by one, in place.

Block by block rather than the whole model (as torchtitan does):
- The blocks are where the time goes, and they are all the same code: compiled once, the graph
  serves every block (torch.compile traces the block's code, with its parameters as inputs).
- The embedding, the output head and the loss stay eager. The chunked loss swaps the head's
  forward for one forward at a time (trainer/model/loss.py) and counts its calls; inside a
  compiled region that swap would be a guard failure and a recompile on every step.
- Each block's backward ends as its own graph, so DDP's gradient hooks still fire block by
  block and the all-reduce of one bucket overlaps the backward of the blocks before it.
- `Module.compile()` compiles the module's call in place: the modules, their parameters, the
  hooks DDP put on them and the state-dict names (checkpoints, export) are unchanged.
"""

from __future__ import annotations

from torch import nn

from trainer.model.methods import transformer_blocks


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of `model` in place (inductor, compiled on first call);
    returns how many. Raises MethodError naming train.compile if no block stack is found."""
    blocks = transformer_blocks(model, key="train.compile")
    for block in blocks:
        block.compile()
    return len(blocks)

"""Activation checkpointing per transformer block: keep a block's input, drop what the block
computes inside, and recompute it during backward. It trades one more forward pass of the
checkpointed blocks (about a third more FLOPs for them) for their activations, which grow with
micro batch x sequence x width x layers and are what stops a large model from fitting at all.

    none       keep every activation (fastest)
    selective  checkpoint every other block: half the blocks' activations, a sixth more FLOPs
    full       checkpoint every block: only each block's input is kept

Why every other block for "selective", rather than torch's op-level policy (save matmul outputs,
recompute the rest, `create_selective_checkpoint_contexts`)? Its memory is simple to reason about
(the plan, tools/plan.py, measures it either way), it uses nothing but the public
torch.utils.checkpoint.checkpoint, and it behaves the same eager and compiled on every torch from
2.6; the op-level policy's support under torch.compile changed across those versions.

Applied outside the model (model.py stays plain), before torch.compile and fully_shard, in that
order as torchtitan does. Only each block's `forward` is replaced: no wrapper module, so parameter
and state-dict names stay those of the plain GPT (`transformer.h.0.attn.c_q.weight`).
FSDP2's hooks stay on the block itself: the block's parameters are gathered by its pre-backward
hook before autograd reaches the recomputation inside it.
"""

import torch.utils.checkpoint

MODES = ("none", "selective", "full")


def checkpointed_blocks(n_layer, mode):
    """Indices of the blocks to checkpoint: none, every other one (1, 3, 5, ...), or all."""
    if mode not in MODES:
        raise ValueError(f"--activation_checkpointing={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return []
    return list(range(n_layer)) if mode == "full" else list(range(1, n_layer, 2))


def apply_activation_checkpointing(model, mode):
    """Checkpoint the blocks of `model` (a GPT) that `mode` selects; returns their indices."""
    chosen = checkpointed_blocks(len(model.transformer.h), mode)
    for i in chosen:
        block = model.transformer.h[i]
        block.forward = _checkpointed(block.forward)
    return chosen


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        # use_reentrant=False: torch's recommended form; works with autograd hooks (FSDP2, DDP),
        # torch.compile, and inputs that do not require grad.
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpointed_forward

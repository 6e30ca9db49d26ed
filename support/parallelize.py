"""The model wrapped for many ranks, in one place: tensor parallelism (--tensor_parallel), then
activation checkpointing, then torch.compile, then FSDP2 (--fsdp, --fsdp_shard_size), in that
order, as torchtitan does (its models/llama3 parallelize.py); under TP the compiled forward sits
inside the checkpoint instead (parallelize says why).

Tensor parallelism (TP) splits every block over the N consecutive ranks of a TP group, the GPUs of
one node, Megatron-style (Shoeybi et al. 2019; Korthikanti et al. 2022 for the sequence parallelism):
  - queries, keys, values and the MLP's first matrix column-wise: each rank holds n_head/N whole
    heads and 4 x n_embd/N hidden units, and computes them with no communication;
  - both output projections row-wise: each rank's partial sums are reduce-scattered over the
    sequence, into the residual stream;
  - sequence parallelism: between blocks (the residual stream, the norms) each rank holds T/N of
    the positions, and the sequence is all-gathered before the attention and the MLP;
  - the token embedding, the head (tied to it or not) and the loss sharded over the vocabulary:
    each rank holds V/N rows and makes its logits, and the training loss is torch's loss_parallel
    cross-entropy on them (support/loss.py), so no rank ever holds the (B, T, V) logits. The
    evaluations (validation, HellaSwag, samples) get the logits whole from the same head.
Everything is torch's: DeviceMesh, parallelize_module and its styles, loss_parallel; the model's
code is the plain one (its attention counts the heads it is given). The data-parallel dimension
is FSDP2's over the other dims of the same mesh: (dp, tp), or (replicate, shard, tp) under HSDP.
Why and when (inside a node only), what was proven on the CPU: docs/distributed.md.
"""

import contextlib

import torch

from support.activation_checkpoint import apply_activation_checkpointing
from support.runtime import fsdp_mesh


def parallelize(model, s, rt, meshes=None):
    """Wrap `model`, a GPT built on the meta device, for training under FSDP2 (and TP, if
    --tensor_parallel > 1), in place: TP first (it replaces the parameters with DTensors of their
    TP shards), then activation checkpointing (inside the block, around TP's collectives), then
    each block compiled (FSDP's gathers and reduce-scatters stay between the compiled blocks, where
    they overlap with compute), then fully_shard per block and at the root. meshes: (FSDP's, TP's)
    instead of device_meshes' (tools/gpu_check.py runs TP's code on one GPU: a TP group of one)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dp_mesh, tp_mesh = meshes or device_meshes(s, rt)
    mp = MixedPrecisionPolicy(param_dtype=rt.amp_dtype or torch.float32, reduce_dtype=torch.float32)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
        if s.compile:
            # under TP each block's own forward is compiled, and the checkpoint runs around it
            # eagerly: traced into the graph, the checkpoint of DTensor activations saves their
            # DeviceMesh for backward, which AOTAutograd refuses (torch 2.13: "expected all
            # tensors_saved_with_vc_check to be Tensors"; tests/test_tensor_parallel.py)
            for block in model.transformer.h:
                block.forward = torch.compile(block.forward)
    apply_activation_checkpointing(model, s.activation_checkpointing)
    for block in model.transformer.h:
        if s.compile and tp_mesh is None:
            block.compile()  # in place: the module and its parameter names stay as they are
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def device_meshes(s, rt):
    """(the mesh FSDP2 shards over, the TP group's mesh or None). Without TP, fsdp_mesh's. With it,
    one mesh of every rank, (dp, tp), or (replicate, shard, tp) under HSDP, in row-major order: the
    ranks of a TP group are consecutive, so with torchrun's numbering one node's."""
    from torch.distributed.device_mesh import init_device_mesh
    tp = s.tensor_parallel
    if tp == 1:
        return fsdp_mesh(s, rt), None
    dp = rt.world_size // tp
    shard = (s.fsdp_shard_size or rt.world_size) // tp  # fsdp_shard_size counts ranks: a node's, TP's included
    if shard == dp:
        mesh = init_device_mesh(rt.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
        return mesh["dp"], mesh["tp"]
    mesh = init_device_mesh(rt.device.type, (dp // shard, shard, tp), mesh_dim_names=("replicate", "shard", "tp"))
    return mesh["replicate", "shard"], mesh["tp"]


def apply_tensor_parallel(model, mesh):
    """Megatron-style TP with sequence parallelism over `mesh` (one TP group), as the module
    docstring says, through torch's parallelize_module. Between the modules named below the
    activations are DTensors sharded over the sequence (Shard(1)); inside the attention and the
    MLP they are plain tensors of this rank's heads and hidden units."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)
    gather_sequence = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    into_stream = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)  # reduce-scattered over T
    for block in model.transformer.h:
        parallelize_module(block, mesh, {
            "ln_1": SequenceParallel(), "attn": gather_sequence,
            "attn.c_q": ColwiseParallel(), "attn.c_k": ColwiseParallel(), "attn.c_v": ColwiseParallel(),
            "attn.c_proj": into_stream,
            "ln_2": SequenceParallel(), "mlp": gather_sequence, "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": into_stream,
        })
    tied = model.lm_head.weight is model.transformer.wte.weight
    # The embeddings look up their rows of the vocabulary (or of the positions): partial sums,
    # reduce-scattered over the sequence. The head gives the evaluations whole logits; training's
    # loss makes its own, sharded over the vocabulary (support/loss.py's vocab_parallel_cross_entropy).
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                               use_local_output=False),
            "transformer.ln_f": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    if "wpe" in model.transformer:  # (T, C) positions, sharded as x's T
        plan["transformer.wpe"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0),
                                                  use_local_output=False)
    parallelize_module(model, mesh, plan)
    # The final hidden states whole on every rank of the group: the head, the loss and the
    # evaluations' row selection (GPT.token_losses, generate) take them as one process has them.
    parallelize_module(model.transformer.ln_f, mesh, PrepareModuleOutput(
        output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True))
    if tied:  # parallelize_module made the head's weight and the embedding's two DTensors: one again
        model.lm_head.weight = model.transformer.wte.weight


def loss_context(s):
    """Where a training step's forward and backward run: under TP inside torch's loss_parallel(),
    which the vocabulary-parallel loss needs (support/loss.py); otherwise nothing."""
    if s.tensor_parallel == 1:
        return contextlib.nullcontext
    from torch.distributed.tensor.parallel import loss_parallel
    return loss_parallel

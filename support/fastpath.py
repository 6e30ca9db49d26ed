"""Measured fast paths, each taken only where it was measured to pay (docs/performance.md): glibc
kept from returning freed memory to the kernel, the bf16 probe, the model's training paths (the
chunked loss, a sparse gradient for the tied embedding), and gradient clipping through BLAS dot
products and the fused optimizer's grad_scale."""

import ctypes
import os
import sys

import torch

from model import full_cross_entropy
from support.loss import chunked_cross_entropy, vocab_parallel_cross_entropy


def keep_freed_memory():
    """Ask glibc to keep freed memory instead of returning it to the kernel. Training allocates and
    frees the same large buffers (activations, logits) every micro step; by default each one above
    a few MB is a fresh mmap that the kernel must zero-fill page by page, which measured ~45% of
    CPU time in a seed-style loop (tools/bench.py, tiny model: 180K page faults and 0.35 s of kernel
    time a step, 1.5x the step time). With these settings those buffers are reused. Returns whether
    the settings took; KEEP_FREED_MEMORY=0 in the environment keeps glibc's defaults (for A/B runs)."""
    if os.environ.get("KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    # mallopt takes a C int and returns 1 on success: 2**31 - 1 is the largest threshold it accepts
    return (libc.mallopt(M_MMAP_MAX, 0) == 1  # serve every allocation from the heap, none by a fresh mmap...
            and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1)  # ...and keep freed heap memory for reuse


def cpu_has_bf16():
    """True where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16), where bf16 autocast
    trains faster than fp32; elsewhere bf16 is emulated and slower. CPU_BF16=0 (or 1) in the
    environment overrides the answer, so a bf16 machine can run what a float32-only one runs (the
    auto dtype, Muon's fp32 Newton-Schulz): docs/performance.md measures the demo so."""
    override = os.environ.get("CPU_BF16", "")
    if override in ("0", "1"):
        return override == "1"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_training_paths(model, s, rt):
    """Set how the model (a GPT) computes its training loss: the trainer's choices, not the model's.
    --chunked_loss (on by default on the CPU): the loss from chunks of rows, never the full (B, T, V)
    logits (support/loss.py), where the full logits' F.cross_entropy is the model's own; under
    tensor parallelism the loss over the vocabulary's shards instead. And a sparse gradient for the
    tied token embedding where it pays (sparse_embedding_pays)."""
    model.loss_fn = (vocab_parallel_cross_entropy if s.tensor_parallel > 1 else
                     chunked_cross_entropy if s.chunked_loss else full_cross_entropy)
    model.sparse_embedding_grad = sparse_embedding_pays(s, rt)


def sparse_embedding_pays(s, rt):
    """A sparse gradient for the tied token embedding (model.GPT.forward). The embedding is the
    lm_head's weight, so its gradient is the sum of the two uses'. The embedding's dense backward
    zeroes a whole (V, C) fp32 table (155 MB at gpt2 size) to scatter B*T rows into, and autograd
    then adds that table to the lm_head's gradient; a sparse one holds just the B*T rows. That
    saves the table's zeroing and addition each step on the CPU (docs/performance.md); on GPUs
    it saves microseconds, and compiled graphs hold no sparse tensors, nor tensor parallelism's
    DTensors sparse gradients."""
    return rt.device.type == "cpu" and not s.compile and s.tensor_parallel == 1


def on_the_cpu(grads):
    """Whether the gradients are plain CPU tensors, where the clipping's fast path was measured to
    pay (not FSDP's sharded DTensors, which torch's own functions handle)."""
    return bool(grads) and grads[0].device.type == "cpu" and not any(hasattr(g, "device_mesh") for g in grads)


def gradient_norm(params):
    """The global L2 norm of the parameters' gradients, as a tensor (reading it would sync with
    the device). On the CPU it comes from BLAS dot products, where that was measured to pay
    (docs/performance.md): torch's foreach norm runs there a tensor at a time at half their
    speed. Elsewhere, and for FSDP's sharded DTensors, torch's own norm, made whole."""
    grads = [p.grad for p in params if p.grad is not None]
    if on_the_cpu(grads):
        return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_gradients(params, optimizer, max_norm, norm):
    """Scale the gradients down to global norm max_norm when their norm (gradient_norm's) is
    larger, as torch's clip_grad_norm_ does. On the CPU, with the fused AdamW, the multiply is
    left to the optimizer kernel, which divides each gradient by the optimizer's `grad_scale` as
    it reads it (the hook torch's GradScaler unscales through): one pass over the gradients fewer
    (docs/performance.md)."""
    if not on_the_cpu([p.grad for p in params if p.grad is not None]):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return
    for part in getattr(optimizer, "optimizers", {"": optimizer}).values():  # CombinedOptimizer's parts
        if part.defaults.get("fused"):
            part.grad_scale = (norm / max_norm).clamp_min(1.0)  # > 1: the gradient is divided by it
        elif part is optimizer:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        else:  # Muon: its own parameters, scaled before it steps
            torch.nn.utils.clip_grads_with_norm_([p for g in part.param_groups for p in g["params"]], max_norm, norm)

"""Will a preset fit a cluster, at which micro batch, and how long will it train? Answered on a CPU.

    python -m tools.plan --model=gpt3-175b --gpus=512 --gpu=H100-80GB
    python -m tools.plan --model=gpt3-13b --gpus=8 --activation_checkpointing=none --micro_batch_size=2
    python -m tools.plan --model=gpt3-13b --gpus=64 --fsdp_shard_size=8    # hybrid: shard in a node, replicate across
    python -m tools.plan --model=gpt3-175b --gpus=1024 --tensor_parallel=8  # TP in a node, FSDP over 128 groups

The memory figures are not a formula: the real model is built, checkpointed and sharded as
train_gpt.py does it (FSDP2 per block, then the root; or DDP's full replicas), and the real
training step (forward, backward, AdamW) runs on fake tensors (FakeTensorMode: shapes and dtypes,
no data) over a fake process group of the cluster's size (collectives that move nothing). torch's
FSDPMemTracker / MemTracker follow every tensor of the rank and record the peak, by category.
This is the method of torchtitan's memory estimator (scripts/estimate/estimation.py).

What it leaves out, and so why a plan "fits" only below 90% of the GPU's memory: the CUDA context
and NCCL's buffers (outside torch's allocator), the caching allocator's fragmentation, and
torch.compile (the fake step runs eager; compiled kernels fuse ops and usually keep less). The
fake step runs on the CPU's kernels (its flash attention, like the GPU's, keeps no T x T scores).

Time is the model's training FLOPs per token (model.flops_per_token) at a stated MFU: by default
the best this project has measured on that GPU class (docs/performance.md). Recomputed blocks cost
a third more of their FLOPs, which model FLOPs (and so MFU) do not count: the estimate adds them.
FSDP's collectives (HSDP's, DDP's: data_parallel_communication) are timed on the links they cross
(ring_rate: NVLink within a node, the NICs between nodes) and run under the compute (FSDP2
prefetches the next block's gather and reduce-scatters the last one's gradients while a block
computes), so a step is max(compute, FSDP's time) + TP's time (overlap_window). Rates are the
links' (GPU.nvlink, GPU.inter_node), so the times are floors; latency is not counted.

Tensor parallelism (--tensor_parallel, Megatron-style with sequence parallelism: q, k, v and the
MLP's fc split by columns, the output projections by rows, the norms and the residual split along
the sequence, a vocabulary-parallel embedding, head and loss) is planned from the fake step of one
data-parallel group, not run: TP's shards are the DP step's tensors cut t ways. So parameters,
gradients, optimizer state and FSDP's buffers divide by t (the sharded state over DP x TP), and so
do the activations, except the all-gathered (B, T, C) inputs of the column-parallel projections,
which each GPU keeps whole for backward (tensor_parallel_peak). TP's collectives are timed at
NVLink's rate (tensor_parallel_traffic) and wait for nothing to hide them. "auto" plans TP 1, 2,
4, 8 and keeps the shortest estimated step, FSDP's time included (choose_tensor_parallel).
"""

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from model import ARCHITECTURES, GPT, describe_attention, flops_per_token, full_cross_entropy, num_params
from support import cli, sharded_muon
from support.activation_checkpoint import MODES, apply_activation_checkpointing, checkpointed_blocks
from support.fastpath import cpu_has_bf16
from support.loss import chunked_cross_entropy
from support.optim import MuonConfig, configure_optimizers, muon_params
from support.presets import PRESETS, preset_config

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    memory: int  # bytes, as torch.cuda.get_device_properties(...).total_memory reports
    peak_flops: float  # dense bf16 datasheet peak, FLOP/s
    mfu: Optional[float]  # best MFU this project measured on this class, None if never measured
    mfu_source: str
    nvlink: Optional[float] = None  # bytes/s one way, per GPU, to the others of its node (NVSwitch); None: unknown
    inter_node: Optional[float] = None  # bytes/s one way, per GPU, to other nodes (its own NIC); None: unknown


# NVLink: NVIDIA's datasheets give both directions together; one way is half. H100 and H200 SXM
# (NVLink 4): 18 links x 25 GB/s = 450 GB/s each way (the datasheet's 900 GB/s). A100 SXM
# (NVLink 3): 12 links x 25 GB/s = 300 GB/s (600 GB/s). The link rate: NCCL's collectives reach
# less, so TP times planned from it are floors (not measured here).
NVLINK_4, NVLINK_3 = 450e9, 300e9
# Between nodes, one InfiniBand NIC a GPU, as in NVIDIA's DGX and HGX reference systems: DGX H100
# and H200 have 8 ConnectX-7 at 400 Gb/s (NDR) for the compute fabric, 400e9 / 8 = 50 GB/s each
# way; DGX A100 8 ConnectX-6 at 200 Gb/s (HDR), 25 GB/s. IB is full duplex, so like NVLink's these
# are one way. The link rate, an assumption about the cluster (fewer NICs a node, or Ethernet, is
# slower), not measured here.
INFINIBAND_NDR, INFINIBAND_HDR = 400e9 / 8, 200e9 / 8
# 80 GB parts show 79.1-80 GiB to torch. The MFU default is the only measurement this project has:
# gpt2 on one H100 80GB, compiled, bf16 (docs/performance.md): 39.3% of 989 TFLOP/s.
MEASURED = "measured: gpt2 on one H100 80GB, docs/performance.md"
GPUS = {
    "H100-80GB": GPU(81559 * 2**20, 989e12, 0.393, MEASURED, NVLINK_4, INFINIBAND_NDR),
    "H200-141GB": GPU(143771 * 2**20, 989e12, 0.393, "H100's " + MEASURED + " (same compute)", NVLINK_4,
                      INFINIBAND_NDR),
    "A100-80GB": GPU(81920 * 2**20, 312e12, None, "", NVLINK_3, INFINIBAND_HDR),
    "A100-40GB": GPU(40960 * 2**20, 312e12, None, "", NVLINK_3, INFINIBAND_HDR),
}
USABLE = 0.9  # fraction of a GPU's memory a plan may fill (see the module docstring)
# An HGX board (H100, H200, A100): 8 GPUs on one NVSwitch. TP's collectives, 4 a block in forward
# and 4 in backward, need NVLink's rate, so a TP group stays within a node.
GPUS_PER_NODE = 8
TENSOR_PARALLEL_AUTO = (1, 2, 4, 8)  # the degrees "auto" plans, within a node


def token_budget(model_name):
    """Tokens a preset trains on (support/presets.py, as train_gpt.py's default max_tokens): 19,073 x
    2**19 for GPT-2 sizes (FineWeb-EDU sample-10BT, one epoch), 300B for GPT-3 sizes (the paper's)."""
    return PRESETS[model_name].train_tokens


@dataclass
class Setup:
    """One rank's training setup: what the memory depends on."""
    model: str
    gpus: int  # all of them: data-parallel ranks x tensor_parallel
    micro_batch_size: int
    activation_checkpointing: str = "none"
    fsdp: bool = True
    seq_len: Optional[int] = None  # None: the preset's context
    chunked_loss: bool = False  # the CUDA default: full logits
    dtype: str = "bfloat16"  # bf16 compute (FSDP: bf16 parameters gathered; DDP: autocast)
    n_layer: Optional[int] = None  # None: the preset's; set to run the fake step on fewer layers
    shard_size: Optional[int] = None  # HSDP (train_gpt --fsdp_shard_size): sharded over this many ranks, not all
    optimizer: str = "adamw"  # or muon: torch's Muon for the blocks' matrices (ShardedMuon under FSDP)
    muon_float32: bool = False  # Muon's Newton-Schulz in fp32 (support/optim.py's Float32Muon: a CPU without bf16); GPUs: bf16
    attention: Optional[str] = None  # None: the preset's pattern (train_gpt --attention)
    attention_band: Optional[int] = None  # None: GPTConfig's (train_gpt --attention_band)
    arch: str = "gpt"  # model.ARCHITECTURES (modern: an untied head holds a second V x C matrix, no position table)
    tensor_parallel: int = 1  # GPUs of a node that split each layer (Megatron-style, sequence parallel); 1: off


# ----------------------------------------------------------------------------------------------
# The fake training step

@contextlib.contextmanager
def fake_process_group(world_size):
    """A process group of world_size ranks in which this process is rank 0 and collectives are
    no-ops: what the sharding code sees on one rank of the real cluster."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    if dist.is_initialized():
        raise RuntimeError("plan: a process group is already running here; run the plan in its own process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build(config, setup, device, mesh):
    """The model as train_gpt.build_model / build_fsdp_model makes it (checkpointing, then
    sharding), and its optimizer. FSDP: built on the meta device, then materialized on `device`."""
    if setup.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, setup.dtype), reduce_dtype=torch.float32)
        with torch.device("meta"):
            model = GPT(config)
        apply_activation_checkpointing(model, setup.activation_checkpointing)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.to_empty(device=device)
    else:
        with torch.device(device):
            model = GPT(config)  # as train_gpt.build_model: whole, on the device
        apply_activation_checkpointing(model, setup.activation_checkpointing)
    model.loss_fn = chunked_cross_entropy if setup.chunked_loss else full_cross_entropy  # train_gpt's --chunked_loss
    muon = MuonConfig(float32=setup.muon_float32) if setup.optimizer == "muon" else None
    optimizer = configure_optimizers(model, 0.1, 1e-4, "cuda", log=lambda m: None, muon=muon,
                                     sharded_muon=sharded_muon.ShardedMuon if setup.fsdp else None)
    return model, optimizer


def setup_config(setup):
    """The GPTConfig a Setup trains. Banded layers (GPT-3's pattern) keep what dense ones keep: the
    fake step runs the CPU's masked flash attention, which, as FlexAttention on a GPU, keeps q, k, v,
    the output and its log-sum-exp, and no T x T scores (one boolean T x T mask a forward)."""
    return preset_config(setup.model, n_layer=setup.n_layer, attention=setup.attention,
                         attention_band=setup.attention_band, **ARCHITECTURES[setup.arch])


def fake_step_peak(setup):
    """Peak bytes on one rank during two training steps (the second with the optimizer state
    allocated), by category: {"params", "grads", "optimizer", "activations", "other", "total"}.
    "activations" counts what forward keeps for backward and what backward makes on the way;
    "params" and "grads" include FSDP's gathered (unsharded) copies of a block at the peak.
    With Muon, "muon_step" is the peak of its step, after backward: the state held then, plus
    "muon_temporaries", what the step makes: under FSDP (ShardedMuon) the whole weight, gradient
    and momentum (fp32) of the largest matrix this rank steps and a flat buffer of its rows of a
    round, and the Newton-Schulz temporaries; "total" is the larger of the two peaks. Rank 0,
    which the fake step is, steps the largest matrices (sharded_muon.deal)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if setup.tensor_parallel > 1:
        raise ValueError("fake_step_peak runs one data-parallel group's step (TP 1); peak_bytes plans TP from it")
    config = setup_config(setup)
    T = setup.seq_len or config.block_size
    device = torch.device("cpu")
    amp = getattr(torch, setup.dtype) if setup.dtype != "float32" else None
    from torch.distributed.device_mesh import init_device_mesh
    # A rank's memory depends only on how many ranks share its shards: with HSDP, one group of
    # shard_size ranks (the replicas' all-reduce of gradient shards adds no lasting memory).
    ranks = setup.shard_size or setup.gpus
    with fake_process_group(ranks):
        mesh = init_device_mesh(device.type, (ranks,))  # before fake mode: it reads real values
        with FakeTensorMode():
            return _peak_of_two_steps(config, setup, device, mesh, T, amp)


def _peak_of_two_steps(config, setup, device, mesh, T, amp):
    model, optimizer = build(config, setup, device, mesh)
    x = torch.randint(0, config.vocab_size, (setup.micro_batch_size, T), device=device)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())  # fp32, unsharded (DDP)
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp and not setup.fsdp else contextlib.nullcontext

    def forward_backward():
        with autocast():
            loss = model(x, x)
        loss.backward()

    # The first step, untracked, allocates the optimizer state; the second is tracked up to the
    # optimizer's update. The update itself runs outside the tracker: under fake tensors torch's
    # trackers count the global-size tensors that DTensor's sharding propagation makes for the
    # optimizer's ops on sharded parameters (seen on torch 2.13: 2.4x the model's full state).
    # Fused AdamW updates in place, with no temporaries, so the peak of the update is the memory
    # held when backward ends, which the tracker has seen.
    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts = dict(getattr(optimizer, "optimizers", {"adamw": optimizer}))  # support/optim.py's CombinedOptimizer's
    tracker = _tracker(model, list(parts.values()), setup.fsdp)
    if setup.fsdp:
        tracker.track_inputs((x,))
    with tracker:
        forward_backward()
    muon = parts.pop("muon", None)
    for part in parts.values():
        part.step()
    peak = _by_category(tracker.get_tracker_snapshot("peak")[device])
    if setup.fsdp and muon is not None:
        # FSDPMemTracker follows one optimizer (AdamW's part); Muon's momentum buffers, held all
        # through the step, are added as they are: this rank's shards
        held = sum(_local_bytes(v) for state in muon.state.values() for v in state.values() if torch.is_tensor(v))
        peak["optimizer"] += held
        peak["total"] += held
    if muon is not None:
        # Muon's step makes no DTensor ops (ShardedMuon works on the local shards), so the tracker
        # counts it as it runs: what is held after backward, the whole matrix and its temporaries.
        from torch.distributed._tools.mem_tracker import MemTracker
        step_tracker = MemTracker()
        step_tracker.track_external(model, muon, *parts.values())
        with step_tracker:
            held = step_tracker.get_tracker_snapshot("current")[device]["Total"]
            muon.step()
        peak["muon_step"] = step_tracker.get_tracker_snapshot("peak")[device]["Total"]
        peak["muon_temporaries"] = peak["muon_step"] - held  # the whole matrix, buffers, Newton-Schulz's
        peak["total"] = max(peak["total"], peak["muon_step"])
    if not setup.fsdp and setup.gpus > 1:
        # DDP copies every gradient into its all-reduce buckets (gradient_as_bucket_view=False,
        # its default): one more set of gradients, held from the first backward on.
        peak["grads"] += grad_bytes
        peak["total"] += grad_bytes
        if "muon_step" in peak:
            peak["muon_step"] += grad_bytes
    return peak


def _local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _tracker(model, optimizers, fsdp):
    if fsdp:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        return FSDPMemTracker(mod=model, optm=optimizers[0])
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(model, *optimizers)
    return tracker


CATEGORIES = {  # FSDPMemTracker's and MemTracker's reference types -> the plan's categories
    "Sharded Param": "params", "Unsharded Param": "params", "Parameter": "params", "Buffer": "params",
    "Sharded Grad": "grads", "Unsharded Grad": "grads", "Gradient": "grads",
    "OptState": "optimizer", "Optstate": "optimizer",
    "Activation": "activations", "Temp": "activations",
    "All Gather": "other", "Reduce Scatter": "other", "Inputs": "other", "Input": "other",
}


def _by_category(snapshot):
    out = dict(params=0, grads=0, optimizer=0, activations=0, other=0)
    for key, value in snapshot.items():
        if key != "Total":
            out[CATEGORIES.get(key, "other")] += value
    out["total"] = snapshot["Total"]
    return out


# ----------------------------------------------------------------------------------------------
# Measured peaks on the CPU (for the checks against reality)

def resident_bytes(*holders):
    """Bytes of the tensors a model and optimizer hold now (parameters, buffers, gradients,
    optimizer state), each storage once; of a sharded DTensor only this rank's shard."""
    tensors = []
    for h in holders:
        if isinstance(h, torch.nn.Module):
            tensors += list(h.parameters()) + [p.grad for p in h.parameters() if p.grad is not None]
            tensors += list(h.buffers())
        elif isinstance(h, torch.optim.Optimizer):
            tensors += [v for state in h.state.values() for v in state.values() if torch.is_tensor(v)]
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_peak_bytes(fn, *holders):
    """The peak bytes of live CPU tensors while fn() runs: what model and optimizer (`holders`)
    hold at the start, plus the highest running sum of the CPU allocator's allocations and frees
    that torch's profiler records (profile_memory=True: every allocation by torch's CPU allocator,
    with its size). Independent of the memory trackers the plan uses."""
    from torch.profiler import ProfilerActivity, profile
    start = resident_bytes(*holders)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = top = 0
    for _, nbytes in events:
        live += nbytes
        top = max(top, live)
    return start + top


def measured_step_peak(setup):
    """The same two training steps as fake_step_peak, on real tensors over a real process group
    (run under torchrun with setup.gpus processes): this rank's peak bytes from the built model
    on. On a GPU (NCCL): torch.cuda.max_memory_allocated. On the CPU (gloo): measure_peak_bytes."""
    from torch.distributed.device_mesh import init_device_mesh
    import os
    config = setup_config(setup)
    T = setup.seq_len or config.block_size
    amp = getattr(torch, setup.dtype) if setup.dtype != "float32" else None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if dist.get_world_size() != setup.gpus:
            raise ValueError(f"--check runs under torchrun with --nproc_per_node={setup.gpus} (--gpus)")
        mesh = init_device_mesh(device.type, (setup.gpus,))
        gen = torch.Generator().manual_seed(dist.get_rank())
        x = torch.randint(0, config.vocab_size, (setup.micro_batch_size, T), generator=gen).to(device)
        model, optimizer = build(config, setup, device, mesh)
        model.init_weights(0)  # initialization's temporaries are not the training step's

        def two_steps():
            train_model = model
            if not setup.fsdp and setup.gpus > 1:  # DDP's buckets are made here, inside the measurement
                from torch.nn.parallel import DistributedDataParallel as DDP
                train_model = DDP(model, device_ids=[device.index] if cuda else None)
            autocast = torch.autocast(device.type, dtype=amp) if amp and not setup.fsdp else contextlib.nullcontext()
            for _ in range(2):
                with autocast:
                    loss = train_model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if not cuda:
            return measure_peak_bytes(two_steps, model, optimizer)
        torch.cuda.reset_peak_memory_stats(device)
        two_steps()
        return torch.cuda.max_memory_allocated(device)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# From fake steps on a few layers to the whole model

FEW_LAYERS = (4, 6)  # even, so "selective" checkpoints the same half of them as of the model
_peaks = {}


def peak_bytes(setup):
    """fake_step_peak for the whole model, from fake steps on 4 and 6 of its layers. From 4 layers
    on, FSDP's buffers in flight at the peak are the same (a block's gathered parameters, the next
    block's prefetch, a gradient reduce: with 2 layers there is no prefetch yet), and what grows
    with depth (sharded state, kept activations) grows by the same bytes a layer. So the two runs
    give the peak for any depth (tests/test_plan.py checks 8 layers against the direct run) at the
    cost of small models: the fake step's time grows with the number of operations, not their size.
    With tensor parallelism, from the step of one data-parallel group (tensor_parallel_peak)."""
    if setup.tensor_parallel > 1:
        group = dataclasses.replace(setup, gpus=data_parallel(setup), tensor_parallel=1)
        return tensor_parallel_peak(peak_bytes(group), setup)
    key = dataclasses.astuple(setup)
    if key not in _peaks:
        n_layer = setup.n_layer or PRESETS[setup.model].n_layer
        if n_layer <= FEW_LAYERS[1]:
            _peaks[key] = fake_step_peak(dataclasses.replace(setup, n_layer=n_layer))
        else:
            a, b = (fake_step_peak(dataclasses.replace(setup, n_layer=n)) for n in FEW_LAYERS)
            per_layer = (n_layer - FEW_LAYERS[0]) / (FEW_LAYERS[1] - FEW_LAYERS[0])
            _peaks[key] = {k: round(a[k] + per_layer * (b[k] - a[k])) for k in a}
    return _peaks[key]


def micro_batch_choices(setup, total_batch_size):
    """Micro batches that divide each data-parallel rank's share of the batch (so accumulation is
    whole). The GPUs of a TP group take the same sequences."""
    T = setup.seq_len or PRESETS[setup.model].block_size
    per_rank, rest = divmod(total_batch_size, T * data_parallel(setup))
    if rest or per_rank == 0:
        return []
    return [b for b in range(1, per_rank + 1) if per_rank % b == 0]


def largest_micro_batch(setup, total_batch_size, budget):
    """(micro batch, its peak) for the largest micro batch whose peak fits `budget` bytes, or
    (None, the peak at micro batch 1). The peak grows by the same amount per sequence (the
    activations), so two fake steps point at the answer; it is then checked by its own."""
    choices = micro_batch_choices(setup, total_batch_size)
    one = peak_bytes(dataclasses.replace(setup, micro_batch_size=1))
    if one["total"] > budget:
        return None, one
    if len(choices) == 1:
        return 1, one
    two = peak_bytes(dataclasses.replace(setup, micro_batch_size=2))
    per_sequence = max(1, two["total"] - one["total"])
    guess = 1 + (budget - one["total"]) // per_sequence
    for b in reversed([b for b in choices if b <= guess]):
        peak = peak_bytes(dataclasses.replace(setup, micro_batch_size=b))
        if peak["total"] <= budget:
            return b, peak
    return 1, one


# ----------------------------------------------------------------------------------------------
# Tensor parallelism: Megatron-style (Shoeybi et al. 2019) with sequence parallelism (Korthikanti
# et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"), planned from the
# fake step of one data-parallel group

def data_parallel(setup):
    """Data-parallel ranks: each takes its own share of the batch; a TP group's GPUs are one rank."""
    return setup.gpus // setup.tensor_parallel


def mlp_width(config):
    """The MLP's hidden width, as model.MLP makes it (read from a one-block model on the meta device)."""
    with torch.device("meta"):
        return GPT(dataclasses.replace(config, n_layer=1)).transformer.h[0].mlp.c_fc.out_features


def tensor_parallel_problem(config, gpus, tp, seq_len):
    """Why `tp` GPUs cannot split each layer of this model on `gpus` GPUs, or "". Attention splits
    by heads, the MLP by its hidden units, the embedding, head and loss by vocabulary rows, the
    norms and the residual (sequence parallelism) by positions; a TP group stays within a node."""
    if tp < 1:
        return "must be at least 1 (1: off)"
    checks = [(tp <= GPUS_PER_NODE, f"is wider than a node's {GPUS_PER_NODE} GPUs (TP's collectives, 8 a block, "
                                    f"need NVLink)"),
              (gpus % tp == 0, f"does not divide --gpus={gpus}"),
              (config.n_head % tp == 0, f"does not divide the {config.n_head} attention heads"),
              (mlp_width(config) % tp == 0, f"does not divide the MLP's width {mlp_width(config)}"),
              (config.padded_vocab_size % tp == 0, f"does not divide the {config.padded_vocab_size} rows of "
                                                   f"the (padded) vocabulary"),
              (seq_len % tp == 0, f"does not divide the sequence of {seq_len} (sequence parallelism splits it)")]
    return next((why for ok, why in checks if not ok), "")


def activation_bytes(setup):
    """Bytes of one activation element: the compute dtype's (bf16 under FSDP's MixedPrecisionPolicy
    and under DDP's autocast, whose linear layers keep bf16 copies of their inputs)."""
    return getattr(torch, setup.dtype).itemsize


def kept_gathered_bytes(setup, config):
    """The all-gathered (micro batch, T, C) activations a TP rank keeps whole at the step's peak:
    each column-parallel projection keeps its input, gathered from the sequence-parallel shards,
    for its weight's gradient (torch's ColwiseParallel does; Megatron-LM instead keeps the shard
    and gathers it again in backward). Attention's q, k and v share one gathered input, the MLP's
    fc another, and the head a third. A checkpointed block keeps neither: only the one being
    recomputed holds its two. At TP 1 the same tensors are the norms' outputs."""
    recomputed = len(checkpointed_blocks(config.n_layer, setup.activation_checkpointing))
    held_by = config.n_layer - recomputed + (1 if recomputed else 0)
    T = setup.seq_len or config.block_size
    return (2 * held_by + 1) * setup.micro_batch_size * T * config.n_embd * activation_bytes(setup)


def tensor_parallel_peak(group_peak, setup):
    """One GPU's peak at TP t from the peak of its data-parallel group's fake step at TP 1
    (`group_peak`, by category): parameters, gradients, optimizer state and FSDP's buffers (other)
    are cut t ways, so the sharded state is over DP x TP; the activations too (inside attention and
    the MLP by heads and hidden units; with sequence parallelism the norms and the residual, which
    TP alone keeps whole, by positions; the vocabulary-parallel loss splits the logits), except the
    gathered inputs (kept_gathered_bytes), whole on every GPU. Left out: the norms, the position
    table and the row-parallel projections' biases are whole on every GPU of the group, which the
    plan counts as cut: 0.02% of gpt3-175b's parameters, 0.09% of gpt3-13b's, 1.3% of gpt3-small's."""
    t = setup.tensor_parallel
    kept = kept_gathered_bytes(setup, setup_config(setup))
    out = {k: round(group_peak[k] / t) for k in ("params", "grads", "optimizer", "other")}
    out["activations"] = round((group_peak["activations"] - kept) / t + kept)
    out["total"] = sum(out.values())
    return out


def tensor_parallel_traffic(setup, config, total_batch_size):
    """Bytes one GPU sends (and as many it receives) a step in TP's collectives. A block, a micro
    batch: in forward, an all-gather of its (B, T, C) input before attention and before the MLP and
    a reduce-scatter after each (sequence parallelism's form of Megatron's two all-reduces); in
    backward the same four again (each one's gradient); a recomputed block's forward runs its four
    once more. The embedding's output is reduce-scattered and the head's input gathered: two more
    each way. Each moves (t - 1)/t of the tensor through every GPU (a ring, or NVSwitch). Left out:
    the loss's all-reduces over the vocabulary (B x T floats) and the replicated norms' gradients."""
    t = setup.tensor_parallel
    if t == 1:
        return 0
    T = setup.seq_len or config.block_size
    sequences = total_batch_size // (T * data_parallel(setup))  # a data-parallel rank's, a step
    recomputed = len(checkpointed_blocks(config.n_layer, setup.activation_checkpointing))
    collectives = 8 * config.n_layer + 4 * recomputed + 4
    return collectives * sequences * T * config.n_embd * activation_bytes(setup) * (t - 1) / t


# ----------------------------------------------------------------------------------------------
# Data-parallel communication: FSDP's, HSDP's and DDP's collectives, timed on the links they cross

def fsdp_traffic(setup, n_params, accum):
    """Bytes one GPU receives (and as many it sends) a step in FSDP's own collectives: the bf16
    parameters gathered in forward and again in backward, and the fp32 gradients reduce-scattered,
    each micro batch, within its shard group; with TP, of its 1/t of the parameters. A ring
    all-gather or reduce-scatter over n ranks moves (n - 1)/n of the whole tensor through each GPU
    (NCCL's, and NVSwitch's). 0 under DDP. Timed by data_parallel_communication."""
    n = setup.shard_size or data_parallel(setup)
    return (2 + 2 + 4) * n_params / setup.tensor_parallel * (n - 1) / n * accum if setup.fsdp else 0


def ring_rate(kind, size, stride):
    """(bytes/s, which link) at which one GPU's share of a ring collective moves, over a group of
    `size` ranks `stride` GPUs apart: ranks are numbered TP-innermost, so a TP group is t adjacent
    GPUs and a data-parallel group (FSDP's shard group, DDP's) takes one GPU of each, stride t, and
    HSDP's replicas stride shard_size. Within one node, NVLink. Across nodes a ring runs at its
    slowest link, the NIC where it leaves a node; NCCL runs several rings at once (channels), each
    leaving a node through another of the group's GPUs and its NIC, so the group's m GPUs of a node
    share m NICs: min(m x inter_node, NVLink). So a data-parallel group with one GPU a node (TP 8)
    gets one NIC, and plain FSDP over whole nodes eight. The pattern NCCL shows: its bus bandwidth
    across nodes grows with the NICs a node's GPUs use (NVIDIA/nccl issues 412; 1168: on 4 nodes, 4
    GPUs a node about 45 GB/s, 8 about 90). (None, why) when the table has no rate."""
    per_node = max(1, GPUS_PER_NODE // stride)
    if size * stride <= GPUS_PER_NODE:
        return kind.nvlink, "NVLink" if kind.nvlink else "no NVLink rate for this GPU"
    if not (kind.inter_node and kind.nvlink):
        return None, "no rate between nodes for this GPU"
    if per_node * kind.inter_node >= kind.nvlink:
        return kind.nvlink, f"NVLink (the group's {per_node} NICs a node are faster)"
    return per_node * kind.inter_node, (f"InfiniBand: the group's {per_node} GPU{'s' * (per_node > 1)} of a node, "
                                        f"a {kind.inter_node / 1e9:.0f} GB/s NIC each")


def data_parallel_communication(setup, n_params, accum, kind):
    """One GPU's data-parallel collectives a step, each a dict: by (FSDP, HSDP or DDP), what, GB
    (received, and as many sent), ranks, seconds at ring_rate (0 when not known), the rate and its
    link. FSDP: fsdp_traffic over the shard group. HSDP adds the replicas' all-reduce of the fp32
    gradient shards, each micro batch (FSDP2 all-reduces after every reduce-scatter unless told not
    to; train_gpt does not), 2(r - 1)/r of the shard over r replicas. DDP: its all-reduce of the
    fp32 gradients, on the last micro batch only (train_gpt skips the others' sync), 2(n - 1)/n of
    them. With TP, of 1/t of the parameters. Not counted: train_gpt --fsdp_unsharded_accumulation
    (one reduce-scatter a step)."""
    t, dp = setup.tensor_parallel, data_parallel(setup)
    gathers = ("bf16 parameters all-gathered in forward and again in backward, fp32 gradients reduce-scattered, "
               "each micro batch")
    if not setup.fsdp:
        legs = [("DDP", "the fp32 gradients all-reduced, once a step", 2 * 4 * n_params / t * (dp - 1) / dp, dp, t)]
    elif setup.shard_size and setup.shard_size < setup.gpus:  # HSDP (the plan has no TP with it)
        s, r = setup.shard_size, setup.gpus // setup.shard_size
        legs = [("HSDP", gathers + ", within a shard group", fsdp_traffic(setup, n_params, accum), s, 1),
                ("HSDP", "the fp32 gradient shards all-reduced across replicas, each micro batch",
                 2 * 4 * n_params / s * (r - 1) / r * accum, r, s)]
    else:
        legs = [("FSDP", gathers, fsdp_traffic(setup, n_params, accum), dp, t)]
    out = []
    for by, what, nbytes, ranks, stride in legs:
        if ranks > 1:
            rate, link = ring_rate(kind, ranks, stride)
            out.append(dict(by=by, what=what, gb=nbytes / 1e9, ranks=ranks, seconds=nbytes / rate if rate else 0.0,
                            rate_gb_s=rate / 1e9 if rate else 0.0, link=link))
    return out


def overlap_window(setup, compute, accum, recomputed):
    """Seconds of a step's compute that its data-parallel collectives run under. FSDP2 gathers the
    next block's parameters while this one computes (prefetch) and reduce-scatters a block's
    gradients while the next one's backward runs, every micro batch: the whole step, so a step is
    max(compute, FSDP's time). DDP all-reduces its gradient buckets as backward makes them, on the
    last micro batch only: that backward, 2/3 of a micro batch's FLOPs (a recomputed block's
    forward runs in backward too: (2 + r)/(3 + r) with r the recomputed share). Neither counts the
    first gather or the last reduce that nothing hides, nor TP's collectives sharing NVLink."""
    if setup.fsdp:
        return compute
    return compute / accum * (2 + recomputed) / (3 + recomputed)


# ----------------------------------------------------------------------------------------------
# The plan

@dataclass
class Plan:
    model: str
    gpus: int
    gpu: str
    sharding: str
    fits: bool
    attention: str = ""  # the attention pattern, as model.describe_attention says it
    reason: str = ""
    activation_checkpointing: str = ""
    micro_batch_size: int = 0
    accumulation_steps: int = 0
    memory_gib: dict = dataclasses.field(default_factory=dict)  # peak on one GPU, by category
    budget_gib: float = 0.0
    mfu: float = 0.0
    mfu_source: str = ""
    step_seconds: float = 0.0
    tokens_per_second: float = 0.0
    tokens: int = 0
    days: float = 0.0
    gpu_hours: float = 0.0
    smallest_gpus_that_fit: Optional[int] = None
    optimizer: str = "adamw"
    muon: dict = dataclasses.field(default_factory=dict)  # with Muon: its step's costs (muon_costs)
    arch: str = "gpt"
    tensor_parallel: int = 1  # GPUs that split each layer (1: none)
    data_parallel: int = 0  # ranks that each take a share of the batch: gpus / tensor_parallel
    tensor_parallel_gb: float = 0.0  # GB one GPU sends (and receives) a step in TP's collectives
    tensor_parallel_seconds: float = 0.0  # their time at NVLink's rate, part of step_seconds
    # FSDP's (HSDP's, DDP's) collectives a step, each timed on the link it crosses (data_parallel_communication)
    data_parallel_communication: list = dataclasses.field(default_factory=list)
    data_parallel_seconds: float = 0.0  # their time, overlapped with compute (overlap_window)
    compute_seconds: float = 0.0  # a step's FLOPs at the MFU, recomputation included
    tensor_parallel_choice: str = ""  # with tensor_parallel "auto": what was planned and why this one


def make_plan(model, gpus, gpu="H100-80GB", fsdp=True, activation_checkpointing="auto",
              micro_batch_size="auto", total_batch_size=None, tokens=None, mfu=None, chunked_loss=False,
              dtype="bfloat16", gpu_memory=None, fsdp_shard_size=None, optimizer="adamw", attention=None,
              attention_band=None, arch="gpt", tensor_parallel="auto", suggest_gpus=True, log=print):
    """The plan for `model` on `gpus` GPUs of kind `gpu`. activation_checkpointing "auto" takes the
    least recomputation at which a micro batch fits; micro_batch_size "auto" the largest that fits.
    gpu_memory (bytes) replaces the table's figure for the GPU (train_gpt passes the device's own).
    optimizer "muon" plans train_gpt's --optimizer=muon (its memory in the fake step, its extra
    communication and Newton-Schulz work in plan.muon). attention, attention_band: the pattern
    (None: the preset's), whose banded layers cost fewer FLOPs. tensor_parallel: the GPUs of a node
    that split each layer (1: off), or "auto" (choose_tensor_parallel). suggest_gpus: if FSDP does
    not fit, find the smallest GPU count that would (more fake steps)."""
    # the arguments as given, for choose_tensor_parallel to plan each TP degree with
    options = {k: v for k, v in locals().items() if k not in ("tensor_parallel", "suggest_gpus", "log")}
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"unknown --optimizer={optimizer!r}; choose adamw or muon")
    if model not in PRESETS:
        raise ValueError(f"unknown --model={model!r}; choose one of: {', '.join(PRESETS)}")
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu={gpu!r}; choose one of: {', '.join(GPUS)}")
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch={arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if fsdp_shard_size and (not fsdp or gpus % fsdp_shard_size):
        raise ValueError(f"--fsdp_shard_size={fsdp_shard_size} needs --fsdp=True and must divide --gpus={gpus}")
    hybrid = fsdp_shard_size and fsdp_shard_size < gpus
    kind, preset = GPUS[gpu], PRESETS[model]
    if gpu_memory:
        kind = dataclasses.replace(kind, memory=int(gpu_memory))
    total_batch_size = total_batch_size or preset.batch_tokens
    budget = int(USABLE * kind.memory)
    setup = Setup(model, gpus, 1, fsdp=fsdp, chunked_loss=chunked_loss, dtype=dtype,
                  shard_size=fsdp_shard_size if hybrid else None, optimizer=optimizer, attention=attention,
                  attention_band=attention_band, arch=arch)
    config = setup_config(setup)
    if tensor_parallel == "auto":
        flop_rate = kind.peak_flops * estimate_mfu(kind, mfu)[0]
        least = MODES[0] if activation_checkpointing == "auto" else activation_checkpointing

        def fastest(t):  # no step at TP t is shorter: its compute with the least recomputation, its TP traffic
            at = dataclasses.replace(setup, tensor_parallel=t, activation_checkpointing=least)
            return (compute_seconds(config, least, total_batch_size, gpus, flop_rate)
                    + tensor_parallel_seconds(at, config, total_batch_size, kind))
        return choose_tensor_parallel(options, tensor_parallel_degrees(config, gpus, fsdp_shard_size, optimizer),
                                      fastest if flop_rate else None, log)
    tp = int(tensor_parallel)
    if tp > 1 and (fsdp_shard_size or optimizer == "muon"):
        raise ValueError(f"--tensor_parallel={tp} is planned with plain FSDP or DDP and AdamW, not with "
                         f"{'--fsdp_shard_size' if fsdp_shard_size else '--optimizer=muon'}: drop one of the two")
    problem = tensor_parallel_problem(config, gpus, tp, config.block_size)
    if problem:
        valid = [t for t in range(1, GPUS_PER_NODE + 1)
                 if not tensor_parallel_problem(config, gpus, t, config.block_size)]
        raise ValueError(f"--tensor_parallel={tp} {problem}: choose one of {', '.join(map(str, valid))} "
                         f"for {model} on {gpus} GPUs")
    setup = dataclasses.replace(setup, tensor_parallel=tp)
    dp = data_parallel(setup)
    sharding = f"HSDP ({gpus // fsdp_shard_size} replicas x {fsdp_shard_size}-way FSDP2)" if hybrid else \
        "FSDP2" if fsdp else "DDP"
    if tp > 1:
        sharding = (f"tensor parallel {tp} (Megatron-style, sequence parallel) x {sharding} over {dp} "
                    f"data-parallel rank{'s' * (dp > 1)}")
    plan = Plan(model, gpus, gpu, sharding, False, describe_attention(config, config.block_size),
                budget_gib=budget / GiB, tokens=tokens or token_budget(model), optimizer=optimizer, arch=arch,
                tensor_parallel=tp, data_parallel=dp)
    sequences = total_batch_size // preset.block_size
    if not micro_batch_choices(setup, total_batch_size):
        workable = [n * tp for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if sequences % n == 0]
        over = f"{gpus} GPUs" if tp == 1 else f"the {dp} data-parallel ranks of {gpus} GPUs at TP {tp}"
        wider = [str(t) for t in TENSOR_PARALLEL_AUTO if t > tp and not tensor_parallel_problem(
            config, gpus, t, config.block_size) and sequences % (gpus // t) == 0]
        plan.reason = (f"the batch of {total_batch_size:,} tokens ({sequences} sequences of {preset.block_size}) "
                       f"does not split evenly over {over}: use {', '.join(map(str, workable))} GPUs"
                       + (f", --tensor_parallel={', '.join(wider[:-1])}{' or ' * (len(wider) > 1)}{wider[-1]},"
                          if wider else "") + " or another --total_batch_size")
        return plan
    modes = MODES if activation_checkpointing == "auto" else [activation_checkpointing]
    for mode in modes:
        setup = dataclasses.replace(setup, activation_checkpointing=mode)
        if micro_batch_size == "auto":
            b, peak = largest_micro_batch(setup, total_batch_size, budget)
        else:
            b = int(micro_batch_size)
            if b not in micro_batch_choices(setup, total_batch_size):
                raise ValueError(f"--micro_batch_size={b} does not divide the {sequences // dp} sequences "
                                 f"each {'GPU' if tp == 1 else 'TP group'} takes a step: use one of "
                                 f"{micro_batch_choices(setup, total_batch_size)}")
            peak = peak_bytes(dataclasses.replace(setup, micro_batch_size=b))
            b = b if peak["total"] <= budget else None
        log(f"  checkpointing {mode}: " + (f"micro batch {b} fits, peak {peak['total'] / GiB:.1f} GiB"
                                            if b else f"does not fit, peak {peak['total'] / GiB:.1f} GiB"))
        if b:
            break
    plan.activation_checkpointing = mode
    plan.memory_gib = {k: v / GiB for k, v in peak.items()}
    if not b:
        plan.reason = (f"does not fit: {peak['total'] / GiB:.1f} GiB a GPU at micro batch "
                       f"{micro_batch_size if micro_batch_size != 'auto' else 1} with {mode} checkpointing, "
                       f"over the {budget / GiB:.1f} GiB usable ({USABLE:.0%} of {gpu})")
        if hybrid:
            plan.reason += "; shard over more ranks: a larger --fsdp_shard_size (or plain FSDP)"
        elif fsdp and suggest_gpus:
            plan.smallest_gpus_that_fit = smallest_gpus(setup, total_batch_size, budget, dataclasses.replace(
                setup, micro_batch_size=1))
        else:
            plan.reason += "; DDP keeps a full copy of everything on each GPU: try --fsdp"
        return plan
    plan.fits, plan.micro_batch_size = True, b
    plan.accumulation_steps = total_batch_size // (b * preset.block_size * dp)
    plan.tensor_parallel_seconds = tensor_parallel_seconds(setup, config, total_batch_size, kind)
    plan.tensor_parallel_gb = tensor_parallel_traffic(setup, config, total_batch_size) / 1e9
    with torch.device("meta"):
        n_params = num_params(GPT(config))
    plan.data_parallel_communication = data_parallel_communication(setup, n_params, plan.accumulation_steps, kind)
    plan.data_parallel_seconds = sum(c["seconds"] for c in plan.data_parallel_communication)
    plan.mfu, plan.mfu_source = estimate_mfu(kind, mfu)
    if plan.mfu:
        plan.compute_seconds = compute_seconds(config, mode, total_batch_size, gpus, kind.peak_flops * plan.mfu)
        recomputed = len(checkpointed_blocks(config.n_layer, mode)) / config.n_layer
        window = overlap_window(setup, plan.compute_seconds, plan.accumulation_steps, recomputed)
        # TP's collectives sit between a block's matmuls, which wait for them: not overlapped
        plan.step_seconds = (plan.compute_seconds + max(0.0, plan.data_parallel_seconds - window)
                             + plan.tensor_parallel_seconds)
        plan.tokens_per_second = total_batch_size / plan.step_seconds
        plan.days = plan.tokens / plan.tokens_per_second / 86400
        plan.gpu_hours = plan.days * 24 * gpus
    if optimizer == "muon":
        plan.muon = muon_costs(setup, peak, plan.accumulation_steps, kind.peak_flops * plan.mfu, plan.step_seconds)
    return plan


def compute_seconds(config, mode, total_batch_size, gpus, flop_rate):
    """A step's compute on one GPU: the batch's training FLOPs (model.flops_per_token), shared by
    all the GPUs, at flop_rate (peak x MFU). A block recomputed under checkpointing `mode` runs its
    forward twice: 4 instead of 3 forward passes' FLOPs, which model FLOPs (and so MFU) do not count."""
    recomputed = len(checkpointed_blocks(config.n_layer, mode)) / config.n_layer
    return total_batch_size * flops_per_token(config, config.block_size) * (1 + recomputed / 3) / (gpus * flop_rate)


def tensor_parallel_seconds(setup, config, total_batch_size, kind):
    """TP's collectives a step (tensor_parallel_traffic) at NVLink's rate; 0 without a rate."""
    traffic = tensor_parallel_traffic(setup, config, total_batch_size)
    return traffic / kind.nvlink if traffic and kind.nvlink else 0.0


def tensor_parallel_degrees(config, gpus, fsdp_shard_size, optimizer):
    """The TP degrees "auto" plans: those of TENSOR_PARALLEL_AUTO that split this model on these
    GPUs; only 1 with HSDP or Muon, which the plan does not combine with TP."""
    if fsdp_shard_size or optimizer == "muon":
        return [1]
    return [t for t in TENSOR_PARALLEL_AUTO if not tensor_parallel_problem(config, gpus, t, config.block_size)]


def choose_tensor_parallel(options, degrees, fastest, log):
    """--tensor_parallel=auto: plans the TP degrees that split the model (of 1, 2, 4, 8) in turn and
    keeps the one with the shortest ESTIMATED step, make_plan's: compute at the plan's MFU with the
    recomputation its checkpointing needs, under which FSDP's (or DDP's) collectives run, timed on
    the links they cross, plus TP's at NVLink's rate. A wider TP splits the memory further (a larger
    micro batch, less recomputation, fewer FSDP gathers a step, a data-parallel group with fewer GPUs
    a node and so fewer NICs) and sends more in TP's collectives: no degree wins by rule. So the
    search stops only where no wider degree can win: when the best step so far is no longer than
    fastest(t) for the next degree t, a floor for any step at TP t (its compute with the least
    checkpointing allowed, no data-parallel time showing, its TP traffic), which grows with t (TP's
    bytes a step grow as t - 1). Without an MFU (fastest None: a GPU this project never measured)
    the smallest degree that fits. Not weighed: the lower MFU of TP's narrower matmuls. None fits:
    the widest degree's refusal."""
    plans, notes, stop = [], [], ""
    least = MODES[0] if options["activation_checkpointing"] == "auto" else options["activation_checkpointing"]
    for i, t in enumerate(degrees):
        plan = make_plan(**options, tensor_parallel=t, suggest_gpus=False, log=log if len(degrees) == 1 else
                         lambda m, t=t: log(f"  TP {t}:{m[1:]}"))
        plans.append(plan)
        if not plan.fits:
            notes.append(f"TP {t} does not fit" if plan.memory_gib else f"TP {t}: the batch does not split")
            continue
        if fastest is None:
            notes.append(f"TP {t} fits")
            break
        notes.append(f"TP {t} {plan.step_seconds:.2f} s a step = {step_parts(plan)}")
        wider = degrees[i + 1] if i + 1 < len(degrees) else None
        if wider and min(p.step_seconds for p in plans if p.fits) <= fastest(wider):
            stop = (f"; none wider planned: TP {wider} takes at least {fastest(wider):.2f} s (its compute with "
                    f"checkpointing {least} and its TP traffic)")
            break
    fitting = [p for p in plans if p.fits]
    if not fitting:  # the widest degree's refusal, with the GPU count that would fit (its peaks are planned)
        chosen = make_plan(**options, tensor_parallel=degrees[-1], log=lambda m: None)
        why = f"none of TP {', '.join(map(str, degrees))} fits"
    elif fastest:
        chosen, why = min(fitting, key=lambda p: p.step_seconds), "the shortest estimated step"
    else:
        chosen, why = fitting[0], "the smallest that fits (no MFU to weigh the steps)"
    if len(plans) > 1:  # else TP 1 is the only degree, or no wider one can be faster: nothing to weigh
        chosen.tensor_parallel_choice = f"TP {chosen.tensor_parallel}, {why} ({'; '.join(notes)}{stop})"
    return chosen


def step_parts(plan):
    """A step's estimate in words: compute, the data-parallel collectives' time not hidden under it
    (overlap_window), TP's collectives."""
    legs, dp = plan.data_parallel_communication, plan.data_parallel_seconds
    name = legs[0]["by"] if legs else ""
    shown = plan.step_seconds - plan.compute_seconds - plan.tensor_parallel_seconds
    parts = f"compute {plan.compute_seconds:.2f} s"
    if shown > 1e-9 * plan.step_seconds:  # more than rounding
        parts += f" + {shown:.2f} s of {name}'s {dp:.2f} s not hidden under it"
    elif dp:
        parts += f" ({name}'s {dp:.2f} s hidden under it)"
    return parts + (f" + TP {plan.tensor_parallel_seconds:.2f} s" if plan.tensor_parallel_seconds else "")


def muon_costs(setup, peak, accum, flop_rate, step_seconds):
    """What Muon adds to a step on one GPU. Memory: the peak of its step (fake_step_peak's
    "muon_step"). Under FSDP (sharded_muon.ShardedMuon), counted from the deal its step makes over
    the model's matrices: the bytes each GPU receives (and as many it sends) to gather the matrices
    it steps and return the others' rows, against FSDP's own per step (a bf16 all-gather of the
    parameters in forward and again in backward, an fp32 reduce-scatter of the gradients, each
    micro step, within one shard group); and the Newton-Schulz FLOPs of the slowest GPU, as time
    at the plan's MFU (an estimate: these are large matmuls, which may run faster). Under DDP
    every GPU steps every matrix, with no extra communication."""
    with torch.device("meta"):
        model = GPT(setup_config(setup))
    shapes = [tuple(p.shape) for p in muon_params(model)]
    n = (setup.shard_size or setup.gpus) if setup.fsdp else 1
    ns_steps = torch.optim.Muon([torch.zeros(1, 1)]).defaults["ns_steps"]
    flops = sharded_muon.step_flops(shapes, n, ns_steps)
    received = sum(sharded_muon.traffic(shapes, n)) / n if n > 1 else 0
    total = sum(p.numel() for p in model.parameters())
    fsdp_received = fsdp_traffic(setup, total, accum)
    largest = max(shapes, key=lambda shape: shape[0] * shape[1])
    return dict(step_peak_gib=peak["muon_step"] / GiB, temporaries_gib=peak["muon_temporaries"] / GiB,
                largest=list(largest), matrices=len(shapes), group=n,
                newton_schulz="fp32" if setup.muon_float32 else "bf16", received_gb=received / 1e9,
                fsdp_received_gb=fsdp_received / 1e9, newton_schulz_tflop=flops / 1e12,
                newton_schulz_seconds=flops / flop_rate if flop_rate else 0.0,
                step_share=flops / flop_rate / step_seconds if flop_rate and step_seconds else 0.0)


def estimate_mfu(kind, mfu):
    if mfu:
        return mfu, "given (--mfu)"
    if kind.mfu:
        return kind.mfu, kind.mfu_source
    return 0.0, "never measured on this GPU: give --mfu for a time estimate"


def smallest_gpus(setup, total_batch_size, budget, at_one):
    """The fewest GPUs (a power of two that splits the batch; with TP, times the TP degree) at which
    micro batch 1 with full checkpointing fits. The sharded state divides by the GPU count, the
    rest does not: the peak at N and 2N GPUs give both parts, then the answer is checked by its own
    fake step."""
    full = dataclasses.replace(at_one, activation_checkpointing="full")
    n1 = full.gpus
    p1 = peak_bytes(full)["total"]
    p2 = peak_bytes(dataclasses.replace(full, gpus=2 * n1))["total"]
    sharded = max(1, 2 * n1 * (p1 - p2))  # p(N) = rest + sharded / N
    rest = p1 - sharded / n1
    if rest >= budget:
        return None
    n = full.tensor_parallel
    while n < sharded / (budget - rest) or not micro_batch_choices(dataclasses.replace(full, gpus=n), total_batch_size):
        n *= 2
        if n > 2**20:
            return None
    while peak_bytes(dataclasses.replace(full, gpus=n))["total"] > budget and n <= 2**20:
        n *= 2
    return n if micro_batch_choices(dataclasses.replace(full, gpus=n), total_batch_size) else None


def format_plan(plan):
    head = f"plan: {plan.model}{'' if plan.arch == 'gpt' else f' ({plan.arch})'} on {plan.gpus} x {plan.gpu}, {plan.sharding}; {plan.attention}"
    lines = [head]
    if plan.tensor_parallel_choice:
        lines.append(f"  tensor parallel auto: {plan.tensor_parallel_choice}")
    if plan.memory_gib:
        m = plan.memory_gib
        lines.append(f"  peak memory per GPU (GiB, at the step's peak): params {m['params']:.2f} | grads "
                     f"{m['grads']:.2f} | optimizer {m['optimizer']:.2f} | activations {m['activations']:.2f} | "
                     f"other {m['other']:.2f} | total {m['total']:.2f} of {plan.budget_gib:.1f} usable")
    if not plan.fits:
        lines.append(f"  REFUSED: {plan.reason}")
        if plan.smallest_gpus_that_fit:
            lines.append(f"  the smallest GPU count that fits (micro batch 1, full checkpointing): "
                         f"{plan.smallest_gpus_that_fit}")
        return "\n".join(lines)
    lines.append(f"  activation checkpointing {plan.activation_checkpointing}, micro batch {plan.micro_batch_size} "
                 f"(the largest that fits), {plan.accumulation_steps} accumulation steps")
    if plan.tensor_parallel > 1:
        rate = GPUS[plan.gpu].nvlink
        lines.append(f"  TP communication: {plan.tensor_parallel_gb:,.0f} GB sent (and as many received) by each GPU a "
                     f"step in all-gathers and reduce-scatters of a micro batch's (B, T, C) activations, 8 a block "
                     f"and 4 more a recomputed block, " + (f"ESTIMATE {plan.tensor_parallel_seconds:.2f} s at NVLink's "
                     f"{rate / 1e9:.0f} GB/s a direction (the link rate: a floor)" if rate else
                     "not timed (no NVLink rate for this GPU)"))
    lines += format_data_parallel(plan)
    if plan.mfu:
        lines.append(f"  ESTIMATE at MFU {plan.mfu:.1%} ({plan.mfu_source}): {plan.step_seconds:.2f} s a step "
                     f"= {step_parts(plan)}, "
                     f"{plan.tokens_per_second:,.0f} tokens/s; {plan.tokens / 1e9:,.0f}B tokens in "
                     f"{plan.days:,.2f} days = {plan.gpu_hours:,.0f} GPU-hours")
    else:
        lines.append(f"  no time estimate: {plan.mfu_source}")
    if plan.muon:
        lines += format_muon(plan)
    return "\n".join(lines)


def format_data_parallel(plan):
    """A line for each data-parallel collective: its bytes, ranks, time and link."""
    lines = []
    for c in plan.data_parallel_communication:
        time = (f"ESTIMATE {c['seconds']:.2f} s at {c['rate_gb_s']:,.0f} GB/s a direction ({c['link']}; the link "
                f"rate: a floor)" if c["seconds"] else f"not timed ({c['link']})")
        lines.append(f"  {c['by']} communication: {c['gb']:,.0f} GB received (and as many sent) by each GPU a step "
                     f"over {c['ranks']} ranks ({c['what']}), {time}")
    if plan.data_parallel_seconds and plan.compute_seconds:
        lines[-1] += (", overlapped with the last micro batch's backward" if c["by"] == "DDP" else
                      ", overlapped with compute (FSDP2's prefetch)")
    return lines


def format_muon(plan):
    m = plan.muon
    rows, cols = m["largest"]
    whole = (f"each is gathered whole to one of the {m['group']} GPUs it is sharded over, which steps it "
             f"(ShardedMuon)" if plan.sharding != "DDP" else "every GPU steps every matrix (DDP)")
    held = (f"the largest, {rows} x {cols}, whole in fp32 with its gradient and momentum" if plan.sharding != "DDP"
            else f"every matrix whole; the largest is {rows} x {cols}")
    lines = [f"  Muon for {m['matrices']} block matrices: {whole}; the peak of its step {m['step_peak_gib']:.2f} GiB, "
             f"{m['temporaries_gib']:.2f} of them made by the step ({held}, and its {m['newton_schulz']} Newton-Schulz "
             f"temporaries)"]
    if plan.sharding != "DDP":
        lines.append(f"  Muon's extra communication: {m['received_gb']:.2f} GB received (and sent) per GPU a step "
                     f"(the weight, gradient and momentum gathered in fp32, the weight and momentum sent back), "
                     f"against FSDP's own {m['fsdp_received_gb']:.1f} GB")
    if m["newton_schulz_seconds"]:
        lines.append(f"  Muon's Newton-Schulz: {m['newton_schulz_tflop']:.1f} TFLOP on the busiest GPU a step, ESTIMATE "
                     f"{m['newton_schulz_seconds'] * 1e3:.0f} ms at the plan's MFU ({m['step_share']:.1%} of the step)")
    return lines


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="a preset of support/presets.py")
    parser.add_argument("--arch", default="gpt", help=f"the architecture: {', '.join(ARCHITECTURES)} (train_gpt --arch)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the cluster (data-parallel ranks)")
    parser.add_argument("--gpu", default="H100-80GB", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--fsdp", default="True", help="True: FSDP2 (train_gpt --fsdp); False: DDP")
    parser.add_argument("--fsdp_shard_size", type=int, default=0, help="HSDP: shard within groups of this many "
                        "GPUs (a node), replicate across groups; 0: shard over all")
    parser.add_argument("--activation_checkpointing", default="auto", help="auto, none, selective or full")
    parser.add_argument("--micro_batch_size", default="auto", help="auto: the largest that fits; or a number")
    parser.add_argument("--total_batch_size", type=int, default=None, help="tokens a step; default the preset's")
    parser.add_argument("--tokens", type=float, default=None, help="tokens to train on; default the preset's budget")
    parser.add_argument("--mfu", type=float, default=None, help="MFU for the time estimate, e.g. 0.35")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--table", default="", help="a markdown table row per GPT-3 preset for these comma-"
                        "separated GPU counts, e.g. 8,64,512,1024 (with --gpu)")
    parser.add_argument("--gpu_memory", type=float, default=None, help="GiB of one GPU; default the --gpu's")
    parser.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (compute)")
    parser.add_argument("--chunked_loss", default="False", help="True: the chunked loss (no full logits)")
    parser.add_argument("--optimizer", default="adamw", help="adamw, or muon (train_gpt --optimizer=muon)")
    parser.add_argument("--attention", default=None, help="dense or gpt3 (train_gpt --attention); default the preset's")
    parser.add_argument("--attention_band", type=int, default=None, help="gpt3's band; default 256")
    parser.add_argument("--tensor_parallel", default="auto", help="GPUs of a node that split each layer "
                        "(train_gpt --tensor_parallel; 1: off), or auto: plan 1, 2, 4 and 8 and keep the shortest "
                        "estimated step")
    parser.add_argument("--table_models", default="", help="with --table: comma-separated presets; default "
                        "every GPT-3 one")
    parser.add_argument("--check", action="store_true", help="under torchrun on the CPU: the planned peak "
                        "against the measured one, for --micro_batch_size and --activation_checkpointing")
    args = parser.parse_args(argv)
    if args.tensor_parallel != "auto" and not args.tensor_parallel.isdigit():
        parser.error(f"--tensor_parallel={args.tensor_parallel}: give a number of GPUs (1: off) or auto")
    if args.check:
        if args.tensor_parallel not in ("auto", "1"):
            parser.error("--check measures TP 1 only (the training step without tensor parallelism)")
        return check_against_measured(args)
    if args.table:
        return print_table([int(n) for n in args.table.split(",")], args.gpu, args.table_models.split(",")
                           if args.table_models else None, args.tensor_parallel)
    if args.activation_checkpointing not in ("auto", *MODES):
        parser.error(f"--activation_checkpointing={args.activation_checkpointing}: choose auto, {', '.join(MODES)}")
    t0 = time.time()
    try:
        plan = make_plan(args.model, args.gpus, args.gpu, fsdp=args.fsdp.lower() in ("true", "1", "yes"),
                         activation_checkpointing=args.activation_checkpointing,
                         micro_batch_size=args.micro_batch_size, total_batch_size=args.total_batch_size,
                         tokens=int(args.tokens) if args.tokens else None, mfu=args.mfu,
                         chunked_loss=args.chunked_loss.lower() in ("true", "1", "yes"), dtype=args.dtype,
                         gpu_memory=args.gpu_memory * GiB if args.gpu_memory else None,
                         fsdp_shard_size=args.fsdp_shard_size or None, optimizer=args.optimizer,
                         attention=args.attention, attention_band=args.attention_band, arch=args.arch,
                         tensor_parallel=args.tensor_parallel, log=(lambda m: None) if args.json else print)
    except ValueError as e:
        sys.exit(f"plan.py: error: {e}")
    print(json.dumps(dataclasses.asdict(plan)) if args.json else
          format_plan(plan) + f"\n  (planned in {time.time() - t0:.0f} s on this CPU: fake tensors, no GPU)")
    return plan


def print_table(counts, gpu, models=None, tensor_parallel="auto"):
    """A markdown row per GPT-3 preset (or per one of `models`): for each GPU count, fits or not,
    the TP degree (if over 1), micro batch, checkpointing, days."""
    print("| preset | " + " | ".join(f"{n} x {gpu}" for n in counts) + " |")
    print("| --- " * (len(counts) + 1) + "|")
    for name in models or [m for m in PRESETS if m.startswith("gpt3")]:
        cells = []
        for n in counts:
            try:
                p = make_plan(name, n, gpu, tensor_parallel=tensor_parallel, log=lambda m: None)
            except ValueError as e:  # a TP degree that does not split this model on n GPUs
                cells.append(f"no: {str(e).split(':')[0]}")
                continue
            if p.fits:
                tp = f"TP {p.tensor_parallel}, " if p.tensor_parallel > 1 else ""
                cells.append(f"{tp}micro {p.micro_batch_size}, AC {p.activation_checkpointing}, ~{p.days:,.1f} days")
            elif p.smallest_gpus_that_fit:
                at = f" at TP {p.tensor_parallel}" if p.tensor_parallel > 1 else ""
                cells.append(f"no: {p.memory_gib['total']:.0f} GiB{at} (fits from {p.smallest_gpus_that_fit})")
            elif "split" in p.reason:
                cells.append(f"no: {PRESETS[name].batch_tokens // PRESETS[name].block_size} sequences a step")
            else:
                cells.append("no")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def check_against_measured(args):
    """Plan, then measure, the same setup on this CPU; prints both and their ratio (rank 0)."""
    import os
    setup = Setup(args.model, int(os.environ.get("WORLD_SIZE", 1)), int(args.micro_batch_size),
                  args.activation_checkpointing, fsdp=args.fsdp.lower() in ("true", "1", "yes"),
                  chunked_loss=args.chunked_loss.lower() in ("true", "1", "yes"), dtype=args.dtype,
                  optimizer=args.optimizer, muon_float32=not cpu_has_bf16(), attention=args.attention,
                  attention_band=args.attention_band, arch=args.arch)
    planned = peak_bytes(setup)["total"]
    measured = measured_step_peak(setup)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(dict(setup=dataclasses.asdict(setup), planned=planned, measured=measured,
                              ratio=planned / measured)))
    return planned, measured


if __name__ == "__main__":
    main()

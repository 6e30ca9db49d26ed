"""Train a GPT-2 / GPT-3 style model on token shards: one CPU, one GPU, or many with torchrun.

    python train_gpt.py --demo                                   # offline CPU demo, minutes
    python train_gpt.py                                          # GPT-2 124M on FineWeb-EDU
    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the same on 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT train_gpt.py

This file is the recipe, top to bottom: the settings (the seed's numbers: edit them here or pass
--name=value; `python train_gpt.py --help` lists them), the schedule, the model wrapped for
training, one optimizer step, the evaluations and the training loop. The plumbing it calls lives
in support/, and docs/ says why each part is as it is.
"""

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dataloader import DataError, DataLoader, DataNotFound, ValidationData, shard_paths
from model import GPT, ConfigError, ModelOptions, flops_per_token
from support import checkpoint, cli, evals, run_guard, settings
from support.activation_checkpoint import apply_activation_checkpointing
from support.cli import SettingsError
from support.fastpath import choose_training_paths, clip_gradients, gradient_norm
from support.hf import gpt_from_hf
from support.optim import configure_optimizers
from support.resume import Checkpointer, choose_checkpoints
from support.runlog import RunLog, StepMeter, open_trackers
from support.parallelize import loss_context, parallelize
from support.runtime import all_reduce_mean, setup_runtime
from support.settings import (auto_micro_batch, check_batch_divisibility, check_sharding, check_tensor_parallel,
                              muon_config, resolve_model_settings)
from support.sharded_muon import ShardedMuon
from support.tokenizer import gpt2_tokenizer

# What ends the program with one line (the message says what to do); anything else is a bug.
USER_ERRORS = (cli.UserError, ConfigError, DataError, DataNotFound, checkpoint.CorruptCheckpoint,
               run_guard.Refused)


@dataclass
class Settings(ModelOptions):
    """Every setting of a run. The model's own options (its shape and architecture) are inherited
    from model.ModelOptions, written once there with the comments --help shows, and listed first."""
    # the model (model.ModelOptions): GPT-2 124M, the seed's: n_layer=12, n_head=12, n_embd=768, block_size=1024;
    # the architecture switches rope, qk_norm, relu2, untied_head, logit_softcap, zero_init, bias, rmsnorm
    # presets: --model sets the shape above and the training numbers below to a preset's (support/presets.py:
    # gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt3-small ... gpt3-175b, tiny), --arch the architecture
    # options above to a named set (model.ARCHITECTURES); or the run starts from weights
    model: str = "gpt2"  # the preset: its dimensions, context, LR, batch and token schedule
    arch: str = "gpt"  # gpt: GPT-2's and GPT-3's, as the papers; modern: all the architecture options on
    init_from: str = ""  # start from weights: a checkpoint file or a Hugging Face GPT-2 folder
    # data
    data_dir: str = "edu_fineweb10B"  # a folder of *_train_* / *_val_* shards (fineweb.py makes them)
    seq_len: Optional[int] = None  # None: block_size
    # batch: total_batch_size tokens per optimizer step, reached by gradient accumulation
    total_batch_size: int = 2**19  # 524,288 tokens (~0.5M, GPT-3 Small's): 16 micro steps of 32 x 1024 on one GPU
    micro_batch_size: Optional[int] = 32  # sequences per forward pass on each process (32 beat 64 by 4% on an H100); auto: the largest that fits (tools/plan.py)
    batch_warmup_tokens: int = 0  # GPT-3 batch-size warmup: ramp from 32K tokens/step over this many tokens; 0 = off
    # optimization (GPT-3 paper recipe: AdamW, LR warmup then cosine decay to 10%, clocked in tokens)
    max_lr: float = 6e-4  # the peak LR (GPT-3 Small's), times max_lr_scale unless given
    max_lr_scale: float = 1.0  # scales the preset's max_lr when --max_lr is not given (recipes stay relative to the model)
    min_lr: Optional[float] = None  # None: 10% of max_lr (6e-5); 0 with --schedule=wsd
    max_tokens: Optional[int] = 19_073 * 2**19  # the budget: 9,999,745,024 = 19,073 steps, ~1 epoch of FineWeb-EDU's 10B sample
    warmup_tokens: Optional[int] = 715 * 2**19  # linear LR warmup: 374,865,920 = 715 steps (GPT-3: 375M tokens)
    decay_tokens: Optional[int] = None  # the decay ends here (min_lr after); None: max_tokens (GPT-3's presets: 260B of 300B)
    max_steps: Optional[int] = None  # instead of max_tokens: max_steps x total_batch_size tokens
    warmup_steps: Optional[int] = None  # instead of warmup_tokens: warmup_steps x total_batch_size tokens
    stop_step: int = 0  # end this session at this step (checkpointed), the schedule still aims at max_tokens; 0 = off
    weight_decay: float = 0.1  # AdamW weight decay on matmul weights and embeddings
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 = never
    max_bad_steps: int = 10  # stop after this many consecutive steps with a NaN/Inf loss or gradient
    optimizer: str = "adamw"  # adamw, or muon: torch.optim.Muon for the blocks' matrices, AdamW (max_lr) for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate; the schedule scales it as it scales max_lr
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_weight_decay: float = 0.0  # Muon's decoupled weight decay (the lr-scaled kind, as AdamW's)
    muon_adjust_lr: str = "original"  # Muon's lr per matrix shape: original (Keller Jordan's) or match_rms_adamw (Moonshot's)
    schedule: str = "cosine"  # cosine (GPT-3: warmup, cosine to min_lr), or wsd: warmup, constant, linear decay at the end
    decay_fraction: float = 0.2  # wsd: the last fraction of the schedule (of decay_tokens) that decays linearly to min_lr
    recipe: str = ""  # a named set of settings (RECIPES: gpt3, fast, modern); settings given on the command line still win
    # evaluation (steps counted as optimizer updates done)
    val_every: int = 250  # validation loss every this many steps and at the end; 0 = never
    val_tokens: int = 10_485_760  # fixed validation budget; the whole split if smaller
    hellaswag_every: int = 250  # HellaSwag accuracy every this many steps and at the end; 0 = never
    sample_every: int = 250  # print text samples every this many steps and at the end; 0 = never
    # checkpoints and logs
    log_dir: str = "log"  # log.txt, metrics.jsonl and checkpoints go here
    checkpoint_every: int = 5000  # a checkpoint every this many steps, and at the end
    keep_checkpoints: int = 3  # the newest this many are kept
    resume: str = "auto"  # auto: the newest good checkpoint in log_dir, if any; a path; or off
    # experiment tracking (optional: pip install -r requirements-extras.txt): metrics.jsonl's events, rank 0
    wandb_project: str = ""  # log to this Weights & Biases project; "" = off (WANDB_MODE=offline: no account)
    wandb_run_name: str = ""  # the W&B run's display name; "" = W&B picks one
    wandb_run_id: str = ""  # the W&B run to log to; "" = the id saved in log_dir (a resume continues its run), or new
    tensorboard: bool = False  # also write TensorBoard event files to log_dir (tensorboard --logdir=log_dir)
    # system
    device: str = "auto"  # auto: cuda, then mps, then cpu; cuda:N one GPU of several (torchrun: each rank its local one)
    dtype: str = "auto"  # float32 or bfloat16 (autocast); auto: bfloat16 on CUDA and on CPUs with bf16 matmul units
    compile: Optional[bool] = None  # None: on for CUDA (minutes to compile, faster steps), off elsewhere
    chunked_loss: Optional[bool] = None  # loss without full logits; None: on for the CPU
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    fsdp_shard_size: int = 0  # FSDP: shard within groups of this many ranks (a node's GPUs), replicate across groups (HSDP); 0 = all ranks
    fsdp_unsharded_accumulation: bool = False  # FSDP: reduce-scatter once a step, not every micro step (full gradients per rank)
    tensor_parallel: int = 1  # with --fsdp: split each block over this many consecutive ranks, one node's GPUs (Megatron-style, sequence-parallel); 1 = off
    activation_checkpointing: str = "none"  # recompute blocks in backward to save memory: none, selective (every other block) or full
    backend: str = "auto"  # torch.distributed backend: nccl for CUDA, gloo for the CPU
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0: from a table (GPUs) or measured (CPU)
    collective_timeout: float = 600  # seconds a collective waits for the other ranks before the job stops (a frozen or dead rank)
    seed: int = 1337  # initial weights, data order and samples
    demo: bool = False  # the offline CPU demo: tiny model on the embedded Wikipedia sample


# The offline demo (--demo): a tiny GPT (4 blocks, 128 wide) on the Wikipedia articles bundled with
# gensim, sized to finish within 10 minutes on 2 CPU cores without bf16 units, with the recipe and
# width that ended lowest in that time (docs/recipes.md). 100 steps of 4,096 tokens: 409,600 tokens,
# 0.65 epoch of the sample's 627K training tokens. A setting given on the command line still wins.
DEMO = dict(model="tiny", n_embd=128, n_head=2, recipe="modern", data_dir="data/wiki", log_dir="log/demo",
            total_batch_size=2**12, micro_batch_size=16, warmup_steps=10, max_steps=100, val_every=50,
            val_tokens=2**16, hellaswag_every=0, sample_every=50, checkpoint_every=50, device="cpu")


# Named recipes (--recipe=NAME): settings that replace the defaults (and the demo's); any setting
# given on the command line still wins. fast: Muon for the blocks' matrices, 3x the preset's AdamW
# LR for the rest (embeddings, head, gains), warmup-stable-decay to 0. modern: the modern GPT
# (--arch=modern, docs/architecture.md) with fast's optimizer and schedule, a lower Muon LR and 12x
# the preset's AdamW LR. Both chosen by LR sweeps (docs/recipes.md); LRs are relative
# (max_lr_scale) so a recipe follows the preset.
RECIPES = dict(
    gpt3=dict(),  # the defaults: GPT-3's AdamW, warmup and cosine decay to 10%
    fast=dict(optimizer="muon", schedule="wsd", decay_fraction=0.3, muon_lr=0.02, max_lr_scale=3.0),
    modern=dict(arch="modern", optimizer="muon", schedule="wsd", decay_fraction=0.3, muon_lr=0.01, max_lr_scale=12.0),
)


def parse_settings(argv):
    """--name=value arguments -> Settings, in layers, each replacing the one before: the defaults
    above, the --model preset's numbers, the demo's, the architecture's (--arch), the recipe's,
    the command line's."""
    return settings.parse_settings(argv, Settings, DEMO, RECIPES)


def settings_help():
    """--help: every setting with its default and its comment above, in its groups."""
    return settings.settings_help(Settings, __doc__, DEMO)


# ----------------------------------------------------------------------------------------------
# The schedule

def lr_at(tokens, step_tokens, s):
    """The LR of the step that trains tokens .. tokens + step_tokens (tokens: trained before it).
    GPT-3's schedule, clocked in tokens: linear warmup to max_lr, reached by the step that ends at
    or past warmup_tokens (so the first step's LR is not 0), then a decay from max_lr to min_lr
    between warmup_tokens and decay_tokens, and min_lr after. With steps of total_batch_size this
    is the seed's schedule in steps: warmup (step + 1) / warmup_steps, cosine over the rest.
    --schedule=wsd replaces the cosine by warmup-stable-decay (wsd_multiplier)."""
    if tokens < s.warmup_tokens:
        return s.max_lr * min(1.0, (tokens + step_tokens) / s.warmup_tokens)
    if s.schedule == "wsd":
        return s.min_lr + wsd_multiplier(tokens, s.warmup_tokens, s.decay_tokens, s.decay_fraction) * (s.max_lr - s.min_lr)
    return s.min_lr + cosine_decay(tokens, s.warmup_tokens, s.decay_tokens) * (s.max_lr - s.min_lr)


def cosine_decay(tokens, warmup_tokens, decay_tokens):
    """The decay's shape: 1 at warmup_tokens, falling as a half cosine to 0 at decay_tokens, then 0."""
    progress = min(1.0, (tokens - warmup_tokens) / max(1, decay_tokens - warmup_tokens))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


BATCH_WARMUP_START = 2**15  # GPT-3's batch-size warmup starts at 32K tokens a step


def wsd_multiplier(position, warmup, total, decay_fraction):
    """Warmup-stable-decay after the warmup: 1 (the peak) until the last decay_fraction of the run,
    then linear down to 0 at total. Holding the peak and decaying only at the end trains as well
    as cosine at its planned length (Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations"). position, warmup and total are on one clock, steps or tokens."""
    decay_start = wsd_decay_start(warmup, total, decay_fraction)
    if position <= decay_start:
        return 1.0
    if position >= total:
        return 0.0
    return (total - position) / (total - decay_start)


def wsd_decay_start(warmup, total, decay_fraction):
    """Where WSD's stable phase ends: decay_fraction of the run before its end, never before the warmup's end."""
    return max(warmup, total - decay_fraction * total)


def accum_steps_at(tokens_seen, s, tokens_per_micro):
    """Micro steps this optimizer step (tokens_per_micro: one global micro batch, every rank's).
    With GPT-3's batch-size warmup the step grows linearly from 32K tokens (or one global micro
    batch, where that is more) to total_batch_size over the first batch_warmup_tokens tokens, in
    whole global micro batches; it never shrinks."""
    full = s.total_batch_size // tokens_per_micro
    if s.batch_warmup_tokens <= 0 or tokens_seen >= s.batch_warmup_tokens:
        return full
    start = min(BATCH_WARMUP_START, s.total_batch_size)
    target = start + (s.total_batch_size - start) * tokens_seen / s.batch_warmup_tokens
    return max(1, min(full, round(target / tokens_per_micro)))


def plan_steps(s, tokens_per_micro, until=None):
    """The optimizer steps that train `until` tokens (default max_tokens), as (tokens before the
    step, tokens in it): the schedule alone, no training. The last step may pass the target by
    less than one step."""
    until = s.max_tokens if until is None else until
    tokens = 0
    while tokens < until:
        step_tokens = accum_steps_at(tokens, s, tokens_per_micro) * tokens_per_micro
        yield tokens, step_tokens
        tokens += step_tokens


def count_steps(s, tokens_per_micro, until):
    """len(list(plan_steps(...))), without walking the steps after the batch-size warmup."""
    ramp = list(plan_steps(s, tokens_per_micro, min(until, s.batch_warmup_tokens)))
    done = ramp[-1][0] + ramp[-1][1] if ramp else 0
    return len(ramp) + max(0, -(-(until - done) // s.total_batch_size))  # then whole steps, rounded up


def describe_plan(s, tokens_per_micro):
    """One line: the run's tokens, then what its LR does and when, in tokens and in the steps they
    take at this batch."""
    steps = lambda tokens: f"{tokens:,} tokens ({count_steps(s, tokens_per_micro, tokens):,} steps)"
    ramp = (f"; the batch ramps from {accum_steps_at(0, s, tokens_per_micro) * tokens_per_micro:,} tokens "
            f"over the first {s.batch_warmup_tokens:,}" if s.batch_warmup_tokens > 0 else "")
    muon = f" (Muon's peak: {s.muon_lr:g})" if s.optimizer == "muon" else ""
    if s.schedule == "wsd":
        stable_until = int(wsd_decay_start(s.warmup_tokens, s.decay_tokens, s.decay_fraction))
        decay = (f"constant until {steps(stable_until)}, then (wsd) linear decay to {s.min_lr:g} at "
                 f"{steps(s.decay_tokens)}")
    else:
        decay = f"cosine decay to {s.min_lr:g} at {steps(s.decay_tokens)}"
    if s.decay_tokens < s.max_tokens:
        after = f", then {s.min_lr:g} for the last {s.max_tokens - s.decay_tokens:,} tokens"
    elif s.decay_tokens == s.max_tokens:
        after = " (the run's end)"
    else:
        after = f" (after the run's end: it stops at {s.max_tokens:,} tokens, before the LR reaches {s.min_lr:g})"
    return (f"plan: {s.max_tokens:,} tokens in {count_steps(s, tokens_per_micro, s.max_tokens):,} steps of "
            f"{s.total_batch_size:,}{ramp}; LR warmup to {s.max_lr:g}{muon} over {steps(s.warmup_tokens)}, "
            f"{decay}{after}")


# ----------------------------------------------------------------------------------------------
# The model, wrapped for training

def build_model(s, config, rt):
    """The model on its device, wrapped for training. Returns (raw_model, train_model): raw_model
    is the plain GPT (evaluation, sampling and checkpoints use it: clean names, no recompiles),
    train_model is what the training step calls (compiled, DDP-wrapped)."""
    if s.fsdp:
        return build_fsdp_model(s, config, rt)
    raw_model = GPT(config, seed=s.seed)  # every rank draws the same initial weights
    if s.init_from:
        raw_model.load_state_dict(load_init_state(s, config))
    raw_model.to(rt.device)
    choose_training_paths(raw_model, s, rt)
    apply_activation_checkpointing(raw_model, s.activation_checkpointing)
    model = torch.compile(raw_model) if s.compile else raw_model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return raw_model, model


def build_fsdp_model(s, config, rt):
    """FSDP2: each block, then the root, is sharded across ranks (2-D with --fsdp_shard_size: HSDP),
    and with --tensor_parallel each block is first split over a node's ranks. The model is built on
    the meta device (no memory), wrapped (support/parallelize.py: TP, activation checkpointing,
    compile, then FSDP2, in torchtitan's order), then materialized and initialized shard by shard,
    so a model far larger than one device fits. With bf16, parameters are gathered in bf16 for
    compute and gradients are reduced in fp32."""
    with torch.device("meta"):
        raw_model = GPT(config)
    parallelize(raw_model, s, rt)
    raw_model.to_empty(device=rt.device)
    raw_model.init_weights(s.seed)  # the same weights as without FSDP
    choose_training_paths(raw_model, s, rt)
    if s.init_from:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(raw_model, load_init_state(s, config),
                             options=StateDictOptions(full_state_dict=True))
    return raw_model, raw_model


def load_init_state(s, config):
    saved_config, state = initial_weights(s.init_from)
    if saved_config != dataclasses.asdict(config):
        raise SettingsError(f"--init_from={s.init_from} holds a model {saved_config}, but the settings "
                         f"give {dataclasses.asdict(config)}: pick the matching --model")
    return state


def initial_weights(path):
    """(model_config dict, state_dict) to start from: a checkpoint (file or sharded folder), or
    GPT-2 weights in Hugging Face form (a local folder, or a hub name such as gpt2 when online)."""
    if os.path.exists(os.path.join(path, "config.json")) or not os.path.exists(path):
        model = gpt_from_hf(path)
    else:
        model = evals.load_checkpoint_model(path)
    return dataclasses.asdict(model.config), model.state_dict()


# ----------------------------------------------------------------------------------------------
# One optimizer step

def build_optimizer(s, rt, raw_model, log):
    """AdamW, or with --optimizer=muon Muon for the blocks' matrices and AdamW for the rest
    (support/optim.py); under FSDP, Muon steps each matrix gathered whole (ShardedMuon).
    tools/bench.py times what this builds."""
    return configure_optimizers(raw_model, s.weight_decay, s.max_lr, rt.device.type, log=log,
                                muon=muon_config(s, rt.device), sharded_muon=ShardedMuon if s.fsdp else None)


def train_step(s, rt, model, raw_model, optimizer, next_batch, accum, stop=None):
    """One optimizer step: accum micro steps of forward and backward on next_batch() batches,
    gradient clipping, then AdamW unless the loss or gradient is NaN/Inf. Returns (loss, grad
    norm, finite): loss is the step's mean over micro batches and ranks. A stop flag (run_guard)
    rides on the loss's all-reduce. tools/bench.py times this."""
    autocast = (lambda: torch.autocast(rt.device.type, dtype=rt.amp_dtype)) if rt.amp_dtype and not s.fsdp \
        else contextlib.nullcontext
    vocab_parallel = loss_context(s)  # TP: the loss over the vocabulary's shards, forward and backward
    model.train()
    loss_accum = torch.zeros((), device=rt.device)
    for micro_step in range(accum):
        x, y = next_batch()
        if rt.device.type == "cuda":  # pinned memory lets the copy overlap the running step
            x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
        else:
            x, y = x.to(rt.device), y.to(rt.device)
        if rt.world_size > 1 and not s.fsdp:
            # DDP all-reduces gradients during backward. Only the last micro step's reduce is
            # needed: the others would send gradients that are still being accumulated.
            model.require_backward_grad_sync = micro_step == accum - 1
        elif s.fsdp and s.fsdp_unsharded_accumulation:
            # The same for FSDP, at a price: until the last micro step every rank holds the
            # whole model's gradients unsharded (docs/distributed.md).
            model.set_requires_gradient_sync(micro_step == accum - 1)
        with autocast(), vocab_parallel():
            loss = model(x, y)
        # The gradient of the step is the mean over all micro batches: scale each micro loss
        # by 1/accum, since backward() sums into .grad.
        loss = loss / accum
        loss_accum += loss.detach()
        with vocab_parallel():
            loss.backward()
    # GPT-3 clips the gradient's global norm at 1.0 (grad_clip): a longer gradient is scaled down
    # to that length, so one bad batch cannot throw the weights far.
    params = list(raw_model.parameters())
    norm = gradient_norm(params)
    if s.grad_clip > 0:
        clip_gradients(params, optimizer, s.grad_clip, norm)
    loss_accum = all_reduce_mean(loss_accum, rt, stop)
    finite = bool(torch.isfinite(loss_accum) & torch.isfinite(norm))  # the step's one host sync
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum, norm, finite


# ----------------------------------------------------------------------------------------------
# Evaluations, once in a while

def run_evals(s, rt, step, last, raw_model, val_data, hellaswag_data, log):
    """Validation, HellaSwag and samples, when due, on the plain model (no DDP, no compile: the
    compiled training graph is never retraced for other shapes); returns the val loss or None.
    Their time is outside the step's. Under FSDP the blocks themselves are compiled
    (build_fsdp_model): they run eagerly here."""
    todo = evals_due(s, step, last, val_data, hellaswag_data)
    val = None
    with torch.compiler.set_stance("force_eager") if s.fsdp and s.compile else contextlib.nullcontext():
        if "validation" in todo:
            v = evals.validation(raw_model, val_data, s.micro_batch_size, rt.dp_rank, rt.dp_size, rt.amp_dtype,
                                 progress=rt.is_main)
            val = v["loss"]
            log(f"step {step:5d} | val loss {val:.4f} | {v['bpb']:.4f} bits/byte ({val_data.num_tokens:,} tokens, "
                f"{v['bytes']:,} bytes)")
            log.metrics(step=step, val_loss=val, val_bpb=v["bpb"])
        if "HellaSwag" in todo:
            r = evals.hellaswag(raw_model, hellaswag_data, rt.dp_rank, rt.dp_size, rt.amp_dtype, progress=rt.is_main)
            log(f"step {step:5d} | HellaSwag acc_norm {r['acc_norm']:.4f} acc {r['acc']:.4f} ({r['n']} examples)")
            log.metrics(step=step, hellaswag_acc=r["acc"], hellaswag_acc_norm=r["acc_norm"], hellaswag_n=r["n"])
        if "samples" in todo:
            for i, text in enumerate(evals.sample_text(raw_model, gpt2_tokenizer(), seed=s.seed + rt.dp_rank)):
                log(f"sample {i}: {text!r}")
    return val


def evals_due(s, step, last, val_data, hellaswag_data):
    """The evaluations due after `step`: what run_evals runs, and what a stopping step skips."""
    return [name for name, on in (("validation", val_data is not None and due(step, s.val_every, last)),
                                  ("HellaSwag", bool(hellaswag_data) and due(step, s.hellaswag_every, last)),
                                  ("samples", due(step, s.sample_every, last))) if on]


def due(step, every, last):
    return every > 0 and (step % every == 0 or last)


# ----------------------------------------------------------------------------------------------
# The training loop

def session_end(s, progress, stop=None, guard=None):
    """The loop's stopping decision, made after each step: None to train on, or why this session
    ends. "signal": any rank was sent one (the flag rode on the step's all-reduce), so the
    checkpoint is saved at once; "the end" (max_tokens trained) and "stop_step" finish with the
    evaluations due and a checkpoint. max_bad_steps NaN/Inf steps in a row raise here instead: the
    NaN guard sets aside the checkpoint of the weights they came from and says where to resume."""
    if guard:
        guard.stop_if_too_many(progress.step - 1)
    if stop and stop.agreed():
        return "signal"
    if progress.tokens >= s.max_tokens:
        return "the end"
    if 0 < s.stop_step <= progress.step:
        return "stop_step"
    return None


def train(s, stop=None):
    """Check every setting, then train with log_dir locked to this run (one writer per folder).
    Bad settings stop here, before any work and before the log folder is made."""
    stop = stop or run_guard.StopOnSignal()  # without handlers installed: never set
    config = resolve_model_settings(s)
    rt = setup_runtime(s)
    check_tensor_parallel(s, config, rt.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size)))
    check_batch_divisibility(s, rt.dp_size)  # the data-parallel ranks: a TP group trains one share
    check_sharding(s, rt.world_size)
    if not s.demo:  # the demo makes its data below
        shard_paths(s.data_dir, "train")  # no data: said now, before the log folder is made
    # Nothing is written to log_dir until the run is sure to start (a refused run leaves the
    # folder as it was): the log prints, and writes from log.start on.
    with RunLog(s.log_dir, rt.is_main) as log:
        candidates = choose_checkpoints(s, rt)  # rank 0 decides for all; refused if log_dir holds another run
        if s.demo:
            prepare_demo_data(s, rt, log)
        if s.micro_batch_size is None:
            s.micro_batch_size = auto_micro_batch(s, rt, log)
        tokens_per_micro = s.micro_batch_size * s.seq_len * rt.dp_size
        raw_model, model = build_model(s, config, rt)
        optimizer = build_optimizer(s, rt, raw_model, log)
        loader = DataLoader(s.data_dir, s.micro_batch_size, s.seq_len, rt.dp_rank, rt.dp_size, seed=s.seed,
                            log=log, vocab_size=config.vocab_size)
        val_data = (ValidationData(s.data_dir, s.seq_len, s.val_tokens, vocab_size=config.vocab_size)
                    if s.val_every > 0 else None)
        checkpointer = Checkpointer(s, rt, log, raw_model, optimizer, loader)
        progress = checkpointer.resume(candidates)  # the newest good checkpoint's step and tokens, or 0
        log.start(open_trackers(s, rt), progress.step)  # the run starts: from here it writes to log_dir
        meter = StepMeter(s, rt, flops_per_token(config, s.seq_len), progress)  # time, MFU, ETA
        log.header(s, rt, raw_model, meter, tokens_per_micro, describe_plan(s, tokens_per_micro),
                   BATCH_WARMUP_START)
        hellaswag_data = evals.hellaswag_for_training(s.hellaswag_every, rt.rank, log)
        guard = run_guard.NanGuard(s.max_bad_steps, s.log_dir, rt.is_main)

        # The schedule's clock is tokens: the run ends once max_tokens are trained (the last step
        # may pass it by less than one step); --stop_step only ends this session.
        ending = session_end(s, progress)  # a resumed run may have nothing left to train
        stop.armed = True  # from here a signal saves a checkpoint after the current step
        while not ending:
            accum = accum_steps_at(progress.tokens, s, tokens_per_micro)
            step_tokens = accum * tokens_per_micro
            lr = lr_at(progress.tokens, step_tokens, s)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group has its own peak
            meter.start()
            loss, norm, finite = train_step(s, rt, model, raw_model, optimizer, loader.next_batch, accum, stop)
            progress.bad_steps = guard.step_done(finite, raw_model, progress.step, lr)  # NaN weights stop here
            progress.tokens += step_tokens
            log.step(progress.step, loss, norm, lr, step_tokens, finite, meter.stop(step_tokens, progress), guard)
            progress.step += 1
            # after each step, one decision on every rank alike: train on, or end this session
            ending = session_end(s, progress, stop, guard)
            if ending == "signal":  # the checkpoint first: an evaluation could outlast the launcher's grace period
                path = checkpointer.save(progress, now=True)
                complete = session_end(s, progress) is not None
                skipped = evals_due(s, progress.step, complete, val_data, hellaswag_data)
                if skipped:
                    log(f"step {progress.step:5d} | {', '.join(skipped)} skipped: stopping on a signal")
                raise stop.stopped(progress.step, path, rt.world_size, complete=complete)
            # once in a while: validation, HellaSwag, samples (all ranks take part)
            val_loss = run_evals(s, rt, progress.step, bool(ending), raw_model, val_data, hellaswag_data, log)
            progress.last_val = progress.last_val if val_loss is None else val_loss
            checkpointer.save(progress, last=bool(ending))  # every checkpoint_every steps, and at the end
    return raw_model


# ----------------------------------------------------------------------------------------------
# The offline demo

# The real run, as the demo's first and last lines give it.
REAL_RUN = ("`python fineweb.py`, then `python train_gpt.py` (one GPU) or "
            "`torchrun --standalone --nproc_per_node=<GPUs> train_gpt.py` (README.md)")


def prepare_demo_data(s, rt, log):
    """Tokenize the embedded Wikipedia sample once (rank 0; the others wait)."""
    if rt.is_main:
        log(f"OFFLINE DEMO: a tiny GPT on 106 Wikipedia articles bundled with gensim. The real run: {REAL_RUN}.")
        import fineweb
        made = fineweb.load_manifest(s.data_dir)
        if not (made and made.complete):
            log(f"preparing the demo data once: reading and tokenizing the articles into {s.data_dir}/ "
                f"(its progress bar follows; README.md says how long it took where)")
        fineweb.prepare_dataset("wiki", out_dir=s.data_dir, progress=True)
    if rt.world_size > 1:
        dist.barrier()


def finish_demo(s):
    import plot
    png = plot.plot_metrics([os.path.join(s.log_dir, "metrics.jsonl")], os.path.join(s.log_dir, "loss.png"))
    print(f"\nDemo finished. Loss plot: {png}; metrics: {s.log_dir}/metrics.jsonl; checkpoints in "
          f"{s.log_dir}/. This was the offline demo; the real run: {REAL_RUN}.")


def main(argv=None):
    """Run from the command line. Mistakes in settings or data end with one clear line, not a
    traceback (support/run_guard.py); anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        cli.print_help(settings_help())
        return
    with run_guard.OneLineErrors("train_gpt.py", USER_ERRORS) as errors:
        s = parse_settings(argv)
        errors.collective_timeout = s.collective_timeout  # named if a collective times out
        with run_guard.StopOnSignal() as stop:
            train(s, stop)
    if s.demo and int(os.environ.get("RANK", 0)) == 0:
        finish_demo(s)


if __name__ == "__main__":
    main()

"""Train a GPT-2 / GPT-3 style model on token shards: one CPU, one GPU, or many with torchrun.

    python train_gpt.py --demo                                   # offline CPU demo, minutes
    python train_gpt.py                                          # GPT-2 124M on FineWeb-EDU
    torchrun --standalone --nproc_per_node=8 train_gpt.py        # the same on 8 GPUs

Every setting below can be given as --name=value; `python train_gpt.py --help` lists them.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import gc
import json
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import checkpoint
import cli
import evaluate
import run_guard
import tracking
from dataloader import DataError, DataLoader, DataNotFound, ValidationData, shard_paths
from model import (GPT, MUON_MIN_TORCH, PRESETS, ConfigError, MuonConfig, configure_optimizers, flops_per_token,
                   num_params, preset_config)
from activation_checkpoint import MODES as ACTIVATION_CHECKPOINTING, apply_activation_checkpointing


class RunError(cli.UserError, RuntimeError):
    """A problem with the run's environment or its training that the user has to fix."""


class SettingsError(cli.UserError, ValueError):
    """Settings that cannot work together, or a value a setting does not take."""


# What ends the program with one line (the message says what to do); anything else is a bug.
USER_ERRORS = (cli.UserError, ConfigError, DataError, DataNotFound, checkpoint.CorruptCheckpoint,
               run_guard.Refused)


@dataclass
class Settings:
    # model: a preset (model.PRESETS: gpt2, gpt2-medium, ..., gpt3-small ... gpt3-175b, tiny);
    # the four fields after it override single dimensions when set
    model: str = "gpt2"  # the preset: its dimensions, context, max_lr and batch are the defaults
    n_layer: Optional[int] = None  # None: the preset's number of blocks
    n_head: Optional[int] = None  # None: the preset's attention heads
    n_embd: Optional[int] = None  # None: the preset's width
    block_size: Optional[int] = None  # None: the preset's context (1024 for GPT-2, 2048 for GPT-3)
    init_from: str = ""  # start from weights: a checkpoint file or a Hugging Face GPT-2 folder
    # data
    data_dir: str = "edu_fineweb10B"  # a folder of *_train_* / *_val_* shards (fineweb.py makes them)
    seq_len: Optional[int] = None  # None: block_size
    # batch: total_batch_size tokens per optimizer step, reached by gradient accumulation
    total_batch_size: Optional[int] = None  # None: the preset's (2**19 = 524,288 for gpt2)
    micro_batch_size: Optional[int] = 32  # sequences per forward pass on each process (32 beat 64 by 4% on an H100); auto: the largest that fits (plan.py)
    batch_warmup_tokens: int = 0  # GPT-3 batch-size warmup: ramp from 32K tokens/step over this many tokens; 0 = off
    # optimization (GPT-3 paper recipe: AdamW, LR warmup then cosine decay to 10%, clocked in tokens)
    max_lr: Optional[float] = None  # None: the preset's (6e-4 for gpt2) x max_lr_scale
    max_lr_scale: float = 1.0  # scales the preset's max_lr when --max_lr is not given (recipes stay relative to the model)
    min_lr: Optional[float] = None  # None: 10% of max_lr
    max_tokens: Optional[int] = None  # the run's token budget; None: the preset's (gpt2: 19,073 x 2**19 = 10B)
    warmup_tokens: Optional[int] = None  # linear LR warmup; None: the preset's (gpt2: 715 x 2**19 = 375M)
    decay_tokens: Optional[int] = None  # cosine decay ends (min_lr after); None: max_tokens, or the preset's (GPT-3: 260B)
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
    recipe: str = ""  # a named set of settings (RECIPES: gpt3, fast); settings given on the command line still win
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
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # float32 or bfloat16 (autocast); auto: bfloat16 on CUDA and on CPUs with bf16 matmul units
    compile: Optional[bool] = None  # None: on for CUDA (minutes to compile, faster steps), off elsewhere
    chunked_loss: Optional[bool] = None  # loss without full logits; None: on for the CPU
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    fsdp_shard_size: int = 0  # FSDP: shard within groups of this many ranks (a node's GPUs), replicate across groups (HSDP); 0 = all ranks
    fsdp_unsharded_accumulation: bool = False  # FSDP: reduce-scatter once a step, not every micro step (full gradients per rank)
    activation_checkpointing: str = "none"  # recompute blocks in backward to save memory: none, selective (every other block) or full
    backend: str = "auto"  # torch.distributed backend: nccl for CUDA, gloo for the CPU
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0: from a table (GPUs) or measured (CPU)
    collective_timeout: float = 600  # seconds a collective waits for the other ranks before the job stops (a frozen or dead rank)
    seed: int = 1337  # initial weights, data order and samples
    demo: bool = False  # the offline CPU demo: tiny model on the embedded Wikipedia sample


# The offline demo (--demo): a tiny GPT on the Wikipedia articles bundled with gensim, sized to
# train in a few minutes on 2 CPU cores, with the recipe that reached the lower val loss in its
# budget (README: Faster recipes). Any setting given on the command line still wins (--recipe=gpt3).
DEMO = dict(model="tiny", recipe="fast", data_dir="data/wiki", log_dir="log/demo", total_batch_size=2**13,
            micro_batch_size=16, warmup_steps=15, max_steps=150, val_every=50, val_tokens=2**16,
            hellaswag_every=0, sample_every=75, checkpoint_every=75, device="cpu")


# Named recipes (--recipe=NAME): settings that replace the defaults (and the demo's); any setting
# given on the command line still wins. fast: Muon for the blocks' matrices, 3x the preset's AdamW
# LR for the rest (embeddings, head, gains), warmup-stable-decay to 0: chosen by compare.py's LR
# sweep (README: Faster recipes). LRs are relative (max_lr_scale) so the recipe follows the preset.
RECIPES = dict(
    gpt3=dict(),  # the defaults: GPT-3's AdamW, warmup and cosine decay to 10%
    fast=dict(optimizer="muon", schedule="wsd", decay_fraction=0.3, muon_lr=0.04, max_lr_scale=3.0),
)


# ----------------------------------------------------------------------------------------------
# Settings from the command line

def _parse_value(name, text, field_type):
    optional = field_type in (Optional[int], Optional[float], Optional[bool])
    if optional and text.lower() in ("none", "auto", ""):
        return None
    base = {Optional[int]: int, Optional[float]: float, Optional[bool]: bool}.get(field_type, field_type)
    if base is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise SettingsError(f"--{name} takes True or False, got {text!r}")
    try:
        if base is int:
            return int(float(text)) if "e" in text.lower() else int(text, 0)
        return base(text)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(base, f"a {base.__name__}")
        raise SettingsError(f"--{name} takes {kind}, got {text!r}") from None


def settings_help():
    """--help: every setting with its default and the comment it has in Settings, in its groups."""
    demo = ", ".join(f"{k}={v}" for k, v in DEMO.items())
    return (f"usage: python train_gpt.py [--name=value ...]   (--name alone means True)\n"
            f"{cli.summary(__doc__)}\n\n{cli.settings_help(Settings)}\n\n"
            f"--demo sets {demo}; a setting given with it still wins.")


def parse_settings(argv):
    """--name=value arguments -> Settings. `--name` alone means True for a True/False setting."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    given = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SettingsError(f"unexpected argument {arg!r}: settings are given as --name=value")
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise SettingsError(f"unknown setting --{name}. Valid settings: {', '.join(fields)} "
                                f"(python train_gpt.py --help)")
        ftype = fields[name].type
        if not eq:
            if ftype not in (bool, Optional[bool]):
                raise SettingsError(f"--{name} needs a value: --{name}=...")
            text = "True"
        given[name] = _parse_value(name, text, ftype)
    values = dict(DEMO) if given.get("demo") else {}
    recipe = given.get("recipe", values.get("recipe", ""))
    if recipe:
        if recipe not in RECIPES:
            raise SettingsError(f"unknown --recipe={recipe!r}; choose one of: {', '.join(RECIPES)}")
        values.update(RECIPES[recipe])
    for pair in SAME_THING:  # a setting given wins over the demo's (or a recipe's) name for the same thing
        if any(name in given for name in pair):
            for name in pair:
                if name not in given:
                    values.pop(name, None)
    values.update(given)
    return Settings(**values)


# Settings that name one value in two units: give one of each pair (resolve_token_schedule).
SAME_THING = (("max_tokens", "max_steps"), ("warmup_tokens", "warmup_steps"))


def resolve_model_settings(s):
    """Fill the settings that follow the model preset, and check every setting's value: a bad one
    stops the run here, before any work, with the fix named."""
    if s.model not in PRESETS:
        raise SettingsError(f"unknown --model={s.model!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[s.model]
    config = preset_config(s.model, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                           block_size=s.block_size)
    s.n_layer, s.n_head, s.n_embd, s.block_size = config.n_layer, config.n_head, config.n_embd, config.block_size
    s.seq_len = s.seq_len or config.block_size
    s.total_batch_size = s.total_batch_size or preset.batch_tokens
    if s.max_lr_scale <= 0:
        raise SettingsError(f"--max_lr_scale must be positive, got {s.max_lr_scale:g}")
    s.max_lr = s.max_lr if s.max_lr is not None else preset.max_lr * s.max_lr_scale
    min_lr_given = s.min_lr is not None
    s.min_lr = s.min_lr if min_lr_given else (0.0 if s.schedule == "wsd" else 0.1 * s.max_lr)
    if s.seq_len > config.block_size:
        raise SettingsError(f"seq_len={s.seq_len} is longer than the model's block_size={config.block_size}")
    for name in ("micro_batch_size", "seq_len", "total_batch_size"):
        if getattr(s, name) is not None and getattr(s, name) <= 0:
            raise SettingsError(f"--{name} must be positive, got {getattr(s, name)}")
    if s.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise SettingsError(f"--activation_checkpointing={s.activation_checkpointing!r}: choose one of "
                            f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    check_optimizer_settings(s)
    resolve_token_schedule(s, preset, min_lr_given)
    check_run_settings(s)
    if s.resume not in ("auto", "off") and not os.path.exists(s.resume):
        raise SettingsError(f"--resume={s.resume}: no such checkpoint. Use auto, off, or a checkpoint path.")
    return config


def resolve_token_schedule(s, preset, min_lr_given=True):
    """Fill max_tokens, warmup_tokens and decay_tokens: given in tokens, or in steps of
    total_batch_size tokens (--max_steps, --warmup_steps), or the preset's. Where the LR decays to
    0 (wsd, or --min_lr=0) the decay ends with the run, so no step trains at LR 0."""
    for tokens, steps in SAME_THING:
        if getattr(s, steps) is not None:
            if getattr(s, tokens) is not None:
                raise SettingsError(f"--{tokens} and --{steps} name the same thing: give one of them")
            if getattr(s, steps) < 0 or (steps == "max_steps" and getattr(s, steps) == 0):
                raise SettingsError(f"--{steps} must be {'positive' if steps == 'max_steps' else 'at least 0'}, "
                                    f"got {getattr(s, steps)}")
            setattr(s, tokens, getattr(s, steps) * s.total_batch_size)
    budget_given = s.max_tokens is not None
    decay_given = s.decay_tokens is not None
    s.max_tokens = s.max_tokens if budget_given else preset.train_tokens
    s.warmup_tokens = s.warmup_tokens if s.warmup_tokens is not None else preset.warmup_tokens
    if not decay_given:
        # a budget of one's own decays over itself, as the seed's does; GPT-3's preset decays over
        # 260B of its 300B tokens and holds min_lr (10%) after: with a min_lr of 0 that hold would
        # train 40B tokens at LR 0, so then the decay ends with the run
        own = budget_given or not preset.decay_tokens or s.min_lr == 0
        s.decay_tokens = s.max_tokens if own else preset.decay_tokens
    if s.max_tokens <= 0:
        raise SettingsError(f"--max_tokens must be positive, got {s.max_tokens}")
    if s.decay_tokens <= 0:
        raise SettingsError(f"--decay_tokens must be positive, got {s.decay_tokens}")
    if not 0 <= s.warmup_tokens <= s.decay_tokens:
        raise SettingsError(f"warmup_tokens={s.warmup_tokens:,} must be between 0 and decay_tokens={s.decay_tokens:,}")
    if s.min_lr == 0 and s.decay_tokens < s.max_tokens and not (min_lr_given and decay_given):
        raise SettingsError(
            f"the LR reaches min_lr=0 at decay_tokens={s.decay_tokens:,}, before the run ends at "
            f"max_tokens={s.max_tokens:,}: the last {s.max_tokens - s.decay_tokens:,} tokens would train at LR 0. "
            f"Give --decay_tokens={s.max_tokens} (or leave it unset), or a --min_lr above 0.")
    if s.batch_warmup_tokens < 0:
        raise SettingsError(f"--batch_warmup_tokens must not be negative, got {s.batch_warmup_tokens}")


def check_run_settings(s):
    """The values of the settings that are not the model's, schedule's or optimizer's: each must
    be in its range, or the run would fail late (a division by zero after the first step) or do
    something other than was asked."""
    at_least = dict(checkpoint_every=1, keep_checkpoints=1, max_bad_steps=1, val_every=0, hellaswag_every=0,
                    sample_every=0, stop_step=0, seed=0, peak_flops=0, grad_clip=0)
    for name, low in at_least.items():
        if getattr(s, name) < low:
            meaning = {0: "must not be negative", 1: "must be at least 1"}[low]
            raise SettingsError(f"--{name} {meaning}, got {getattr(s, name)}" +
                                (": a checkpoint is also written at the end and when stopped by a signal; "
                                 "a large value checkpoints rarely" if name == "checkpoint_every" else ""))
    if s.collective_timeout <= 0:
        raise SettingsError(f"--collective_timeout must be positive (seconds), got {s.collective_timeout:g}")
    if s.val_every > 0 and s.val_tokens < s.seq_len:
        raise SettingsError(f"--val_tokens={s.val_tokens} is less than one sequence of seq_len={s.seq_len}: "
                            f"give at least {s.seq_len}, or --val_every=0 for no validation")
    if s.dtype not in ("auto", "float32", "bfloat16"):
        raise SettingsError(f"--dtype={s.dtype}: choose float32 or bfloat16 (or auto)")
    if s.backend not in ("auto", "nccl", "gloo"):
        raise SettingsError(f"--backend={s.backend}: choose nccl (CUDA), gloo (CPU) or auto")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", s.device):
        raise SettingsError(f"--device={s.device}: choose auto, cpu, cuda (or cuda:N) or mps")
    try:
        tracking.check_trackers(s.wandb_project, s.wandb_run_name, s.wandb_run_id, s.tensorboard)
    except tracking.TrackerError as e:
        raise SettingsError(str(e)) from None


def auto_micro_batch(s, rt, log):
    """--micro_batch_size=auto: on a GPU, the largest micro batch that fits its memory and divides
    each rank's share of the batch, from plan.py (a fake training step, run by rank 0 in a process
    of its own: it needs a process group of its own); on the CPU, the largest divisor up to 16
    (memory is rarely the limit there, and larger micro batches gain little speed)."""
    per_rank = s.total_batch_size // (s.seq_len * rt.world_size)
    if rt.device.type != "cuda":
        choice = max((b for b in range(1, 17) if per_rank % b == 0), default=1)
        log(f"micro batch: auto = {choice} ({rt.device.type}: the largest divisor of {per_rank} sequences up to 16)")
        return choice
    preset = PRESETS[s.model]
    if (s.n_layer, s.n_head, s.n_embd, s.seq_len) != (preset.n_layer, preset.n_head, preset.n_embd, preset.block_size):
        raise SettingsError("--micro_batch_size=auto plans the presets as they are; with n_layer, n_head, n_embd "
                         "or seq_len changed, give a number")
    answer = [None]
    if rt.is_main:
        import subprocess
        memory = torch.cuda.get_device_properties(rt.device).total_memory / 2**30
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan.py"), "--json",
               f"--model={s.model}", f"--gpus={rt.world_size}", f"--gpu_memory={memory}", f"--fsdp={s.fsdp}",
               f"--fsdp_shard_size={s.fsdp_shard_size}",
               f"--activation_checkpointing={s.activation_checkpointing}", f"--dtype={s.dtype}",
               f"--chunked_loss={s.chunked_loss}", f"--total_batch_size={s.total_batch_size}"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if done.returncode != 0:
            raise RunError(f"--micro_batch_size=auto: plan.py failed: {done.stderr.strip()[-500:]}")
        answer[0] = json.loads(done.stdout.strip().splitlines()[-1])
    if rt.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    plan = answer[0]
    if not plan["fits"]:
        raise RunError(f"--micro_batch_size=auto: {plan['reason']}")
    log(f"micro batch: auto = {plan['micro_batch_size']} (plan.py: peak {plan['memory_gib']['total']:.1f} GiB "
        f"of {plan['budget_gib']:.1f} usable on this GPU, an estimate for eager; compiled keeps less)")
    return plan["micro_batch_size"]


def check_optimizer_settings(s):
    """--optimizer, --schedule and their settings, checked before anything is built."""
    if s.optimizer not in ("adamw", "muon"):
        raise SettingsError(f"unknown --optimizer={s.optimizer!r}; choose adamw or muon")
    if s.schedule not in ("cosine", "wsd"):
        raise SettingsError(f"unknown --schedule={s.schedule!r}; choose cosine or wsd")
    if not 0 < s.decay_fraction <= 1:
        raise SettingsError(f"--decay_fraction={s.decay_fraction} must be in (0, 1]: the share of the run that decays")
    if s.max_lr < 0:
        raise SettingsError(f"--max_lr must not be negative, got {s.max_lr:g}")
    if not 0 <= s.min_lr <= s.max_lr:
        raise SettingsError(f"--min_lr={s.min_lr:g} must be between 0 and max_lr={s.max_lr:g}")
    if s.weight_decay < 0:
        raise SettingsError(f"--weight_decay must not be negative, got {s.weight_decay:g}")
    if s.optimizer != "muon":
        return
    if not hasattr(torch.optim, "Muon"):
        raise SettingsError(f"--optimizer=muon needs torch {MUON_MIN_TORCH} or newer (torch.optim.Muon); this is "
                         f"torch {torch.__version__}. Upgrade torch, or use --optimizer=adamw.")
    if s.fsdp:
        raise SettingsError("--optimizer=muon does not work with --fsdp: torch.optim.Muon would orthogonalize each "
                         "rank's shard of a matrix instead of the whole matrix. Use DDP (no --fsdp) or --optimizer=adamw.")
    if s.muon_adjust_lr not in ("original", "match_rms_adamw"):
        raise SettingsError(f"unknown --muon_adjust_lr={s.muon_adjust_lr!r}; choose original or match_rms_adamw")
    if s.muon_lr <= 0:
        raise SettingsError(f"--muon_lr must be positive, got {s.muon_lr:g}")
    if s.max_lr == 0:
        raise SettingsError("--max_lr=0 with --optimizer=muon: the schedule sets Muon's LR as a multiple of "
                            "max_lr's (muon_lr / max_lr), so max_lr must be positive")
    if not 0 <= s.muon_momentum < 1:
        raise SettingsError(f"--muon_momentum={s.muon_momentum:g} must be in [0, 1) (0.95 is the usual)")
    if s.muon_weight_decay < 0:
        raise SettingsError(f"--muon_weight_decay must not be negative, got {s.muon_weight_decay:g}")


def muon_config(s, device):
    """Muon's settings for model.configure_optimizers, or None for plain AdamW. On a CPU without
    bf16 matmul units Muon orthogonalizes in float32 (model.Float32Muon): bf16 is ~20x slower there."""
    if s.optimizer != "muon":
        return None
    return MuonConfig(lr=s.muon_lr, momentum=s.muon_momentum, weight_decay=s.muon_weight_decay,
                      adjust_lr_fn=s.muon_adjust_lr, float32=device.type == "cpu" and not cpu_has_bf16())


def check_batch_divisibility(s, world_size):
    """Micro steps per optimizer step, or a SettingsError naming values that work. With
    --micro_batch_size=auto (None), chosen later as a divisor, the batch must split into sequences."""
    tokens_per_micro = (s.micro_batch_size or 1) * s.seq_len * world_size
    if s.total_batch_size % tokens_per_micro == 0:
        return s.total_batch_size // tokens_per_micro
    micro_ok = [b for b in range(1, 2 * (s.micro_batch_size or 1) + 1)
                if s.total_batch_size % (b * s.seq_len * world_size) == 0]
    lower = s.total_batch_size // tokens_per_micro * tokens_per_micro
    totals = [t for t in (lower, lower + tokens_per_micro) if t > 0]
    fixes = [f"--micro_batch_size in {micro_ok}"] if micro_ok else []
    fixes.append(f"--total_batch_size={' or '.join(map(str, totals))}")
    raise SettingsError(
        f"total_batch_size={s.total_batch_size} is not divisible by micro_batch_size x seq_len x "
        f"world_size = {s.micro_batch_size} x {s.seq_len} x {world_size} = {tokens_per_micro}. "
        f"Values that work: {', or '.join(fixes)}.")


def check_sharding(s, world_size):
    """--fsdp_shard_size: it needs --fsdp and must split the ranks into equal groups."""
    if s.fsdp_shard_size == 0:
        return
    if not s.fsdp:
        raise SettingsError(f"--fsdp_shard_size={s.fsdp_shard_size} shards the model within groups of ranks: "
                            f"it needs --fsdp")
    if s.fsdp_shard_size < 0 or world_size % s.fsdp_shard_size:
        sizes = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise SettingsError(f"--fsdp_shard_size={s.fsdp_shard_size} does not divide the {world_size} ranks into "
                            f"equal groups: choose one of {sizes} (usually the GPUs of one node)")


def fsdp_mesh(s, rt):
    """The ranks FSDP2 shards over. With --fsdp_shard_size (hybrid sharding, HSDP) a 2-D mesh:
    each group of fsdp_shard_size ranks (one node) holds one sharded copy of the model, and the
    groups are replicas of each other. The per-micro-step gathers and reduce-scatters then stay on
    the fast links inside a node; across nodes only one all-reduce of each gradient shard per step
    runs, at the price of a memory per GPU of sharding over one node, not over all."""
    from torch.distributed.device_mesh import init_device_mesh
    shard = s.fsdp_shard_size or rt.world_size
    if shard == rt.world_size:
        return init_device_mesh(rt.device.type, (rt.world_size,))
    return init_device_mesh(rt.device.type, (rt.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


# ----------------------------------------------------------------------------------------------
# Schedules

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
    decay_start = max(warmup, total - decay_fraction * total)
    if position <= decay_start:
        return 1.0
    if position >= total:
        return 0.0
    return (total - position) / (total - decay_start)


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
        stable_until = max(s.warmup_tokens, int(s.decay_tokens - s.decay_fraction * s.decay_tokens))
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
# Devices, processes and speed

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU (V100: fp16). A key
# is the words a device name must hold (torch.cuda.get_device_name, split at spaces and dashes:
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"); the key with the most matching words wins, so a
# PCIe or NVL card gets its own figure and "L40" is not "L40S" or "L4".
GPU_PEAK_FLOPS = {("H100",): 989e12, ("H100", "PCIe"): 756e12, ("H100", "NVL"): 835e12,
                  ("H200",): 989e12, ("H200", "NVL"): 835e12, ("H800",): 989e12, ("H800", "PCIe"): 756e12,
                  ("A100",): 312e12, ("A800",): 312e12, ("L40S",): 362e12, ("L40",): 181e12,
                  ("L4",): 121e12, ("A10",): 125e12, ("RTX", "4090"): 165e12, ("RTX", "3090"): 71e12,
                  ("V100",): 125e12}


def gpu_peak_flops(name):
    """The GPU_PEAK_FLOPS figure for a device name, or 0.0 for a device the table lacks."""
    words = set(re.split(r"[\s\-_]+", name))
    keys = [key for key in GPU_PEAK_FLOPS if words.issuperset(key)]
    return GPU_PEAK_FLOPS[max(keys, key=len)] if keys else 0.0


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None for fp32
    is_main: bool


def keep_freed_memory():
    """Ask glibc to keep freed memory instead of returning it to the kernel. Training allocates and
    frees the same large buffers (activations, logits) every micro step; by default each one above
    a few MB is a fresh mmap that the kernel must zero-fill page by page, which measured ~45% of
    CPU time in a seed-style loop (bench.py, tiny model: 180K page faults and 0.35 s of kernel
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
    trains faster than fp32; elsewhere bf16 is emulated and slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(backend, device_id, timeout_s=600):
    """init_process_group from torchrun's environment (env://). torchrun keeps one store across
    --max-restarts, so a restarted process can read the address a peer of the crashed generation
    left there (torch issue 135712; seen here: gloo's connectFullMesh refused, or a hang, in 2
    restarts of 5). With one torchrun agent (one node) its restart count numbers the generations,
    and each generation's keys go under a prefix of their own. Across nodes the agents' counts can
    differ, so there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per restart) is the fix:
    see restart_advice."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    if os.environ.get("GROUP_WORLD_SIZE") == "1":
        store = dist.PrefixStore(f"train_gpt/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, device_id=device_id,
                            timeout=datetime.timedelta(seconds=timeout_s))


def restart_advice(env=os.environ):
    """A line of advice for a multi-node torchrun job with --max-restarts and the shared store."""
    if (int(env.get("GROUP_WORLD_SIZE", 1)) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return ("torchrun restarts across nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node "
                "before torchrun, or a restarted job can read the crashed one's addresses and fail to connect")
    return None


def setup_runtime(s):
    """Read torchrun's environment, pick the device, start the process group."""
    run_guard.stop_with_launcher()  # under torchrun: a SIGKILLed launcher must not leave its workers running
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device_type = s.device
    if device_type == "auto":
        device_type = ("cuda" if torch.cuda.is_available() else
                       "mps" if torch.backends.mps.is_available() else "cpu")
    device_type = device_type.split(":")[0]
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device=cuda but CUDA is not available here; use --device=cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local_world > torch.cuda.device_count():
            raise RunError(f"{local_world} processes on this machine but only {torch.cuda.device_count()} "
                               f"GPUs: set --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    backend = s.backend if s.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RunError("--backend=nccl needs CUDA GPUs; on the CPU use --backend=gloo (or auto)")
    if world_size > 1 or s.fsdp:  # FSDP needs a process group, even of one
        if "MASTER_ADDR" not in os.environ:  # plain `python train_gpt.py --fsdp`: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        init_process_group(backend, device if device_type == "cuda" else None, s.collective_timeout)
    if s.dtype == "auto":
        s.dtype = "bfloat16" if device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16()) else "float32"
    if s.dtype not in ("float32", "bfloat16"):
        raise SettingsError(f"--dtype={s.dtype}: choose float32 or bfloat16")
    if s.compile is None:
        s.compile = device_type == "cuda"
    if s.chunked_loss is None:
        s.chunked_loss = device_type == "cpu"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left over
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()
    amp = torch.bfloat16 if s.dtype == "bfloat16" else None
    return Runtime(rank, local_rank, world_size, device, amp, rank == 0)


def peak_flops(s, device):
    """The device's peak FLOP/s for MFU: the setting, a datasheet table (GPUs), or on the CPU the
    fp32 matrix-product rate measured now (a yardstick: bf16 can exceed it)."""
    if s.peak_flops > 0:
        return s.peak_flops
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measure_matmul_flops()
    return 0.0


def model_flops_utilization(tokens_per_sec, flops_per_token, peak, devices=1):
    """MFU: the model's training FLOP/s (model.flops_per_token x tokens/s, over all devices) as a
    fraction of the devices' peak; 0 when the peak is unknown."""
    return tokens_per_sec * flops_per_token / (peak * devices) if peak else 0.0


def mfu_label(mfu, s, rt):
    """On the CPU without --peak_flops the yardstick is the measured fp32 matmul rate, which bf16
    steps can exceed: say so rather than print an MFU above 100%."""
    if rt.device.type == "cpu" and s.peak_flops <= 0:
        return f"{mfu:.2f}x fp32 matmul"
    return f"MFU {mfu * 100:.1f}%"


def measure_matmul_flops(n=2048, trials=5):
    """The CPU's fp32 matrix-product rate in FLOP/s: the best of a few n x n products (~50 ms each
    on 2 cores; the rate levels off from about n=1536). The best, not the mean, as other work on
    a shared machine only ever slows a trial down."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return max(matmul_rate(a, b) for _ in range(trials))


def matmul_rate(a, b):
    """FLOP/s of one product a @ b, timed now."""
    t0 = time.perf_counter()
    a @ b
    return 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Logging

class RunLog:
    """Rank 0 prints, and appends to log_dir/log.txt and log_dir/metrics.jsonl (never truncated,
    so a resumed run continues the same files). Other ranks stay silent. Each metrics event also
    goes to the trackers (tracking.py: W&B, TensorBoard), closed by close().

    Lines are printed at once, but written to log.txt only from start() on (the earlier ones
    then too): start() is called once the run is sure to start, so a run refused at start
    (another run's checkpoints, a checkpoint of another model) leaves the log_dir as it was."""

    def __init__(self, log_dir, is_main):
        self.is_main = is_main
        self.log_dir = log_dir
        self.trackers = []
        self.pending = []  # lines printed before start()

    def start(self, trackers=()):
        self.trackers = list(trackers) if self.is_main else []
        if self.is_main:
            os.makedirs(self.log_dir, exist_ok=True)
            self._append("log.txt", "".join(line + "\n" for line in self.pending))
        self.pending = None

    def _append(self, name, text):
        with open(os.path.join(self.log_dir, name), "a") as f:
            f.write(text)

    def __call__(self, msg):
        if self.is_main:
            print(msg, flush=True)
            if self.pending is None:
                self._append("log.txt", msg + "\n")
            else:
                self.pending.append(msg)

    def metrics(self, **event):
        if self.is_main:
            self._append("metrics.jsonl", json.dumps(event) + "\n")
            for tracker in self.trackers:
                tracker.log(event)

    def close(self):
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(s, rt):
    """W&B and TensorBoard as the settings ask (tracking.py), on rank 0; the settings are the
    runs' config. A missing package or a W&B run that cannot start is an error before any work."""
    if not rt.is_main:
        return []
    try:
        return tracking.open_trackers(s.log_dir, dataclasses.asdict(s), s.wandb_project, s.wandb_run_name,
                                      s.wandb_run_id, s.tensorboard, fresh=s.resume == "off")
    except tracking.TrackerError as e:
        raise RunError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Model, parallelism, checkpoints

def initial_weights(path):
    """(model_config dict, state_dict) to start from: a checkpoint (file or sharded folder), or
    GPT-2 weights in Hugging Face form (a local folder, or a hub name such as gpt2 when online)."""
    import convert_hf
    if os.path.exists(os.path.join(path, "config.json")) or not os.path.exists(path):
        model = convert_hf.gpt_from_hf(path)
    else:
        model = evaluate.load_checkpoint_model(path)
    return dataclasses.asdict(model.config), model.state_dict()


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
    raw_model.sparse_embedding_grad = sparse_embedding_pays(s, rt)
    apply_activation_checkpointing(raw_model, s.activation_checkpointing)
    model = torch.compile(raw_model) if s.compile else raw_model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return raw_model, model


def sparse_embedding_pays(s, rt):
    """A sparse gradient for the tied token embedding (model.GPT.forward) saves a (V, C) table's
    zeroing and addition each step on the CPU (README: Performance); on GPUs that costs
    microseconds, and compiled graphs hold no sparse tensors."""
    return rt.device.type == "cpu" and not s.compile


def load_init_state(s, config):
    saved_config, state = initial_weights(s.init_from)
    if saved_config != dataclasses.asdict(config):
        raise SettingsError(f"--init_from={s.init_from} holds a model {saved_config}, but the settings "
                         f"give {dataclasses.asdict(config)}: pick the matching --model")
    return state


def build_fsdp_model(s, config, rt):
    """FSDP2: each block, then the root, is sharded across ranks. The model is built on the meta
    device (no memory), sharded, then materialized and initialized shard by shard, so a model far
    larger than one device fits. With bf16, parameters are gathered in bf16 for compute and
    gradients are reduced in fp32. With --compile each block is compiled before it is sharded,
    as torchtitan does (activation checkpointing, then compile, then fully_shard, block by
    block): FSDP's gathers and reduce-scatters stay between the compiled blocks, where they
    overlap with compute, instead of being traced into one whole-model graph."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = fsdp_mesh(s, rt)  # 2-D with --fsdp_shard_size: fully_shard then shards on one dim, replicates on the other
    mp = MixedPrecisionPolicy(param_dtype=rt.amp_dtype or torch.float32, reduce_dtype=torch.float32)
    with torch.device("meta"):
        raw_model = GPT(config)
    apply_activation_checkpointing(raw_model, s.activation_checkpointing)  # before compile and sharding
    for block in raw_model.transformer.h:
        if s.compile:
            block.compile()  # in place: the module and its parameter names stay as they are
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(raw_model, mesh=mesh, mp_policy=mp)
    raw_model.to_empty(device=rt.device)
    raw_model.init_weights(s.seed)  # the same weights as without FSDP
    raw_model.sparse_embedding_grad = sparse_embedding_pays(s, rt)
    if s.init_from:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(raw_model, load_init_state(s, config),
                             options=StateDictOptions(full_state_dict=True))
    return raw_model, raw_model


def describe_parallelism(s, rt):
    if s.fsdp and s.fsdp_shard_size and s.fsdp_shard_size < rt.world_size:
        return f"HSDP ({rt.world_size // s.fsdp_shard_size} replicas x {s.fsdp_shard_size}-way FSDP)"
    return "FSDP" if s.fsdp else "DDP" if rt.world_size > 1 else "single process"


def model_and_optimizer_state(s, raw_model, optimizer):
    if s.fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(raw_model, optimizer)
    return raw_model.state_dict(), optimizer.state_dict()


def save_checkpoint(s, rt, step, raw_model, optimizer, loader, extra, log):
    """Write this step's checkpoint, then prune old ones. State holding a NaN/Inf is never written
    (the run stops instead); a write the system refuses (disk full, permissions...) stops the run
    naming the error and the disk."""
    model_state, optim_state = model_and_optimizer_state(s, raw_model, optimizer)
    bad = checkpoint.nonfinite_tensors({"model": model_state, "optimizer": optim_state})
    if count_on_all_ranks(len(bad), rt, s.fsdp):
        raise RunError(f"step {step}: {len(bad) or 'some'} weight or optimizer tensors hold NaN/Inf (e.g. "
                       f"{bad[:3]}), so no checkpoint was written. The newest checkpoint in {s.log_dir} holds "
                       f"no NaN: lower --max_lr or raise --warmup_tokens and resume from it.")
    state = {"model": model_state, "optimizer": optim_state, "step": step,
             "model_config": dataclasses.asdict(raw_model.config), "settings": dataclasses.asdict(s),
             "data": loader.state_dict(), "rng": rng_states(rt), **extra}
    path = checkpoint.checkpoint_path(s.log_dir, step, sharded=s.fsdp)
    try:
        if s.fsdp:
            checkpoint.save_sharded(state, path, rt.rank, rt.world_size)
        elif rt.is_main:
            checkpoint.save_file(state, path)
    except checkpoint.WriteFailed as e:
        raise RunError(f"{e}. {write_failure_advice(e.errno)}, then resume: the checkpoints written before are "
                       f"intact.") from e
    if rt.is_main:
        checkpoint.prune(s.log_dir, s.keep_checkpoints, step)
        log(f"saved checkpoint {path}")
    return path


def write_failure_advice(code):
    """What to do about a checkpoint write the system refused, by its errno: free space only
    helps a full disk."""
    move = "move --log_dir (with its checkpoints) to"
    return {
        errno.ENOSPC: f"Free space on that disk, or {move} one with room",
        errno.EDQUOT: f"Free space within your quota (or have it raised), or {move} a disk with room",
        errno.EACCES: f"Give this user write permission on --log_dir, or {move} a folder it can write",
        errno.EPERM: f"Give this user write permission on --log_dir, or {move} a folder it can write",
        errno.EROFS: f"That disk is mounted read-only: remount it read-write, or {move} a writable disk",
        errno.EIO: f"The disk may be failing (see the kernel log, dmesg): {move} a sound disk",
        errno.EFBIG: f"A file-size limit (ulimit -f) or the filesystem's largest file was reached: raise the "
                     f"limit, or {move} another filesystem",
    }.get(code, f"Fix what the error names, or {move} another disk")


def count_on_all_ranks(n, rt, sharded):
    """n summed over ranks when each holds its own shard (FSDP); otherwise every rank has it all."""
    if sharded and rt.world_size > 1:
        total = torch.tensor(float(n), device=rt.device)
        dist.all_reduce(total)
        return int(total.item())
    return n


def is_sharded_checkpoint(path):
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                       for name in (checkpoint.MANIFEST, ".metadata", "extra.pt"))


def rng_states(rt):
    """Every rank's RNG states (torch, CUDA, numpy, python), as a list indexed by rank: rank 0
    writes the checkpoint. Every rank calls this."""
    mine = checkpoint.rng_state(rt.device)
    if rt.world_size == 1:
        return [mine]
    states = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng_state(states, rt, log):
    """Each rank takes back its own RNG states. Ranks the checkpoint has none for (it was written
    by fewer processes) keep their fresh ones, and the log says so."""
    if rt.rank < len(states):
        checkpoint.set_rng_state(states[rt.rank], rt.device)
    if len(states) != rt.world_size:
        log(f"note: the checkpoint holds the RNG states of {len(states)} ranks, this run has "
            f"{rt.world_size}: ranks {len(states)} and up start theirs afresh")


def resume_candidates(s):
    """The checkpoints to try, newest first, as (folder, names): log_dir's (auto), a given log
    folder's, or (None, [the checkpoint given])."""
    if s.resume == "off":
        return None, []
    if s.resume == "auto":
        return s.log_dir, [os.path.basename(path) for _, path in checkpoint.list_checkpoints(s.log_dir)]
    if os.path.isdir(s.resume) and not is_sharded_checkpoint(s.resume):  # a log folder
        found = checkpoint.list_checkpoints(s.resume)
        if not found:
            raise SettingsError(f"--resume={s.resume} is a folder without checkpoints (ckpt_<step>.pt files or "
                             f"ckpt_<step>/ folders): give a checkpoint, a log folder holding them, auto or off")
        return s.resume, [os.path.basename(path) for _, path in found]
    return None, [s.resume]


def check_one_run_per_log_dir(s):
    """A log_dir holds one run's checkpoints. Another run started there (fresh, or from another
    checkpoint than its newest) would mix with them: pruning keeps the highest steps, whichever run
    wrote them, and a later --resume=auto picks the highest. Refuse, with the choices."""
    existing = checkpoint.list_checkpoints(s.log_dir)
    if not existing or s.resume == "auto":
        return
    if s.resume != "off" and os.path.realpath(s.resume) in (os.path.realpath(s.log_dir),
                                                            os.path.realpath(existing[0][1])):
        return  # the log folder itself (as auto), or its newest checkpoint
    what = "a fresh run (--resume=off)" if s.resume == "off" else f"a run from --resume={s.resume}"
    raise RunError(f"{s.log_dir} already holds checkpoints of a run (the newest: {existing[0][1]}), and {what} "
                   f"there would mix with them. Choose: continue that run (--resume=auto); start this one in "
                   f"another --log_dir; or, to start over here, delete the old checkpoints first "
                   f"(rm -r {os.path.join(s.log_dir, 'ckpt_')}*).")


def choose_checkpoints(s, rt):
    """The checkpoints this run may resume from, newest first, as rank 0 sees them: one decision
    for the whole job. Ranks that each listed their own log_dir could disagree (node-local disks:
    only rank 0 writes checkpoints under DDP), and a rank that started fresh beside ranks that
    resumed would train on, silently wrong. Rank 0 also refuses a second run in a log_dir that
    holds one (check_one_run_per_log_dir); that refusal, too, reaches every rank. Names are sent
    relative to the folder they were found in, so each rank looks in its own log_dir."""
    decision = [None]
    if rt.is_main:
        try:
            check_one_run_per_log_dir(s)
            folder, names = resume_candidates(s)
            decision[0] = ("ok", (folder is not None, names))
        except (RunError, SettingsError) as e:
            decision[0] = (type(e).__name__, str(e))
    if rt.world_size > 1:
        dist.broadcast_object_list(decision, src=0)
    kind, found = decision[0]
    if kind != "ok":
        raise {"RunError": RunError, "SettingsError": SettingsError}[kind](found)
    in_folder, names = found
    folder = s.log_dir if s.resume == "auto" else s.resume
    return [os.path.join(folder, name) for name in names] if in_folder else names


def load_resume_state(s, rt, candidates, raw_model, optimizer, log):
    """Restore the newest good checkpoint of candidates (choose_checkpoints) into model and
    optimizer; return its plain values (or None to start fresh). Good: its checksum matches, it
    loads, and no tensor is NaN/Inf. Under --resume=auto (or a log folder) a bad one is reported
    and the one before it tried; if there are checkpoints but none is good, the run stops instead
    of starting over on top of them. Every rank loads the same one, or the job stops."""
    one_file = s.resume not in ("auto", "off") and candidates == [s.resume]
    failures = []
    for path in candidates:
        check_every_rank_has(path, s, rt)
        try:
            state = load_checkpoint(rt, path, raw_model, optimizer, log, unverified_ok=one_file,
                                    optimizer_name=s.optimizer)
        except checkpoint.CorruptCheckpoint as e:
            if one_file:
                raise
            log(f"warning: {e}; trying the checkpoint before it")
            failures.append((path, str(e)))
            continue
        log(f"resumed from {path} at step {state['step']}")
        return state
    if failures:
        raise RunError(none_loaded_message(s, failures))
    return None


def none_loaded_message(s, failures):
    """What to do when every checkpoint failed. One that only lacks its checksum file (written
    before checksums, or its sidecar lost) can be loaded unverified by naming it, but a log_dir
    resumes only from its newest checkpoint (check_one_run_per_log_dir): the newer ones have to
    be moved aside first. The advice names the exact commands."""
    folder = os.path.dirname(failures[0][0]) or "."
    text = (f"{folder} holds {len(failures)} checkpoints and none could be loaded (the reasons are above), so the "
            f"run does not start over on top of them. To start a new run, use another --log_dir; to start over "
            f"here, delete them first (rm -r {os.path.join(folder, 'ckpt_')}*)")
    unverified = [i for i, (path, _) in enumerate(failures) if not os.path.exists(checksum_record(path))]
    if not unverified:
        return text + "."
    i = unverified[0]
    path, newer = failures[i][0], [p for p, _ in failures[:i]]
    aside = os.path.join(folder, "damaged")
    move = (f"move the newer ones aside (mkdir -p {aside} && mv {' '.join(p + '*' for p in newer)} {aside}/), "
            f"then " if newer else "")
    return text + (f"; {path} lacks its checksum file ({checksum_record(path)}), so it could not be verified: "
                   f"to load it unverified, {move}give --resume={path}.")


def checksum_record(path):
    """Where a checkpoint's checksums are: a folder's manifest, a file's sidecar."""
    return os.path.join(path, checkpoint.MANIFEST) if os.path.isdir(path) else path + checkpoint.CHECKSUM_SUFFIX


def check_every_rank_has(path, s, rt):
    """Stop the job, naming the ranks, if a rank cannot see the checkpoint rank 0 chose."""
    if rt.world_size == 1:
        return
    mine = None if os.path.exists(path) else socket.gethostname()
    seen = [None] * rt.world_size
    dist.all_gather_object(seen, mine)
    missing = [(rank, host) for rank, host in enumerate(seen) if host is not None]
    if missing:
        who = ", ".join(f"rank {rank} on host {host}" for rank, host in missing[:4])
        raise RunError(f"log_dir is not shared: {who} {'has' if len(missing) == 1 else 'have'} no "
                       f"{path}, the checkpoint rank 0 resumes from; every rank must load it. Put --log_dir on a "
                       f"filesystem every node shares (the default for torchrun across nodes), or copy the "
                       f"checkpoint to the same path on every node.")


def agree(reason, rt, path, each_reads_all):
    """Every rank's verdict on one checkpoint, made one. reason: this rank's (None: fine). If every
    rank failed, or the ranks read different parts of it (shards), the checkpoint is bad:
    CorruptCheckpoint, and the next one is tried on every rank. If ranks that read the same
    whole file disagree, some rank's storage or memory failed: the job stops (RunError) rather
    than fall back on some ranks, or on a good checkpoint."""
    if rt.world_size == 1:
        if reason:
            raise checkpoint.CorruptCheckpoint(reason)
        return
    verdicts = [None] * rt.world_size
    dist.all_gather_object(verdicts, None if reason is None else (socket.gethostname(), reason))
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
    if not failed:
        return
    if len(failed) == rt.world_size or not each_reads_all:
        raise checkpoint.CorruptCheckpoint(failed[0][1][1])
    rank, (host, why) = failed[0]
    raise RunError(f"rank {rank} on host {host} could not read {path} ({why}), which "
                   f"{rt.world_size - len(failed)} other ranks read: that rank's disk or memory failed. The "
                   f"checkpoint is kept; fix that machine (or run without it) and start the job again.")


def load_checkpoint(rt, path, raw_model, optimizer, log, unverified_ok=False, optimizer_name="adamw"):
    """Verify one checkpoint, load it into model and optimizer and check it holds no NaN/Inf;
    every rank reaches the same verdict (agree). The optimizer keeps this run's settings
    (keep_settings). Returns its plain values; raises CorruptCheckpoint."""
    sharded = os.path.isdir(path)
    record = checksum_record(path)
    verify = not (unverified_ok and not os.path.exists(record))
    if not verify:
        log(f"warning: {path} has no checksum ({record} is missing: written before checksums?): loading it unverified")
    state, reason = None, None
    try:
        if sharded:
            if verify:
                agree(checkpoint.verify_folder(path, rt.rank, rt.world_size), rt, path, each_reads_all=False)
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_state, optim_state = get_state_dict(raw_model, optimizer)
            state = checkpoint.load_sharded(path, model_state, optim_state)
        else:
            if verify:
                checkpoint.verify_file(path)
            state = checkpoint.load_file(path)
            model_state, optim_state = state["model"], state["optimizer"]
    except checkpoint.CorruptCheckpoint as e:
        reason = str(e)
    agree(reason, rt, path, each_reads_all=not sharded)
    check_compatible(state, raw_model.config)
    check_same_optimizer(state, optimizer_name)
    bad = checkpoint.nonfinite_tensors({"model": model_state, "optimizer": optim_state})
    nan = f"checkpoint {path} holds NaN/Inf in {len(bad)} tensors (e.g. {bad[:3]})" if bad else None
    agree(nan, rt, path, each_reads_all=not sharded)

    def load():
        if sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict
            set_state_dict(raw_model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        else:
            raw_model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
    keep_settings(optimizer, load)
    return state


def keep_settings(optimizer, load):
    """load() the checkpoint's optimizer state (moments, momentum buffers, step counts) and keep
    this run's hyperparameters: load_state_dict also restores each param group's settings as
    saved (weight decay, Muon's momentum, lr_scale, adjust_lr_fn, ...), which would silently train
    with the checkpoint's values instead of the ones given now. The LR is the schedule's, set
    every step. Returns the group fields that changed: [(name, checkpoint's, now's)]."""
    asked = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load()
    changed = []
    for now, group in zip(asked, optimizer.param_groups):
        changed += [(k, group.get(k), v) for k, v in now.items() if k != "lr" and group.get(k) != v]
        group.update(now)
    return changed


def settings_changes(saved, now):
    """'name a -> b' for each setting that differs from the checkpoint's (what trains now)."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v]


def check_compatible(state, config):
    """A checkpoint of another model or data must not be loaded into this run."""
    saved = state["model_config"]
    for name, value in dataclasses.asdict(config).items():
        if saved.get(name) != value:
            raise SettingsError(f"the checkpoint's model has {name}={saved.get(name)}, these settings give "
                             f"{value}: resume with the checkpoint's --{name} (or --model), or start a "
                             f"new --log_dir")


def check_same_optimizer(state, optimizer_name):
    """A checkpoint's optimizer state only loads into the optimizer it was saved from."""
    saved = state.get("settings", {}).get("optimizer", "adamw")
    if saved != optimizer_name:
        raise SettingsError(f"the checkpoint was trained with --optimizer={saved}, these settings give "
                            f"--optimizer={optimizer_name}: resume with --optimizer={saved}, or start a new --log_dir")


# ----------------------------------------------------------------------------------------------
# Training

def all_reduce_mean(value, rt, stop=None):
    """The mean over ranks; with `stop`, its flag travels in the same all-reduce (run_guard)."""
    if rt.world_size > 1:
        if stop is not None:
            value = stop.ride(value, rt.world_size)
        else:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= rt.world_size
    return value


def check_weights_finite(s, rt, raw_model, step, lr):
    """After an update: a step with a finite loss and gradient can still push weights to NaN/Inf
    (a learning rate far too high). Stop then, before anything is saved: undoing the update would
    need a copy of every weight and moment. The check is the sum of each weight tensor, which a NaN
    or Inf makes non-finite: one reduction a tensor, several times cheaper on the CPU than torch's
    max-abs norm (README: Checkpoints and resume). Only a tensor whose values add up past fp32's
    range (1e38), broken anyway, could stop a run without a NaN."""
    weights = [p.to_local() if hasattr(p, "to_local") else p for p in raw_model.parameters()]
    weights = [w for w in weights if w.numel()]  # an FSDP rank may hold an empty shard
    total = torch.stack([w.sum() for w in weights]).sum() if weights else torch.zeros((), device=rt.device)
    bad = (~torch.isfinite(total)).float()
    if s.fsdp and rt.world_size > 1:  # each rank holds a shard
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise RunError(f"step {step}'s update made the weights NaN/Inf although its loss and gradient were finite: "
                       f"the learning rate ({lr:.3g}) is far too high. Nothing was saved after it; the newest "
                       f"checkpoint in {s.log_dir} (if any) holds no NaN: lower --max_lr (or raise --warmup_tokens) "
                       f"and resume from it (or start again if there is none).")


def clip_gradients(params, optimizer, max_norm):
    """Scale the step's gradient down to norm max_norm when it is larger (0: never); returns the
    norm before clipping, as a tensor (reading it would sync with the device).

    On the CPU, where it was measured to pay (README: Performance), two of clip_grad_norm_'s
    costs are saved: the norm comes from BLAS dot products (torch's foreach norm runs there a
    tensor at a time at half their speed), and with the fused AdamW the multiply is left to the
    optimizer kernel, which divides each gradient by the optimizer's `grad_scale` as it reads it
    (the hook torch's GradScaler unscales through). Elsewhere torch's own clipping runs."""
    grads = [p.grad for p in params if p.grad is not None]
    if any(hasattr(g, "device_mesh") for g in grads):  # FSDP's sharded DTensors: torch's own way
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not (grads and grads[0].device.type == "cpu"):
        if max_norm <= 0:
            return torch.nn.utils.get_total_norm(grads)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()
    if max_norm <= 0:
        return norm
    for part in getattr(optimizer, "optimizers", {"": optimizer}).values():  # model.CombinedOptimizer's parts
        if part.defaults.get("fused"):
            part.grad_scale = (norm / max_norm).clamp_min(1.0)  # > 1: the gradient is divided by it
        elif part is optimizer:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        else:  # Muon: its own parameters, scaled before it steps
            torch.nn.utils.clip_grads_with_norm_([p for g in part.param_groups for p in g["params"]], max_norm, norm)
    return norm


def train_step(s, rt, model, raw_model, optimizer, next_batch, accum, stop=None):
    """One optimizer step: accum micro steps of forward and backward on next_batch() batches,
    gradient clipping, then AdamW unless the loss or gradient is NaN/Inf. Returns (loss, grad
    norm, finite): loss is the step's mean over micro batches and ranks. A stop flag (run_guard)
    rides on the loss's all-reduce. bench.py times this."""
    autocast = (lambda: torch.autocast(rt.device.type, dtype=rt.amp_dtype)) if rt.amp_dtype and not s.fsdp \
        else contextlib.nullcontext
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
            # whole model's gradients unsharded (README: FSDP).
            model.set_requires_gradient_sync(micro_step == accum - 1)
        with autocast():
            _, loss = model(x, y, return_logits=not s.chunked_loss)
        # The gradient of the step is the mean over all micro batches: scale each micro loss
        # by 1/accum, since backward() sums into .grad.
        loss = loss / accum
        loss_accum += loss.detach()
        loss.backward()
    norm = clip_gradients(list(raw_model.parameters()), optimizer, s.grad_clip)
    loss_accum = all_reduce_mean(loss_accum, rt, stop)
    finite = bool(torch.isfinite(loss_accum) & torch.isfinite(norm))  # the step's one host sync
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum, norm, finite


def train(s, stop=None):
    """Check the settings, then train with log_dir locked to this run (run_guard: one writer per
    folder). Bad settings stop here, before any work and before the log folder is made."""
    stop = stop or run_guard.StopOnSignal()  # without handlers installed: never set
    config = resolve_model_settings(s)
    rt = setup_runtime(s)
    check_batch_divisibility(s, rt.world_size)
    check_sharding(s, rt.world_size)
    if not s.demo:  # the demo makes its data below
        shard_paths(s.data_dir, "train")  # no data: said now, before the log folder is made
    with run_guard.log_dir_lock(s.log_dir, rt.rank) as lock:
        return train_run(s, rt, config, stop, lock)


def train_run(s, rt, config, stop, lock):
    """The recipe: model, optimizer, data, resume, then the training loop with its evaluations
    and checkpoints."""
    # Until the run is sure to start (every refusal below has passed), nothing is written to
    # log_dir: the log prints, the lock is not claimed, W&B and TensorBoard are not opened.
    log = RunLog(s.log_dir, rt.is_main)
    candidates = choose_checkpoints(s, rt)  # refused here if log_dir holds another run
    advice = restart_advice()
    if advice:
        log(f"note: {advice}")
    if s.demo:
        prepare_demo_data(s, rt, log)
    if s.micro_batch_size is None:
        s.micro_batch_size = auto_micro_batch(s, rt, log)
    tokens_per_micro = s.micro_batch_size * s.seq_len * rt.world_size

    raw_model, model = build_model(s, config, rt)
    optimizer = configure_optimizers(raw_model, s.weight_decay, s.max_lr, rt.device.type, log=log,
                                     muon=muon_config(s, rt.device))
    loader = DataLoader(s.data_dir, s.micro_batch_size, s.seq_len, rt.rank, rt.world_size, seed=s.seed, log=log,
                        vocab_size=config.vocab_size)
    val_data = (ValidationData(s.data_dir, s.seq_len, s.val_tokens, vocab_size=config.vocab_size)
                if s.val_every > 0 else None)

    step, tokens_seen, bad_steps, last_val = 0, 0, 0, None
    state = load_resume_state(s, rt, candidates, raw_model, optimizer, log)
    if state is not None:
        # bad_steps restarts at 0: a resumed session may be the fix (a lower --max_lr)
        step, tokens_seen, bad_steps, last_val = state["step"], state["tokens_seen"], 0, state["val_loss"]
        loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"], rt, log)
        changes = settings_changes(state.get("settings", {}), dataclasses.asdict(s))
        if changes:
            log(f"settings changed since the checkpoint (these train now): {'; '.join(changes)}")
        if tokens_seen >= s.max_tokens:
            log(f"{s.log_dir} already holds a finished run ({tokens_seen:,} of {s.max_tokens:,} tokens, "
                f"{step} steps). To train again use another --log_dir, or raise --max_tokens to continue it.")
    else:
        log(f"settings: {json.dumps(dataclasses.asdict(s))}")
    lock.claim()  # the run starts: from here on it writes to log_dir
    log.start(open_trackers(s, rt))
    flops_token = flops_per_token(config, s.seq_len)
    peak = peak_flops(s, rt.device)
    log(f"model {s.model}: {num_params(raw_model):,} parameters, {flops_token / 1e6:.1f} MFLOPs/token; "
        f"device {rt.device} x {rt.world_size}, dtype {s.dtype}, compile {s.compile}, "
        f"{describe_parallelism(s, rt)}, "
        f"activation checkpointing {s.activation_checkpointing}; "
        f"peak {peak / 1e12:.2f} TFLOP/s for MFU")
    log(f"batch: {s.total_batch_size:,} tokens/step = {s.micro_batch_size} x {s.seq_len} x "
        f"{rt.world_size} ranks x {s.total_batch_size // tokens_per_micro} accumulation steps")
    if 0 < s.batch_warmup_tokens and tokens_per_micro > min(BATCH_WARMUP_START, s.total_batch_size):
        log(f"note: the batch-size warmup starts at one global micro batch, {tokens_per_micro:,} tokens "
            f"({s.micro_batch_size} x {s.seq_len} x {rt.world_size} ranks), not {BATCH_WARMUP_START:,}: "
            f"a smaller --micro_batch_size starts it lower")
    log(describe_plan(s, tokens_per_micro))
    hellaswag_data = load_hellaswag(s, rt, log)

    # The schedule's clock is tokens: the run ends once max_tokens are trained (the last step may
    # pass it by less than one step); --stop_step only ends this session.
    clock = TrainClock(session_done(step, tokens_seen, s), 1.0)
    stop.armed = True  # from here a signal saves a checkpoint after the current step
    while tokens_seen < s.max_tokens and not (0 < s.stop_step <= step):
        accum = accum_steps_at(tokens_seen, s, tokens_per_micro)
        step_tokens = accum * tokens_per_micro
        lr = lr_at(tokens_seen, step_tokens, s)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group has its own peak
        t0 = time.perf_counter()
        loss_accum, norm, finite = train_step(s, rt, model, raw_model, optimizer, loader.next_batch, accum, stop)
        bad_steps = 0 if finite else bad_steps + 1
        if finite:
            check_weights_finite(s, rt, raw_model, step, lr)
        stopping = stop.agreed()
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens_seen += step_tokens
        tps = step_tokens / dt
        mfu = model_flops_utilization(tps, flops_token, peak, rt.world_size)
        loss_value, norm_value = loss_accum.item(), norm.item()  # one copy to the host each
        clock.step_done(session_done(step + 1, tokens_seen, s), dt)
        if finite:
            log(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} | "
                f"{step_tokens:,} tokens | {dt * 1000:.0f} ms | {tps:,.0f} tok/s | {mfu_label(mfu, s, rt)} | "
                f"{clock.text()}")
            log.metrics(step=step, train_loss=loss_value, lr=lr, grad_norm=norm_value, tokens_per_sec=tps,
                        ms=dt * 1000, mfu=mfu, tokens=tokens_seen, step_tokens=step_tokens)
        else:
            log(f"step {step:5d} | skipped: loss {loss_value} grad norm {norm_value} is not finite "
                f"({bad_steps} in a row; stopping at {s.max_bad_steps})")
            log.metrics(step=step, skipped=True, train_loss=str(loss_value), grad_norm=str(norm_value))
            if bad_steps >= s.max_bad_steps:
                raise RunError(
                    f"{bad_steps} steps in a row had a NaN/Inf loss or gradient; stopping. The newest checkpoint "
                    f"in {s.log_dir} holds no NaN: lower --max_lr or raise --warmup_tokens and resume from it.")
        step += 1
        last = tokens_seen >= s.max_tokens or step == s.stop_step
        if stopping:  # the checkpoint first, then stop: an evaluation could outlast the grace period
            path = save_checkpoint(s, rt, step, raw_model, optimizer, loader,
                                   dict(tokens_seen=tokens_seen, bad_steps=bad_steps, val_loss=last_val), log)
            skipped = evals_due(s, step, last, val_data, hellaswag_data)
            if skipped:
                log(f"step {step:5d} | {', '.join(skipped)} skipped: stopping on a signal")
            raise stop.stopped(step, path, rt.world_size, complete=last)
        val_loss = run_evals(s, rt, step, last, raw_model, val_data, hellaswag_data, log)
        last_val = last_val if val_loss is None else val_loss
        if step % s.checkpoint_every == 0 or last:
            save_checkpoint(s, rt, step, raw_model, optimizer, loader,
                            dict(tokens_seen=tokens_seen, bad_steps=bad_steps, val_loss=last_val), log)
    log.close()
    return raw_model


def session_done(step, tokens, s):
    """The fraction of this session done after `step` optimizer steps and `tokens` trained: what
    the ETA extrapolates. A session ends at max_tokens, or at stop_step when that comes first."""
    done = tokens / s.max_tokens
    return max(done, step / s.stop_step) if s.stop_step > 0 else done


def format_duration(seconds):
    """4s, 3m07s, 2h05m, 3d04h: short enough for the step line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


class TrainClock:
    """Time since the session's first step (evaluations and checkpoints included), and the ETA:
    the budget left over the rate of the last `window` steps, with step time alone (evaluation
    and checkpoint time excluded, so the ETA is the training's own; they add to it)."""

    def __init__(self, done, end, window=20):
        self.end, self.window = end, window
        self.start = time.perf_counter()
        self.points = [(done, 0.0)]  # (budget done, training seconds so far)

    def step_done(self, done, step_seconds):
        self.points.append((done, self.points[-1][1] + step_seconds))
        self.points = self.points[-(self.window + 1):]

    def eta_seconds(self):
        (done0, t0), (done1, t1) = self.points[0], self.points[-1]
        if done1 <= done0 or t1 <= t0:
            return None
        return (self.end - done1) * (t1 - t0) / (done1 - done0)

    def text(self):
        eta = self.eta_seconds()
        elapsed = format_duration(time.perf_counter() - self.start)
        return f"{elapsed} elapsed, ETA {'?' if eta is None else format_duration(eta)}"


def due(step, every, last):
    return every > 0 and (step % every == 0 or last)


def run_evals(s, rt, step, last, raw_model, val_data, hellaswag_data, log):
    """Validation, HellaSwag and samples, on the plain model (no DDP, no compile: the compiled
    training graph is never retraced for other shapes). Their time is outside the step's. Under
    FSDP the blocks themselves are compiled (build_fsdp_model): they run eagerly here."""
    eager = torch.compiler.set_stance("force_eager") if s.fsdp and s.compile else contextlib.nullcontext()
    with eager:
        return _run_evals(s, rt, step, last, raw_model, val_data, hellaswag_data, log)


def evals_due(s, step, last, val_data, hellaswag_data):
    """The evaluations due after `step`: what _run_evals runs, and what a stopping step skips."""
    return [name for name, on in (("validation", val_data is not None and due(step, s.val_every, last)),
                                  ("HellaSwag", bool(hellaswag_data) and due(step, s.hellaswag_every, last)),
                                  ("samples", due(step, s.sample_every, last))) if on]


def _run_evals(s, rt, step, last, raw_model, val_data, hellaswag_data, log):
    val = None
    todo = evals_due(s, step, last, val_data, hellaswag_data)
    if "validation" in todo:
        val = evaluate.val_loss(raw_model, val_data, s.micro_batch_size, rt.rank, rt.world_size, rt.amp_dtype,
                                progress=rt.is_main)
        log(f"step {step:5d} | val loss {val:.4f} ({val_data.num_tokens:,} tokens)")
        log.metrics(step=step, val_loss=val)
    if "HellaSwag" in todo:
        r = evaluate.hellaswag(raw_model, hellaswag_data, rt.rank, rt.world_size, rt.amp_dtype, progress=rt.is_main)
        log(f"step {step:5d} | HellaSwag acc_norm {r['acc_norm']:.4f} acc {r['acc']:.4f} ({r['n']} examples)")
        log.metrics(step=step, hellaswag_acc=r["acc"], hellaswag_acc_norm=r["acc_norm"], hellaswag_n=r["n"])
    if "samples" in todo:
        from fineweb import gpt2_tokenizer
        for i, text in enumerate(evaluate.sample_text(raw_model, gpt2_tokenizer(), seed=s.seed + rt.rank)):
            log(f"sample {i}: {text!r}")
    return val


def load_hellaswag(s, rt, log):
    if s.hellaswag_every <= 0:
        return None
    try:
        return evaluate.hellaswag_examples_distributed(rt.rank)
    except Exception as e:  # offline, most likely: training goes on without it
        log(f"HellaSwag disabled: {e}")
        return None


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
                f"(about a minute on 2 cores)")
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
    traceback; anything else is a bug and keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(settings_help())
        return
    try:
        s = parse_settings(argv)
        with run_guard.StopOnSignal() as stop:
            train(s, stop)
    except USER_ERRORS as e:
        sys.exit(f"train_gpt.py: error: {e}")
    except run_guard.Stopped as e:  # SIGTERM, Ctrl-C, SIGHUP, SIGQUIT: one line, the checkpoint saved
        print(e.message, file=sys.stderr, flush=True)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    except RuntimeError as e:
        message = run_guard.collective_timeout_message(e, s.collective_timeout) if dist.is_initialized() else None
        if message is None:
            raise
        sys.exit(f"train_gpt.py: error: {message}")
    finally:
        if dist.is_initialized():
            # FSDP's modules hold the process group through reference cycles: collected first,
            # the group is destroyed here, not at interpreter exit, where a gloo thread releasing
            # tensors can abort the process (seen in a test worker).
            gc.collect()
            dist.destroy_process_group()
    if s.demo and int(os.environ.get("RANK", 0)) == 0:
        finish_demo(s)


if __name__ == "__main__":
    main()

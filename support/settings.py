"""Settings from the command line: --name=value parsed into a settings dataclass (train_gpt.Settings)
through the layers a run is made of (the dataclass's defaults, the demo's, a recipe's, the command
line's), --help generated from the dataclass's own comments, and every value checked before any
work: a bad one stops the run with one line that names the fix (check_batch_divisibility lists the
values that work)."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Optional

import torch
import torch.distributed as dist

from model import ARCHITECTURES, ATTENTION_PATTERNS, ModelOptions, arch_changes
from support import cli, hf, tracking
from support.activation_checkpoint import MODES as ACTIVATION_CHECKPOINTING
from support.cli import RunError, SettingsError
from support.fastpath import cpu_has_bf16
from support.optim import MUON_MIN_TORCH, MuonConfig
from support.presets import PRESETS, preset_config


def parse_value(name, text, field_type):
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
        if base is not int:
            return base(text)
        if "e" in text.lower() and not text.lower().startswith("0x"):  # 1e9, 5.24288e5: whole numbers only
            number = float(text)
            if not number.is_integer():  # 2.5e0, and 1e999 (Inf)
                raise ValueError(text)
            return int(number)
        return int(text, 0)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(base, f"a {base.__name__}")
        raise SettingsError(f"--{name} takes {kind}, got {text!r}") from None


def settings_help(cls, doc, demo, command="train_gpt.py"):
    """--help: every setting with its default and the comment it has in the dataclass, in its groups."""
    demo_text = ", ".join(f"{k}={v}" for k, v in demo.items())
    return (f"usage: python {command} [--name=value ...]   (--name alone means True)\n"
            f"{cli.summary(doc)}\n\n{cli.settings_help(cls)}\n\n"
            f"--demo sets {demo_text}; a setting given with it still wins.")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m tools.plan` runs

# The preset whose numbers are train_gpt.Settings' own defaults (the seed's run): choosing it sets
# nothing, so an edit to those defaults is what trains.
SEED_PRESET = "gpt2"

# Settings that name one value in two units: give one of each pair (resolve_token_schedule).
SAME_THING = (("max_tokens", "max_steps"), ("warmup_tokens", "warmup_steps"))

# The range of every numeric setting, checked first (check_ranges): a finite number, above 0, or at
# least 0 where 0 means something (Settings' comments say what: off, never, no warmup, ...). How
# settings bound each other (min_lr <= max_lr, seq_len <= block_size, ...) is checked where they
# are resolved, below. A numeric setting added later gets the finiteness check without a line here;
# tests/test_train.py feeds every one 0, -1, NaN and Inf.
POSITIVE = ("n_layer", "n_head", "n_embd", "block_size", "attention_band", "seq_len", "total_batch_size",
            "micro_batch_size", "max_lr_scale", "max_tokens", "decay_tokens", "max_steps", "max_bad_steps",
            "muon_lr", "decay_fraction", "val_tokens", "checkpoint_every", "keep_checkpoints", "collective_timeout",
            "tensor_parallel")
NOT_NEGATIVE = ("logit_softcap", "batch_warmup_tokens", "max_lr", "min_lr", "warmup_tokens", "warmup_steps",
                "stop_step", "weight_decay", "grad_clip", "muon_momentum", "muon_weight_decay", "val_every",
                "hellaswag_every", "sample_every", "fsdp_shard_size", "peak_flops", "seed")
RANGE_NOTES = dict(  # what a refusal adds where the range alone does not say what to give
    seq_len="or none: the model's block_size", micro_batch_size="or auto: the largest that fits",
    attention_band="the tokens a banded layer sees", collective_timeout="in seconds", tensor_parallel="1 = off",
    checkpoint_every="a checkpoint is also written at the end and when stopped by a signal; a large value "
                     "checkpoints rarely")


def parse_settings(argv, cls, demo, recipes):
    """--name=value arguments -> a cls (train_gpt.Settings). `--name` alone means True for a
    True/False setting. The values come in layers, each replacing the one before: the dataclass's
    defaults (the seed's GPT-2 124M run), the chosen model preset's numbers (support/presets.py), the
    demo's (--demo), the architecture's options (--arch, model.ARCHITECTURES), the recipe's
    (--recipe), and the command line's, which always win."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
        given[name] = parse_value(name, text, ftype)
    demo_layer = dict(demo) if given.get("demo") else {}
    recipe = given.get("recipe", demo_layer.get("recipe", ""))
    if recipe and recipe not in recipes:
        raise SettingsError(f"unknown --recipe={recipe!r}; choose one of: {', '.join(recipes)}")
    recipe_layer = recipes[recipe] if recipe else {}
    arch = given.get("arch", recipe_layer.get("arch", demo_layer.get("arch", fields["arch"].default)))
    if arch not in ARCHITECTURES:
        raise SettingsError(f"unknown --arch={arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    own = {**demo_layer, **ARCHITECTURES[arch], **recipe_layer, **given}  # everything but the preset's
    model = own.get("model", fields["model"].default)
    values = {} if model == SEED_PRESET else preset_settings(model)
    values.update(own)
    for tokens, steps in SAME_THING:  # a budget in tokens or in steps: the one given wins
        if tokens in given and steps in given:
            raise SettingsError(f"--{tokens} and --{steps} name the same thing: give one of them")
        if tokens in given:
            values.pop(steps, None)
        elif values.get(steps) is not None:
            values[tokens] = None  # in steps: made tokens once the batch is known
    now = lambda name: values.get(name, fields[name].default)
    # a budget of one's own decays over itself, as the seed's does: a GPT-3 preset's decay ends at
    # 260B of its 300B tokens and holds min_lr (10%) after; a decay to 0 (wsd's) ends with the run,
    # or that hold would train 40B tokens at LR 0
    decays_to_zero = now("min_lr") == 0 or (now("min_lr") is None and now("schedule") == "wsd")
    if "decay_tokens" not in own and ({"max_tokens", "max_steps"} & own.keys() or decays_to_zero):
        values.pop("decay_tokens", None)
    if now("optimizer") == "muon" and now("muon_adjust_lr") == "match_rms_adamw" and "muon_lr" not in given:
        raise SettingsError(match_rms_adamw_needs_its_lr(now("muon_lr"), now("n_embd")))
    check_range("max_lr_scale", now("max_lr_scale"))  # now: it scales max_lr below
    if "max_lr" not in own:  # a recipe's LR is relative to the preset's
        values["max_lr"] = now("max_lr") * now("max_lr_scale")
    return cls(**values)


def match_rms_adamw_needs_its_lr(muon_lr, width):
    """Moonshot's match_rms_adamw scales Muon's step by 0.2 sqrt(max dim) where Keller Jordan's original
    scales it by sqrt(max(1, rows/cols)), so muon_lr means another step under each: the defaults and
    the recipes' muon_lr were tuned under original, and would step a C x C matrix 0.2 sqrt(C) times
    as far (5.5x at 768 wide). The LR is the user's to give, not ours to guess."""
    factor = 0.2 * math.sqrt(width)
    return (f"--muon_adjust_lr=match_rms_adamw with muon_lr={muon_lr:g} (tuned for original) would step each "
            f"{width} x {width} matrix {factor:.1f}x as far as original does; give --muon_lr as well: "
            f"--muon_lr={muon_lr / factor:.3g} steps square matrices as original's {muon_lr:g} does "
            f"(Moonshot's convention gives Muon AdamW's LR)")


def preset_settings(name):
    """The settings a model preset sets (support/presets.py): its dimensions, context, attention
    pattern, LR, batch and token schedule."""
    if name not in PRESETS:
        raise SettingsError(f"unknown --model={name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    values = dict(n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, block_size=p.block_size, max_lr=p.max_lr,
                  total_batch_size=p.batch_tokens, max_tokens=p.train_tokens, warmup_tokens=p.warmup_tokens,
                  attention=p.attention)
    if p.decay_tokens:
        values["decay_tokens"] = p.decay_tokens
    return values


def check_range(name, value):
    """A numeric setting's value against its range (POSITIVE, NOT_NEGATIVE); never NaN or Inf."""
    shown = f"{value:g}" if isinstance(value, float) else value
    note = f" ({RANGE_NOTES[name]})" if name in RANGE_NOTES else ""
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingsError(f"--{name} must be a finite number, got {shown}{note}")
    if name in POSITIVE and not value > 0:
        raise SettingsError(f"--{name} must be positive, got {shown}{note}")
    if name in NOT_NEGATIVE and value < 0:
        raise SettingsError(f"--{name} must not be negative, got {shown}{note}")


def check_ranges(s):
    """Every numeric setting of s (a train_gpt.Settings) in its range, before anything uses it."""
    for field in dataclasses.fields(s):
        value = getattr(s, field.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(field.name, value)


def resolve_model_settings(s):
    """Fill the settings that follow others (seq_len, min_lr, the token schedule) and check every
    setting's value: a bad one stops the run here, before any work, with the fix named. Returns
    the model's GPTConfig."""
    if s.model not in PRESETS:
        raise SettingsError(f"unknown --model={s.model!r}; choose one of: {', '.join(PRESETS)}")
    check_ranges(s)
    check_init_from(s.init_from)
    check_attention_settings(s)
    config = preset_config(s.model, **model_options(s))
    s.attention_band = config.attention_band if s.attention != "dense" else None  # the band that trains
    s.seq_len = config.block_size if s.seq_len is None else s.seq_len
    s.min_lr = s.min_lr if s.min_lr is not None else (0.0 if s.schedule == "wsd" else 0.1 * s.max_lr)
    if s.seq_len > config.block_size:
        raise SettingsError(f"seq_len={s.seq_len} is longer than the model's block_size={config.block_size}")
    if s.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise SettingsError(f"--activation_checkpointing={s.activation_checkpointing!r}: choose one of "
                            f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    check_optimizer_settings(s)
    resolve_token_schedule(s)
    check_run_settings(s)
    if s.resume not in ("auto", "off") and not os.path.exists(s.resume):
        raise SettingsError(f"--resume={s.resume}: no such checkpoint. Use auto, off, or a checkpoint path.")
    return config


def check_init_from(path):
    """--init_from: a checkpoint file, a sharded checkpoint folder, a Hugging Face folder, or a hub
    name (fetched when the model is built). A path that cannot be one is refused now."""
    if not path:
        return
    kinds = ("a checkpoint (ckpt_<step>.pt, or a sharded ckpt_<step>/ folder, in a log_dir), a Hugging Face "
             "GPT-2 folder (config.json and model.safetensors), or a hub name such as gpt2")
    local = os.path.expanduser(path)
    if not os.path.exists(local) and not hf.is_hub_name(path):
        raise SettingsError(f"--init_from={path}: no such file or folder. Give {kinds}.")
    if os.path.isdir(local) and not any(os.path.exists(os.path.join(local, f)) for f in ("config.json", "extra.pt")):
        raise SettingsError(f"--init_from={path} is a folder with neither config.json (Hugging Face) nor extra.pt "
                            f"(a sharded checkpoint). Give {kinds}.")


def check_attention_settings(s):
    """--attention and --attention_band: a known pattern, and a band only where some layer bands."""
    if s.attention not in ATTENTION_PATTERNS:
        raise SettingsError(f"unknown --attention={s.attention!r}; choose one of: {', '.join(ATTENTION_PATTERNS)} "
                            f"(gpt3: every other layer banded, docs/attention.md)")
    if s.attention_band is None:
        return
    if s.attention == "dense":
        raise SettingsError(f"--attention_band={s.attention_band} bands the layers of --attention=gpt3, but this "
                            f"model is dense (--attention=dense): give --attention=gpt3, or no band")


def model_options(s):
    """The settings that are the model's options (model.ModelOptions: s inherits them), by name."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(ModelOptions)}


def resolve_token_schedule(s):
    """Make max_tokens and warmup_tokens tokens (--max_steps, --warmup_steps are steps of
    total_batch_size tokens), decay_tokens max_tokens when unset, and refuse a schedule that
    would train steps at LR 0 (a min_lr of 0 reached before the run's end)."""
    for tokens, steps in SAME_THING:
        if getattr(s, steps) is not None:
            if getattr(s, tokens) is not None:
                raise SettingsError(f"--{tokens} and --{steps} name the same thing: give one of them")
            setattr(s, tokens, getattr(s, steps) * s.total_batch_size)
    s.decay_tokens = s.max_tokens if s.decay_tokens is None else s.decay_tokens
    if s.warmup_tokens > s.decay_tokens:
        raise SettingsError(f"warmup_tokens={s.warmup_tokens:,} must be between 0 and decay_tokens={s.decay_tokens:,}")
    if s.min_lr == 0 and s.decay_tokens < s.max_tokens:
        raise SettingsError(
            f"the LR reaches min_lr=0 at decay_tokens={s.decay_tokens:,}, before the run ends at "
            f"max_tokens={s.max_tokens:,}: the last {s.max_tokens - s.decay_tokens:,} tokens would train at LR 0. "
            f"Give --decay_tokens={s.max_tokens} (or leave it unset), or a --min_lr above 0.")


def check_run_settings(s):
    """The settings that are not the model's, schedule's or optimizer's, beyond their ranges: what
    would fail late or do something other than was asked."""
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


def check_optimizer_settings(s):
    """--optimizer, --schedule and their settings, checked before anything is built."""
    if s.optimizer not in ("adamw", "muon"):
        raise SettingsError(f"unknown --optimizer={s.optimizer!r}; choose adamw or muon")
    if s.schedule not in ("cosine", "wsd"):
        raise SettingsError(f"unknown --schedule={s.schedule!r}; choose cosine or wsd")
    if s.decay_fraction > 1:
        raise SettingsError(f"--decay_fraction={s.decay_fraction:g} must be in (0, 1]: the share of the run that decays")
    if s.min_lr > s.max_lr:
        raise SettingsError(f"--min_lr={s.min_lr:g} must be between 0 and max_lr={s.max_lr:g}")
    if s.muon_momentum >= 1:
        raise SettingsError(f"--muon_momentum={s.muon_momentum:g} must be in [0, 1) (0.95 is the usual)")
    if s.optimizer != "muon":
        return
    if not hasattr(torch.optim, "Muon"):
        raise SettingsError(f"--optimizer=muon needs torch {MUON_MIN_TORCH} or newer (torch.optim.Muon); this is "
                         f"torch {torch.__version__}. Upgrade torch, or use --optimizer=adamw.")
    if s.muon_adjust_lr not in ("original", "match_rms_adamw"):
        raise SettingsError(f"unknown --muon_adjust_lr={s.muon_adjust_lr!r}; choose original or match_rms_adamw")
    if s.max_lr == 0:
        raise SettingsError("--max_lr=0 with --optimizer=muon: the schedule sets Muon's LR as a multiple of "
                            "max_lr's (muon_lr / max_lr), so max_lr must be positive")


def muon_config(s, device):
    """Muon's settings for support/optim.py's configure_optimizers, or None for plain AdamW. On a CPU
    without bf16 matmul units Muon orthogonalizes in float32 (Float32Muon): bf16 is ~20x slower there."""
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


def check_tensor_parallel(s, config, world_size, local_world_size):
    """--tensor_parallel=N (support/parallelize.py): every layout it cannot split evenly, or across
    nodes, and what it does not work with, refused before any work with the degrees that work. (The
    MLP's width, 4 x n_embd, splits wherever the heads do: n_head divides n_embd.)"""
    tp = s.tensor_parallel
    if tp == 1:
        return
    works = [n for n in range(1, local_world_size + 1) if all(
        size % n == 0 for size in (config.n_head, config.padded_vocab_size, s.seq_len, world_size, local_world_size))]
    choose = f"Values that work here: --tensor_parallel in {works}"
    if world_size % tp:
        raise SettingsError(f"--tensor_parallel={tp} splits each block over {tp} ranks, but this run has {world_size}: "
                            f"start it with torchrun --nproc_per_node={tp} (or a multiple of {tp} ranks). {choose}.")
    if local_world_size % tp:
        raise SettingsError(f"--tensor_parallel={tp} does not fit in a node's {local_world_size} ranks: a TP group "
                            f"talks in every layer (all-gathers and reduce-scatters), which only the links inside a "
                            f"node are fast enough for. Use FSDP (--fsdp_shard_size) across nodes. {choose}.")
    if not s.fsdp:
        raise SettingsError(f"--tensor_parallel={tp} splits each block over {tp} ranks, and FSDP2 is what runs "
                            f"across the TP groups: add --fsdp (with --fsdp_shard_size={tp} the groups are replicas "
                            f"of each other, as DDP's ranks are)")
    for what, size in ((f"n_head={config.n_head} (heads)", config.n_head),
                       (f"the padded vocabulary {config.padded_vocab_size}", config.padded_vocab_size),
                       (f"seq_len={s.seq_len} (sequence parallelism: positions between blocks)", s.seq_len)):
        if size % tp:
            raise SettingsError(f"{what} is not divisible by --tensor_parallel={tp}: each rank of a TP group "
                                f"holds an equal share. {choose}.")
    if s.fsdp_shard_size % tp:
        raise SettingsError(f"--fsdp_shard_size={s.fsdp_shard_size} counts ranks, the TP groups' included: give a "
                            f"multiple of --tensor_parallel={tp} (a node's GPUs)")
    if s.chunked_loss:
        raise SettingsError(f"--chunked_loss makes the loss from the whole head; under --tensor_parallel={tp} the "
                            f"head and the loss are split over the vocabulary instead (loss_parallel): leave "
                            f"--chunked_loss unset")


def auto_micro_batch(s, rt, log):
    """--micro_batch_size=auto: on a GPU, the largest micro batch that fits its memory and divides
    each rank's share of the batch, from tools/plan.py (a fake training step, run by rank 0 in a process
    of its own: it needs a process group of its own); on the CPU, the largest divisor up to 16
    (memory is rarely the limit there, and larger micro batches gain little speed)."""
    per_rank = s.total_batch_size // (s.seq_len * rt.dp_size)
    if rt.device.type != "cuda":
        choice = max((b for b in range(1, 17) if per_rank % b == 0), default=1)
        log(f"micro batch: auto = {choice} ({rt.device.type}: the largest divisor of {per_rank} sequences up to 16)")
        return choice
    preset = PRESETS[s.model]
    if (s.n_layer, s.n_head, s.n_embd, s.seq_len) != (preset.n_layer, preset.n_head, preset.n_embd, preset.block_size):
        raise SettingsError("--micro_batch_size=auto plans the presets as they are; with n_layer, n_head, n_embd "
                         "or seq_len changed, give a number")
    changes = arch_changes(s)
    arch = next((name for name, options in ARCHITECTURES.items() if options == changes), None)
    if arch is None:
        raise SettingsError(f"--micro_batch_size=auto plans the named architectures ({', '.join(ARCHITECTURES)}) as "
                            f"they are; with single options changed ({changes}), give a number")
    answer = [None]
    if rt.is_main:
        memory = torch.cuda.get_device_properties(rt.device).total_memory / 2**30
        cmd = [sys.executable, "-m", "tools.plan", "--json",
               f"--model={s.model}", f"--arch={arch}", f"--gpus={rt.world_size}", f"--gpu_memory={memory}", f"--fsdp={s.fsdp}",
               f"--fsdp_shard_size={s.fsdp_shard_size}",
               f"--activation_checkpointing={s.activation_checkpointing}", f"--dtype={s.dtype}",
               f"--chunked_loss={s.chunked_loss}", f"--total_batch_size={s.total_batch_size}",
               f"--optimizer={s.optimizer}", f"--attention={s.attention}",
               f"--tensor_parallel={s.tensor_parallel}"] + (  # the run's degree: the plan must not choose another
                  [f"--attention_band={s.attention_band}"] if s.attention_band else [])
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if done.returncode != 0:
            raise RunError(f"--micro_batch_size=auto: tools/plan.py failed: {done.stderr.strip()[-500:]}")
        answer[0] = json.loads(done.stdout.strip().splitlines()[-1])
    if rt.world_size > 1:
        dist.broadcast_object_list(answer, src=0)
    plan = answer[0]
    if not plan["fits"]:
        raise RunError(f"--micro_batch_size=auto: {plan['reason']}")
    log(f"micro batch: auto = {plan['micro_batch_size']} (tools/plan.py: peak {plan['memory_gib']['total']:.1f} GiB "
        f"of {plan['budget_gib']:.1f} usable on this GPU, an estimate for eager; compiled keeps less)")
    return plan["micro_batch_size"]

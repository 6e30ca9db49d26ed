"""The optimizers: GPT-3's AdamW, or Muon (torch.optim.Muon) for the blocks' weight matrices with
AdamW for the rest, as one CombinedOptimizer; Float32Muon for CPUs without bf16 matmul units.
Which tensors decay is the model's optimizer_groups; under FSDP, Muon steps each matrix whole
through support/sharded_muon.py's ShardedMuon, passed in by the trainer."""

import inspect
from dataclasses import dataclass

import torch

from model import ConfigError, optimizer_groups


def configure_optimizers(model, weight_decay, learning_rate, device_type, log=print, muon=None, sharded_muon=None):
    """AdamW with GPT-3's betas (0.9, 0.95) and eps 1e-8; the fused kernel on CUDA (one launch
    for all parameters instead of several per tensor) and on the CPU (one pass over each tensor
    instead of six).
    With muon (a MuonConfig), the blocks' weight matrices are trained by torch.optim.Muon
    instead, and the result is a CombinedOptimizer of the two. sharded_muon, for a model whose
    matrices are sharded (FSDP), is the optimizer that runs that Muon on them whole
    (support/sharded_muon.py's ShardedMuon), called as sharded_muon(muon_class, groups, **settings)."""
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    if muon is not None:
        return configure_muon(model, weight_decay, learning_rate, muon, fused, log, sharded_muon)
    groups = optimizer_groups(model, weight_decay)
    for group in groups:
        log(f"optimizer: {len(group['params'])} tensors, {sum(p.numel() for p in group['params']):,} "
            f"parameters {'decayed' if group['params'][0].dim() >= 2 else 'not decayed'} (weight_decay={group['weight_decay']})")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


MUON_MIN_TORCH = "2.9"  # the first torch with torch.optim.Muon


@dataclass
class MuonConfig:
    """torch.optim.Muon's settings for the blocks' weight matrices (Keller Jordan's defaults)."""
    lr: float = 0.02
    momentum: float = 0.95
    weight_decay: float = 0.0
    adjust_lr_fn: str = "original"  # "original": lr x sqrt(max(1, rows/cols)); "match_rms_adamw": 0.2 x sqrt(max dim)
    float32: bool = False  # orthogonalize in float32 (Float32Muon) instead of torch's bfloat16


def muon_params(model):
    """The tensors Muon trains: the 2-D weight matrices inside the transformer blocks (attention's
    query, key, value and output projections, each a matrix of its own, and the MLP's two layers).
    Orthogonalizing an update only means something for
    a matrix that maps one hidden space to another; the embeddings (and the head tied to them)
    are lookup tables over tokens, and biases and gains are vectors, so those stay with AdamW. An
    untied head (untied_head) maps into the vocabulary, not a hidden space: AdamW too, as in
    modded-nanogpt and nanochat. QK-norm and RMSNorm (rmsnorm) have no parameters to train."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and name.startswith("transformer.h.") and p.dim() == 2]


def configure_muon(model, weight_decay, learning_rate, muon, fused, log=print, sharded_muon=None):
    """Muon for muon_params(model), AdamW (as configure_optimizers) for every other tensor. Each
    group carries lr_scale, its peak learning rate over the schedule's (learning_rate): the
    schedule sets lr = lr_at(step) x lr_scale, so Muon follows the same warmup and decay."""
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer=muon needs torch {MUON_MIN_TORCH} or newer (torch.optim.Muon); "
                         f"this is torch {torch.__version__}. Upgrade torch, or use --optimizer=adamw.")
    matrices = muon_params(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    adamw_groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
                    {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    adamw_groups = [group for group in adamw_groups if group["params"]]  # as optimizer_groups: none empty
    log(f"optimizer: Muon for {len(matrices)} block matrices, {sum(p.numel() for p in matrices):,} parameters "
        f"(lr={muon.lr}, momentum={muon.momentum}, weight_decay={muon.weight_decay}, {muon.adjust_lr_fn}); "
        f"AdamW for {len(rest)} tensors (embeddings, biases, gains), {sum(p.numel() for p in rest):,} parameters"
        + (f"; {sharded_muon.__name__}: each matrix gathered whole to one rank and stepped there" if sharded_muon else ""))
    adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    muon_class = Float32Muon if muon.float32 else torch.optim.Muon
    groups = [{"params": matrices, "lr_scale": muon.lr / learning_rate}]
    settings = dict(lr=muon.lr, momentum=muon.momentum, weight_decay=muon.weight_decay, adjust_lr_fn=muon.adjust_lr_fn)
    muon_opt = muon_class(groups, **settings) if sharded_muon is None else sharded_muon(muon_class, groups, **settings)
    return CombinedOptimizer(adamw=adamw, muon=muon_opt)


class _Float32Casts(torch.overrides.TorchFunctionMode):
    """Inside it, Tensor.bfloat16() gives a float32 copy instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.bfloat16:
            return args[0].to(torch.float32, copy=True)
        return func(*args, **(kwargs or {}))


class Float32Muon(torch.optim.Muon if hasattr(torch.optim, "Muon") else torch.optim.Optimizer):
    """torch.optim.Muon with its Newton-Schulz iteration run in float32 instead of bfloat16: torch's
    own iteration, with its one cast to bfloat16 turned into a float32 copy. For CPUs without bf16
    matmul units, where torch multiplies bf16 matrices ~20x slower than fp32 (a 256 x 1024 product:
    320 instead of 15 ms), which made a Muon step of the tiny model take 20 s."""

    def step(self, closure=None):
        with _Float32Casts():
            return super().step(closure)


class CombinedOptimizer:
    """Several optimizers, each over its own parameters, used as one: param_groups lists all their
    groups (a learning-rate schedule sets them all), step and zero_grad run each, and state_dict is
    one plain dict keyed by name, so a checkpoint resumes every part exactly. torch has no such
    container (torchtitan's OptimizersContainer is the same idea)."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise ValueError(f"the saved optimizer state holds {sorted(state)}, this optimizer is "
                             f"{sorted(self.optimizers)}: resume with the --optimizer it was saved with")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])

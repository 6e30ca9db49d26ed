"""The GPT model: GPT-2's architecture, GPT-3's banded attention layers, and the modern GPT's options.

Parameter names match OpenAI/HF GPT-2 (`transformer.h.0.attn.c_proj.weight`, ...), except that the
attention's queries, keys and values are three projections (c_q, c_k, c_v) where GPT-2 has one
fused c_attn: support/hf.py fuses them on the way to GPT-2's format and splits them on the way in.
GPT-3's one change to the architecture, alternating dense and locally banded attention layers, is
the `attention` option (docs/attention.md). The modern GPT's changes (rotary positions, QK-norm,
ReLU², an untied head, a logit soft-cap, zero-initialized projections, no biases, parameter-free
RMSNorm) are the Architecture options, each off by default: ARCHITECTURES["modern"] turns them all
on (docs/architecture.md).

This file works alone: of the project it imports only support/attention_kernels.py, the attention
kernels, which import nothing else of it. How the model trains (the optimizers, the chunked loss,
the presets) lives in support/.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.attention_kernels import attention

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>


def padded_vocab(vocab_size, multiple=64):
    """Round the vocabulary up to a multiple of 64: 50257 -> 50304. The lm_head matmul is the
    largest in a small GPT, and a dimension with many factors of 2 lets the kernels tile it
    evenly (several percent faster on GPUs). The extra ids are never predicted (see GPT.logits)."""
    return math.ceil(vocab_size / multiple) * multiple


# The losses without full logits (support/loss.py in training, GPT.token_losses in evaluation)
# make the logits of this many rows at a time: at GPT-2's vocabulary an fp32 chunk is 51.5 MB, and
# a step holds a few such buffers at once (docs/memory.md: 1,024 rows took the demo to 2.4 GB).
LOSS_CHUNK_ROWS = 256
IGNORE_INDEX = -100  # a target that counts for nothing (F.cross_entropy's default ignore_index)

ATTENTION_PATTERNS = ("dense", "gpt3")  # Shape.attention; banded_layers says which layers band
GPT3_BAND = 256  # GPT-Neo's window: the band of gpt3 attention when none is given (docs/attention.md)


class ConfigError(ValueError):
    """A model that cannot be built as asked (a bad dimension or preset name): a user's mistake,
    which the scripts print as one line."""


# The model's options, written once: GPTConfig and train_gpt.Settings both inherit them, and --help
# shows the comments below. A new option is a field here and the code that uses it.

@dataclass
class Shape:
    """The model's size, context and attention pattern: what a preset sets (support/presets.py)."""
    # the model's shape: gpt2's numbers (GPT-2 124M, the seed's run); another --model preset replaces
    # them with its own (a setting given on the command line still wins)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (64 channels each)
    n_embd: int = 768  # the width of the residual stream
    block_size: int = 1024  # the longest context (GPT-3's presets: 2048)
    # attention: GPT-3 "use[s] alternating dense and locally banded sparse attention patterns in the
    # layers" (Brown et al. 2020, section 2.1): banded_layers attend to the last attention_band positions
    attention: str = "dense"  # dense: every layer causal (GPT-2); gpt3: every other layer banded, as GPT-3 (its presets' default; docs/attention.md)
    attention_band: Optional[int] = None  # gpt3: a banded layer's token sees itself and the band - 1 before it; None: 256 (GPT-Neo's, the paper gives none)


@dataclass
class Architecture:
    """The modern GPT's options. Each default is GPT-2's architecture, so the presets train the
    papers' models, and a checkpoint saved before an option existed (which lacks it) loads as the
    model it was."""
    # architecture (ARCHITECTURES; docs/architecture.md): GPT-2's unless asked. --arch=modern turns
    # every option below on; each can still be set on its own (the command line wins)
    rope: bool = False  # rotary position embeddings on queries and keys, instead of the learned position table
    qk_norm: bool = False  # RMS-normalize each head's queries and keys (no gains) before attention
    relu2: bool = False  # ReLU squared in the MLP instead of GELU
    untied_head: bool = False  # an output head of its own instead of the token embedding (AdamW trains it)
    logit_softcap: float = 0.0  # logits become cap * tanh(logits / cap); 0 = off (modern: 15)
    zero_init: bool = False  # the projections into the residual stream (and an untied head) start at zero
    bias: bool = True  # biases in the linear layers and LayerNorms
    rmsnorm: bool = False  # parameter-free RMSNorm instead of LayerNorm


@dataclass
class ModelOptions(Architecture, Shape):
    """Every option of the model: Shape's fields, then Architecture's."""


ARCH_FIELDS = tuple(f.name for f in fields(Architecture))


@dataclass
class GPTConfig(ModelOptions):
    """The model to build: its options and its vocabulary."""
    vocab_size: int = GPT2_VOCAB_SIZE  # real token ids: 0 .. vocab_size-1
    padded_vocab_size: int = 50304  # rows of the embedding / lm_head; ids past vocab_size are dead

    def __post_init__(self):
        if self.attention_band is None:
            self.attention_band = GPT3_BAND
        for name in ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "attention_band"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for f in fields(Architecture):
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"GPTConfig.{f.name} must be True or False, got {getattr(self, f.name)!r}")
        if isinstance(self.logit_softcap, bool) or not isinstance(self.logit_softcap, (int, float)) \
                or not self.logit_softcap >= 0:
            raise ConfigError(f"logit_softcap must be a number >= 0 (0 = off; nanochat's is 15), got {self.logit_softcap!r}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rope rotates pairs of channels: the head size n_embd/n_head = "
                              f"{self.n_embd // self.n_head} must be even")
        if self.n_embd % self.n_head != 0:
            near = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0 and abs(h - self.n_head) <= 8]
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: every head needs "
                f"n_embd/n_head channels. Pick n_head from {near} or change n_embd.")
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"padded_vocab_size={self.padded_vocab_size} is smaller than "
                             f"vocab_size={self.vocab_size}; use padded_vocab({self.vocab_size}).")
        if self.attention not in ATTENTION_PATTERNS:
            raise ConfigError(f"unknown attention pattern {self.attention!r}: choose one of {', '.join(ATTENTION_PATTERNS)}")


# The named sets of architecture options (--arch). modern: modded-nanogpt's and nanochat's GPT
# (docs/architecture.md); soft-cap 15 is nanochat's.
ARCHITECTURES = {
    "gpt": {},  # GPT-2's and GPT-3's (the defaults)
    "modern": dict(rope=True, qk_norm=True, relu2=True, untied_head=True, logit_softcap=15.0, zero_init=True,
                   bias=False, rmsnorm=True),
}


def arch_changes(config):
    """{option: value} for each architecture option of config that is not GPT-2's (its default)."""
    return {f.name: getattr(config, f.name) for f in fields(Architecture) if getattr(config, f.name) != f.default}


# ----------------------------------------------------------------------------------------------
# GPT-3's attention pattern: dense and locally banded layers

def banded_layers(config):
    """The layers whose attention is banded: none for dense; for gpt3 every other layer from the
    second on (1, 3, 5, ...): the first layer is dense, and with an even number of layers the last
    is banded. That is GPT-Neo's order (global, local, global, ...); the paper says only "alternating"."""
    return list(range(1, config.n_layer, 2)) if config.attention == "gpt3" else []


def layer_band(config, layer):
    """The band of a layer's attention, or None for a dense (causal) layer."""
    return config.attention_band if layer in banded_layers(config) else None


def describe_attention(config, seq_len=None):
    """The attention pattern in words, for the run's log."""
    banded = banded_layers(config)
    if not banded:
        return "attention dense (every layer causal over the whole context)"
    dense = [i for i in range(config.n_layer) if i not in banded]
    note = (f"; the band covers the whole seq_len={seq_len}: this trains as dense"
            if seq_len and config.attention_band >= seq_len else "")
    return (f"attention {config.attention}: {len(banded)} of {config.n_layer} layers banded to the last "
            f"{config.attention_band} tokens ({_layer_list(banded)}), {len(dense)} dense ({_layer_list(dense)}){note}")


def _layer_list(layers):
    return ", ".join(map(str, layers)) if len(layers) <= 4 else f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"


# ----------------------------------------------------------------------------------------------
# The model

def make_norm(config):
    """GPT-2's LayerNorm (a gain, and a bias unless bias=False), or with rmsnorm a parameter-free
    RMSNorm, as nanochat's: x / rms(x), nothing to learn. eps 1e-5 as LayerNorm's (RMSNorm's own
    default is the dtype's eps, 0.0078 in bf16, larger than the mean square of small activations)."""
    if config.rmsnorm:
        return nn.RMSNorm(config.n_embd, eps=1e-5, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


ROPE_BASE = 10000  # RoFormer's (and LLaMA's, nanochat's)


def rotary(x, base=ROPE_BASE):
    """Rotary position embedding (Su et al. 2021, RoFormer) of x: (B, n_head, T, head_size). The
    channel pair (i, i + d/2) at position t is rotated by the angle t * base^(-2i/d). A query at m
    and a key at n rotated so have a dot product that depends on m - n only: attention sees
    relative positions, with no position table. The T x d/2 angles are made at each call (no
    buffer: a model built on the meta device and sharded, as FSDP's, has nothing to fill in)."""
    T, d = x.size(-2), x.size(-1)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, band=None):
        super().__init__()
        # Heads of head_size channels: as many as the projections give this module, all n_head of
        # them, or under tensor parallelism (support/parallelize.py) this rank's share
        self.head_size = config.n_embd // config.n_head
        self.band = band  # None: dense causal; else attention() sees the band positions up to each
        self.rope, self.qk_norm = config.rope, config.qk_norm
        # Queries, keys and values for all heads: three matrices, which Muon orthogonalizes each on
        # its own (GPT-2 fuses them into one, c_attn: see support/hf.py)
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True

    def forward(self, x):
        B, T, _ = x.size()
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (proj(x).view(B, T, -1, self.head_size).transpose(1, 2) for proj in (self.c_q, self.c_k, self.c_v))
        if self.qk_norm:  # unit-RMS queries and keys: the attention logits stay bounded (no gains to learn)
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-5), F.rms_norm(k, (k.size(-1),), eps=1e-5)
        if self.rope:
            q, k = rotary(q), rotary(k)
        y = attention(q, k, v, self.band)  # flash attention on GPUs (dense layers)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, nh, T, hs) -> (B, T, nh x hs)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.relu2 = config.relu2
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True

    def forward(self, x):
        x = self.c_fc(x)
        if self.relu2:  # ReLU squared (So et al. 2021, Primer; modded-nanogpt's)
            return self.c_proj(F.relu(x).square())
        return self.c_proj(F.gelu(x, approximate="tanh"))  # GPT-2 used the tanh GELU


class Block(nn.Module):
    def __init__(self, config, band=None):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, band)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config, seed=0):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))
        if not config.rope:  # rotary positions need no table
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts.update(h=nn.ModuleList([Block(config, layer_band(config, i)) for i in range(config.n_layer)]),
                     ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (as GPT-2): the output projection is the token embedding. One tensor, so
        # one gradient, one optimizer state, and 38M fewer parameters at gpt2 size. untied_head
        # gives the head a matrix of its own (modded-nanogpt: the same loss in ~10% fewer tokens).
        if not config.untied_head:
            self.lm_head.weight = self.transformer.wte.weight
        # The trainer's choices (support/fastpath.py makes them): loss_fn, how the mean loss is
        # computed (support/loss.py's chunked_cross_entropy makes no full logits), and a sparse
        # gradient for the tied embedding (forward). Alone, the model computes nanoGPT's loss.
        self.loss_fn = full_cross_entropy
        self.sparse_embedding_grad = False
        if self.lm_head.weight.device.type != "meta":
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed=0):
        """GPT-2 init: N(0, 0.02) for weights and embeddings, zero biases, unit LayerNorm gains, and
        the two projections that write into the residual stream at 0.02/sqrt(2*n_layer), so the
        stream's variance does not grow with depth (each block adds two of them). With zero_init
        those projections (and an untied head) start at zero instead, as modded-nanogpt's: each
        block starts as the identity, and the first steps shape the stream from the embedding.
        Queries, keys and values are drawn as GPT-2's one (3C, C) matrix, then split: the same
        initial weights as GPT-2's fused layout.

        Every tensor is drawn whole, in a fixed order, from one CPU generator seeded with `seed`,
        then copied in. A CPU generator, whatever the parameters' device: CUDA's draws other
        numbers from the same seed, so a model built on the CPU and moved (DDP) and one
        materialized on the GPU (FSDP) would start apart. A sharded parameter (a DTensor, as FSDP
        makes) keeps only its own shard of the whole, so a model gets the same initial weights
        however it is split across processes and devices. Separate from __init__ so that a model
        built on the meta device can be sharded first."""
        generator = torch.Generator().manual_seed(seed)
        std_residual = 0.02 / math.sqrt(2 * self.config.n_layer)
        kv = []  # a layer's k and v, drawn with its q
        for name, param in self.named_parameters():  # the tied lm_head appears once, as wte
            module = self.get_submodule(name.rsplit(".", 1)[0])
            full = torch.empty(param.shape, dtype=param.dtype)
            residual = getattr(module, "residual_scaled_init", False)
            if name.endswith(".bias"):
                full.zero_()
            elif isinstance(module, nn.LayerNorm):
                full.fill_(1.0)
            elif self.config.zero_init and (residual or module is self.lm_head):
                full.zero_()
            elif name.endswith((".c_k.weight", ".c_v.weight")):
                full = kv.pop(0)
            elif name.endswith(".c_q.weight"):
                C = param.size(0)
                full, *kv = torch.empty(3 * C, C, dtype=param.dtype).normal_(0.0, 0.02, generator=generator).split(C)
            else:
                full.normal_(0.0, std_residual if residual else 0.02, generator=generator)
            if module is self.transformer.wte or module is self.lm_head:
                full[self.config.vocab_size:] = 0.0  # dead rows of the padded vocabulary: inert
            _copy_whole_into(param, full.to(param.device))

    def hidden_states(self, idx, sparse_embedding_grad=False):
        """(B, T) token ids -> (B, T, C) final-LayerNorm activations. sparse_embedding_grad: see
        forward; only for a graph whose loss also goes through the lm_head."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        wte = self.transformer.wte  # the module, where no sparse gradient is asked: tensor parallelism hooks it
        x = F.embedding(idx, wte.weight, sparse=True) if sparse_embedding_grad else wte(idx)
        if not self.config.rope:
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def logits(self, h):
        """(..., C) hidden states -> (..., padded_vocab_size) logits, soft-capped (logit_softcap),
        padded ids at -inf: a padded id then has probability 0, so it is never sampled, scored or
        learned. Where no gradient needs them (evaluation, sampling), the cap is applied in place:
        no (..., V) temporaries."""
        logits = self.lm_head(h)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = softcap(logits, cap) if logits.requires_grad else softcap_(logits, cap)
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits[..., self.config.vocab_size:] = float("-inf")
        return logits

    def forward(self, idx, targets=None, reduction="mean"):
        """(B, T) token ids -> (B, T, padded_vocab_size) logits; given targets (B, T), their loss
        instead (self.loss). With sparse_embedding_grad the tied embedding's gradient holds just
        the B*T rows looked up, and autograd adds it to the lm_head's dense one (where that pays:
        support/fastpath.py); never under torch.compile, which traces no sparse tensors, nor for an
        untied embedding, whose gradient would stay sparse, which AdamW does not take."""
        sparse = (self.sparse_embedding_grad and targets is not None and not self.config.untied_head
                  and not torch.compiler.is_compiling())
        h = self.hidden_states(idx, sparse_embedding_grad=sparse)
        return self.logits(h) if targets is None else self.loss(h, targets, reduction)

    def loss(self, h, targets, reduction="mean"):
        """The cross-entropy of the logits of h (B, T, C) against targets (B, T); a target of
        IGNORE_INDEX counts for nothing. reduction="mean" (training): the mean over the targets,
        computed by self.loss_fn. reduction="none" (evaluation): each position's loss, (B, T) fp32,
        0 where ignored, from the scored rows' logits only (token_losses)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")
        return self.loss_fn(self, h, targets) if reduction == "mean" else self.token_losses(h, targets)

    @torch.compiler.disable  # the scored rows are data: their count is a shape no graph can fix
    def token_losses(self, h, targets):
        """(B, T) fp32 cross-entropy of the logits of h (B, T, C) against targets (B, T), 0 where the
        target is IGNORE_INDEX: what evaluation scores (validation sums it, HellaSwag sums each
        ending's). Only scored rows get logits, LOSS_CHUNK_ROWS at a time, each chunk made by
        self.logits and converted to fp32 on its own, as the full path converts its whole logits:
        the same numbers, without the (B, T, V) logits and their fp32 copy (0.8 GB in fp32 at
        16 x 256 and GPT-2's vocabulary). A target outside the vocabulary is refused with a
        ValueError (check_targets)."""
        flat_h, flat_targets = h.flatten(0, 1), targets.flatten()
        check_targets(flat_targets, self.config.vocab_size)
        losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=h.device)
        for rows in (flat_targets != IGNORE_INDEX).nonzero().squeeze(1).split(LOSS_CHUNK_ROWS):
            logits = self.logits(flat_h[rows]).float()
            losses[rows] = F.cross_entropy(logits, flat_targets[rows], reduction="none")
            del logits  # freed before the next chunk's are made
        return losses.view_as(targets)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
        """Top-k sampling with temperature. idx: (B, T) prompt ids -> (B, T + max_new_tokens).
        Pass a seeded torch.Generator (on idx's device) for reproducible samples."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        top_k = min(top_k, self.config.vocab_size) if top_k else self.config.vocab_size
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self.logits(self.hidden_states(context)[:, -1, :]).float() / temperature
            top_logits, top_ids = torch.topk(logits, top_k, dim=-1)  # padded ids are -inf: never in
            probs = F.softmax(top_logits, dim=-1)
            choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into top_k
            idx = torch.cat([idx, torch.gather(top_ids, -1, choice)], dim=1)
        return idx


def full_cross_entropy(model, h, targets):
    """GPT.loss_fn unless the trainer chooses another: nanoGPT's loss, the mean cross-entropy of the
    full (B, T, padded_vocab_size) logits of h, in fp32."""
    return F.cross_entropy(model.logits(h).flatten(0, 1).float(), targets.flatten())


def softcap(logits, cap):
    """cap * tanh(logits / cap): near the identity for small logits, never beyond +-cap, so no logit
    can grow without bound (Gemma 2, modded-nanogpt, nanochat)."""
    return cap * torch.tanh(logits / cap)


def softcap_(logits, cap):
    """softcap in place, for logits no gradient needs: the same numbers without softcap's
    temporaries, each as large as the logits."""
    return logits.div_(cap).tanh_().mul_(cap)


def _copy_whole_into(param, full):
    """param.copy_(full), where param may be a sharded DTensor: then only its shard is copied."""
    if hasattr(param, "device_mesh"):  # a DTensor
        from torch.distributed.tensor import distribute_tensor
        try:  # every rank holds the same `full`: cut the local shard, no communication
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        except TypeError:  # torch < 2.6: scatter from rank 0 (the same values anyway)
            full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


def check_targets(targets, vocab_size, ignore_index=IGNORE_INDEX):
    """How many targets count (are not ignore_index), refusing any other outside 0..vocab_size-1:
    unchecked, a negative one would pick a probability from the end of the row (and a padded id
    one of 0, an infinite loss), or index past it from inside torch. The answer comes to the host
    (one sync), cheap enough: a few passes over the N targets, each 1/V of one over the logits;
    no wait on the CPU, and on a GPU a wait for the forward queued
    so far, once a call, the GPU idle only while the next kernels launch."""
    counted = targets != ignore_index
    outside = counted & ((targets < 0) | (targets >= vocab_size))
    n_outside, n_counted = torch.stack([outside.sum(), counted.sum()]).tolist()
    if n_outside:
        first = int(outside.nonzero()[0, 0])
        more = f" (and {n_outside - 1} more)" if n_outside > 1 else ""
        raise ValueError(f"target {int(targets[first])} at position {first}{more} is outside the vocabulary: "
                         f"targets are token ids 0..{vocab_size - 1}, or ignore_index={ignore_index} for a "
                         f"position that has none. Make the targets with the model's tokenizer, or pass the "
                         f"ignore_index they use.")
    return n_counted


# ----------------------------------------------------------------------------------------------
# Counting

def num_params(model):
    """Parameters, counting the tied embedding / lm_head once."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config, seq_len):
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):
    6 x the parameters that take part in matmuls (every block weight and bias, the norms' gains
    and biases, and the lm_head; not the token embedding or position table, which are only looked
    up: so an untied head, a second V x C table, adds none, and rotary positions remove none),
    plus attention's QK^T and AV: 2 x 2 x T x C per layer forward, 12 x L x C x T for forward and
    backward (counting the full T x T square, as the PaLM paper and nanoGPT do, though causal
    masking could skip half). A banded layer counts its band's width, min(band, T) keys a query,
    as a dense one counts T. The rotations, QK-norm and soft-cap are elementwise: not counted."""
    L, C, V = config.n_layer, config.n_embd, config.padded_vocab_size
    bias = int(config.bias)
    norm = 0 if config.rmsnorm else (1 + bias) * C  # a LayerNorm's gain (and bias); RMSNorm has none
    per_block = (C * 3 * C + C * C + C * 4 * C + 4 * C * C) + bias * (3 * C + C + 4 * C + C) + 2 * norm
    matmul_params = L * per_block + V * C + norm  # blocks, lm_head, ln_f
    keys = sum(min(layer_band(config, i) or seq_len, seq_len) for i in range(L))  # per query, over the layers
    return 6 * matmul_params + 12 * C * keys


# ----------------------------------------------------------------------------------------------
# Optimizer groups

def optimizer_groups(model, weight_decay):
    """Decay every tensor of 2 or more dimensions (matmul weights, embeddings); never biases or
    LayerNorm gains, which only shift or scale and gain nothing from being pulled to zero. A group
    with no tensors (the modern GPT has no biases or gains) is left out: torch's distributed
    checkpoint cannot load an empty group beside a second optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [group for group in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if group["params"]]

"""The GPT model: GPT-2 architecture, presets for GPT-2 and GPT-3 sizes, optimizer groups.
GPT-3's one change to the architecture, alternating dense and locally banded attention layers, is
the `attention` field of GPTConfig (docs/attention.md).

Parameter names match OpenAI/HF GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...), so GPT-2
weights map one to one (HF stores the four matmul weights transposed; see convert_hf.py).
The modern GPT's changes (rotary positions, QK-norm, ReLU², an untied head, a logit soft-cap,
zero-initialized projections, no biases, parameter-free RMSNorm) are GPTConfig options, each off
by default: ARCHITECTURES["modern"] turns them all on (docs/architecture.md).
This file imports nothing from the rest of the project and works alone.
"""

import functools
import importlib.util
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>


def padded_vocab(vocab_size, multiple=64):
    """Round the vocabulary up to a multiple of 64: 50257 -> 50304. The lm_head matmul is the
    largest in a small GPT, and a dimension with many factors of 2 lets the kernels tile it
    evenly (several percent faster on GPUs). The extra ids are never predicted (see GPT.forward)."""
    return math.ceil(vocab_size / multiple) * multiple


# The losses without full logits (lm_head_cross_entropy in training, GPT.token_losses in evaluation)
# make the logits of this many rows at a time: at GPT-2's vocabulary an fp32 chunk is 206 MB.
LOSS_CHUNK_ROWS = 1024
IGNORE_INDEX = -100  # a target that counts for nothing (F.cross_entropy's default ignore_index)

ATTENTION_PATTERNS = ("dense", "gpt3")  # GPTConfig.attention; banded_layers says which layers band


class ConfigError(ValueError):
    """A model that cannot be built as asked (a bad dimension or preset name): a user's mistake,
    which the scripts print as one line."""


@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest context the position embedding covers
    vocab_size: int = GPT2_VOCAB_SIZE  # real token ids: 0 .. vocab_size-1
    padded_vocab_size: int = 50304  # rows of the embedding / lm_head; ids past vocab_size are dead
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # GPT-3 "use[s] alternating dense and locally banded sparse attention patterns in the layers"
    # (Brown et al. 2020, section 2.1): banded_layers(config) attend to the last attention_band
    # positions only. The paper gives no band: 256 is GPT-Neo's window (docs/attention.md).
    attention: str = "dense"  # dense: every layer causal over the whole context (GPT-2); or gpt3
    attention_band: int = 256  # gpt3: a banded layer's position attends to itself and the band - 1 before it
    # The modern GPT's options (docs/architecture.md). Each default is GPT-2's architecture, so the
    # presets train the papers' model, and a checkpoint saved before a field existed (which lacks
    # it) loads as the model it was.
    rope: bool = False  # rotary position embeddings on queries and keys, instead of the learned position table
    qk_norm: bool = False  # RMS-normalize each head's queries and keys (no gains) before attention
    relu2: bool = False  # the MLP's activation: ReLU squared instead of GELU
    untied_head: bool = False  # the output head is a matrix of its own, not the token embedding
    logit_softcap: float = 0.0  # logits become cap * tanh(logits / cap); 0 = off
    zero_init: bool = False  # the projections into the residual stream (and an untied head) start at zero
    bias: bool = True  # biases in the linear layers and LayerNorms
    rmsnorm: bool = False  # parameter-free RMSNorm instead of LayerNorm

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "attention_band"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ARCH_FIELDS:
            value, default = getattr(self, name), GPTConfig.__dataclass_fields__[name].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f"GPTConfig.{name} must be True or False, got {value!r}")
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


# The GPTConfig fields of the architecture (not its size), and the named sets of them (--arch).
# modern: modded-nanogpt's and nanochat's GPT (docs/architecture.md); soft-cap 15 is nanochat's.
ARCH_FIELDS = ("rope", "qk_norm", "relu2", "untied_head", "logit_softcap", "zero_init", "bias", "rmsnorm")
ARCHITECTURES = {
    "gpt": {},  # GPT-2's and GPT-3's (the defaults)
    "modern": dict(rope=True, qk_norm=True, relu2=True, untied_head=True, logit_softcap=15.0, zero_init=True,
                   bias=False, rmsnorm=True),
}


def arch_changes(config):
    """{option: value} for each architecture option of config that is not GPT-2's (its default)."""
    return {name: getattr(config, name) for name in ARCH_FIELDS
            if getattr(config, name) != GPTConfig.__dataclass_fields__[name].default}


@dataclass(frozen=True)
class Preset:
    """A named model size with the training defaults its paper gives it."""
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    max_lr: float
    batch_tokens: int  # tokens per optimizer step
    train_tokens: int = 0  # the run's token budget
    decay_tokens: int = 0  # the cosine decay reaches min_lr here (then it stays there); 0 = train_tokens
    warmup_tokens: int = 375_000_000  # linear LR warmup (GPT-3: 375M tokens for every size)
    attention: str = "dense"  # GPTConfig.attention: GPT-3's sizes take GPT-3's pattern, gpt3


# GPT-2 sizes train on one epoch of FineWeb-EDU sample-10BT as the seed does: 19,073 steps of
# 2**19 tokens (10B), LR warmup 715 steps (375M), decay over the whole run. GPT-3 sizes as the
# paper (section 2.3 and appendix B): 300B tokens each, warmup over 375M, cosine decay to 10%
# over 260B tokens, then the last 40B at 10%.
GPT2_TOKENS = dict(train_tokens=19_073 * 2**19, warmup_tokens=715 * 2**19)
GPT3_TOKENS = dict(train_tokens=300 * 10**9, decay_tokens=260 * 10**9)
GPT3 = dict(GPT3_TOKENS, attention="gpt3")  # and the paper's attention: every other layer banded


# GPT-2 sizes (Radford et al. 2019) use its 1024 context; their learning rates follow the GPT-3
# model of similar size. GPT-3 sizes are Table 2.1 of Brown et al. 2020: context 2048, batch in
# tokens (0.5M = 2**19 = 256 sequences of 2048) and learning rate. The table has two rows whose
# width is not n_head * d_head: XL lists n_heads=24 with d_model=2048 and d_head=128, and 13B lists
# d_model=5140 with 40 heads of 128. We keep d_head=128 and its products: 16 heads, and 5120 wide.
PRESETS = {
    "gpt2": Preset(12, 12, 768, 1024, 6e-4, 2**19, **GPT2_TOKENS),
    "gpt2-medium": Preset(24, 16, 1024, 1024, 3e-4, 2**19, **GPT2_TOKENS),
    "gpt2-large": Preset(36, 20, 1280, 1024, 2.5e-4, 2**19, **GPT2_TOKENS),
    "gpt2-xl": Preset(48, 25, 1600, 1024, 2e-4, 2**19, **GPT2_TOKENS),
    "gpt3-small": Preset(12, 12, 768, 2048, 6e-4, 2**19, **GPT3),
    "gpt3-medium": Preset(24, 16, 1024, 2048, 3e-4, 2**19, **GPT3),
    "gpt3-large": Preset(24, 16, 1536, 2048, 2.5e-4, 2**19, **GPT3),
    "gpt3-xl": Preset(24, 16, 2048, 2048, 2e-4, 2**20, **GPT3),
    "gpt3-2.7b": Preset(32, 32, 2560, 2048, 1.6e-4, 2**20, **GPT3),
    "gpt3-6.7b": Preset(32, 32, 4096, 2048, 1.2e-4, 2**21, **GPT3),
    "gpt3-13b": Preset(40, 40, 5120, 2048, 1e-4, 2**21, **GPT3),
    "gpt3-175b": Preset(96, 96, 12288, 2048, 6e-5, 1536 * 2048, **GPT3),
    # A CPU-sized model for the offline demo and the tests: same architecture, tiny.
    "tiny": Preset(4, 4, 256, 256, 1e-3, 2**14, train_tokens=150 * 2**14, warmup_tokens=15 * 2**14),
}


def preset_config(name, **overrides):
    """GPTConfig for a named preset; keyword arguments override single fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    fields = dict(n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, block_size=p.block_size, attention=p.attention)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Attention: dense causal, or GPT-3's locally banded layers

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


def band_mask_mod(band):
    """FlexAttention's mask_mod of a band: query position q attends to key position k when
    q - band < k <= q (itself and the band - 1 before it)."""
    def in_band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < band)
    return in_band


def band_mask(T, band, device=None):
    """(T, T) boolean: True where query t attends to key s (band_mask_mod, evaluated whole)."""
    positions = torch.arange(T, device=device)
    return band_mask_mod(band)(None, None, positions[:, None], positions[None, :])


def attention(q, k, v, band=None):
    """Causal self-attention of (B, n_head, T, head_size) q, k, v. band None: each position attends
    to itself and every position before it (scaled_dot_product_attention's is_causal: flash
    attention on GPUs). With a band: to itself and the band - 1 positions before it only. A band
    that covers the whole sequence is dense, and takes the dense path: the same numbers exactly.
    Banded training on CUDA runs FlexAttention with a sliding-window block mask (flex_band_attention:
    the blocks outside the band are skipped); elsewhere, and for evaluation's many shapes on CUDA,
    scaled_dot_product_attention with the boolean band mask (forward and backward on every device,
    every position computed). All give the masked softmax's numbers to rounding (tests/test_attention.py)."""
    T = q.size(-2)
    if band is None or band >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.device.type == "cuda" and torch.is_grad_enabled():
        if HAS_FLEX_ATTENTION:
            return flex_band_attention(q, k, v, band)
        _say_flex_is_missing()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, band, q.device))


# FlexAttention (torch >= 2.6 here): found now, imported when a banded layer first trains on CUDA.
HAS_FLEX_ATTENTION = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
_BAND_BLOCK_MASKS = {}  # (T, band, device) -> BlockMask: made once, read by every banded layer and step


def flex_band_attention(q, k, v, band):
    """FlexAttention over the band: a block mask that lists, for each 128-query block, only the
    key blocks that meet the band, so at T = 2048 with a band of 256 a layer computes 3 of a
    dense causal layer's ~8.5 key blocks per query block on average. flex_attention runs compiled
    (its fused kernel; eagerly it would materialize the scores): inside a compiled model it is
    traced with the model, outside (--compile=False) it is compiled on its own, once per shape."""
    T = q.size(-2)
    key = (T, band, q.device.type, q.device.index)
    block_mask = _BAND_BLOCK_MASKS.get(key)
    if block_mask is None:
        block_mask = _BAND_BLOCK_MASKS[key] = band_block_mask(T, band, q.device)
    from torch.nn.attention.flex_attention import flex_attention
    flex = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return flex(q, k, v, block_mask=block_mask)


def band_block_mask(T, band, device):
    """The BlockMask of a band over a sequence of T (create_block_mask over band_mask_mod). Under
    torch.compile the first call is traced into the graph, which then stores the mask in
    flex_band_attention's cache; the guard on that cache recompiles once, and from then on the
    graph reads the stored mask: no graph break, no mask rebuilt a step (seen on torch 2.13, CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(band_mask_mod(band), None, None, T, T, device=device)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _say_flex_is_missing():
    warnings.warn(f"banded attention on CUDA wants FlexAttention (torch >= 2.6); torch {torch.__version__} has "
                  f"none, so banded layers compute every position, masked: the same numbers, without the speed-up")


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
        self.n_head = config.n_head
        self.band = band  # None: dense causal; else attention() sees the band positions up to each
        self.rope, self.qk_norm = config.rope, config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:  # unit-RMS queries and keys: the attention logits stay bounded (no gains to learn)
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-5), F.rms_norm(k, (k.size(-1),), eps=1e-5)
        if self.rope:
            q, k = rotary(q), rotary(k)
        y = attention(q, k, v, self.band)  # flash attention on GPUs (dense layers)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
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
        # Training on the CPU sets this (train_gpt.build_model): see forward.
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

        Every tensor is drawn whole, in a fixed order, from one CPU generator seeded with `seed`,
        then copied in. A CPU generator, whatever the parameters' device: CUDA's draws other
        numbers from the same seed, so a model built on the CPU and moved (DDP) and one
        materialized on the GPU (FSDP) would start apart. A sharded parameter (a DTensor, as FSDP
        makes) keeps only its own shard of the whole, so a model gets the same initial weights
        however it is split across processes and devices. Separate from __init__ so that a model
        built on the meta device can be sharded first."""
        generator = torch.Generator().manual_seed(seed)
        std_residual = 0.02 / math.sqrt(2 * self.config.n_layer)
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
        x = F.embedding(idx, self.transformer.wte.weight, sparse=sparse_embedding_grad)
        if not self.config.rope:
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def logits(self, h):
        """(..., C) hidden states -> (..., padded_vocab_size) logits, soft-capped (logit_softcap),
        padded ids at -inf: a padded id then has probability 0, so it is never sampled, scored or
        learned."""
        logits = self.lm_head(h)
        if self.config.logit_softcap:
            logits = softcap(logits, self.config.logit_softcap)
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits[..., self.config.vocab_size:] = float("-inf")
        return logits

    def forward(self, idx, targets=None, return_logits=True, reduction="mean"):
        """Returns (logits, loss). loss is the mean cross-entropy over the targets, or None; a
        target of -100 (F.cross_entropy's ignore_index) is left out, in both ways of computing it.
        With return_logits=False (training) the loss is computed in row chunks and the full
        (B, T, vocab) logits are never materialized: see lm_head_cross_entropy. reduction="none"
        (evaluation) makes loss the (B, T) fp32 loss of each position instead, 0 where ignored;
        with return_logits=False from chunks of rows too (token_losses)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")
        # The token embedding is the lm_head's weight, so its gradient is the sum of the two
        # uses'. The embedding's dense backward zeroes a whole (V, C) fp32 table (155 MB at gpt2
        # size) to scatter B*T rows into, and autograd then adds that table to the lm_head's
        # gradient. With sparse_embedding_grad the embedding's gradient holds just the B*T rows;
        # autograd adds it to the lm_head's dense one, and the sum is dense, as AdamW needs. That
        # pays on the CPU (docs/performance.md); the trainer turns it on there. Never under
        # torch.compile, which traces no sparse tensors. Only for the tied embedding: an untied
        # one's gradient would stay sparse, which AdamW does not take.
        sparse = (self.sparse_embedding_grad and not self.config.untied_head and targets is not None
                  and not torch.compiler.is_compiling())
        h = self.hidden_states(idx, sparse_embedding_grad=sparse)
        if targets is None:
            return self.logits(h), None
        if return_logits:
            logits = self.logits(h)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
            return logits, loss if reduction == "mean" else loss.view_as(targets)
        if reduction == "none":
            return None, self.token_losses(h, targets)
        loss = lm_head_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                     self.config.vocab_size, softcap=self.config.logit_softcap)
        return None, loss

    @torch.compiler.disable  # the scored rows are data: their count is a shape no graph can fix
    def token_losses(self, h, targets):
        """(B, T) fp32 cross-entropy of the logits of h (B, T, C) against targets (B, T), 0 where the
        target is IGNORE_INDEX: what evaluation scores (validation sums it, HellaSwag sums each
        ending's). Only scored rows get logits, LOSS_CHUNK_ROWS at a time, each chunk made by
        self.logits and converted to fp32 on its own, as the full path converts its whole logits:
        the same numbers, without the (B, T, V) logits and their fp32 copy (0.8 GB in fp32 at
        16 x 256 and GPT-2's vocabulary). A target outside the vocabulary is refused with a
        ValueError, as lm_head_cross_entropy refuses it."""
        flat_h, flat_targets = h.flatten(0, 1), targets.flatten()
        _count_targets(flat_targets, self.config.vocab_size, IGNORE_INDEX)
        losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=h.device)
        for rows in (flat_targets != IGNORE_INDEX).nonzero().squeeze(1).split(LOSS_CHUNK_ROWS):
            logits = self.logits(flat_h[rows]).float()
            losses[rows] = F.cross_entropy(logits, flat_targets[rows], reduction="none")
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


def softcap(logits, cap):
    """cap * tanh(logits / cap): near the identity for small logits, never beyond +-cap, so no logit
    can grow without bound (Gemma 2, modded-nanogpt, nanochat)."""
    return cap * torch.tanh(logits / cap)


def _copy_whole_into(param, full):
    """param.copy_(full), where param may be a sharded DTensor: then only its shard is copied."""
    if hasattr(param, "device_mesh"):  # a DTensor
        from torch.distributed.tensor import distribute_tensor
        try:  # every rank holds the same `full`: cut the local shard, no communication
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        except TypeError:  # torch < 2.6: scatter from rank 0 (the same values anyway)
            full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


# ----------------------------------------------------------------------------------------------
# Training loss without the full logits

class _LMHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight.T) against targets, computed chunk by chunk of rows.

    The full logits are N x V (at B=8, T=256 with V=50304 that is 400 MB in fp32, and again as
    their gradient). Here each chunk's logits are made, turned into the loss and straight away
    into the gradients of h and weight (d loss / d logits = softmax - onehot), then dropped. The
    backward pass only scales the saved gradients, so nothing is computed twice. Without a
    gradient to make (under torch.no_grad, or no input needing one) only the loss is computed.

    On the CPU the passes over a chunk's n x V logits cost as much as its matmuls, so there are
    few: a fused softmax (fp32 inside, also for bf16 logits: the same values as the fp32 softmax
    rounded once to bf16, as autocast's full-logits path produces), and for bf16 one read-only row
    sum. That sum is what keeps the target's entry exact: in bf16 a probability above ~0.998 rounds
    to 1, so p - 1 would be 0 for every confident target. Instead 1 - p is the fp32 sum of the
    other probabilities (each exact to bf16 rounding), so the target's entry -(1 - p) is as exact as
    autocast's fp32 p - 1 rounded to bf16, and its loss -log1p(-(1 - p)) as exact too. A target
    less likely than fp32's smallest normal number (a loss above ~87.3 for that token) counts as
    87.3: finite, where its probability is 0.

    With a soft-cap (softcap > 0) the logits are cap * tanh(z / cap) of the matmul's z, and the
    gradient through it is (softmax - onehot) * (1 - tanh^2), one n x V buffer more per chunk (the
    tanh, kept until that product).

    An ignored target (ignore_index) drops its row from the loss and from both gradient products:
    its target is read as id 0, and its rows of xc and of the gradient of h are zeroed after (n x C
    each, not another n x V pass). The mean is over the `counted` targets. With none ignored (as in
    training) none of that runs."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_size, compute_dtype, need_grad, ignore_index, counted,
                softcap):
        N = h.size(0)
        x, w = h.to(compute_dtype), weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # the loss and weight-gradient sums
        loss_sum = torch.zeros((), dtype=acc, device=h.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = None
        masked = counted < N  # some targets are ignored
        for s in range(0, N, chunk_size):
            xc, tc = x[s:s + chunk_size], targets[s:s + chunk_size]
            if masked:
                ignored = tc == ignore_index
                tc = tc.masked_fill(ignored, 0)
            logits = xc @ w.t()  # (n, V)
            if softcap:
                tanh = logits.div_(softcap).tanh_()  # in place: z's buffer becomes tanh(z / cap)
                logits = tanh * softcap
            if logits.size(1) > vocab_size:
                logits[:, vocab_size:] = float("-inf")  # padded ids: probability 0
            probs = torch.softmax(logits, dim=1)
            del logits  # freed before the gradient products are made: one n x V buffer at a time
            log_p = _target_log_probs(probs, tc, acc, need_grad)  # probs[target] = p - 1 if need_grad
            loss_sum -= (log_p.masked_fill(ignored, 0.0) if masked else log_p).sum()
            if need_grad:
                if softcap:  # through the cap: d(cap tanh(z / cap)) / dz = 1 - tanh^2; as probs - probs * tanh^2,
                    probs.addcmul_(probs, tanh.square_(), value=-1.0)  # two passes over the n x V buffers, not four
                torch.mm(probs, w, out=grad_x[s:s + chunk_size])
                if masked:
                    grad_x[s:s + chunk_size].masked_fill_(ignored[:, None], 0.0)
                    xc = xc.masked_fill(ignored[:, None], 0.0)  # so the weight's product leaves the row out
                grad_w = _add_product(grad_w, probs.t(), xc, acc)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.scale = 1.0 / max(counted, 1)  # none counted: the gradients are zeros, as F.cross_entropy's
            ctx.dtypes = (h.dtype, weight.dtype)
        return loss_sum / counted  # none counted: 0 / 0, NaN, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        g = grad_loss * ctx.scale
        return (_scaled(grad_x, g, ctx.dtypes[0]), _scaled(grad_w, g, ctx.dtypes[1])) + (None,) * 8


def _target_log_probs(probs, targets, acc, make_grad):
    """log p(target) of each row of the (n, V) softmax probs, in acc (fp32 at least); with
    make_grad, also turn probs into d loss / d logits in place (the target's entry minus 1)."""
    rows = torch.arange(targets.size(0), device=targets.device)
    p = probs[rows, targets].to(acc)
    tiny = torch.finfo(acc).tiny
    if probs.dtype == acc:  # fp32 / fp64: p - 1 is exact enough in the softmax's own precision
        if make_grad:
            probs[rows, targets] -= 1.0
        return p.clamp_min(tiny).log()
    probs[rows, targets] = 0.0
    rest = probs.sum(dim=1, dtype=acc)  # 1 - p, from the other probabilities: exact where p is near 1
    if make_grad:
        probs[rows, targets] = (-rest).to(probs.dtype)
    return torch.where(p > 0.5, torch.log1p(-rest.clamp_max(1.0 - 2**-24)), p.clamp_min(tiny).log())


def _scaled(grad, g, dtype):
    """grad * g as dtype: a bf16 gradient is converted, then scaled in place (one buffer, not two)."""
    return grad * g if grad.dtype == dtype else grad.to(dtype).mul_(g)


def _add_product(total, a, b, acc):
    """total + a @ b. The first product is kept as it comes (one chunk: no extra pass); from the
    second on the sum is carried in acc (fp32 at least), so bf16 products are not summed in bf16."""
    if total is None:
        return a @ b
    if total.dtype != acc:
        total = total.to(acc)
    return total.addmm_(a, b) if a.dtype == acc else total.add_(a @ b)


def lm_head_cross_entropy(h, weight, targets, vocab_size, chunk_size=LOSS_CHUNK_ROWS, ignore_index=IGNORE_INDEX,
                          softcap=0.0):
    """Mean cross-entropy of the logits h @ weight.T (soft-capped to softcap * tanh(. / softcap)
    when softcap > 0), equal to F.cross_entropy on the full logits (ids past vocab_size masked) to
    fp32 rounding. h: (N, C), weight: (V, C), targets: (N,).
    Under autocast the matmuls run in the autocast dtype, the softmax in fp32, as F.cross_entropy
    would be run. A target equal to ignore_index (F.cross_entropy's default, -100) counts for
    nothing, as there: the mean is over the others (NaN, with zero gradients, if none is left).
    Any other target outside 0..vocab_size-1 is refused with a ValueError."""
    counted = _count_targets(targets, vocab_size, ignore_index)
    device_type = h.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device_type=device_type, enabled=False):
        return _LMHeadCrossEntropy.apply(h, weight, targets, vocab_size, chunk_size, compute_dtype, need_grad,
                                         ignore_index, counted, softcap)


def _count_targets(targets, vocab_size, ignore_index):
    """How many targets count (are not ignore_index), refusing any other outside 0..vocab_size-1:
    unchecked, a negative one would pick a probability from the end of the row (and a padded id
    one of 0, an infinite loss), or index past it from inside torch. The answer comes to the host
    (one sync), cheap enough: a few passes over the N targets, each 1/V of one over the logits;
    no wait on the CPU, where the trainer uses this loss, and on a GPU a wait for the forward queued
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
# Optimizer

def optimizer_groups(model, weight_decay):
    """Decay every tensor of 2 or more dimensions (matmul weights, embeddings); never biases or
    LayerNorm gains, which only shift or scale and gain nothing from being pulled to zero."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
    for name, group in zip(("decayed", "not decayed"), groups):
        log(f"optimizer: {len(group['params'])} tensors, {sum(p.numel() for p in group['params']):,} "
            f"parameters {name} (weight_decay={group['weight_decay']})")
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
    qkv and projection, the MLP's two layers). Orthogonalizing an update only means something for
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

"""The model presets (--model): GPT-2's and GPT-3's sizes with the training numbers their papers
give them, and a tiny model for the CPU. GPT-3's come from the paper's Table 2.1, copied below as
printed."""

from dataclasses import dataclass

from model import ConfigError, GPTConfig


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


# Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1: "Sizes, architectures, and
# learning hyper-parameters (batch size in tokens and learning rate) of the models which we trained.
# All models were trained for a total of 300 billion tokens." Every model's context is 2048 tokens.
GPT3_TABLE_2_1 = {
    #              n_params  n_layers  d_model  n_heads  d_head  batch size  learning rate
    "gpt3-small": ("125M", 12, 768, 12, 64, "0.5M", 6.0e-4),
    "gpt3-medium": ("350M", 24, 1024, 16, 64, "0.5M", 3.0e-4),
    "gpt3-large": ("760M", 24, 1536, 16, 96, "0.5M", 2.5e-4),
    "gpt3-xl": ("1.3B", 24, 2048, 24, 128, "1M", 2.0e-4),
    "gpt3-2.7b": ("2.7B", 32, 2560, 32, 80, "1M", 1.6e-4),
    "gpt3-6.7b": ("6.7B", 32, 4096, 32, 128, "2M", 1.2e-4),
    "gpt3-13b": ("13.0B", 40, 5140, 40, 128, "2M", 1.0e-4),
    "gpt3-175b": ("175.0B", 96, 12288, 96, 128, "3.2M", 0.6e-4),
}
# The batch sizes in whole sequences of 2048: 0.5M = 256 of them (2**19 tokens), 3.2M = 1536.
BATCH_TOKENS = {"0.5M": 2**19, "1M": 2**20, "2M": 2**21, "3.2M": 1536 * 2048}
GPT3_CONTEXT = 2048

# GPT-2 sizes train on one epoch of FineWeb-EDU sample-10BT as the seed does: 19,073 steps of
# 2**19 tokens (10B), LR warmup 715 steps (375M), decay over the whole run. GPT-3 sizes as the
# paper (section 2.3 and appendix B): 300B tokens each, warmup over 375M, cosine decay to 10%
# over 260B tokens, then the last 40B at 10%.
GPT2_TOKENS = dict(train_tokens=19_073 * 2**19, warmup_tokens=715 * 2**19)
GPT3_TOKENS = dict(train_tokens=300 * 10**9, decay_tokens=260 * 10**9)


def gpt3_preset(n_params, n_layers, d_model, n_heads, d_head, batch, lr):
    """A row of Table 2.1 as a Preset, with the paper's attention: every other layer banded. Two rows
    have a width that is not n_heads x d_head: XL lists 24 heads with d_model=2048 and d_head=128,
    and 13B d_model=5140 with 40 heads of 128. We keep d_head and the width it divides: XL gets
    2048 // 128 = 16 heads, 13B 5140 // 128 = 40 heads, 5120 wide."""
    heads = d_model // d_head
    return Preset(n_layers, heads, heads * d_head, GPT3_CONTEXT, lr, BATCH_TOKENS[batch], attention="gpt3",
                  **GPT3_TOKENS)


# GPT-2 sizes (Radford et al. 2019) use its 1024 context; their learning rates follow the GPT-3
# model of similar size.
PRESETS = {
    "gpt2": Preset(12, 12, 768, 1024, 6e-4, 2**19, **GPT2_TOKENS),
    "gpt2-medium": Preset(24, 16, 1024, 1024, 3e-4, 2**19, **GPT2_TOKENS),
    "gpt2-large": Preset(36, 20, 1280, 1024, 2.5e-4, 2**19, **GPT2_TOKENS),
    "gpt2-xl": Preset(48, 25, 1600, 1024, 2e-4, 2**19, **GPT2_TOKENS),
    **{name: gpt3_preset(*row) for name, row in GPT3_TABLE_2_1.items()},
    # A CPU-sized model for the offline demo and the tests: same architecture, tiny.
    "tiny": Preset(4, 4, 256, 256, 1e-3, 2**14, train_tokens=150 * 2**14, warmup_tokens=15 * 2**14),
}


def preset_config(name, **overrides):
    """GPTConfig for a named preset; keyword arguments override single fields (None: the preset's)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    fields = dict(n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, block_size=p.block_size, attention=p.attention)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**fields)

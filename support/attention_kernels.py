"""The attention kernels behind the model's one call, attention(q, k, v, band): dense causal
attention (flash attention on GPUs), and GPT-3's locally banded layers, as FlexAttention with a
sliding-window block mask (training on CUDA; the block masks made once and kept) or as a masked
scaled_dot_product_attention (everywhere else).

model.py imports this module, so it imports nothing else of the project (tests/test_layout.py).
"""

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F


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

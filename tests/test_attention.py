"""GPT-3's attention pattern (--attention=gpt3): dense causal layers alternating with layers banded
to the last attention_band positions. The CPU's path against the masked softmax written out,
forward and backward; FlexAttention's block mask (the CUDA path) on the CPU's forward; where the
gradient can flow; the layers chosen; the presets and settings; FLOPs by hand; sampling against
the full forward; and a training run's log line. tools/gpu_check.sh compares the CUDA kernel."""

import dataclasses
import math

import pytest
import torch

import model
import train_gpt
from conftest import tiny_args, train_losses
from model import GPT, GPTConfig, banded_layers, flops_per_token
from support import hf
from support.attention_kernels import attention, band_block_mask
from support.presets import PRESETS, preset_config
from support.cli import SettingsError
from support.settings import resolve_model_settings

pytestmark = pytest.mark.usefixtures("one_thread")
BANDED = GPTConfig(block_size=64, n_layer=4, n_head=2, n_embd=32, attention="gpt3", attention_band=8)


def reference_attention(q, k, v, band):
    """softmax(q k^T / sqrt(d) over the keys t - band < s <= t) v, in float64, written out."""
    q, k, v = q.double(), k.double(), v.double()
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    allowed = torch.tensor([[t - band < s <= t for s in range(T)] for t in range(T)])
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def qkv(B=2, H=3, T=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("band", [1, 7, 16])
def test_cpu_path_equals_the_masked_softmax_forward_and_backward(band):
    q, k, v = qkv()
    out = attention(q, k, v, band)
    ref = reference_attention(q, k, v, band)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for got, want in zip(grads, ref_grads):  # float32 both: the reference's float64, rounded at the leaves
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_flex_attention_block_mask_equals_the_masked_softmax_on_the_cpu_forward():
    """The CUDA path's pieces, band_mask_mod and band_block_mask, through FlexAttention's eager
    forward (the CPU has no FlexAttention backward): the reference's numbers, and only the key
    blocks that meet the band are listed (the ones the kernel computes)."""
    from torch.nn.attention.flex_attention import flex_attention
    T, band = 512, 100
    q, k, v = (t.detach() for t in qkv(B=1, H=2, T=T, D=16))
    block_mask = band_block_mask(T, band, "cpu")
    with pytest.warns(UserWarning):  # eager flex: "unfused", slow, fine for a test
        out = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, band), atol=1e-5, rtol=0)
    # 128-token blocks: query block i meets key blocks i-1 and i (a band of 100 < 128), never more
    blocks = block_mask.kv_num_blocks + (block_mask.full_kv_num_blocks if block_mask.full_kv_num_blocks is not None else 0)
    assert blocks.flatten().tolist() == [1, 2, 2, 2]


def test_a_band_that_covers_the_sequence_is_dense_exactly():
    x = torch.randint(0, 50257, (2, 64))
    dense = GPT(dataclasses.replace(BANDED, attention="dense"), seed=3)
    for band in (64, 1000):
        banded = GPT(dataclasses.replace(BANDED, attention_band=band), seed=3)
        assert torch.equal(banded(x), dense(x))
    assert not torch.equal(GPT(BANDED, seed=3)(x), dense(x))  # a band of 8 changes them


def test_a_banded_layer_sees_only_its_band_and_a_dense_layer_everything_before():
    """Gradient of layer l's output at position t with respect to the layer's inputs: zero before
    t - band + 1 in a banded layer (and after t in every layer), nonzero there in a dense one."""
    gpt = GPT(BANDED, seed=1)
    t, band = 40, BANDED.attention_band
    x = torch.randn(1, 64, BANDED.n_embd, requires_grad=True)
    for layer, block in enumerate(gpt.transformer.h):
        (grad,) = torch.autograd.grad(block.attn(x)[0, t].sum(), x)
        seen = grad[0].abs().sum(dim=1) > 0
        assert not seen[t + 1:].any()
        assert seen[t - band + 1:t + 1].all()
        if layer in banded_layers(BANDED):
            assert not seen[:t - band + 1].any(), layer
        else:
            assert seen[:t - band + 1].all(), layer


def test_the_odd_layers_are_banded_as_documented():
    assert banded_layers(dataclasses.replace(BANDED, n_layer=12)) == [1, 3, 5, 7, 9, 11]
    assert banded_layers(dataclasses.replace(BANDED, n_layer=5)) == [1, 3]
    assert banded_layers(dataclasses.replace(BANDED, attention="dense")) == []
    assert [block.attn.band for block in GPT(BANDED).transformer.h] == [None, 8, None, 8]
    assert model.describe_attention(preset_config("gpt3-small"), 2048) == (
        "attention gpt3: 6 of 12 layers banded to the last 256 tokens (1, 3, ..., 11), 6 dense (0, 2, ..., 10)")
    assert "this trains as dense" in model.describe_attention(BANDED, 8)


def test_gpt3_presets_band_gpt2_presets_and_tiny_do_not():
    for name, preset in PRESETS.items():
        config = preset_config(name)
        assert config.attention == ("gpt3" if name.startswith("gpt3") else "dense"), name
        assert config.attention_band == 256
    pattern = lambda *argv: resolve_model_settings(train_gpt.parse_settings(list(argv))).attention
    assert pattern() == pattern("--model=tiny") == pattern("--model=gpt2-xl") == "dense"
    assert pattern("--model=gpt3-small") == pattern("--model=gpt3-175b") == "gpt3"
    assert pattern("--model=gpt3-small", "--attention=dense") == "dense"  # a dense GPT-3: one flag
    s = train_gpt.parse_settings(["--model=gpt3-xl", "--attention_band=512"])
    assert resolve_model_settings(s).attention_band == 512 and s.attention_band == 512


@pytest.mark.parametrize("argv, message", [
    (["--attention=sparse"], "unknown --attention='sparse'; choose one of: dense, gpt3"),
    (["--attention_band=128"], "model is dense (--attention=dense): give --attention=gpt3, or no band"),
    (["--model=gpt3-small", "--attention=dense", "--attention_band=128"], "model is dense"),
    (["--model=gpt3-small", "--attention_band=0"], "--attention_band must be positive"),
])
def test_bad_attention_settings_are_refused_in_one_line(argv, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model_settings(train_gpt.parse_settings(argv))


def test_flops_per_token_count_a_banded_layer_by_its_band():
    """gpt3-small at T = 2048: 6 x 123,689,472 matmul parameters (gpt2's, test_bench), and per
    token 12 x 768 x (6 dense layers x 2048 keys + 6 banded x 256): 869,538,816."""
    params = 6 * 123_689_472
    assert flops_per_token(preset_config("gpt3-small"), 2048) == params + 12 * 768 * (6 * 2048 + 6 * 256) == 869_538_816
    assert flops_per_token(preset_config("gpt3-small", attention="dense"), 2048) == params + 12 * 12 * 768 * 2048
    assert flops_per_token(preset_config("gpt3-small"), 128) == params + 12 * 12 * 768 * 128  # band > T: T


def perturbed(config, seed):
    """A GPT with its weights moved off their init: an untrained one predicts one token everywhere."""
    gpt = GPT(config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return gpt


def test_generate_past_the_band_gives_what_the_full_banded_forward_gives():
    """Greedy sampling (top_k=1) of 40 tokens after a 4-token prompt, band 8: each token is the
    full banded forward's argmax over the sequence so far. The same weights dense give the same
    logits inside the first band only."""
    gpt, prompt = perturbed(BANDED, 2), torch.tensor([[464, 2068, 7586, 21831]])
    band = BANDED.attention_band
    with torch.no_grad():
        out = gpt.generate(prompt, 40, top_k=1)
        logits = gpt(out[:, :-1])
        assert torch.equal(logits[0, 3:].argmax(-1), out[0, 4:])
        dense = perturbed(dataclasses.replace(BANDED, attention="dense"), 2)(out[:, :-1])
    real = slice(0, BANDED.vocab_size)
    torch.testing.assert_close(dense[0, :band, real], logits[0, :band, real], atol=1e-4, rtol=0)
    assert ((dense[0, band:, real] - logits[0, band:, real]).abs().amax(-1) > 0.1).all()


def test_hf_export_refuses_a_banded_model_in_one_line(tmp_path):
    assert hf.not_plain_gpt2(dataclasses.replace(BANDED, attention="dense", attention_band=8)) == []
    with pytest.raises(hf.cli.BadInput, match=r"not plain GPT-2 \(attention='gpt3' \(GPT-2: 'dense'\), "
                                              r"attention_band=8 \(GPT-2: 256\)\)") as refused:
        hf.export_hf(GPT(BANDED), BANDED, str(tmp_path / "out"))
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_gpt3_small_trains_logs_its_pattern_evaluates_and_resumes_with_it(shards, tmp_path, capsys):
    """gpt3-small's pattern on tiny dimensions (band 8 of 32): the model line names it; training,
    validation and the samples (40 tokens, past the band) run; the checkpoint keeps the pattern, a
    run stopped at step 2 resumes to the same step-4 weights, and a resume as dense is refused."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = dict(model="gpt3-small", attention_band=8, max_steps=4, val_every=2, sample_every=4, checkpoint_every=2)
    train_gpt.main(tiny_args(shards, straight, **args))
    printed = capsys.readouterr().out
    assert "attention gpt3: 1 of 2 layers banded to the last 8 tokens (1), 1 dense (0)" in printed
    assert "val loss" in printed and "sample 0:" in printed and len(train_losses(straight)) == 4
    saved = torch.load(f"{straight}/ckpt_0000004.pt", weights_only=True)
    assert (saved["model_config"]["attention"], saved["model_config"]["attention_band"]) == ("gpt3", 8)
    train_gpt.main(tiny_args(shards, resumed, stop_step=2, **args))
    with pytest.raises(SystemExit, match="the checkpoint's model has attention=gpt3, these settings give dense"):
        train_gpt.main(tiny_args(shards, resumed, **dict(args, model="tiny", attention_band=None)))
    train_gpt.main(tiny_args(shards, resumed, **args))
    assert "resumed from" in capsys.readouterr().out
    assert train_losses(resumed) == train_losses(straight)
    weights = torch.load(f"{resumed}/ckpt_0000004.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], saved["model"][k]) for k in weights)

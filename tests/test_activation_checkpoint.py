"""Activation checkpointing: the same losses and weights, bit for bit, and less memory."""

import dataclasses
import os

import pytest
import torch

from tools import plan
import train_gpt
from support.activation_checkpoint import apply_activation_checkpointing, checkpointed_blocks
from conftest import tiny_args, train_losses
from model import GPT, GPTConfig
from support.loss import chunked_cross_entropy
from support.optim import configure_optimizers
from support import evals

CONFIG = GPTConfig(block_size=64, vocab_size=512, padded_vocab_size=512, n_layer=4, n_head=2, n_embd=64)


def train_three_steps(mode, compile_backend=None, config=CONFIG):
    """Losses and final weights of 3 AdamW steps on fixed batches."""
    model = GPT(config, seed=0)
    model.loss_fn = chunked_cross_entropy
    apply_activation_checkpointing(model, mode)
    step_model = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = configure_optimizers(model, 0.1, 1e-2, "cpu", log=lambda m: None)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        x = torch.randint(0, 512, (4, 64), generator=gen)
        loss = step_model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.state_dict()


def test_blocks_chosen_per_mode():
    assert checkpointed_blocks(5, "none") == []
    assert checkpointed_blocks(5, "selective") == [1, 3]
    assert checkpointed_blocks(5, "full") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="none, selective, full"):
        checkpointed_blocks(5, "some")


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_bit_identical_losses_and_weights_with_clean_names(one_thread, mode):
    ref_losses, ref_state = train_three_steps("none")
    losses, state = train_three_steps(mode)
    assert losses == ref_losses
    assert list(state) == list(ref_state)  # no wrapper prefixes: checkpoints stay interchangeable
    assert all(torch.equal(state[k], ref_state[k]) for k in state)


def test_compiled_graph_with_checkpointing_gives_the_same_losses(one_thread):
    """Dynamo and AOTAutograd trace the checkpointed blocks (aot_eager: the graph capture of
    torch.compile without inductor's code generation, which takes minutes on this CPU)."""
    two_blocks = dataclasses.replace(CONFIG, n_layer=2)
    ref_losses, ref_state = train_three_steps("none", "aot_eager", two_blocks)
    losses, state = train_three_steps("full", "aot_eager", two_blocks)
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in state)


def test_fsdp_run_with_full_checkpointing_equals_without(shards, tmp_path, one_thread):
    """train_gpt end to end on FSDP2 (a group of one): the recipe's own wiring. Losses and the
    final weights (its sharded checkpoint) bit for bit."""
    runs, models = {}, {}
    for mode in ("none", "full"):
        log_dir = str(tmp_path / mode)
        train_gpt.main(tiny_args(shards, log_dir, fsdp=True, activation_checkpointing=mode, max_steps=3,
                                 val_every=0, checkpoint_every=100))
        runs[mode] = train_losses(log_dir)
        models[mode] = evals.load_checkpoint_model(os.path.join(log_dir, "ckpt_0000003"))
    assert len(runs["full"]) == 3 and runs["full"] == runs["none"]
    full, none = models["full"].state_dict(), models["none"].state_dict()
    assert list(full) == list(none) and all(torch.equal(full[k], none[k]) for k in none)
    untrained = GPT(models["none"].config).state_dict()  # as load_checkpoint builds it, before the shards fill it
    assert not torch.equal(none["lm_head.weight"], untrained["lm_head.weight"])  # the trained weights were read


def test_a_bad_mode_is_refused_before_training(shards, tmp_path):
    with pytest.raises(SystemExit, match="activation_checkpointing='half'"):
        train_gpt.main(tiny_args(shards, str(tmp_path), activation_checkpointing="half"))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_lowers_the_measured_peak(one_thread, mode):
    """Measured with the CPU allocator's own records (plan.measure_peak_bytes)."""
    def peak(mode):
        model = GPT(CONFIG, seed=0)
        model.loss_fn = chunked_cross_entropy
        apply_activation_checkpointing(model, mode)
        x = torch.randint(0, 512, (8, 64))
        return plan.measure_peak_bytes(lambda: model(x, x).backward(), model)
    none, less = peak("none"), peak(mode)
    # the activations are the part that changes: a block keeps ~20 (B, T, C) tensors, so at
    # B x T = 512, C = 64 that is ~2.6 MB for 4 blocks, against 0.9 MB of weights and gradients
    assert less < none - (0.3 if mode == "selective" else 0.6) * 2**20, (none, less)


def test_banded_attention_compiled_and_checkpointed_trains_as_eager(one_thread):
    """GPT-3's pattern (layer 1 banded to 16 of 64) through Dynamo and AOTAutograd, every block
    recomputed: the eager model's losses (to rounding) and weights."""
    banded = dataclasses.replace(CONFIG, n_layer=2, attention="gpt3", attention_band=16)
    ref_losses, ref_state = train_three_steps("none", None, banded)
    losses, state = train_three_steps("full", "aot_eager", banded)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], atol=1e-5, rtol=1e-4)
    dense_losses, _ = train_three_steps("none", None, dataclasses.replace(banded, attention="dense"))
    assert abs(dense_losses[-1] - losses[-1]) > 1e-4  # the band changed the training

import json
import os
import sys
import tempfile

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_shards(folder, n_train=3, train_tokens=20_000, val_tokens=8_000, seed=0, vocab=50257):
    """Token shards in the seed's .npy layout. The tokens follow a simple pattern (a noisy
    counter) so that a model can learn something from them."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)

    def tokens(n):
        base = np.cumsum(rng.integers(1, 4, n)) % 512
        return np.where(rng.random(n) < 0.1, rng.integers(0, vocab, n), base).astype(np.uint16)

    np.save(os.path.join(folder, "test_val_000000.npy"), tokens(val_tokens))
    for i in range(n_train):
        np.save(os.path.join(folder, f"test_train_{i + 1:06d}.npy"), tokens(train_tokens))
    return folder


@pytest.fixture(scope="session", autouse=True)
def session_tempdir(tmp_path_factory):
    """Every temporary file of the session under pytest's own temporary folder, which a passing
    session removes (pytest.ini): torchrun's torchelastic_* log folders, tiktoken's cache, bench's
    shards, ... in this process and in the processes it starts (they inherit TMPDIR)."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield folder
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards")))


# A model and batch small enough that a training step takes a few milliseconds on the CPU.
TINY = dict(model="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, micro_batch_size=4,
            total_batch_size=4 * 32 * 2, max_lr=3e-3, warmup_steps=2, max_steps=10, val_every=5,
            val_tokens=2048, hellaswag_every=0, sample_every=0, checkpoint_every=5, device="cpu",
            dtype="float32", peak_flops=1e12)  # MFU against a given peak: measuring the CPU's matmul
# rate would cost each run 1-2 s (the suite's several hundred runs: minutes); tests/test_cli.py and
# tests/test_bench.py measure it.


def tiny_args(data_dir, log_dir, **overrides):
    values = dict(TINY, data_dir=data_dir, log_dir=log_dir)
    values.update(overrides)
    return [f"--{k}={v}" for k, v in values.items()]


def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(log_dir):
    """The train loss of each step (the last logged, should a step appear twice)."""
    return {e["step"]: e["train_loss"] for e in read_metrics(log_dir) if "train_loss" in e and not e.get("skipped")}


def assert_chunked_loss_equals_full_logits(model, x, y):
    """The model's chunked loss (support/loss.py's, the trainer's choice) against its full logits'
    cross-entropy (the model's own): the loss to 1e-5 and every parameter's gradient to 1e-6 (1e-4
    relative)."""
    from support.loss import chunked_cross_entropy
    ref = model(x, y)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    model.loss_fn = chunked_cross_entropy
    chunked = model(x, y)
    grads = torch.autograd.grad(chunked, list(model.parameters()))
    assert abs(chunked.item() - ref.item()) < 1e-5
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


class TensorsMade(TorchDispatchMode):
    """Counts the tensors of at least min_numel elements that ops make inside it: outputs in new
    memory (a view, an in-place op or an out= argument returns a tensor given to it: not counted)."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel, self.count = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def tensors(tree):
            return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        given = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        self.count += sum(t.numel() >= self.min_numel and t.untyped_storage().data_ptr() not in given
                          for t in tensors(out))
        return out


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: a second thread gains nothing, and on a busy 2-core machine
    OpenMP threads wait on each other (seen: one test 3 s with 1 thread, 22 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A training run that signals itself: python -c SIGNAL_AT SIGNAL RANK CALL ARGS... sends SIGNAL (a
# name such as SIGTERM, or KILL_PARENT: SIGKILL to its launcher) from rank RANK in its CALL-th
# training forward (counted from 1), then trains on as the signal lets it.
SIGNAL_AT = """
import os, signal, sys
import model, train_gpt
real_forward, calls = model.GPT.forward, [0]
def forward(self, *args, **kwargs):
    if self.training:
        calls[0] += 1
        if os.environ.get("RANK", "0") == sys.argv[2] and calls[0] == int(sys.argv[3]):
            if sys.argv[1] == "KILL_PARENT":  # the launcher dies (torchrun SIGKILLed)
                os.kill(os.getppid(), signal.SIGKILL)
            else:
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real_forward(self, *args, **kwargs)
model.GPT.forward = forward
train_gpt.main(sys.argv[4:])
"""


class FusedAttention(torch.nn.Module):
    """model.py's attention as it was before q, k and v were split (main at 2ae6f76): GPT-2's one
    c_attn projection. Put in place of model.CausalSelfAttention, it builds models, and so writes
    checkpoints, of the fused layout, as the code before wrote them (the same initial weights)."""

    def __init__(self, config, band=None):
        super().__init__()
        self.n_head, self.band, self.rope, self.qk_norm = config.n_head, band, config.rope, config.qk_norm
        self.c_attn = torch.nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True

    def forward(self, x):
        import model
        from support.attention_kernels import attention
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if self.qk_norm:
            q, k = torch.nn.functional.rms_norm(q, (q.size(-1),), eps=1e-5), torch.nn.functional.rms_norm(k, (k.size(-1),), eps=1e-5)
        if self.rope:
            q, k = model.rotary(q), model.rotary(k)
        return self.c_proj(attention(q, k, v, self.band).transpose(1, 2).contiguous().view(B, T, C))

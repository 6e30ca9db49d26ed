"""evaluate.py: validation loss, HellaSwag, sampling, checkpoint loading and the CLI, on tiny models.
The distributed checks run 2 real gloo processes (DDP-style and FSDP2-sharded)."""

import dataclasses
import functools
import gc
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from support.runtime import free_port
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from support import checkpoint  # noqa: E402
import evaluate  # noqa: E402
from dataloader import ValidationData  # noqa: E402
from fineweb import gpt2_tokenizer  # noqa: E402
from model import ARCHITECTURES, GPT, LOSS_CHUNK_ROWS, GPTConfig  # noqa: E402
from support import evals
from conftest import TensorsMade

TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)  # real GPT-2 vocabulary sizes
SMALL_VOCAB = dict(TINY, vocab_size=100, padded_vocab_size=128)
TINY_V = GPTConfig(**TINY).padded_vocab_size
T, N_WINDOWS = 16, 7  # 7 validation windows: 2 ranks get 4 and 3 (+1 padding row)

ENDINGS = ["walks the dog in the park.", "bakes a chocolate cake.", "paints the fence bright red.",
           "reads a long book about ships."]
CONTEXTS = ["Every morning at seven, Anna", "On rainy Sundays my grandfather",
            "Before the summer party, the neighbours", "In the quiet library, a student",
            "After lunch, the tall man", "When the sun comes out, Maria"]


def hellaswag_set():
    """Official-format examples where every ending is right for some context and wrong for
    others, so only a model that reads the context can score 1.0."""
    examples = []
    for i, ctx in enumerate(CONTEXTS):
        label, correct = i % 4, ENDINGS[i % 4]
        endings = [e for e in ENDINGS if e != correct]
        endings.insert(label, correct)
        examples.append(dict(ind=i, activity_label="Test", ctx_a=ctx, ctx_b="", ctx=ctx, endings=endings,
                             source_id=f"test~{i}", split="val", split_type="indomain", label=label))
    return examples


def write_jsonl(path, examples):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)


def tiny_model(seed=0, noise=0.0, **config):
    """A tiny GPT; noise adds N(0, noise) to every weight so that logits differ by O(1) between
    tokens (a freshly initialized GPT is almost uniform: near-ties everywhere)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(config or TINY)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
        model.transformer.wte.weight[model.config.vocab_size:] = 0
    return model


def all_rows(examples, block_size=TINY["block_size"]):
    """Every example's 4 token rows and ending starts, in one list each (as hellaswag batches them)."""
    rows, starts = [], []
    for e in examples:
        r, s = evals.render_example(e, gpt2_tokenizer(), block_size)
        rows += r
        starts += s
    return rows, starts


@functools.lru_cache(maxsize=None)
def trained_state():
    """Weights of a tiny GPT overfit (50 AdamW steps, ~2 s) on each context + its right ending."""
    model, examples = tiny_model(), hellaswag_set()
    all_r, all_s = all_rows(examples)
    right = [4 * i + e["label"] for i, e in enumerate(examples)]
    rows, starts = [all_r[i] for i in right], [all_s[i] for i in right]
    x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    y = torch.full_like(x, -1)
    for i, (r, s) in enumerate(zip(rows, starts)):
        x[i, :len(r)] = torch.tensor(r)
        y[i, s - 1:len(r) - 1] = torch.tensor(r[s:])  # learn the ending only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(50):
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_model():
    model = GPT(GPTConfig(**TINY))
    model.load_state_dict(trained_state())
    return model


def write_val_shard(data_dir, vocab_size, seed=0):
    os.makedirs(data_dir, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, vocab_size, T * N_WINDOWS + 5).astype(np.uint16)
    np.save(os.path.join(data_dir, "test_val_000000.npy"), tokens)
    return ValidationData(data_dir, T, T * N_WINDOWS)


def direct_mean_ce(model, data, amp_dtype=None):
    """The mean cross-entropy of all validation windows in one forward, no batching or ranks, from
    the full logits (fp32 softmax, as val_loss: over 50k logits it is itself only good to ~1e-5 per
    token), under bf16 autocast with amp_dtype."""
    windows = torch.stack([torch.from_numpy(s.read(o, T + 1).astype(np.int64)) for s, o in data.windows])
    with torch.no_grad(), evals.autocast(torch.device("cpu"), amp_dtype):
        logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten()).item()


def reference_predictions(model, examples):
    """build-nanogpt's method, one unpadded row at a time: (pred, pred_norm) per example."""
    tokenizer, preds = gpt2_tokenizer(), []
    for e in examples:
        rows, starts = evals.render_example(e, tokenizer, model.config.block_size)
        sums, avgs = [], []
        for row, start in zip(rows, starts):
            with torch.no_grad():
                logits = model(torch.tensor([row]))
            losses = F.cross_entropy(logits[0, start - 1:-1], torch.tensor(row[start:]), reduction="none")
            sums.append(losses.sum().item())
            avgs.append(losses.mean().item())
        preds.append((int(np.argmin(sums)), int(np.argmin(avgs))))
    return preds


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------------------------
# Validation loss

# The architectures whose logits come out differently: GPT-2's, the modern GPT's (soft-capped, untied
# head, ...) and GPT-3's banded attention (a band shorter than the windows)
ARCHS = dict(gpt={}, modern=ARCHITECTURES["modern"], banded=dict(attention="gpt3", attention_band=6))
DTYPES = dict(fp32=None, bf16=torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_val_loss_equals_direct_mean_at_any_batch_size(tmp_path, arch, dtype):
    """Validation's chunked per-token losses against the mean over one forward's full logits."""
    model = tiny_model(noise=0.1, **SMALL_VOCAB, **ARCHS[arch])
    data = write_val_shard(str(tmp_path), 100)
    direct = direct_mean_ce(model, data, DTYPES[dtype])
    for batch_size in (2, 3, N_WINDOWS):
        assert evals.val_loss(model, data, batch_size, amp_dtype=DTYPES[dtype]) == pytest.approx(direct, rel=1e-5)
    assert model.training  # restored


def test_val_loss_under_bf16_autocast_is_close(tmp_path):
    model = tiny_model(noise=0.1, **SMALL_VOCAB)
    data = write_val_shard(str(tmp_path), 100)
    fp32 = evals.val_loss(model, data, 4)
    bf16 = evals.val_loss(model, data, 4, amp_dtype=torch.bfloat16)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)


# Evaluation's batches, large enough for several of the loss's chunks of rows
CHUNKED = dict(TINY, vocab_size=1000, padded_vocab_size=1024)
ROWS = 2 * LOSS_CHUNK_ROWS + 512


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_token_losses_equal_cross_entropy_of_the_full_logits(arch, dtype):
    """Each position's loss from chunks of the scored rows equals F.cross_entropy of the full
    logits in fp32, 0 where the target is -1 (a whole padding row, a row's first positions)."""
    model = tiny_model(noise=0.1, **CHUNKED, **ARCHS[arch])
    B = ROWS // TINY["block_size"]
    x, targets = torch.randint(0, 1000, (2, B, TINY["block_size"]))
    targets[3] = -1
    targets[0, :10] = -1
    with torch.no_grad(), evals.autocast(torch.device("cpu"), DTYPES[dtype]):
        got = evals.token_losses(model, x, targets)
        logits = model(x)
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    assert got.dtype == torch.float32 and (got[3] == 0).all() and (got[0, :10] == 0).all()
    torch.testing.assert_close(got, want.view_as(got), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # not an index error from inside torch
        evals.token_losses(model, x, targets.masked_fill(targets == 5, 1010))


def test_evaluation_never_makes_the_full_logits(tmp_path):
    """Validation and HellaSwag make no tensor as large as a batch's logits (rows x V), in any
    dtype: every op's output is watched below autograd, log-softmax's included. The largest is
    one chunk's logits, as the model's loss makes them."""
    model = tiny_model(noise=0.1, **CHUNKED)
    V, T_val = CHUNKED["padded_vocab_size"], TINY["block_size"]
    os.makedirs(tmp_path / "val")
    np.save(tmp_path / "val" / "test_val_000000.npy", np.random.default_rng(0).integers(0, 1000, ROWS + 1, dtype=np.uint16))
    data = ValidationData(str(tmp_path / "val"), T_val, ROWS)
    rows, _ = all_rows(hellaswag_set())
    hellaswag_positions = len(rows) * -(-max(map(len, rows)) // 16) * 16  # one forward, padded as ending_losses
    with LargestTensor() as validation:
        evals.val_loss(model, data, ROWS // T_val)  # one batch of every window
    with LargestTensor() as hellaswag:
        evals.hellaswag(tiny_model(noise=0.1), hellaswag_set(), batch_size=len(CONTEXTS))  # GPT-2's ids: one forward
    assert validation.numel == LOSS_CHUNK_ROWS * V < ROWS * V
    assert hellaswag.numel < hellaswag_positions * TINY_V


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_soft_caps_the_logits_in_place(dtype):
    """A soft-capped model's evaluation makes no more chunk-sized (rows, V) tensors than an
    uncapped one: without a gradient the cap is applied in place. Its three out-of-place ops made
    three more a chunk, and they grew the float32 demo's RSS by 0.3 GB (docs/memory.md)."""
    x, y = torch.randint(0, 1000, (4, 64)), torch.randint(0, 1000, (4, 64))  # 256 rows: one chunk
    made, losses = {}, {}
    for cap in (0.0, 15.0):
        model = tiny_model(noise=0.1, **CHUNKED, logit_softcap=cap)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            with TensorsMade(min_numel=LOSS_CHUNK_ROWS * CHUNKED["padded_vocab_size"]) as tensors:
                losses[cap] = evals.token_losses(model, x, y)
            with torch.enable_grad():
                want = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none")
        torch.testing.assert_close(losses[cap].flatten(), want, rtol=1e-5, atol=1e-5)  # the cap still applies
        made[cap] = tensors.count
    assert made[15.0] == made[0.0] > 0


def test_scoring_drops_autocasts_weight_copies_before_the_loss(tmp_path):
    """Under bf16 autocast, no bf16 copy of a weight is alive when the loss's log-softmax runs:
    autocast would otherwise keep one of every weight to the end of the forward's region."""
    model = tiny_model(noise=0.1, **SMALL_VOCAB)
    data = write_val_shard(str(tmp_path), 100)
    weight_shapes = {p.shape for p in model.parameters() if p.dim() == 2}
    with LiveWeightCasts(weight_shapes) as casts:
        evals.val_loss(model, data, 4, amp_dtype=torch.bfloat16)
        evals.hellaswag(tiny_model(noise=0.1), hellaswag_set()[:2], amp_dtype=torch.bfloat16)
    assert casts.made > 0 and casts.alive_at_loss == [0] * len(casts.alive_at_loss) != []


class LiveWeightCasts(TorchDispatchMode):
    """Counts bf16 copies of tensors shaped as weights (autocast's casts) still alive each time
    a log-softmax runs."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.casts, self.made, self.alive_at_loss = shapes, [], 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._log_softmax.default:
            self.alive_at_loss.append(sum(ref() is not None for ref in self.casts))
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == torch.bfloat16 and out.shape in self.shapes:
            self.casts.append(weakref.ref(out))
            self.made += 1
        return out


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in elements) any aten op returns inside it."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


# ----------------------------------------------------------------------------------------------
# HellaSwag scoring

def test_hellaswag_picks_the_endings_a_model_prefers():
    before = evals.hellaswag(tiny_model(), hellaswag_set())
    after = evals.hellaswag(trained_model(), hellaswag_set(), batch_size=4)
    assert after == dict(acc=1.0, acc_norm=1.0, n=len(CONTEXTS))
    assert before["acc_norm"] < 1.0  # the untrained model cannot read these contexts


def test_hellaswag_batched_and_padded_matches_one_row_at_a_time():
    model, examples = tiny_model(seed=1, noise=0.2), hellaswag_set()
    preds = reference_predictions(model, examples)
    want = dict(acc=np.mean([p == e["label"] for (p, _), e in zip(preds, examples)]),
                acc_norm=np.mean([p == e["label"] for (_, p), e in zip(preds, examples)]), n=len(examples))
    assert 0 < want["acc"] < 1 or 0 < want["acc_norm"] < 1  # a mixed result: a real comparison
    for batch_size in (1, 4, 16):
        assert evals.hellaswag(model, examples, batch_size=batch_size) == pytest.approx(want)


def test_padding_does_not_change_ending_losses():
    model = tiny_model(seed=2, noise=0.2)
    rows, starts = all_rows(hellaswag_set())
    assert len({len(r) for r in rows}) > 3  # rows really are padded to different extents
    with torch.no_grad():
        batched, counts = evals.ending_losses(model, rows, starts, torch.device("cpu"), None)
        for i, (row, start) in enumerate(zip(rows, starts)):
            alone, n = evals.ending_losses(model, [row], [start], torch.device("cpu"), None)
            assert batched[i].item() == pytest.approx(alone.item(), rel=1e-5)
            assert counts[i] == n == len(row) - start


def test_long_examples_lose_context_from_the_left():
    example = dict(ctx=" ".join(["word"] * 200), endings=["a b c"] * 4, label=0)
    rows, starts = evals.render_example(example, gpt2_tokenizer(), 16)
    ending = gpt2_tokenizer().encode(" a b c")
    for row, start in zip(rows, starts):
        assert len(row) == 16 and row[start:] == ending and start == 16 - len(ending)
    result = evals.hellaswag(tiny_model(block_size=16, n_layer=1, n_head=2, n_embd=32), [example])
    assert result["n"] == 1


def test_hellaswag_same_counts_when_compiled():
    model, examples = trained_model(), hellaswag_set()[:3]
    compiled_model = torch.compile(model)
    eager = evals.hellaswag(model, examples, batch_size=3)
    compiled = evals.hellaswag(compiled_model, examples, batch_size=3)  # one shape: one compile
    assert compiled == eager == dict(acc=1.0, acc_norm=1.0, n=3)
    rows, starts = all_rows(examples)
    with torch.no_grad():  # the same batch shape again: the compiled graph is reused
        want, _ = evals.ending_losses(model, rows, starts, torch.device("cpu"), None)
        got, _ = evals.ending_losses(compiled_model, rows, starts, torch.device("cpu"), None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# HellaSwag download

def test_hellaswag_download_once_then_cached(tmp_path, monkeypatch, no_proxy):
    served = tmp_path / "server"
    write_jsonl(str(served / "hellaswag_val.jsonl"), hellaswag_set())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hellaswag_{{split}}.jsonl"
        monkeypatch.setattr(evals, "HELLASWAG_URL", url)
        cache = tmp_path / "cache"
        assert evals.hellaswag_examples(str(cache)) == hellaswag_set()
    finally:
        server.shutdown()
        server.server_close()
    assert os.listdir(cache) == ["hellaswag_val.jsonl"]  # no temp file left
    assert evals.hellaswag_examples(str(cache)) == hellaswag_set()  # server gone: the cached copy


def test_hellaswag_offline_error_is_fast_and_says_what_to_do(tmp_path, monkeypatch, no_proxy):
    monkeypatch.setattr(evals, "HELLASWAG_URL", f"http://127.0.0.1:{free_port()}/hellaswag_{{split}}.jsonl")
    cache = tmp_path / "cache"
    t0 = time.time()
    with pytest.raises(ConnectionError, match="could not download HellaSwag") as err:
        evals.hellaswag_examples(str(cache))
    assert time.time() - t0 < 5
    assert "hellaswag_val.jsonl" in str(err.value) and str(cache) in str(err.value) and "curl" in str(err.value)
    assert not os.path.exists(cache) or os.listdir(cache) == []
    with pytest.raises(FileNotFoundError, match="hellaswag_val.jsonl is missing"):
        evals.hellaswag_examples(str(cache), download=False)


def test_hellaswag_rejects_a_malformed_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(dict(ctx="a", endings=["b", "c"], label=0)) + "\n")
    with pytest.raises(ValueError, match=r"hellaswag_val.jsonl:1: not a HellaSwag example"):
        evals.hellaswag_examples(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Sampling

class RecordingTokenizer:
    """The GPT-2 tokenizer, remembering every id it is asked to decode."""

    def __init__(self):
        self.inner, self.decoded = gpt2_tokenizer(), []

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        self.decoded += ids
        return self.inner.decode(ids)


def padded_rows_win_model():
    """A model whose padded vocabulary rows would win every step if they were not masked: the
    final LayerNorm outputs the constant direction d, and the padded rows of wte (= lm_head) are
    100 * d."""
    model = tiny_model()
    with torch.no_grad():
        d = torch.zeros(TINY["n_embd"])
        d[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(d)
        model.transformer.wte.weight[model.config.vocab_size:] = 100 * d
    return model


def test_sampling_never_emits_padded_ids_and_is_reproducible():
    model, tokenizer = padded_rows_win_model(), RecordingTokenizer()
    with torch.no_grad():  # the construction works: unmasked, a padded id would be the argmax
        assert model.lm_head(model.transformer.ln_f.bias).argmax() >= model.config.vocab_size
    prompt = "Hello, I'm a language model,"
    first = evals.sample_text(model, tokenizer, prompt, num_samples=3, max_new_tokens=20, seed=7)
    assert len(tokenizer.decoded) == 3 * (len(tokenizer.encode(prompt)) + 20)
    assert max(tokenizer.decoded) < model.config.vocab_size
    assert all(text.startswith(prompt) for text in first)
    assert evals.sample_text(model, tokenizer, prompt, num_samples=3, max_new_tokens=20, seed=7) == first
    assert evals.sample_text(model, tokenizer, prompt, num_samples=3, max_new_tokens=20, seed=8) != first
    assert model.training


def test_sampling_needs_a_prompt():
    with pytest.raises(ValueError, match="prompt is empty"):
        evals.sample_text(tiny_model(), gpt2_tokenizer(), prompt="")


# ----------------------------------------------------------------------------------------------
# Checkpoints and the command line

def save_checkpoint(model, path):
    """A checkpoint file as training writes it (trimmed: no optimizer, data or RNG state)."""
    checkpoint.save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                          "step": 3}, str(path))


def test_load_checkpoint_file_and_sharded_folder(tmp_path):
    """checkpoint.py's two layouts; the sharded one as one process reads it (a folder written by
    2 real FSDP ranks is read in test_two_ranks_sharded_checkpoint_loads_in_one_process). And a
    folder written before attention's q, k and v were split (GPT-2's fused c_attn): read whole,
    then split."""
    import torch.distributed.checkpoint as dcp
    from support.fused_qkv import fuse_model_state
    model = tiny_model(noise=0.1)
    save_checkpoint(model, tmp_path / "ckpt_0000003.pt")
    for folder, state in (("ckpt_0000003", model.state_dict()), ("fused/ckpt_0000003", fuse_model_state(model.state_dict()))):
        dcp.save({"model": state, "optimizer": {}}, checkpoint_id=str(tmp_path / folder))
        checkpoint.save_file({"model_config": dataclasses.asdict(model.config), "step": 3},
                             str(tmp_path / folder / "extra.pt"))
    x = torch.randint(0, 50257, (2, 10))
    want = model(x)
    for path in (tmp_path / "ckpt_0000003.pt", tmp_path / "ckpt_0000003", tmp_path / "fused" / "ckpt_0000003"):
        loaded = evals.load_checkpoint_model(str(path), "cpu")
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
        assert torch.equal(loaded(x), want)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint file or sharded checkpoint folder"):
        evals.load_checkpoint_model(str(tmp_path / "nope.pt"))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="lacks 'model' or 'model_config'"):
        evals.load_checkpoint_model(str(tmp_path / "other.pt"))


def test_cli_runs_val_hellaswag_and_samples(tmp_path, capsys):
    model = trained_model()
    save_checkpoint(model, tmp_path / "model.pt")
    data = write_val_shard(str(tmp_path / "data"), 50257)
    write_jsonl(str(tmp_path / "hs" / "hellaswag_val.jsonl"), hellaswag_set())
    results = evaluate.main([f"--checkpoint={tmp_path / 'model.pt'}", "--val", f"--data_dir={tmp_path / 'data'}",
                             f"--val_tokens={T * N_WINDOWS}", f"--seq_len={T}", "--hellaswag",
                             f"--hellaswag_dir={tmp_path / 'hs'}", "--sample", "--num_samples=2",
                             "--max_new_tokens=5", "--device=cpu", "--dtype=float32"])
    assert results["val_loss"] == pytest.approx(direct_mean_ce(model, data), rel=1e-6)
    assert results["hellaswag_acc_norm"] == 1.0 and results["hellaswag_n"] == len(CONTEXTS)
    out = capsys.readouterr().out
    assert "val_loss" in out and "hellaswag acc_norm 1.0000" in out and out.count("sample: ") == 2
    with pytest.raises(SystemExit):
        evaluate.main([f"--checkpoint={tmp_path / 'model.pt'}"])  # nothing to do


def test_every_command_that_reads_a_checkpoint_verifies_it_as_a_resume_does(shards, tmp_path, capsys):
    """8 bytes overwritten inside a checkpoint's weights, its .sha256 beside it: torch alone loads
    it, and evaluate.py printed a plausible val_loss. Now evaluate.py (the real command),
    convert_hf.py export and train_gpt.py --init_from refuse it in one line, as a resume does. A
    NaN in the weights, saved with a valid checksum, is refused too (training never saves one); a
    file without its checksum record (written before checksums) loads, with a warning."""
    import convert_hf
    import train_gpt
    from conftest import ROOT, tiny_args
    path = str(tmp_path / "ckpt_0000003.pt")
    save_checkpoint(tiny_model(noise=0.1), path)
    write_val_shard(str(tmp_path / "data"), 50257)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)  # inside the token embedding, most of the file
        f.write(b"\x7f" * 8)
    assert torch.load(path, weights_only=True)["step"] == 3
    run = subprocess.run([sys.executable, "evaluate.py", f"--checkpoint={path}", "--val",
                          f"--data_dir={tmp_path / 'data'}", f"--seq_len={T}", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    damaged = (f"checkpoint {path} does not match the checksum written with it (damaged or changed on disk): use "
               f"another checkpoint of its run, or an intact copy of this one")
    assert (run.returncode, run.stdout, run.stderr) == (1, "", f"evaluate.py: error: {damaged}\n")
    for main, args, prog in ((convert_hf.main, ["export", path, str(tmp_path / "hf")], "convert_hf.py"),
                             (train_gpt.main, tiny_args(shards, str(tmp_path / "log"), block_size=64,
                                                        init_from=path), "train_gpt.py")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == f"{prog}: error: {damaged}"
    assert not os.path.exists(tmp_path / "hf")

    model = tiny_model(noise=0.1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_checkpoint(model, path)
    with pytest.raises(SystemExit) as e:
        evaluate.main([f"--checkpoint={path}", "--sample"])
    assert "holds NaN/Inf in 1 weight tensors (e.g. ['transformer.h.0.mlp.c_fc.weight'])" in e.value.code
    save_checkpoint(tiny_model(noise=0.1), path)
    os.remove(path + checkpoint.CHECKSUM_SUFFIX)
    capsys.readouterr()
    assert torch.equal(evals.load_checkpoint_model(path).lm_head.weight, tiny_model(noise=0.1).lm_head.weight)
    assert capsys.readouterr().err == (f"warning: {path} has no checksum ({path}.sha256 is missing: written before "
                                       f"checksums?): loaded it unverified\n")


# ----------------------------------------------------------------------------------------------
# Two ranks: plain (every rank holds the model, as under DDP) and sharded with FSDP2

def distributed_worker(rank, tmp, port):
    torch.set_num_threads(1)  # two workers on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        distributed_checks(rank, tmp)
    finally:
        # The FSDP model, its mesh and the optimizer hold the process group. Freed here (their
        # hooks form reference cycles, hence the collection), the group is really destroyed now;
        # left to interpreter exit, a gloo thread releasing tensors then aborted the process
        # (seen in about 1 run of 10).
        gc.collect()
        dist.destroy_process_group()


def distributed_checks(rank, tmp):
    """Evaluation on two ranks: plain, then FSDP-sharded; results to tmp/rank{rank}.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = GPT(GPTConfig(**TINY))
    model.load_state_dict(torch.load(os.path.join(tmp, "model.pt"), weights_only=True))
    data = ValidationData(os.path.join(tmp, "data"), T, T * N_WINDOWS)
    examples = evals.hellaswag_examples_distributed(rank, os.path.join(tmp, "hs"), download=False)
    results = dict(val=evals.val_loss(model, data, 2, rank, 2),
                   hellaswag=evals.hellaswag(model, examples[:5], rank, 2, batch_size=2))
    mesh = init_device_mesh("cpu", (2,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    results.update(
        fsdp_val=evals.val_loss(model, data, 3, rank, 2),
        fsdp_hellaswag=evals.hellaswag(model, examples[:5], rank, 2, batch_size=2),
        fsdp_samples=evals.sample_text(model, gpt2_tokenizer(), max_new_tokens=6, num_samples=2))
    # a sharded checkpoint as train_gpt.py writes it, and the full weights it should hold
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_state, optim_state = get_state_dict(model, optimizer)
    checkpoint.save_sharded({"model": model_state, "optimizer": optim_state, "step": 7,
                             "model_config": dataclasses.asdict(model.config)},
                            os.path.join(tmp, "ckpt_0000007"), rank)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(tmp, "fsdp_full.pt"))
    evals.HELLASWAG_URL = f"http://127.0.0.1:{free_port()}/hellaswag_{{split}}.jsonl"  # nothing listens
    try:
        evals.hellaswag_examples_distributed(rank, os.path.join(tmp, "empty"))
    except ConnectionError as e:
        results["download_error"] = str(e)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist"))
    model = tiny_model(seed=3, noise=0.2)
    torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
    write_val_shard(os.path.join(tmp, "data"), 50257)
    write_jsonl(os.path.join(tmp, "hs", "hellaswag_val.jsonl"), hellaswag_set())
    with pytest.MonkeyPatch.context() as mp_env:
        for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            mp_env.delenv(var, raising=False)  # the spawned workers must reach 127.0.0.1 directly
        context = mp.start_processes(distributed_worker, args=(tmp, free_port()), nprocs=2, join=False,
                                     start_method="spawn")
    deadline = time.time() + 120
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two gloo workers hung for 2 minutes (a collective one rank never reached?)")
    ranks = []
    for r in range(2):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    return model, ValidationData(os.path.join(tmp, "data"), T, T * N_WINDOWS), ranks, tmp


def test_two_ranks_val_loss_equals_one_process(two_ranks):
    model, data, ranks, _ = two_ranks
    single = evals.val_loss(model, data, 4)
    assert single == pytest.approx(direct_mean_ce(model, data), rel=1e-6)
    for r in ranks:
        assert r["val"] == pytest.approx(single, rel=1e-6)
        assert r["fsdp_val"] == pytest.approx(single, rel=1e-6)


def test_two_ranks_hellaswag_counts_equal_one_process(two_ranks):
    model, _, ranks, _ = two_ranks
    single = evals.hellaswag(model, hellaswag_set()[:5], batch_size=2)
    assert single["n"] == 5
    for r in ranks:  # 5 examples: rank 0 scores 3, rank 1 scores 2 and runs one dummy forward
        assert r["hellaswag"] == pytest.approx(single)
        assert r["fsdp_hellaswag"] == pytest.approx(single)


def test_two_ranks_sharded_sampling_and_download_failure(two_ranks):
    model, _, ranks, _ = two_ranks
    single = evals.sample_text(model, gpt2_tokenizer(), max_new_tokens=6, num_samples=2)
    assert ranks[0]["fsdp_samples"] == ranks[1]["fsdp_samples"] == single
    assert "could not download HellaSwag" in ranks[0]["download_error"]  # rank 0 tried
    assert "reported by another rank" in ranks[1]["download_error"]  # rank 1 was told, did not hang


def test_two_ranks_sharded_checkpoint_loads_in_one_process(two_ranks):
    model, _, _, tmp = two_ranks
    full = torch.load(os.path.join(tmp, "fsdp_full.pt"), weights_only=True)
    loaded = evals.load_checkpoint_model(os.path.join(tmp, "ckpt_0000007"), "cpu")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, full[name]) and torch.equal(tensor, model.state_dict()[name]), name
    # damaged: a shard's bytes changed (its manifest says so), and a shard missing where no manifest
    # is left (DCP's own error, one line: it raises a BaseException that holds each rank's traceback)
    for damage, reason in (("overwrite", "does not match the checksum"),
                           ("remove", "could not be read (FileNotFoundError: [Errno 2] No such file")):
        folder = os.path.join(tmp, f"ckpt_{damage}")
        shutil.copytree(os.path.join(tmp, "ckpt_0000007"), folder)
        shard = os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".distcp"))[0])
        if damage == "overwrite":
            with open(shard, "r+b") as f:
                f.write(b"\x7f" * 8)
        else:
            os.remove(shard)
            os.remove(os.path.join(folder, checkpoint.MANIFEST))
        with pytest.raises(checkpoint.CorruptCheckpoint) as e:
            evals.load_checkpoint_model(folder, "cpu")
        assert reason in str(e.value) and "\n" not in str(e.value), str(e.value)

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TensorsMade, assert_chunked_loss_equals_full_logits
from model import GPT, GPTConfig, flops_per_token, num_params, optimizer_groups, padded_vocab
from support.loss import chunked_cross_entropy, lm_head_cross_entropy
from support.optim import configure_optimizers
from support.presets import GPT3_TABLE_2_1, PRESETS, preset_config

SMALL = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def test_gpt2_parameter_count_with_real_vocab():
    model = GPT(preset_config("gpt2", padded_vocab_size=50257))
    assert num_params(model) == 124_439_808


def test_gpt2_names_match_openai():
    """GPT-2's names, but for its fused c_attn: our q, k and v are three matrices (support/hf.py
    fuses them into GPT-2's c_attn)."""
    names = set(GPT(preset_config("gpt2")).state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_k.bias", "transformer.h.0.attn.c_v.weight",
                 "transformer.h.0.attn.c_proj.bias", "transformer.h.11.ln_2.bias", "transformer.h.11.mlp.c_fc.weight",
                 "transformer.h.11.mlp.c_proj.weight", "transformer.ln_f.weight", "lm_head.weight"]:
        assert name in names
    assert not any("c_attn" in name for name in names)


def test_gpt2_optimizer_groups():
    decay, no_decay = optimizer_groups(GPT(preset_config("gpt2")), 0.1)
    assert (len(decay["params"]), sum(p.numel() for p in decay["params"])) == (50 + 2 * 12, 124_354_560)
    assert (len(no_decay["params"]), sum(p.numel() for p in no_decay["params"])) == (98 + 2 * 12, 121_344)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = configure_optimizers(GPT(SMALL), 0.1, 1e-3, "cpu", log=lambda m: None)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_init_draws_on_a_cpu_generator():
    """The weights come from a CPU generator whatever the device (CUDA's draws other numbers), so
    a model moved to a GPU (DDP) and one materialized there (FSDP) start alike (gpu_check.py
    checks that on CUDA; tests/test_distributed.py that FSDP and DDP train alike)."""
    # On the CPU the default generator would draw the same numbers from the same seed: what tells
    # a generator of its own apart is that the global one is neither reseeded nor drawn from.
    # (Building the modules does draw from it, for torch's default init, which init_weights replaces.)
    model = GPT(SMALL, seed=5)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    model.init_weights(5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    other = GPT(SMALL, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    first = torch.empty(SMALL.padded_vocab_size, SMALL.n_embd).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(5))
    first[SMALL.vocab_size:] = 0.0
    assert torch.equal(model.transformer.wte.weight, first)  # wte is drawn first


def test_init_is_seeded_and_scaled():
    a = GPT(preset_config("gpt2", n_layer=4), seed=7)
    b = GPT(preset_config("gpt2", n_layer=4), seed=7)
    c = GPT(preset_config("gpt2", n_layer=4), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.lm_head.weight is a.transformer.wte.weight
    attn = a.transformer.h[0].attn
    for c in (attn.c_q, attn.c_k, attn.c_v):
        assert abs(c.weight.std().item() - 0.02) < 1e-3 and c.bias.abs().sum() == 0
    assert abs(a.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 1e-3


def test_q_k_v_start_as_gpt2s_fused_matrix_split():
    """q, k and v are drawn as GPT-2's one (3C, C) c_attn, then split: the initial weights of the
    fused layout, bit for bit (every tensor before and after them too: the generator's order kept)."""
    model = GPT(SMALL, seed=4)
    generator = torch.Generator().manual_seed(4)
    draw = lambda *shape: torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    assert torch.equal(model.transformer.wte.weight[:SMALL.vocab_size], draw(SMALL.padded_vocab_size, 32)[:SMALL.vocab_size])
    assert torch.equal(model.transformer.wpe.weight, draw(32, 32))
    attn = model.transformer.h[0].attn
    assert torch.equal(torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]), draw(96, 32))
    assert torch.equal(attn.c_proj.weight, torch.empty(32, 32).normal_(0.0, 0.02 / math.sqrt(4), generator=generator))


def test_presets_are_valid_and_gpt3_follows_the_paper():
    for name in PRESETS:
        preset_config(name)  # every preset builds a valid config
    assert preset_config("gpt3-small").block_size == 2048
    assert PRESETS["gpt3-175b"].n_embd == 12288 and PRESETS["gpt3-175b"].max_lr == 6e-5
    assert PRESETS["gpt3-xl"].batch_tokens == 2**20
    for name, (_, n_layers, d_model, n_heads, d_head, _, lr) in GPT3_TABLE_2_1.items():
        p = PRESETS[name]  # the table's rows; XL's and 13B's heads and width as d_head divides them
        assert (p.n_layer, p.n_embd // p.n_head, p.max_lr, p.attention) == (n_layers, d_head, lr, "gpt3")
        assert (p.n_embd, p.n_head) == ((2048, 16) if name == "gpt3-xl" else (5120, 40) if name == "gpt3-13b"
                                        else (d_model, n_heads))


def test_bad_config_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="not divisible by n_head=24"):
        GPTConfig(n_embd=2048, n_head=24)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_config("gpt5")
    with pytest.raises(ValueError, match="padded_vocab_size"):
        GPTConfig(vocab_size=100, padded_vocab_size=64)


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(preset_config("gpt2", n_layer=2))
    x, y = torch.randint(0, 50257, (2, 64)), torch.randint(0, 50257, (2, 64))
    loss = model(x, y)
    # ln(50257) = 10.825, plus about var(logits)/2 = (0.02 * sqrt(768))**2 / 2 = 0.15 from the
    # N(0, 0.02) lm_head: anything within 0.3 is a uniform guess; a broken init is far off.
    assert abs(loss.item() - math.log(50257)) < 0.3
    assert padded_vocab(50257) == 50304


def test_padded_ids_have_zero_probability():
    torch.manual_seed(0)
    model = GPT(SMALL)
    with torch.no_grad():
        model.transformer.wte.weight[SMALL.vocab_size:] = 100.0  # would win every argmax if not masked
    logits = model(torch.randint(0, 50257, (2, 8)))
    assert logits[..., SMALL.vocab_size:].max() == float("-inf")
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, top_k=0, generator=torch.Generator().manual_seed(0))
    assert out.max() < SMALL.vocab_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_loss_equals_cross_entropy_and_its_gradients(dtype):
    torch.manual_seed(0)
    h = torch.randn(300, 48, dtype=dtype, requires_grad=True)
    w = (torch.randn(160, 48, dtype=dtype) * 0.5).requires_grad_()
    t = torch.randint(0, 150, (300,))
    logits = h @ w.t()
    logits = torch.cat([logits[:, :150], torch.full_like(logits[:, 150:], float("-inf"))], dim=1)
    ref = F.cross_entropy(logits, t)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    loss = lm_head_cross_entropy(h, w, t, vocab_size=150, chunk_size=64)  # 300 rows: uneven chunks
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))  # a non-unit upstream gradient too
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(loss.item() - ref.item()) < tol
    torch.testing.assert_close(gh, 3.0 * ref_gh, atol=tol, rtol=tol)
    torch.testing.assert_close(gw, 3.0 * ref_gw, atol=tol, rtol=tol)


def test_chunked_loss_through_the_model_matches_full_logits():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
    assert_chunked_loss_equals_full_logits(model, x, y)


def test_sparse_embedding_gradient_equals_the_dense_one(monkeypatch):
    # With sparse_embedding_grad (the trainer's choice on the CPU) forward() gives the token
    # embedding a sparse gradient, which autograd adds to the lm_head's dense one (the same tied
    # tensor): the sum must equal the all-dense gradient.
    torch.manual_seed(0)
    model = GPT(SMALL)
    assert not model.sparse_embedding_grad  # the model alone: off
    model.sparse_embedding_grad = True
    asked, embedding = [], F.embedding
    sparse = lambda a, k: k["sparse"] if "sparse" in k else a[6]  # keyword, or nn.Embedding's 7th argument
    monkeypatch.setattr(F, "embedding", lambda *a, **k: (a[1] is model.transformer.wte.weight and  # not wpe's
                                                         asked.append(sparse(a, k))) or embedding(*a, **k))
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
    h = model.hidden_states(x, sparse_embedding_grad=False)
    ref = F.cross_entropy(model.logits(h).flatten(0, 1), y.flatten())
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for loss_fn in (model.loss_fn, chunked_cross_entropy):  # the model's own, the trainer's chunked one
        model.loss_fn = loss_fn
        loss = model(x, y)
        loss.backward()
        wte_grad = model.transformer.wte.weight.grad
        assert wte_grad.layout == torch.strided  # dense, as fused AdamW needs
        for p, r in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, r, atol=1e-6, rtol=1e-4)
        model.zero_grad(set_to_none=True)
    assert asked == [False, True, True]  # the reference dense, then forward's two sparse


def test_flops_per_token_matches_a_hand_count():
    c = preset_config("gpt2")
    # per block: qkv 768x2304, attention out 768x768, MLP 768x3072 and 3072x768 (+ biases, LNs);
    # lm_head 50304x768; attention scores and values 2 x 2 x T x C per layer, forward.
    block = 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 4 * 768
    forward = 2 * (12 * block + 50304 * 768 + 2 * 768) + 12 * 4 * 1024 * 768
    assert flops_per_token(c, 1024) == 3 * forward
    assert flops_per_token(c, 1024) == 6 * (num_params(GPT(c)) - 1024 * 768) + 12 * 12 * 768 * 1024


def test_one_batch_can_be_overfit():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x = torch.randint(0, 1000, (4, 32))
    y = torch.roll(x, -1, dims=1)
    model.loss_fn = chunked_cross_entropy
    opt = configure_optimizers(model, 0.0, 1e-2, "cpu", log=lambda m: None)
    for _ in range(60):  # seen: 0.015 at step 60 (0.17 at 40)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_bf16_chunked_loss_gradient_is_exact_for_confident_targets():
    """With bf16 logits a probability above ~0.998 rounds to 1, so p - 1 taken in bf16 is 0: the
    confident targets' gradient must still be as exact as autocast's full-logits path (fp32
    softmax - onehot, rounded to bf16), and so must the weight's gradient (which sums the rows'
    products over the chunks). The weight is the identity, so the gradient of h is the gradient of
    the logits."""
    torch.manual_seed(0)
    N, V = 512, 128
    t = torch.randint(0, V - 8, (N,))
    h = torch.randn(N, V)
    h[torch.arange(N), t] += torch.linspace(2.0, 14.0, N)  # p(target) from ~0.1 to ~0.99999
    h = h.to(torch.bfloat16).float().requires_grad_()  # exactly representable: bf16 logits = h
    w = torch.eye(V, requires_grad=True)
    ref = torch.autograd.grad(F.cross_entropy(h.double()[:, :V - 8], t), h)[0].float()  # 8 padded ids
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.cat([(h @ w.t())[:, :V - 8].float(), torch.full((N, 8), float("-inf"))], dim=1)
        full_loss = F.cross_entropy(logits, t)
        full = torch.autograd.grad(full_loss, h)[0]
        chunked_loss = lm_head_cross_entropy(h, w, t, vocab_size=V - 8, chunk_size=100)
        chunked = torch.autograd.grad(chunked_loss, h)[0]
    rows = torch.arange(N)
    confident = F.softmax(h.detach()[:, :V - 8], dim=1)[rows, t] > 0.998
    assert confident.sum() > 100

    def target_error(g):  # mean relative error of the target entries' gradient, confident rows
        return ((g[rows, t] - ref[rows, t]).abs() / ref[rows, t].abs())[confident].mean().item()

    assert target_error(full) < 0.02
    assert target_error(chunked) <= 1.5 * target_error(full)
    assert (chunked[rows, t] < 0).all()  # never 0: every target is pulled up
    torch.testing.assert_close(chunked, full, atol=2e-6, rtol=2e-2)
    assert abs(chunked_loss.item() - full_loss.item()) < 1e-3 * full_loss.item() + 1e-6

    def weight_gradients(rows):  # dL/dW of these rows' loss: float64 truth, full logits, chunked
        hr, tr = h.detach()[rows], t[rows]
        wd = w.detach().double().requires_grad_()
        truth = torch.autograd.grad(F.cross_entropy((hr.double() @ wd.t())[:, :V - 8], tr), wd)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.cat([(hr @ w.t())[:, :V - 8].float(), torch.full((len(rows), 8), float("-inf"))], dim=1)
            full_w = torch.autograd.grad(F.cross_entropy(logits, tr), w)[0]
            chunked_w = torch.autograd.grad(lm_head_cross_entropy(hr, w, tr, vocab_size=V - 8, chunk_size=100), w)[0]
        return truth, full_w, chunked_w

    def error(g, truth):  # relative, over the whole weight gradient
        return ((g.double() - truth).norm() / truth.norm()).item()

    # dL/dW to the same standard: over every row (six chunks, their products summed in fp32), and
    # over the confident rows alone, where it is made of the small -(1 - p) entries above
    for selected in (rows, rows[confident]):
        truth, full_w, chunked_w = weight_gradients(selected)
        full_error, chunked_error = error(full_w, truth), error(chunked_w, truth)
        assert full_error < 0.01
        assert chunked_error <= 1.25 * full_error, len(selected)


class MatrixProducts(TorchDispatchMode):
    """Records the operand shapes of every matrix product run inside it, as aten sees them: `@`,
    torch.mm(out=...), addmm_ and the rest all arrive here, whichever Python spelling made them."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "linear"}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        if name in self.PRODUCTS:  # addmm, baddbmm, addbmm, addmv: (input, a, b); the rest (a, b)
            a, b = args[1:3] if name.startswith("add") or name == "baddbmm" else args[:2]
            self.shapes.append((tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def test_chunked_loss_makes_no_gradient_without_grad():
    # 64 rows of C=8 against V=40 in chunks of 16: the logits (16, 8) @ (8, 40), the gradient of h
    # (16, 40) @ (40, 8) and of the weight (40, 16) @ (16, 8) are told apart by their shapes.
    h, w, t = torch.randn(64, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True), torch.randint(0, 40, (64,))
    logits, grad_h, grad_w = ((16, 8), (8, 40)), ((16, 40), (40, 8)), ((40, 16), (16, 8))
    ref = lm_head_cross_entropy(h, w, t, vocab_size=40, chunk_size=16)
    for grad_enabled, inputs in ((False, (h, w)), (True, (h.detach(), w.detach()))):
        with torch.set_grad_enabled(grad_enabled), MatrixProducts() as products:
            loss = lm_head_cross_entropy(*inputs, t, vocab_size=40, chunk_size=16)
        assert products.shapes == [logits] * 4  # one a chunk, the logits', and no gradient's
        assert loss.grad_fn is None and loss.item() == ref.item()
    with MatrixProducts() as products:
        loss = lm_head_cross_entropy(h, w, t, vocab_size=40, chunk_size=16)
    assert sorted(products.shapes) == sorted([logits, grad_h, grad_w] * 4)  # with a gradient: both, a chunk
    with MatrixProducts() as products:
        loss.backward()
    assert products.shapes == []  # the backward only scales what the forward made


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_chunked_loss_makes_its_chunk_buffers_once_a_call(softcap):
    """The (rows, V) buffers of a chunk are made once a call and every chunk reuses them: made
    afresh for each chunk, they fragmented the heap glibc keeps on the CPU (keep_freed_memory),
    and the float32 demo's RSS grew by 0.2 GB (docs/memory.md, "The loss chunk")."""
    torch.manual_seed(0)
    V, chunk = 100, 32  # C = 8 < chunk: the weight's gradient (V, C) is smaller than a chunk's logits
    h, w, t = torch.randn(256, 8, requires_grad=True), torch.randn(V, 8, requires_grad=True), torch.randint(0, 90, (256,))
    made = {}
    for rows in (64, 256):  # 2 chunks, then 8
        with TensorsMade(min_numel=chunk * V) as tensors:
            lm_head_cross_entropy(h[:rows], w, t[:rows], vocab_size=90, chunk_size=chunk, softcap=softcap).backward()
        made[rows] = tensors.count
    assert made[64] == made[256] == (3 if softcap else 2)  # the logits and the softmax (and the capped logits)


@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_chunked_loss_ignores_targets_as_cross_entropy(ignore_index):
    # -100 is the default of both, and left to it (as GPT.forward does): passed to neither
    given = {} if ignore_index == -100 else dict(ignore_index=ignore_index)
    torch.manual_seed(0)
    h = torch.randn(300, 48, requires_grad=True)
    w = (torch.randn(160, 48) * 0.5).requires_grad_()
    mixed = torch.randint(0, 150, (300,))
    mixed[::3] = ignore_index
    mixed[64:128] = ignore_index  # a whole chunk
    for t in (mixed, torch.full_like(mixed, ignore_index)):  # a mix; every target ignored
        logits = h @ w.t()
        logits = torch.cat([logits[:, :150], torch.full_like(logits[:, 150:], float("-inf"))], dim=1)
        ref = F.cross_entropy(logits, t, **given)  # every target ignored: NaN, with zero gradients
        ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
        loss = lm_head_cross_entropy(h, w, t, vocab_size=150, chunk_size=64, **given)
        gh, gw = torch.autograd.grad(loss, (h, w))
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(lm_head_cross_entropy(h, w, t, vocab_size=150, chunk_size=64, **given), ref,
                                       atol=1e-5, rtol=1e-5, equal_nan=True)
    assert ref.isnan() and gh.eq(0).all() and gw.eq(0).all()
    kept = mixed != ignore_index  # bf16, in one chunk: an ignored row is exactly a row left out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ignoring = lm_head_cross_entropy(h, w, mixed, vocab_size=150, chunk_size=len(mixed), **given)
        ignoring = (ignoring, *torch.autograd.grad(ignoring, (h, w)))
        leaving_out = lm_head_cross_entropy(h[kept], w, mixed[kept], vocab_size=150, chunk_size=len(mixed), **given)
        leaving_out = (leaving_out, *torch.autograd.grad(leaving_out, (h, w)))
    assert all(torch.equal(a, b) for a, b in zip(ignoring, leaving_out))


def test_model_ignores_the_default_ignore_index_in_both_losses():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))
    y[:, :7] = -100  # e.g. a prompt the loss should not count
    results = []
    for loss_fn in (model.loss_fn, chunked_cross_entropy):
        model.loss_fn = loss_fn
        loss = model(x, y)
        results.append((loss, *torch.autograd.grad(loss, list(model.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_chunked_loss_refuses_a_target_outside_the_vocabulary():
    h, w = torch.randn(6, 8), torch.randn(16, 8)  # 10 real ids, 6 padded
    for bad, given in ((-2, dict(ignore_index=-1)), (10, {}), (16, {}), (-1, {})):
        t = torch.tensor([0, 9, given.get("ignore_index", -100), bad, 3, bad])  # one ignored, two bad
        with pytest.raises(ValueError, match=rf"^target {bad} at position 3 \(and 1 more\) .* ids 0\.\.9, or ignore_index"):
            lm_head_cross_entropy(h, w, t, vocab_size=10, **given)

"""The modern GPT's options (model.ARCH_FIELDS, --arch=modern, --recipe=modern): each does what it
says and only that, the default stays GPT-2's, and the rest of the program (chunked loss, counts,
settings, checkpoints, export, plan, evaluations, resume) holds with them. DDP and FSDP with the
bundle are in tests/test_distributed.py."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import train_gpt
from conftest import assert_chunked_loss_equals_full_logits, read_metrics, tiny_args, train_losses
from model import ARCH_FIELDS, ARCHITECTURES, GPT, GPTConfig, arch_changes, flops_per_token, num_params, rotary
from support import checkpoint, cli, evals
from support.loss import chunked_cross_entropy, lm_head_cross_entropy
from support.optim import MuonConfig, configure_optimizers
from support.presets import PRESETS, preset_config
from support.tokenizer import gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
MODERN = ARCHITECTURES["modern"]


def small(**options):
    return GPTConfig(**SMALL, **options)


def batch(seed=0, T=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (2, T), generator=g)
    return x, torch.roll(x, -1, 1)


# ----------------------------------------------------------------------------------------------
# The default is GPT-2's, as before

def test_the_default_architecture_trains_the_losses_it_trained_before():
    """Losses of 4 AdamW steps of the default GPT, recorded from model.py before these options
    existed: a change to the default architecture, its init or its parameter order shows here."""
    assert arch_changes(GPTConfig()) == {} and ARCHITECTURES["gpt"] == {}
    assert all(arch_changes(preset_config(name)) == {} for name in PRESETS)
    torch.manual_seed(0)
    model = GPT(small(), seed=3)
    model.loss_fn = chunked_cross_entropy
    x = torch.randint(0, 50257, (2, 32))
    y = torch.roll(x, -1, 1)
    opt = configure_optimizers(model, 0.1, 1e-2, "cpu", log=lambda m: None)
    losses = []
    for _ in range(4):
        loss = model(x, y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses == pytest.approx([10.811524391174316, 10.338874816894531, 10.037784576416016,
                                    9.565145492553711], abs=1e-5)


def test_modern_bundle_and_single_options_as_settings():
    s = train_gpt.parse_settings(["--arch=modern", "--model=tiny"])
    assert {name: getattr(s, name) for name in MODERN} == MODERN
    config = train_gpt.resolve_model_settings(s)
    assert arch_changes(config) == MODERN
    one_off = train_gpt.resolve_model_settings(train_gpt.parse_settings(["--arch=modern", "--rope=False"]))
    assert arch_changes(one_off) == {k: v for k, v in MODERN.items() if k != "rope"}
    assert arch_changes(train_gpt.resolve_model_settings(train_gpt.parse_settings(["--qk_norm"]))) == {"qk_norm": True}
    recipe = train_gpt.parse_settings(["--recipe=modern"])
    assert recipe.arch == "modern" and recipe.optimizer == "muon" and recipe.logit_softcap == 15.0
    gpt_arch = train_gpt.parse_settings(["--recipe=modern", "--arch=gpt"])  # the command line wins
    assert gpt_arch.optimizer == "muon" and not any(getattr(gpt_arch, k) != v for k, v in dataclasses.asdict(
        GPTConfig()).items() if k in ARCH_FIELDS)
    with pytest.raises(cli.SettingsError, match="unknown --arch='new'; choose one of: gpt, modern"):
        train_gpt.parse_settings(["--arch=new"])
    with pytest.raises(model_module.ConfigError, match="logit_softcap must be a number >= 0"):
        GPTConfig(logit_softcap=-1.0)
    with pytest.raises(model_module.ConfigError, match="must be even"):
        GPTConfig(n_embd=30, n_head=2, rope=True)
    with pytest.raises(model_module.ConfigError, match="True or False"):
        GPTConfig(rope=1)
    assert "--arch" in train_gpt.settings_help() and "--logit_softcap" in train_gpt.settings_help()


# ----------------------------------------------------------------------------------------------
# Each option

def test_rope_has_no_position_table_and_scores_depend_on_distance_only():
    names = set(GPT(small(rope=True)).state_dict())
    assert "transformer.wpe.weight" in set(GPT(small()).state_dict()) and "transformer.wpe.weight" not in names
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16)  # the same query and key at every position
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 12, 16)
    scores = (rotary(q) @ rotary(k).transpose(-1, -2))[0, 0]  # (12, 12): query m, key n
    for d in range(-11, 12):  # every diagonal m - n = d holds one value
        diagonal = torch.diagonal(scores, d)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert torch.diagonal(scores, 0)[0] != pytest.approx(torch.diagonal(scores, -3)[0].item(), abs=1e-3)
    torch.testing.assert_close(rotary(q).norm(dim=-1), q.norm(dim=-1))  # a rotation: lengths kept
    torch.testing.assert_close(rotary(q)[..., 0, :], q[..., 0, :])  # position 0: no rotation


def attention_inputs(config, monkeypatch):
    """The q and k that the first block hands to scaled_dot_product_attention."""
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append((q, k)) or sdpa(q, k, v, **kw))
    with torch.no_grad():
        GPT(config, seed=1)(batch()[0])
    return seen[0]


def test_qk_norm_gives_unit_rms_queries_and_keys_without_gains(monkeypatch):
    q, k = attention_inputs(small(qk_norm=True), monkeypatch)
    for t in (q, k):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), atol=1e-2, rtol=0)  # eps 1e-5 inside
    q0, _ = attention_inputs(small(), monkeypatch)
    assert q0.pow(2).mean(-1).max() < 0.5  # without it: the projections' scale (N(0, 0.02) weights)
    assert num_params(GPT(small(qk_norm=True))) == num_params(GPT(small()))


def test_relu2_squares_the_relu():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    mlp = GPT(small(relu2=True), seed=1).transformer.h[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
        assert not torch.allclose(mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh")), atol=1e-4)


def test_untied_head_is_its_own_matrix_trained_by_adamw():
    model = GPT(small(untied_head=True), seed=1)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert num_params(model) == num_params(GPT(small())) + 50304 * 32
    assert model.lm_head.weight[50257:].abs().sum() == 0  # dead padded rows, as the embedding's
    model.sparse_embedding_grad = True  # the trainer's CPU choice: an untied embedding keeps a dense gradient
    opt = configure_optimizers(model, 0.1, 1e-3, "cpu", log=lambda m: None, muon=MuonConfig(float32=True))
    assert not any(p is model.lm_head.weight for g in opt.optimizers["muon"].param_groups for p in g["params"])
    before = model.lm_head.weight.clone(), model.transformer.wte.weight.clone()
    model.loss_fn = chunked_cross_entropy
    loss = model(*batch())
    loss.backward()
    assert model.transformer.wte.weight.grad.layout == torch.strided
    opt.step()
    head, wte = model.lm_head.weight, model.transformer.wte.weight
    assert not torch.equal(head, before[0]) and not torch.equal(wte, before[1])  # both trained
    assert not torch.allclose(head, wte)  # and apart


def test_softcap_bounds_the_logits_everywhere():
    model = GPT(small(logit_softcap=2.0), seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(500.0)  # raw logits far beyond the cap
        logits = model(batch()[0])
        real = logits[..., :50257]
        assert real.abs().max() <= 2.0 and real.abs().max() > 1.9 and logits[..., 50257:].max() == float("-inf")
        out = model.generate(batch()[0][:, :4], 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 9) and out.max() < 50257


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_loss_with_softcap_equals_cross_entropy_and_its_gradients(dtype):
    torch.manual_seed(0)
    h = torch.randn(300, 48, dtype=dtype, requires_grad=True)
    w = (torch.randn(160, 48, dtype=dtype) * 0.5).requires_grad_()
    t = torch.randint(0, 150, (300,))
    t[::7] = -100  # some ignored
    logits = 3.0 * torch.tanh(h @ w.t() / 3.0)
    logits = torch.cat([logits[:, :150], torch.full_like(logits[:, 150:], float("-inf"))], dim=1)
    ref = F.cross_entropy(logits, t)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    loss = lm_head_cross_entropy(h, w, t, vocab_size=150, chunk_size=64, softcap=3.0)
    gh, gw = torch.autograd.grad(loss * 2.0, (h, w))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(loss.item() - ref.item()) < tol
    torch.testing.assert_close(gh, 2.0 * ref_gh, atol=tol, rtol=tol)
    torch.testing.assert_close(gw, 2.0 * ref_gw, atol=tol, rtol=tol)
    uncapped = lm_head_cross_entropy(h, w, t, vocab_size=150, chunk_size=64)
    assert abs(uncapped.item() - loss.item()) > 0.1  # the cap changed the loss: a real comparison


def test_the_whole_bundle_chunked_equals_full_logits_and_zero_init_starts_uniform():
    torch.manual_seed(0)
    model = GPT(small(**MODERN), seed=1)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == block.mlp.c_proj.weight.abs().sum() == 0
    assert model.lm_head.weight.abs().sum() == 0
    x, y = batch()
    loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(50257), abs=1e-5)  # a zero head: the uniform guess
    names = set(model.state_dict())
    assert not any(n.endswith(".bias") or ".ln_" in n for n in names)  # no biases, parameter-free norms
    with torch.no_grad():  # away from the init, so every gradient is nonzero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert_chunked_loss_equals_full_logits(model, x, y)


def test_bias_false_and_rmsnorm():
    no_bias = GPT(small(bias=False))
    assert not [n for n, _ in no_bias.named_parameters() if n.endswith(".bias")]
    assert num_params(no_bias) == num_params(GPT(small())) - 2 * (3 * 32 + 32 + 4 * 32 + 32 + 2 * 32) - 32
    rms = GPT(small(rmsnorm=True))
    assert not [n for n, _ in rms.named_parameters() if ".ln_" in n]
    x = torch.randn(4, 32) * 3 + 1
    torch.testing.assert_close(rms.transformer.ln_f(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())


def test_parameters_and_flops_per_token_by_hand():
    """gpt2 with the bundle: no position table, a second 50304 x 768 matrix (the head), no biases
    or norm gains. FLOPs: 6 x (the blocks' matrices + the head) + attention; the head adds matmul
    FLOPs no more than the tied one did."""
    c = preset_config("gpt2", **MODERN)
    blocks = 12 * (768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768)
    assert num_params(GPT(c)) == 2 * 50304 * 768 + blocks == 162_201_600
    assert flops_per_token(c, 1024) == 6 * (blocks + 50304 * 768) + 12 * 12 * 768 * 1024
    for name, value in [("rope", True), ("untied_head", True), ("bias", False), ("rmsnorm", True), (None, None)]:
        config = small(**({name: value} if name else {}))
        model = GPT(config)
        # lookups, not matmuls: the position table, and an untied embedding (a tied one is the head)
        looked_up = (50304 * 32 if config.untied_head else 0) + (0 if config.rope else 32 * 32)
        assert flops_per_token(config, 32) == 6 * (num_params(model) - looked_up) + 12 * 2 * 32 * 32, name


# ----------------------------------------------------------------------------------------------
# The rest of the program with the bundle

def test_export_to_hugging_face_refuses_a_modern_model(tmp_path):
    from support.hf import export_hf
    model = GPT(small(rope=True, untied_head=True))
    with pytest.raises(cli.BadInput, match=r"not plain GPT-2 \(rope=True \(GPT-2: False\), "
                                           r"untied_head=True \(GPT-2: False\)\)"):
        export_hf(model, model.config, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")  # refused before anything was written


def test_checkpoints_written_before_the_options_load_as_gpt2(tmp_path):
    """Such a checkpoint also holds attention's q, k and v fused, as GPT-2's c_attn (written before
    they were split): it loads split, the same model."""
    from support.fused_qkv import fuse_model_state
    model = GPT(small(), seed=2)
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in ARCH_FIELDS}
    path = str(tmp_path / "old.pt")
    fused = fuse_model_state(model.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in fused and not any(".c_q." in name for name in fused)
    checkpoint.save_file({"model": fused, "model_config": config}, path)
    loaded = evals.load_checkpoint_model(path)
    assert arch_changes(loaded.config) == {} and loaded.lm_head.weight is loaded.transformer.wte.weight
    x = batch()[0]
    assert torch.equal(loaded(x), model(x))
    from support.resume import check_compatible
    check_compatible({"model_config": config}, model.config)  # a resume of it: the same model
    with pytest.raises(cli.SettingsError, match="the checkpoint's model has rope=False, these settings give True"):
        check_compatible({"model_config": config}, small(rope=True))


def test_bits_per_byte_from_the_decoded_targets(shards):
    from dataloader import ValidationData
    enc = gpt2_tokenizer()
    table = evals.token_bytes()
    assert table[enc.encode("Hello")[0]] == 5 and table[enc.eot_token] == 0 and table[60000] == 0
    data = ValidationData(shards, 32, 1024, vocab_size=50257)
    targets = [t for _, y in data.batches(4) for t in y[y != -1].tolist()]
    text_bytes = sum(len(enc.decode_single_token_bytes(t)) for t in targets if t != enc.eot_token)
    assert evals.val_bytes(data) == text_bytes > len(targets)  # most tokens are more than a byte
    model = GPT(small(**MODERN), seed=1)
    v = evals.validation(model, data, 4)
    assert v["loss"] == evals.val_loss(model, data, 3)
    assert v["bpb"] == pytest.approx(v["loss"] * len(targets) / math.log(2) / text_bytes, rel=1e-9)


def test_modern_recipe_trains_resumes_exactly_and_evaluates(shards, tmp_path):
    """--recipe=modern (the bundle with Muon) on the CPU's chunked loss: it learns, a resume from
    step 5 gives every loss bit for bit, the val line and metrics.jsonl carry bits per byte, and
    HellaSwag and samples run on the trained model."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = dict(recipe="modern", max_lr=3e-3, sample_every=10)
    train_gpt.main(tiny_args(shards, straight, **args))
    train_gpt.main(tiny_args(shards, resumed, **args, stop_step=5))
    train_gpt.main(tiny_args(shards, resumed, **args))
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == list(range(10)) and a == b
    vals = [e for e in read_metrics(straight) if "val_loss" in e]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] < 10.9 and 0 < vals[-1]["val_bpb"] < vals[0]["val_bpb"]
    log = open(os.path.join(straight, "log.txt")).read()
    assert "bits/byte" in log and "sample 0:" in log and '"arch": "modern"' in log
    model = evals.load_checkpoint_model(os.path.join(straight, "ckpt_0000010.pt"))
    assert arch_changes(model.config) == MODERN
    example = dict(ctx="The cat sat on the", endings=["mat.", "dog.", "sky.", "tree."], label=0)
    assert evals.hellaswag(model, [example, dict(example, label=2)])["n"] == 2
    # resuming it with an option changed is refused, naming the option
    with pytest.raises(SystemExit, match="the checkpoint's model has qk_norm=True, these settings give False"):
        train_gpt.main(tiny_args(shards, straight, **args, qk_norm=False, max_steps=12))


def test_compiled_bundle_traces_whole_and_matches_eager():
    """torch.compile of the bundle's training forward and backward (full logits, as compiled runs
    train) as one graph (fullgraph: no break), with the aot_eager backend: dynamo and AOTAutograd
    trace it as inductor would, without the minutes of C++ compilation a CPU needs
    (tools/gpu_check.py compiles it with inductor on a GPU)."""
    torch.manual_seed(0)
    model = GPT(small(**MODERN), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = batch()
    want = model(x, y)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x, y)
    grads = torch.autograd.grad(got, list(model.parameters()))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_plan_counts_the_untied_head():
    from tools import plan
    base = plan.Setup("tiny", gpus=1, micro_batch_size=1, fsdp=False, seq_len=32, dtype="float32", n_layer=2)
    gpt, modern = plan.peak_bytes(base), plan.peak_bytes(dataclasses.replace(base, arch="modern"))
    extra = num_params(GPT(preset_config("tiny", n_layer=2, **MODERN))) - num_params(GPT(preset_config("tiny", n_layer=2)))
    assert extra > 0 and modern["params"] - gpt["params"] == 4 * extra  # fp32 parameters, exactly
    with pytest.raises(ValueError, match="unknown --arch='x'"):
        plan.make_plan("tiny", 1, arch="x", log=lambda m: None)


def test_auto_micro_batch_plans_named_architectures_only():
    from types import SimpleNamespace
    from support.settings import auto_micro_batch
    s = train_gpt.parse_settings(["--arch=modern", "--rope=False", "--micro_batch_size=auto"])
    train_gpt.resolve_model_settings(s)
    rt = SimpleNamespace(device=torch.device("cuda"), world_size=1, dp_size=1, is_main=True)  # refused before any CUDA call
    with pytest.raises(cli.SettingsError, match="plans the named architectures"):
        auto_micro_batch(s, rt, print)

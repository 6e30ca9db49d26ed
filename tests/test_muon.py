"""--optimizer=muon (torch.optim.Muon for the blocks' matrices, AdamW for the rest) and --schedule=wsd."""

import os

import pytest
import torch

import model as model_module
import train_gpt
from conftest import FusedAttention, read_metrics, tiny_args, train_losses
from model import GPT, GPTConfig
from support.fastpath import clip_gradients, gradient_norm
from support.fused_qkv import split_model_state, split_optimizer_state
from support.optim import CombinedOptimizer, Float32Muon, MuonConfig, configure_optimizers
from train_gpt import Settings, lr_at, parse_settings, wsd_multiplier

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=16))


def with_grads(model, scale=1.0):
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    model(x, x).mul(scale).backward()
    return model


def muon_optimizer(model, **kwargs):
    return configure_optimizers(model, 0.1, 1e-3, "cpu", log=lambda msg: None, muon=MuonConfig(**kwargs))


def test_muon_trains_the_block_matrices_and_adamw_the_rest():
    model = small_model()
    opt = muon_optimizer(model, lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = [{names[id(p)] for p in g["params"]} for g in opt.optimizers["adamw"].param_groups]
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert adamw[0] == {"transformer.wte.weight", "transformer.wpe.weight"}  # wte is the tied lm_head
    assert adamw[1] and all(n.endswith(".bias") or ".ln_" in n for n in adamw[1])
    assert set(names.values()) == muon | adamw[0] | adamw[1]  # every tensor in exactly one group
    assert [g["weight_decay"] for g in opt.optimizers["adamw"].param_groups] == [0.1, 0.0]
    # one schedule drives both: Muon's peak is its own lr, as a multiple of the schedule's
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, pytest.approx(20.0)]
    assert isinstance(opt.optimizers["adamw"], torch.optim.AdamW)


def newton_schulz(g, eps=1e-7):
    """torch.optim.Muon's orthogonalization (torch/optim/_muon.py), written out to run in float64:
    Keller Jordan's quintic, 5 steps of X <- aX + (bA + cA^2)X with A = XX^T, from X = G / |G|_F
    (clamped at eps), on the wide orientation (a tall G is transposed, then back)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


def muon_reference(w, grads, lr, momentum, weight_decay):
    """torch.optim.Muon's steps (nesterov, adjust_lr_fn="original") in float64: the buffer lerps
    toward the gradient, the update is the gradient lerped toward the buffer, orthogonalized; the
    weight decays by lr x weight_decay, then moves by lr x sqrt(max(1, rows/cols)) x the update."""
    w, buf = w.double(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf.lerp_(g, 1 - momentum)
        update = newton_schulz(g.lerp(buf, momentum))
        w = w * (1 - lr * weight_decay) - lr * max(1, w.size(0) / w.size(1)) ** 0.5 * update
    return w


def test_float32_muon_is_torch_muon_without_the_bf16_rounding():
    """Float32Muon steps as Muon in float64 does, to fp32 rounding; torch's bf16 Muon misses that by
    ~1% of the move, so the tolerance tells the two apart. Two steps of a tall matrix: the momentum
    carries over, and the iteration runs on the transpose with the lr scaled by sqrt(2)."""
    w0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(64, 32, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    truth = muon_reference(w0, grads, lr=0.1, momentum=0.95, weight_decay=0.1)
    stepped = []
    for cls in (torch.optim.Muon, Float32Muon):
        w = torch.nn.Parameter(w0.clone())
        opt = cls([w], lr=0.1, momentum=0.95, weight_decay=0.1)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        stepped.append(w.detach().double())
    bf16, fp32 = stepped
    # the weights move by up to 0.12; fp32 rounding leaves ~4e-7 of that, bf16 ~2e-3
    tight = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(fp32, truth, **tight)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bf16, truth, **tight)
    move = (truth - w0.double()).norm()
    assert (bf16 - truth).norm() < 0.05 * move  # torch's own steps: the same iteration, rounded


def test_clipping_with_muon_equals_torch_clip_then_step():
    ref, model = with_grads(small_model(), 50.0), with_grads(small_model(), 50.0)
    ref_opt, opt = muon_optimizer(ref), muon_optimizer(model)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    norm = gradient_norm(list(model.parameters()))
    clip_gradients(list(model.parameters()), opt, 1.0, norm)
    opt.step()
    assert ref_norm.item() > 10
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=name)
    muon_state = opt.optimizers["muon"].state
    ref_state = ref_opt.optimizers["muon"].state
    for p, r in zip(opt.optimizers["muon"].param_groups[0]["params"], ref_opt.optimizers["muon"].param_groups[0]["params"]):
        torch.testing.assert_close(muon_state[p]["momentum_buffer"], ref_state[r]["momentum_buffer"])


def test_combined_state_dict_round_trip_and_a_mismatch_is_refused():
    model = with_grads(small_model())
    opt = muon_optimizer(model)
    opt.step()
    state = opt.state_dict()
    assert set(state) == {"adamw", "muon"}
    # built with other settings, so only the loaded state can make its groups equal to opt's
    other = configure_optimizers(small_model(), 0.0, 2e-3, "cpu", log=lambda msg: None,
                                 muon=MuonConfig(lr=0.05, momentum=0.9, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"))

    def settings(optimizer):  # every group's hyperparameters, lr_scale included
        return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    for name in ("adamw", "muon"):
        assert settings(other.optimizers[name]) != settings(opt.optimizers[name])
    other.load_state_dict(state)
    for name in ("adamw", "muon"):
        assert settings(other.optimizers[name]) == settings(opt.optimizers[name]), name
        a, b = opt.optimizers[name].state_dict()["state"], other.optimizers[name].state_dict()["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k][f], b[k][f]) for k in a for f in a[k] if torch.is_tensor(a[k][f]))
    with pytest.raises(ValueError, match="--optimizer"):
        CombinedOptimizer(adamw=torch.optim.AdamW(small_model().parameters())).load_state_dict(state)


def test_muon_orthogonalizes_q_k_and_v_each_on_its_own():
    """After one Muon step each of attention's q, k and v has moved by an orthogonalized update of
    its own: singular values flat (std / mean below 0.35: Newton-Schulz's five steps leave them in
    about 0.7..1.2). GPT-2's fused (3C, C) c_attn, orthogonalized whole as before the split, leaves
    the q and k blocks of its update far from flat (above 1): the small q and k gradients of a new
    model get what the v gradient leaves over. A gradient of full rank: 256 tokens for C = 32."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32), seed=0)
    x = torch.randint(0, 50257, (16, 16), generator=torch.Generator().manual_seed(1))
    model(x, x).backward()
    attn = model.transformer.h[0].attn
    parts = (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight)
    before, fused_grad = [p.detach().clone() for p in parts], torch.cat([p.grad for p in parts])
    muon_optimizer(model, float32=True).step()

    def spread(update):
        s = torch.linalg.svdvals(update.double())
        return (s.std() / s.mean()).item()

    assert max(spread(p.detach() - b) for p, b in zip(parts, before)) < 0.35
    fused = torch.nn.Parameter(torch.cat(before))  # the step before the split: one matrix
    fused.grad = fused_grad
    Float32Muon([fused], lr=0.02).step()
    q, k, v = (fused.detach() - torch.cat(before)).chunk(3)
    assert spread(q) > 1 and spread(k) > 1


def test_a_checkpoint_of_the_fused_q_k_v_loads_muons_momentum_and_adamws_moments_split(monkeypatch):
    """A CombinedOptimizer's state written before q, k and v were split (the fused c_attn's Muon
    momentum, AdamW's moments of its bias) loads into today's model and optimizer as rows q, k and
    v of those, every other tensor's state as it was; and each part then steps on its own."""
    with monkeypatch.context() as m:
        m.setattr(model_module, "CausalSelfAttention", FusedAttention)
        old = with_grads(small_model())
    old_opt = muon_optimizer(old)
    old_opt.step()
    new = small_model()
    opt = muon_optimizer(new)
    new.load_state_dict(split_model_state(old.state_dict()))
    opt.load_state_dict(split_optimizer_state(old_opt.state_dict(), opt, new))
    muon, adamw = opt.optimizers["muon"].state, opt.optimizers["adamw"].state
    old_muon, old_adamw = old_opt.optimizers["muon"].state, old_opt.optimizers["adamw"].state
    for block, old_block in zip(new.transformer.h, old.transformer.h):
        attn, fused = block.attn, old_block.attn.c_attn
        for i, part in enumerate((attn.c_q, attn.c_k, attn.c_v)):
            rows = slice(16 * i, 16 * (i + 1))
            assert torch.equal(part.weight, fused.weight[rows]) and torch.equal(part.bias, fused.bias[rows])
            assert torch.equal(muon[part.weight]["momentum_buffer"], old_muon[fused.weight]["momentum_buffer"][rows])
            for moment in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(adamw[part.bias][moment], old_adamw[fused.bias][moment][rows])
        assert torch.equal(muon[attn.c_proj.weight]["momentum_buffer"], old_muon[old_block.attn.c_proj.weight]["momentum_buffer"])
    assert torch.equal(adamw[new.transformer.wte.weight]["exp_avg"], old_adamw[old.transformer.wte.weight]["exp_avg"])
    with_grads(new)
    opt.step()
    attn = new.transformer.h[0].attn
    assert [adamw[p.bias]["step"].item() for p in (attn.c_q, attn.c_k, attn.c_v)] == [2, 2, 2]  # one count each


def fail(args, match):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(args)
    assert match in str(e.value.code), e.value.code


def test_clear_errors(shards, tmp_path, monkeypatch):
    log = str(tmp_path / "log")
    fail(tiny_args(shards, log, optimizer="sgd"), "choose adamw or muon")
    fail(tiny_args(shards, log, schedule="linear"), "choose cosine or wsd")
    fail(tiny_args(shards, log, schedule="wsd", decay_fraction=0), "--decay_fraction must be positive, got 0")
    fail(tiny_args(shards, log, recipe="slow"), "unknown --recipe='slow'")
    fail(tiny_args(shards, log, optimizer="muon", muon_adjust_lr="x"), "choose original or match_rms_adamw")
    # an AdamW checkpoint does not resume as a Muon run
    train_gpt.main(tiny_args(shards, log, max_steps=5, val_every=0))
    fail(tiny_args(shards, log, optimizer="muon", max_steps=6), "trained with --optimizer=adamw")
    monkeypatch.delattr(torch.optim, "Muon")
    fail(tiny_args(shards, str(tmp_path / "old"), optimizer="muon"), "needs torch 2.9 or newer")
    fail(tiny_args(shards, str(tmp_path / "old"), optimizer="muon", fsdp=True), "needs torch 2.9 or newer")
    with pytest.raises(ValueError, match="needs torch 2.9"):
        muon_optimizer(small_model())


def test_match_rms_adamw_needs_a_muon_lr_given_and_the_one_it_names_steps_as_original(shards, tmp_path):
    """Issue 29.2: match_rms_adamw with the recipe's muon_lr (tuned for original) stepped each C x C
    matrix 0.2 sqrt(C) times as far (5.5x at 768 wide). It is refused in one line unless --muon_lr is
    given, and the LR the line names steps a square matrix as far as original's does."""
    log = str(tmp_path / "log")
    with pytest.raises(SystemExit) as e:
        train_gpt.main(tiny_args(shards, log, recipe="fast", muon_adjust_lr="match_rms_adamw", n_embd=256, n_head=4))
    message = str(e.value.code)
    assert "\n" not in message and "match_rms_adamw with muon_lr=0.02" in message and "3.2x as far" in message
    assert not os.path.exists(log)  # refused before any work
    named = float(message.split("--muon_lr=")[1].split()[0])
    steps = {}
    for fn, lr in (("original", 0.02), ("match_rms_adamw", named), ("match_rms_adamw, recipe's lr", 0.02)):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(256, 256))
        w.grad = torch.randn(256, 256)
        before = w.detach().clone()
        torch.optim.Muon([w], lr=lr, weight_decay=0, adjust_lr_fn=fn.split(",")[0]).step()
        steps[fn] = (w.detach() - before).norm().item()
    assert steps["match_rms_adamw"] == pytest.approx(steps["original"], rel=2e-3)  # the named LR has 3 digits
    assert steps["match_rms_adamw, recipe's lr"] == pytest.approx(0.2 * 256 ** 0.5 * steps["original"], rel=1e-3)
    s = parse_settings(["--recipe=fast", "--muon_adjust_lr=match_rms_adamw", f"--muon_lr={named}"])
    assert (s.muon_adjust_lr, s.muon_lr) == ("match_rms_adamw", named)  # given: it trains as asked


def test_muon_trains_and_resumes_exactly(shards, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    args = dict(optimizer="muon", schedule="wsd", muon_lr=0.05, max_steps=6, checkpoint_every=3, val_every=3)
    train_gpt.main(tiny_args(shards, straight, **args))
    train_gpt.main(tiny_args(shards, resumed, **args, stop_step=3))
    train_gpt.main(tiny_args(shards, resumed, **args))
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == list(range(6)) and a == b  # bit for bit
    vals = [e["val_loss"] for e in read_metrics(straight) if "val_loss" in e]
    assert vals[-1] < vals[0] < 10.9  # it learns
    ckpt = torch.load(f"{straight}/ckpt_0000006.pt", weights_only=True)
    assert set(ckpt["optimizer"]) == {"adamw", "muon"}
    assert all("momentum_buffer" in v for v in ckpt["optimizer"]["muon"]["state"].values())
    # wsd: the last 20% of 6 x 256 tokens decay; the step starting at 1280 tokens is inside it
    lrs = {e["step"]: e["lr"] for e in read_metrics(straight) if "lr" in e}
    assert lrs[1] == lrs[4] == 3e-3 and lrs[5] == pytest.approx(3e-3 * (1536 - 1280) / (0.2 * 1536))


# The fast recipe (Muon, WSD) on 2 processes, 6 steps, checkpoints at 3 and 6: what DDP, FSDP and
# HSDP train are compared on it.
MUON_RUN = dict(recipe="fast", max_steps=6, checkpoint_every=3, val_every=3)


@pytest.fixture(scope="module")
def two_rank_muon_runs(shards, tmp_path_factory):
    """Three runs of 2 processes in one job (two process starts spared): DDP; FSDP2; FSDP2 resumed
    from DDP's step-3 checkpoint file. Returns their log_dirs and the job's output."""
    from test_distributed import runs_in_one_job
    folder = tmp_path_factory.mktemp("two_rank_muon_runs")
    dirs = {name: str(folder / name) for name in ("ddp", "fsdp", "fsdp_from_ddp")}
    codes, out = runs_in_one_job([
        tiny_args(shards, dirs["ddp"], **MUON_RUN),
        tiny_args(shards, dirs["fsdp"], fsdp=True, **MUON_RUN),
        tiny_args(shards, dirs["fsdp_from_ddp"], fsdp=True, resume=os.path.join(dirs["ddp"], "ckpt_0000003.pt"),
                  **MUON_RUN)], folder)
    assert codes == [0, 0, 0], (codes, out[-3000:])
    assert "DDP" in out and "Muon for 12 block matrices" in out  # 2 blocks: q, k, v, the projection, the MLP's two
    return dirs, out


@pytest.fixture(scope="module")
def ddp_muon(two_rank_muon_runs):
    return two_rank_muon_runs[0]["ddp"]


def test_ddp_with_muon_equals_one_process(shards, ddp_muon, tmp_path):
    single = str(tmp_path / "single")
    train_gpt.main(tiny_args(shards, single, **MUON_RUN))
    la, lb = train_losses(single), train_losses(ddp_muon)
    assert sorted(la) == sorted(lb) == list(range(6))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5), step
    wa = torch.load(f"{single}/ckpt_0000006.pt", weights_only=True)["model"]
    wb = torch.load(f"{ddp_muon}/ckpt_0000006.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_wsd_lr_at_its_boundaries():
    # on the token clock; one token a step here, so tokens read as steps
    s = Settings(max_lr=1e-3, min_lr=0.0, warmup_tokens=10, max_tokens=100, decay_tokens=100, schedule="wsd",
                 decay_fraction=0.2)
    assert lr_at(0, 1, s) == pytest.approx(1e-4)  # warmup as cosine's
    assert lr_at(9, 1, s) == pytest.approx(1e-3)
    assert lr_at(10, 1, s) == lr_at(50, 1, s) == lr_at(80, 1, s) == 1e-3  # stable up to the decay's start
    assert lr_at(81, 1, s) == pytest.approx(1e-3 * 19 / 20)
    assert lr_at(90, 1, s) == pytest.approx(0.5e-3)
    assert lr_at(99, 1, s) == pytest.approx(1e-3 / 20)
    assert lr_at(100, 1, s) == 0.0 and lr_at(150, 1, s) == 0.0
    s.min_lr = 1e-4
    assert lr_at(90, 1, s) == pytest.approx(0.55e-3) and lr_at(100, 1, s) == pytest.approx(1e-4)
    # a decay longer than the run after warmup starts at the warmup's end
    assert wsd_multiplier(750_000, 0, 1_000_000, 0.5) == 0.5
    assert wsd_multiplier(30, 20, 100, 1.0) == pytest.approx(70 / 80)


def test_wsd_defaults_to_decay_to_zero_and_the_default_recipe_is_unchanged():
    s = parse_settings(["--model=tiny", "--schedule=wsd"])
    train_gpt.resolve_model_settings(s)
    assert s.min_lr == 0.0 and s.optimizer == "adamw"
    d = parse_settings([])
    train_gpt.resolve_model_settings(d)
    assert (d.optimizer, d.schedule, d.min_lr) == ("adamw", "cosine", pytest.approx(6e-5))


def test_fast_recipe_and_the_command_line_wins():
    s = parse_settings(["--recipe=fast"])
    for name, value in train_gpt.RECIPES["fast"].items():
        assert getattr(s, name) == value
    assert s.optimizer == "muon"
    assert parse_settings(["--recipe=fast", "--optimizer=adamw"]).optimizer == "adamw"
    demo = parse_settings(["--demo"])  # the demo trains with the recipe that won its time (docs/recipes.md)
    assert demo.model == "tiny" and demo.recipe == "modern" and demo.optimizer == "muon" and demo.schedule == "wsd"
    assert (demo.arch, demo.rope, demo.n_embd, demo.muon_lr) == ("modern", True, 128, train_gpt.RECIPES["modern"]["muon_lr"])
    seed_recipe = parse_settings(["--demo", "--recipe=gpt3"])  # GPT-2's architecture, AdamW, cosine
    assert (seed_recipe.optimizer, seed_recipe.schedule, seed_recipe.max_lr_scale) == ("adamw", "cosine", 1.0)
    assert (seed_recipe.arch, seed_recipe.rope) == ("gpt", False)
    fast_demo = parse_settings(["--demo", "--recipe=fast"])
    assert (fast_demo.arch, fast_demo.muon_lr, fast_demo.n_embd) == ("gpt", 0.02, 128)


def test_max_lr_scale_scales_the_presets_lr_unless_max_lr_is_given():
    fast = parse_settings(["--recipe=fast", "--model=tiny"])
    train_gpt.resolve_model_settings(fast)
    assert fast.max_lr == pytest.approx(train_gpt.RECIPES["fast"]["max_lr_scale"] * 1e-3)  # tiny's preset: 1e-3
    given = parse_settings(["--recipe=fast", "--model=gpt2", "--max_lr=1e-4"])
    train_gpt.resolve_model_settings(given)
    assert given.max_lr == 1e-4 and given.min_lr == 0.0  # the command line wins; wsd decays to 0
    with pytest.raises(train_gpt.SettingsError, match="--max_lr_scale must be positive"):
        train_gpt.resolve_model_settings(parse_settings(["--max_lr_scale=0"]))


# ----------------------------------------------------------------------------------------------
# Muon under FSDP and HSDP (issue 24): support/sharded_muon.py's ShardedMuon

SHARDED_MUON_CHECKS = r"""
import json
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from model import GPT
from support.fastpath import clip_gradients, gradient_norm
from support.optim import Float32Muon, MuonConfig, configure_optimizers, muon_params
from support.presets import preset_config
from support.sharded_muon import ShardedMuon
from tools import plan

dist.init_process_group("gloo")
checks = {}
meshes = {"FSDP": init_device_mesh("cpu", (2,)),
          "HSDP 2 x 1": init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))}

# 1. torch's Muon on each whole matrix, given the gradient FSDP reduced, and ShardedMuon on the shards:
# the same weights and momentum, bit for bit, for 3 steps. Rows split evenly, unevenly (5: 3 + 2), one
# rank with none (1 row); tall and wide; 5 matrices, so the last round leaves a rank idle.
SHAPES = [(5, 8), (1, 6), (12, 8), (7, 3), (8, 12)]
for mesh_name, mesh in meshes.items():
    for cls in (torch.optim.Muon, Float32Muon):
        for fn in ("original", "match_rms_adamw"):
            torch.manual_seed(0)
            whole = [torch.nn.Linear(c, r, bias=False) for r, c in SHAPES]
            sharded = [torch.nn.Linear(c, r, bias=False) for r, c in SHAPES]
            for a, b in zip(whole, sharded):
                b.load_state_dict(a.state_dict())
                fully_shard(b, mesh=mesh)
            settings = dict(lr=0.05, momentum=0.9, weight_decay=0.1, adjust_lr_fn=fn)
            ref = cls([a.weight for a in whole], **settings)
            opt = ShardedMuon(cls, [b.weight for b in sharded], **settings)
            for step in range(3):
                g = torch.Generator().manual_seed(step)
                for a, b, (r, c) in zip(whole, sharded, SHAPES):
                    b(torch.randn(4, c, generator=g)).square().sum().backward()
                    a.weight.grad = b.weight.grad.full_tensor()
                ref.step(), opt.step(), ref.zero_grad(), opt.zero_grad()
            name = f"{mesh_name}, {cls.__name__}, {fn}"
            checks[name] = [torch.equal(b.weight.full_tensor(), a.weight)
                            and torch.equal(opt.state[b.weight]["momentum_buffer"].full_tensor(),
                                            ref.state[a.weight]["momentum_buffer"]) for a, b in zip(whole, sharded)]
            checks[name + ": momentum sharded as its matrix"] = all(
                opt.state[b.weight]["momentum_buffer"].placements == b.weight.placements for b in sharded)

# 2. the run's optimizer (AdamW + ShardedMuon) on the tiny preset sharded as tools/plan.py builds it,
# clipped by clip_gradients to 0.05 (the norm is larger), against the same model unsharded (torch's
# clipping, then torch's Muon) and unsharded unclipped. Two steps: the momentum carries the clipping over.
# Newton-Schulz in fp32: in bf16 the last bit of a gradient (the norm summed in another order) moves
# some weights by 2e-3 (seen here), and only equal gradients would compare.
setup = plan.Setup("tiny", gpus=2, micro_batch_size=1, fsdp=True, seq_len=64, dtype="float32", n_layer=2,
                   optimizer="muon", muon_float32=True)
config = preset_config("tiny", n_layer=2)
model, optimizer = plan.build(config, setup, torch.device("cpu"), meshes["FSDP"])
model.init_weights(0)
refs = {clip: GPT(config, seed=0) for clip in (True, False)}
ref_opts = {clip: configure_optimizers(m, 0.1, 1e-4, "cuda", log=lambda m: None, muon=MuonConfig(float32=True))
            for clip, m in refs.items()}
x = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
norms = []
for step in range(2):
    model(x, x).backward()
    norms.append(gradient_norm(list(model.parameters())))
    clip_gradients(list(model.parameters()), optimizer, 0.05, norms[-1])
    norms[-1] = norms[-1].item()
    optimizer.optimizers["adamw"].step()
    if step == 0:
        optimizer.optimizers["muon"].step()
    else:  # the bytes its step allocates beyond what is held, by torch's CPU allocator (rank 0 steps the largest)
        start = plan.resident_bytes(model, *optimizer.optimizers.values())
        peak = plan.measure_peak_bytes(optimizer.optimizers["muon"].step, model, *optimizer.optimizers.values())
        checks["muon step's temporaries, measured"] = peak - start
    optimizer.zero_grad(set_to_none=True)
    for clip, m in refs.items():
        m(x, x).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        ref_opts[clip].step()
        ref_opts[clip].zero_grad(set_to_none=True)
checks["norms"] = norms
for clip, m in refs.items():
    checks[f"max gap to unsharded, clip {clip}"] = max(
        (p.full_tensor() - r).abs().max().item() for p, r in zip(muon_params(model), muon_params(m)))
if dist.get_rank() == 0:
    print("CHECKS " + json.dumps(checks), flush=True)
dist.destroy_process_group()
"""


def test_sharded_muon_steps_each_matrix_whole_as_torch_muon_and_plan_counts_its_memory(tmp_path):
    """One torchrun job of 2 gloo processes, three checks (SHARDED_MUON_CHECKS): ShardedMuon against
    torch's Muon on whole matrices, bit for bit (FSDP, and HSDP's mesh: a shard group of one); the
    run's optimizer clipped by clip_gradients against torch's clipping and Muon unsharded; the
    bytes its step allocates, measured, against tools/plan.py's fake step."""
    import json
    from test_distributed import run_ok
    from tools import plan
    script = tmp_path / "sharded_muon_checks.py"
    script.write_text(SHARDED_MUON_CHECKS)
    out = run_ok([], script=(str(script),))
    checks = json.loads(next(line for line in out.splitlines() if line.startswith("CHECKS "))[len("CHECKS "):])
    for mesh in ("FSDP", "HSDP 2 x 1"):
        for cls in ("Muon", "Float32Muon"):
            for fn in ("original", "match_rms_adamw"):
                name = f"{mesh}, {cls}, {fn}"
                assert checks[name] == [True] * 5, name
                assert checks[name + ": momentum sharded as its matrix"], name
    assert min(checks["norms"]) > 1  # clipped to 0.05: by 20x and more
    # the clipped step as torch clips (its norm computed in another order: fp32 rounding), and not
    # the unclipped one (seen: 1.5e-7 and 9.2e-5; Muon's orthogonalized update barely feels a scale)
    assert checks["max gap to unsharded, clip True"] < 1e-5 < 3e-5 < checks["max gap to unsharded, clip False"]
    setup = plan.Setup("tiny", gpus=2, micro_batch_size=1, fsdp=True, seq_len=64, dtype="float32", n_layer=2,
                       optimizer="muon", muon_float32=True)
    planned, measured = plan.fake_step_peak(setup)["muon_temporaries"], checks["muon step's temporaries, measured"]
    assert measured > 12 * 1024 * 256  # at least the largest matrix (1024 x 256) whole with its gradient and momentum
    assert abs(planned / measured - 1) < 0.1, (planned, measured)


def test_sharded_muon_refuses_what_fsdp2_did_not_shard_by_rows():
    from support.sharded_muon import ShardedMuon
    with pytest.raises(ValueError, match="FSDP2's sharded matrices"):
        ShardedMuon(torch.optim.Muon, [torch.nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="momentum should be >= 0"):  # torch's own checks of its settings
        ShardedMuon(torch.optim.Muon, [], momentum=-1)


def sharded_checkpoint(folder):
    """A sharded checkpoint folder as one torch.save file (DCP's converter), loaded weights_only,
    and which tensors it holds as more than one chunk (sharded: each rank wrote its rows)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(folder, folder + ".pt")
    chunks = {k: len(v.chunks) for k, v in FileSystemReader(folder).read_metadata().state_dict_metadata.items()
              if hasattr(v, "chunks")}
    return torch.load(folder + ".pt", weights_only=True), chunks


def test_fsdp_with_muon_trains_as_ddp_bit_for_bit_and_takes_over_a_ddp_checkpoint(two_rank_muon_runs):
    """2 processes, FSDP2 and ShardedMuon, the fast recipe: the losses, the final weights and Muon's
    momentum buffers are DDP's bit for bit (the same gradients, gathered whole, stepped by the same
    torch Muon). The momentum buffers are in the sharded checkpoint as shards. DDP's step-3
    checkpoint file (AdamW's and Muon's state in one CombinedOptimizer dict) resumed under FSDP
    is sharded as it loads, and trains the uninterrupted run's steps 3-5 bit for bit. (A sharded
    checkpoint's own resume with Muon: the HSDP test below, and the one after it in one process.)"""
    dirs, out = two_rank_muon_runs
    ddp_muon, fsdp, resumed = dirs["ddp"], dirs["fsdp"], dirs["fsdp_from_ddp"]
    assert "FSDP" in out and "ShardedMuon: each matrix gathered whole" in out
    assert train_losses(fsdp) == train_losses(ddp_muon)  # bit for bit
    assert max(e["grad_norm"] for e in read_metrics(fsdp) if "grad_norm" in e) < 1.0  # below grad_clip: see docs
    state, chunks = sharded_checkpoint(os.path.join(fsdp, "ckpt_0000006"))
    ddp = torch.load(os.path.join(ddp_muon, "ckpt_0000006.pt"), weights_only=True)
    assert state["model"].keys() == ddp["model"].keys()
    assert all(torch.equal(state["model"][k], v) for k, v in ddp["model"].items())
    names = [n for n, _ in GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).named_parameters()
             if n.startswith("transformer.h.") and n.endswith(".weight") and "ln_" not in n]
    momentum = {n: state["optimizer"]["state"][n]["momentum_buffer"] for n in names}
    assert len(momentum) == 12 and all(torch.equal(momentum[n], ddp["optimizer"]["muon"]["state"][i]["momentum_buffer"])
                                      for i, n in enumerate(names))
    assert all(chunks[f"optimizer.state.{n}.momentum_buffer"] == 2 for n in names)
    assert f"resumed from {os.path.join(ddp_muon, 'ckpt_0000003.pt')} at step 3" in out
    after = train_losses(resumed)
    assert sorted(after) == [3, 4, 5] and after == {s: v for s, v in train_losses(fsdp).items() if s >= 3}


def test_hsdp_2x2_with_muon_trains_as_ddp_and_resumes_exactly(shards, ddp_muon, tmp_path):
    """4 processes as 2 replicas x 2-way FSDP, 2 sequences each: DDP's 8 sequences a step. The
    gradient is averaged over 4 ranks in another order than DDP's over 2 (fp32 rounding, which
    Newton-Schulz amplifies), so the losses agree to 2e-4 (seen: 4.3e-5; DDP over 4 processes
    against 2: 2.3e-5), where a Muon of each rank's own shard misses by 1.9e-3 (docs/recipes.md).
    Resumed from its step-3 checkpoint, it trains the uninterrupted run's steps bit for bit. It is
    also the suite's HSDP test: AdamW trains the embeddings, gains and biases here, whose gradients
    cross the same shard groups and replicas as a plain AdamW run's."""
    from test_distributed import runs_in_one_job
    hsdp, resumed = str(tmp_path / "hsdp"), str(tmp_path / "resumed")
    args = dict(fsdp=True, fsdp_shard_size=2, micro_batch_size=2, **MUON_RUN)
    codes, out = runs_in_one_job([tiny_args(shards, hsdp, **args),
                                  tiny_args(shards, resumed, resume=os.path.join(hsdp, "ckpt_0000003"), **args)],
                                 tmp_path, nproc=4)
    assert codes == [0, 0], codes
    assert "HSDP (2 replicas x 2-way FSDP)" in out and "ShardedMuon" in out
    assert f"resumed from {os.path.join(hsdp, 'ckpt_0000003')} at step 3" in out
    la, lb = train_losses(hsdp), train_losses(ddp_muon)
    assert sorted(la) == sorted(lb) == list(range(6))
    assert all(la[s] == pytest.approx(lb[s], abs=2e-4) for s in la), (la, lb)
    assert train_losses(resumed) == {s: v for s, v in la.items() if s >= 3}


def test_fsdp_with_muon_resumed_with_new_settings_trains_them(shards, tmp_path):
    """keep_settings under FSDP (a group of one): a resume with --muon_momentum=0.8 steps with 0.8
    (the next checkpoint's Muon group, which is the one that stepped), says so in the log, and
    trains otherwise than the 0.95 it was saved with. The NaN guard stops an FSDP + Muon run whose
    update made the weights non-finite."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    args = dict(fsdp=True, recipe="fast", max_steps=4, checkpoint_every=2, val_every=0)
    train_gpt.main(tiny_args(shards, first, **args))
    train_gpt.main(tiny_args(shards, second, resume=os.path.join(first, "ckpt_0000002"), muon_momentum=0.8, **args))
    state, _ = sharded_checkpoint(os.path.join(second, "ckpt_0000004"))
    groups = state["optimizer"]["param_groups"]
    muon = [g for g in groups if "momentum" in g]
    assert len(muon) == 1 and muon[0]["momentum"] == 0.8 and len(groups) == 3
    assert "settings changed since the checkpoint (these train now): muon_momentum 0.95 -> 0.8" in \
        open(os.path.join(second, "log.txt")).read()
    a, b = train_losses(first), train_losses(second)
    assert b[2] == a[2] and b[3] != a[3]  # step 2 trained with 0.8: step 3's loss shows it
    fail(tiny_args(shards, str(tmp_path / "nan"), fsdp=True, optimizer="muon", max_lr=1e39, max_steps=2),
         "step 0's update made the weights NaN/Inf")


def test_the_modern_recipe_under_fsdp_resumes_exactly_also_from_a_checkpoint_saved_before(shards, tmp_path,
                                                                                           monkeypatch):
    """The modern GPT has no biases or gains, so AdamW's undecayed group was empty, and
    torch.distributed.checkpoint loads no empty group beside a second optimizer (Muon): the
    resume died in a traceback. Optimizers hold no empty groups now, and a sharded checkpoint
    saved with one (as before) is read whole and resumes too, and so does a file (one process)."""
    straight, old, again, from_old = (str(tmp_path / n) for n in ("straight", "old", "again", "from_old"))
    args = dict(fsdp=True, recipe="modern", max_steps=4, checkpoint_every=2, val_every=0)
    train_gpt.main(tiny_args(shards, straight, **args))
    train_gpt.main(tiny_args(shards, again, resume=os.path.join(straight, "ckpt_0000002"), **args))
    last_two = {s: v for s, v in train_losses(straight).items() if s >= 2}
    assert train_losses(again) == last_two

    class AdamWAsBefore(torch.optim.AdamW):  # the optimizer of the code before: an empty undecayed group
        def __init__(self, groups, **settings):
            assert all(group["params"] for group in groups)
            super().__init__(list(groups) + [{"params": [], "weight_decay": 0.0, "lr_scale": 1.0}], **settings)
    one = dict(args, fsdp=False)
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "AdamW", AdamWAsBefore)
        train_gpt.main(tiny_args(shards, old, stop_step=2, **args))
        train_gpt.main(tiny_args(shards, old + "_file", stop_step=2, **one))
    train_gpt.main(tiny_args(shards, from_old, resume=os.path.join(old, "ckpt_0000002"), **args))
    assert train_losses(from_old) == last_two
    train_gpt.main(tiny_args(shards, from_old + "_file", resume=os.path.join(old + "_file", "ckpt_0000002.pt"), **one))
    assert train_losses(from_old + "_file") == last_two  # FSDP in one process trains as one process does
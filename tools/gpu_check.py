"""CUDA paths in one go, for a lent GPU: bf16 autocast, the chunked loss, flash attention, fused
AdamW, DDP and FSDP starting from the same weights, NCCL with one rank. Prints one line per check and exits non-zero if any failed.

    python -m tools.gpu_check          # then python -m tools.bench for MFU; bash tools/gpu_check.sh runs both and more
    python -m tools.gpu_check banded   # a group: GPT-3's banded attention, FlexAttention against the masked reference
    python -m tools.gpu_check fsdp_muon_step_share     # one check by name (groups: default, banded, fsdp_muon, modern,
                                                       # tensor_parallel)
"""

import contextlib
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ARCHITECTURES, GPT, GPTConfig
from support import runtime
from support.attention_kernels import attention, band_mask, flex_band_attention
from support.loss import chunked_cross_entropy
from support.optim import configure_optimizers

CHECKS = {"default": [], "banded": [], "fsdp_muon": [], "modern": [], "tensor_parallel": []}  # python -m tools.gpu_check [group or check ...]


def check(fn=None, group="default"):
    if fn is None:
        return lambda fn: check(fn, group)
    CHECKS[group].append(fn)
    return fn


@check
def bf16_chunked_loss_matches_full_logits():
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=256), seed=0).cuda()
    x = torch.randint(0, 50257, (8, 256), device="cuda")
    y = torch.randint(0, 50257, (8, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(x, y)
        model.loss_fn = chunked_cross_entropy
        chunked = model(x, y)
    gap = abs(full.item() - chunked.item())
    assert gap < 1e-2, f"chunked loss {chunked.item()} vs full {full.item()}"
    return f"full {full.item():.5f} chunked {chunked.item():.5f}"


@check
def flash_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(4, 12, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash attention cannot run
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    return f"flash kernel ran, relative error vs fp32 {err:.1e}"


@check
def fused_adamw():
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64), seed=0).cuda()
    opt = configure_optimizers(model, 0.1, 1e-3, "cuda", log=lambda m: None)
    assert opt.defaults.get("fused"), "fused AdamW was not chosen on CUDA"
    x = torch.randint(0, 50257, (2, 64), device="cuda")
    loss = model(x, x)
    loss.backward()
    opt.step()
    return "fused=True, one step ok"


@check
def ddp_and_fsdp_start_alike():
    """DDP's model is built on the CPU and moved, FSDP's materialized on the GPU shard by shard:
    both must hold the same initial weights (model.init_weights draws on a CPU generator), and
    give the same first loss (fp32)."""
    import train_gpt
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = "29512"
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        config = GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128)
        rt = runtime.Runtime(0, 0, 1, torch.device("cuda", 0), None, True)
        ddp, _ = train_gpt.build_model(train_gpt.Settings(compile=False, seed=7), config, rt)
        fsdp, _ = train_gpt.build_fsdp_model(train_gpt.Settings(fsdp=True, compile=False, seed=7), config, rt)
        same = all(torch.equal(a, b.full_tensor()) for a, b in zip(ddp.parameters(), fsdp.parameters()))
        assert same, "DDP and FSDP start from different weights"
        x = torch.randint(0, 50257, (4, 128), device="cuda")
        losses = [m(x, x).item() for m in (ddp, fsdp)]
        assert abs(losses[0] - losses[1]) < 1e-5, losses
        return f"identical weights; first losses DDP {losses[0]:.6f} FSDP {losses[1]:.6f}"
    finally:
        dist.destroy_process_group()


@check
def nccl_single_rank():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    t = torch.ones(4, device="cuda")
    dist.all_reduce(t)
    dist.destroy_process_group()
    assert t.sum().item() == 4
    return "all_reduce ok"


@check(group="fsdp_muon")
def fsdp_muon_step_share(config=None, micro_batch=8, accum=64, device="cuda", backend="nccl"):
    """FSDP2 + Muon (support/sharded_muon.py) on one GPU, a process group of one (every matrix is
    gathered through the NCCL all_to_all path, from one rank to itself): forward + backward of one
    micro batch, and the optimizer step (AdamW's part, Muon's part), timed apart. Default: gpt3-xl's
    width and context with 4 of its 24 blocks (the share does not depend on the depth: both grow by
    a block's worth) at micro batch 8 x 2048; accum 64 is gpt3-xl's 2**20-token step on this one GPU.
    Also 3 steps of a small fp32 model against the same steps unsharded (torch's Muon): the gap."""
    import time
    from support.optim import MuonConfig, muon_params
    from support.presets import preset_config
    from support.sharded_muon import ShardedMuon, step_flops
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = "29513"
    dist.init_process_group(backend, rank=0, world_size=1,
                            device_id=torch.device(device, 0) if device == "cuda" else None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        mesh = init_device_mesh(device, (1,))

        def sharded(cfg, seed):
            model = GPT(cfg, seed=seed).to(device)
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, configure_optimizers(model, 0.1, 1e-4, device, log=lambda m: None,
                                               muon=MuonConfig(float32=device == "cpu"), sharded_muon=ShardedMuon)
        small = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)
        (fsdp, fsdp_opt), plain = sharded(small, 0), GPT(small, seed=0).to(device)
        plain_opt = configure_optimizers(plain, 0.1, 1e-4, device, log=lambda m: None,
                                         muon=MuonConfig(float32=device == "cpu"))
        x = torch.randint(0, 50257, (4, 64), device=device)
        for _ in range(3):
            for m, o in ((fsdp, fsdp_opt), (plain, plain_opt)):
                m(x, x).backward()
                o.step()
                o.zero_grad(set_to_none=True)
        gap = max((a.full_tensor() - b).abs().max().item() for a, b in zip(muon_params(fsdp), muon_params(plain)))
        assert gap < 1e-2, f"FSDP + ShardedMuon moved the matrices {gap:.2e} away from torch's Muon unsharded"
        cfg = config or preset_config("gpt3-xl", n_layer=4)
        model, opt = sharded(cfg, 0)
        x = torch.randint(0, 50257, (micro_batch, cfg.block_size), device=device)
        times = {"forward+backward": [], "AdamW's step": [], "Muon's step": []}
        for i in range(6):  # the first 2 warm up
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(x, x)
            loss.backward()
            sync()
            t1 = time.perf_counter()
            opt.optimizers["adamw"].step()
            sync()
            t2 = time.perf_counter()
            opt.optimizers["muon"].step()
            sync()
            t3 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                for name, t in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[name].append(t)
        fb, adamw, muon = (sorted(v)[len(v) // 2] for v in times.values())
        flops = step_flops([tuple(p.shape) for p in muon_params(model)], 1, opt.optimizers["muon"].defaults["ns_steps"])
        share = (adamw + muon) / (accum * fb + adamw + muon)
        return (f"unsharded gap {gap:.1e}; {cfg.n_layer} blocks of {cfg.n_embd}, micro batch {micro_batch} x "
                f"{cfg.block_size}: forward+backward {fb * 1e3:.1f} ms, AdamW's step {adamw * 1e3:.1f} ms, Muon's step "
                f"{muon * 1e3:.1f} ms ({flops / 1e12:.2f} TFLOP of Newton-Schulz: {flops / muon / 1e12:.0f} TFLOP/s); "
                f"the optimizer's share of a step of {accum} micro batches: {share:.2%} (medians of 4)")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# GPT-3's banded attention (model.attention): FlexAttention on CUDA

def relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@check(group="banded")
def flex_band_attention_matches_the_masked_reference():
    """model.attention on a banded layer (T 2048, band 256, gpt3-small's heads) takes FlexAttention,
    compiled, with the band's block mask; against SDPA with the boolean band mask in fp32 (the
    math kernel): forward and the three gradients, in fp32 and bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T, band, lines = 2048, 256, []
    mask = band_mask(T, band, "cuda")
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 12, T, 64, device="cuda", dtype=dtype, generator=g, requires_grad=True) for _ in range(3))
        out = attention(q, k, v, band)
        assert torch.equal(out, flex_band_attention(q, k, v, band)), "attention() did not take FlexAttention"
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
        errors = [relative_error(out, ref)] + [relative_error(a, b) for a, b in zip(grads, ref_grads)]
        assert max(errors) < tolerance, (dtype, errors)
        lines.append(f"{str(dtype).split('.')[1]}: out/dq/dk/dv relative error " + "/".join(f"{e:.1e}" for e in errors))
    return "; ".join(lines)


@check(group="banded")
def flex_band_attention_speed():
    """Forward + backward at T 2048 (bf16, 8 x 12 heads x 64): FlexAttention over the band against
    flash (dense causal) and SDPA with the band's boolean mask (every block computed). A
    measurement, no threshold: the band's share of a dense layer's work is about 3 key blocks of 8.5."""
    T, band = 2048, 256
    q, k, v = (torch.randn(8, 12, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = band_mask(T, band, "cuda")
    paths = {"flex band": lambda: flex_band_attention(q, k, v, band),
             "flash dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
             "SDPA masked band": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    ms = {}
    for name, fn in paths.items():
        for _ in range(3):
            fn().sum().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn().sum().backward()
        torch.cuda.synchronize()
        ms[name] = (time.perf_counter() - t0) * 100
    return ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items())


def compiled_trains_as_eager(config):
    """The compiled model's losses over 3 AdamW steps (bf16 autocast) against the same model eager."""
    x = torch.randint(0, 50257, (3, 4, 1024), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    losses = {}
    for name in ("eager", "compiled"):
        gpt = GPT(config, seed=0).cuda()
        step_model = torch.compile(gpt) if name == "compiled" else gpt
        opt = configure_optimizers(gpt, 0.1, 1e-3, "cuda", log=lambda m: None)
        losses[name] = []
        for batch in x:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(batch, torch.roll(batch, -1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    gaps = [abs(a - b) for a, b in zip(losses["eager"], losses["compiled"])]
    assert max(gaps) < 2e-2, losses
    return f"eager {losses['eager']}, compiled {losses['compiled']}"


@check(group="banded")
def compiled_banded_gpt_trains_as_eager():
    """A gpt3-pattern GPT (4 layers, T 1024, band 256), bf16: compiled against eager (banded layers
    on FlexAttention either way)."""
    return compiled_trains_as_eager(GPTConfig(block_size=1024, n_layer=4, n_head=12, n_embd=768, attention="gpt3",
                                              attention_band=256))


# ----------------------------------------------------------------------------------------------
# The modern GPT (--arch=modern, docs/architecture.md): inductor on the bundle

@check(group="modern")
def compiled_modern_gpt_trains_as_eager():
    """The modern bundle (rotary positions, QK-norm, ReLU², untied head, soft-cap 15, zero-init, no
    biases, RMSNorm), 4 layers at gpt2's width, T 1024, bf16: inductor's graph against eager (the
    CPU suite traces it with aot_eager only)."""
    return compiled_trains_as_eager(GPTConfig(block_size=1024, n_layer=4, n_head=12, n_embd=768,
                                              **ARCHITECTURES["modern"]))


# ----------------------------------------------------------------------------------------------
# Tensor parallelism (support/parallelize.py): its code on one GPU, a TP group of one

@check(group="tensor_parallel")
def tp_group_of_one_trains_as_fsdp(device="cuda", backend="nccl"):
    """One GPU cannot run tensor parallelism across ranks (docs/distributed.md), but its code runs
    with a TP group of one, a (1, 1) mesh: the TP plan's DTensors, sequence-parallel norms, the
    vocabulary-parallel loss under loss_parallel, inside FSDP2 with bf16 parameters, eager and with
    each block compiled. 3 AdamW steps of the modern GPT with GPT-3's banded attention (T 256, 2
    layers, selective activation checkpointing) against plain FSDP2: the same losses (bf16 on CUDA)."""
    import train_gpt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel
    from model import full_cross_entropy
    from support.loss import vocab_parallel_cross_entropy
    from support.parallelize import parallelize
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = "29514"
    dist.init_process_group(backend, rank=0, world_size=1,
                            device_id=torch.device(device, 0) if device == "cuda" else None)
    try:
        config = GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=256, attention="gpt3", attention_band=64,
                           **ARCHITECTURES["modern"])
        rt = runtime.Runtime(0, 0, 1, torch.device(device, 0) if device == "cuda" else torch.device(device),
                             torch.bfloat16 if device == "cuda" else None, True)
        mesh = init_device_mesh(device, (1, 1), mesh_dim_names=("dp", "tp"))
        x = torch.randint(0, 50257, (3, 4, 256), generator=torch.Generator().manual_seed(0)).to(rt.device)
        losses = {}
        for name in ("FSDP", "TP group of one", "TP group of one, compiled")[:3 if device == "cuda" else 2]:
            tp = name.startswith("TP")
            s = train_gpt.Settings(fsdp=True, compile=name.endswith("compiled"), activation_checkpointing="selective")
            with torch.device("meta"):
                model = GPT(config)
            parallelize(model, s, rt, meshes=(mesh["dp"], mesh["tp"]) if tp else None)
            model.to_empty(device=rt.device)
            model.init_weights(7)
            model.loss_fn = vocab_parallel_cross_entropy if tp else full_cross_entropy
            opt = configure_optimizers(model, 0.1, 1e-3, device, log=lambda m: None)
            context = loss_parallel if tp else contextlib.nullcontext
            losses[name] = []
            for batch in x:
                with context():
                    loss = model(batch, torch.roll(batch, -1, 1))
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses[name].append(round(loss.item(), 5))
        gap = max(abs(a - b) for name in losses for a, b in zip(losses[name], losses["FSDP"]))
        assert gap < (2e-2 if device == "cuda" else 1e-5), losses
        return f"largest gap {gap:.1e}: {losses}"
    finally:
        dist.destroy_process_group()


def main(argv=None):
    """python -m tools.gpu_check [GROUP or CHECK ...]: the default group, or the groups and checks named."""
    argv = sys.argv[1:] if argv is None else argv
    named = {fn.__name__: [fn] for fns in CHECKS.values() for fn in fns} | CHECKS
    unknown = [name for name in argv if name not in named]
    if unknown:
        sys.exit(f"gpu_check.py: error: unknown {unknown}; choose groups {', '.join(CHECKS)} or checks "
                 f"{', '.join(n for n in named if n not in CHECKS)}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    failed = 0
    for fn in [fn for name in argv or ["default"] for fn in named[name]]:
        try:
            print(f"PASS {fn.__name__}: {fn()}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}:\n{traceback.format_exc()}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

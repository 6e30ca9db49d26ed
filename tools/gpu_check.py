"""CUDA paths in one go, for a lent GPU: bf16 autocast, the chunked loss, flash attention, fused
AdamW, DDP and FSDP starting from the same weights, NCCL with one rank. Prints one line per check and exits non-zero if any failed.

    python -m tools.gpu_check          # then python -m tools.bench for MFU; bash tools/gpu_check.sh runs both and more
    python -m tools.gpu_check fsdp_muon_step_share     # one check by name, also those not run by default
"""

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import GPT, GPTConfig, configure_optimizers
from support import runtime

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


@check
def bf16_chunked_loss_matches_full_logits():
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=256), seed=0).cuda()
    x = torch.randint(0, 50257, (8, 256), device="cuda")
    y = torch.randint(0, 50257, (8, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, full = model(x, y)
        _, chunked = model(x, y, return_logits=False)
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
    _, loss = model(x, x)
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
        losses = [m(x, x)[1].item() for m in (ddp, fsdp)]
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


def fsdp_muon_step_share(config=None, micro_batch=8, accum=64, device="cuda", backend="nccl"):
    """FSDP2 + Muon (support/sharded_muon.py) on one GPU, a process group of one (every matrix is
    gathered through the NCCL all_to_all path, from one rank to itself): forward + backward of one
    micro batch, and the optimizer step (AdamW's part, Muon's part), timed apart. Default: gpt3-xl's
    width and context with 4 of its 24 blocks (the share does not depend on the depth: both grow by
    a block's worth) at micro batch 8 x 2048; accum 64 is gpt3-xl's 2**20-token step on this one GPU.
    Also 3 steps of a small fp32 model against the same steps unsharded (torch's Muon): the gap."""
    import time
    from model import MuonConfig, muon_params, preset_config
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
                m(x, x)[1].backward()
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
                loss = model(x, x)[1]
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


NAMED = {"fsdp_muon_step_share": fsdp_muon_step_share}  # run by name only (tools/gpu_check.sh section 5)


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    failed = 0
    named = {fn.__name__: fn for fn in CHECKS} | NAMED
    for fn in [named[name] for name in sys.argv[1:]] or CHECKS:
        try:
            print(f"PASS {fn.__name__}: {fn()}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}:\n{traceback.format_exc()}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

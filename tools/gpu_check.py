"""CUDA paths in one go, for a lent GPU: bf16 autocast, the chunked loss, flash attention, fused
AdamW, DDP and FSDP starting from the same weights, NCCL with one rank. Prints one line per check and exits non-zero if any failed.

    python -m tools.gpu_check          # then python -m tools.bench for MFU; bash tools/gpu_check.sh runs both and more
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


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    failed = 0
    for fn in CHECKS:
        try:
            print(f"PASS {fn.__name__}: {fn()}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}:\n{traceback.format_exc()}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

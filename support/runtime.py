"""Where a run runs: torchrun's environment, the device, the process group, the FSDP mesh, and the
few collectives the trainer needs (a mean over ranks, a count over shards)."""

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from support import run_guard
from support.cli import RunError, SettingsError
from support.fastpath import cpu_has_bf16, keep_freed_memory


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None for fp32
    is_main: bool
    tensor_parallel: int = 1  # ranks per TP group (--tensor_parallel): consecutive ranks, which train one share of a batch

    @property
    def dp_rank(self):
        """Which share of each batch this rank trains (and scores in evaluations): its TP group's."""
        return self.rank // self.tensor_parallel

    @property
    def dp_size(self):
        """How many shares a batch is split into: the data-parallel ranks, one a TP group."""
        return self.world_size // self.tensor_parallel


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(backend, device_id, timeout_s=600):
    """init_process_group from torchrun's environment (env://). torchrun keeps one store across
    --max-restarts, so a restarted process can read the address a peer of the crashed generation
    left there (torch issue 135712; seen here: gloo's connectFullMesh refused, or a hang, in 2
    restarts of 5). With one torchrun agent (one node) its restart count numbers the generations,
    and each generation's keys go under a prefix of their own. Across nodes the agents' counts can
    differ, so there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per restart) is the fix:
    see restart_advice."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    if os.environ.get("GROUP_WORLD_SIZE") == "1":
        store = dist.PrefixStore(f"train_gpt/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, device_id=device_id,
                            timeout=datetime.timedelta(seconds=timeout_s))


def restart_advice(env=os.environ):
    """A line of advice for a multi-node torchrun job with --max-restarts and the shared store."""
    if (int(env.get("GROUP_WORLD_SIZE", 1)) > 1 and int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
            and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        return ("torchrun restarts across nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node "
                "before torchrun, or a restarted job can read the crashed one's addresses and fail to connect")
    return None


def setup_runtime(s):
    """Read torchrun's environment, pick the device, start the process group."""
    run_guard.stop_with_launcher()  # under torchrun: a SIGKILLed launcher must not leave its workers running
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device_type = s.device
    if device_type == "auto":
        device_type = ("cuda" if torch.cuda.is_available() else
                       "mps" if torch.backends.mps.is_available() else "cpu")
    device_type, _, index = device_type.partition(":")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device={s.device} but CUDA is not available here; use --device=cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local_world > torch.cuda.device_count():
            raise RunError(f"{local_world} processes on this machine but only {torch.cuda.device_count()} "
                               f"GPUs: set --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = cuda_device(index, local_rank, world_size)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    backend = s.backend if s.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise RunError("--backend=nccl needs CUDA GPUs; on the CPU use --backend=gloo (or auto)")
    if world_size > 1 or s.fsdp:  # FSDP needs a process group, even of one
        if "MASTER_ADDR" not in os.environ:  # plain `python train_gpt.py --fsdp`: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        init_process_group(backend, device if device_type == "cuda" else None, s.collective_timeout)
    if s.dtype == "auto":
        s.dtype = "bfloat16" if device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16()) else "float32"
    if s.compile is None:
        s.compile = device_type == "cuda"
    if s.chunked_loss is None:  # under TP the loss is vocabulary-parallel instead (support/parallelize.py)
        s.chunked_loss = device_type == "cpu" and s.tensor_parallel == 1
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left over
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()
    amp = torch.bfloat16 if s.dtype == "bfloat16" else None
    return Runtime(rank, local_rank, world_size, device, amp, rank == 0, s.tensor_parallel)


def cuda_device(index, local_rank, world_size):
    """The GPU a process trains on: the one --device=cuda:N names (index "N"), else under torchrun
    its local rank's (one process per GPU), else the current one (cuda:0 unless CUDA_VISIBLE_DEVICES
    says otherwise)."""
    if not index:
        return torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if world_size > 1:
        raise SettingsError(f"--device=cuda:{index} names one GPU, but under torchrun each of the {world_size} "
                            f"processes trains on its local rank's: use --device=cuda (CUDA_VISIBLE_DEVICES "
                            f"chooses the GPUs torchrun uses)")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise SettingsError(f"--device=cuda:{index}, but this machine has {count} GPU{'s' if count > 1 else ''}: "
                            f"choose {', '.join(f'cuda:{i}' for i in range(count))} or cuda")
    return torch.device("cuda", int(index))


def fsdp_mesh(s, rt):
    """The ranks FSDP2 shards over. With --fsdp_shard_size (hybrid sharding, HSDP) a 2-D mesh:
    each group of fsdp_shard_size ranks (one node) holds one sharded copy of the model, and the
    groups are replicas of each other. The per-micro-step gathers and reduce-scatters then stay on
    the fast links inside a node; across nodes only one all-reduce of each gradient shard per step
    runs, at the price of a memory per GPU of sharding over one node, not over all."""
    from torch.distributed.device_mesh import init_device_mesh
    shard = s.fsdp_shard_size or rt.world_size
    if shard == rt.world_size:
        return init_device_mesh(rt.device.type, (rt.world_size,))
    return init_device_mesh(rt.device.type, (rt.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def describe_parallelism(s, rt):
    tp = f" x {s.tensor_parallel}-way TP" if s.tensor_parallel > 1 else ""
    if s.fsdp and s.fsdp_shard_size and s.fsdp_shard_size < rt.world_size:
        shard = s.fsdp_shard_size // s.tensor_parallel
        return f"HSDP ({rt.world_size // s.fsdp_shard_size} replicas x {shard}-way FSDP){tp}"
    if tp:
        return f"FSDP ({rt.dp_size}-way){tp}"
    return "FSDP" if s.fsdp else "DDP" if rt.world_size > 1 else "single process"


def all_reduce_mean(value, rt, stop=None):
    """The mean over ranks; with `stop`, its flag travels in the same all-reduce (run_guard)."""
    if rt.world_size > 1:
        if stop is not None:
            value = stop.ride(value, rt.world_size)
        else:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= rt.world_size
    return value


def count_on_all_ranks(n, rt, sharded):
    """n summed over ranks when each holds its own shard (FSDP); otherwise every rank has it all."""
    if sharded and rt.world_size > 1:
        total = torch.tensor(float(n), device=rt.device)
        dist.all_reduce(total)
        return int(total.item())
    return n

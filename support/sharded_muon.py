"""Muon under FSDP2: every block matrix orthogonalized whole, as without sharding, by torch's own
Muon step, while its momentum buffer stays sharded.

FSDP2 holds each matrix as a DTensor sharded by rows (Shard(0)) over the ranks of its mesh (over
the mesh's shard dim under HSDP; the replicas hold the same shards). torch.optim.Muon's step
needs the whole matrix: its Newton-Schulz iteration orthogonalizes all of it, and its learning
rate scales with the whole shape. Given FSDP2's DTensors it runs without an error, but its steps
are not the whole-matrix ones (docs/recipes.md).

So ShardedMuon deals the matrices out: each step, in rounds of one matrix per rank of the shard
group (largest first, so the matrices of a round are alike and no rank waits for a larger one),
  1. gathers to each matrix's rank every rank's rows of its weight, gradient and momentum buffer
     (three all_to_all_single calls a round, fp32: what torch's Muon step reads);
  2. that rank runs torch's Muon step (muon_class: torch.optim.Muon, or support/optim.py's
     Float32Muon on CPUs without bf16 units, as under DDP) on the whole tensors: the step DDP's
     Muon takes, bit for bit when the gradient is the same;
  3. sends every rank its rows of the new weight and momentum buffer back (two all_to_all_single).
Each rank thus orthogonalizes 1/N of the matrices and receives 1/N of them whole: at gpt3-xl on
8 GPUs 8x less work and 5x fewer bytes than every rank gathering and stepping every matrix
(docs/recipes.md).

Under tensor parallelism (support/parallelize.py) a matrix is also split over the TP group, a
node's ranks: by rows (q, k, v, the MLP's first) or by columns (the output projections). Each
round first gathers its matrices' TP shards (rows_over_fsdp: DTensor's redistribute, inside the
node), leaving the rows FSDP shards them by, and puts the new weight and momentum back into them
after. Every rank of a TP group then steps the same matrices (the work is shared over the FSDP
ranks only), and under FSDP x TP DTensor gathers a row-split matrix whole on every rank of the
group first (FSDP shards the rows of its TP shards: two all-gathers, docs/distributed.md). The momentum buffers stay DTensors sharded like their matrices: in the sharded
checkpoint as shards, as AdamW's moments are. For the step, each rank holds the whole weight,
gradient and momentum of the largest matrix it steps (12 bytes an element), one flat buffer of its
rows of the largest round, and the Newton-Schulz temporaries: tools/plan.py counts them.
"""

import torch
import torch.distributed as dist


def fsdp_placements(t):
    """The placements of t (a DTensor) with tensor parallelism's mesh dim ("tp") whole: the rows
    FSDP2 shards it by over its other dims, as without TP. Without TP, t's own."""
    from torch.distributed.tensor import Replicate, Shard
    names = t.device_mesh.mesh_dim_names or ()
    if "tp" not in names:
        return tuple(t.placements)
    return tuple(Replicate() if name == "tp" else placement if placement.is_replicate() else Shard(0)
                 for name, placement in zip(names, t.placements))


def rows_over_fsdp(t):
    """t (a matrix, its gradient or its momentum) gathered over the TP group into the rows FSDP2
    shards it by (fsdp_placements); without TP, t itself, with no communication."""
    placements = fsdp_placements(t)
    return t if placements == tuple(t.placements) else t.redistribute(placements=placements)


def row_sharding(p):
    """(process group, this rank's index in it, its size) of the mesh dim over which FSDP2 shards
    the matrix p by rows (once TP's shards are gathered); a ValueError for any other layout."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(p, DTensor) or p.ndim != 2:
        raise ValueError(f"ShardedMuon steps FSDP2's sharded matrices (2-D DTensors); got a {type(p).__name__} "
                         f"of shape {tuple(p.shape)}")
    placements = fsdp_placements(p)
    sharded = [d for d, placement in enumerate(placements) if placement.is_shard()]
    if len(sharded) != 1 or placements[sharded[0]] != Shard(0) or not all(
            placement.is_replicate() for d, placement in enumerate(placements) if d != sharded[0]):
        raise ValueError(f"ShardedMuon steps matrices sharded by rows on one mesh dim (FSDP2's Shard(0), "
                         f"replicated on any other); got placements {placements}")
    mesh, dim = p.device_mesh, sharded[0]
    return mesh.get_group(dim), mesh.get_local_rank(dim), mesh.size(dim)


def row_counts(rows, n):
    """The rows of each of n ranks, as FSDP2 splits them (torch.chunk: ceil(rows / n) each, the
    last ones fewer or none)."""
    size = -(-rows // n)
    return [max(0, min(size, rows - i * size)) for i in range(n)]


def deal(shapes, n):
    """The rounds of a step over matrices of these shapes: lists of at most n indices, the largest
    matrices first (ties in the given order); a round's i-th matrix is stepped by the group's rank i."""
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1])
    return [order[k:k + n] for k in range(0, len(order), n)]


class ShardedMuon(torch.optim.Optimizer):
    """torch's Muon (muon_class) over FSDP2's row-sharded matrices: each step, each matrix is
    gathered whole to one rank of its shard group, stepped there by muon_class, and its rows sent
    back (module docstring). Its param groups hold muon_class's own settings (lr, momentum,
    weight_decay, nesterov, adjust_lr_fn, ...: torch checks and fills them), so a schedule or a
    resume sets them as it sets torch's Muon's; its state is torch's Muon's, "momentum_buffer" per
    matrix, a DTensor sharded like it. Every rank of the group must call step() (collectives)."""

    def __init__(self, muon_class, params, **settings):
        self.muon_class = muon_class
        defaults = muon_class([torch.zeros(1, 1)], **settings).defaults  # torch's checks and defaults
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                group_rank_size = row_sharding(p)
                rows = row_counts(p.shape[0], group_rank_size[2])[group_rank_size[1]]
                if fsdp_placements(p) == tuple(p.placements) and p.to_local().shape != (rows, p.shape[1]):
                    raise ValueError(f"a matrix of shape {tuple(p.shape)} holds {tuple(p.to_local().shape)} on this "
                                     f"rank, not the {rows} rows torch.chunk gives it: FSDP2 shards otherwise here")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            matrices = [p for p in group["params"] if p.grad is not None]  # the same on every rank (FSDP)
            by_group = {}
            for p in matrices:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)  # sharded like p, as torch's Muon makes it
                pg, rank, n = row_sharding(p)
                by_group.setdefault(pg, (rank, n, []))[2].append(p)
            for pg, (rank, n, ps) in by_group.items():
                self._step_group(ps, settings, pg, rank, n)
        return loss

    def _step_group(self, matrices, settings, pg, rank, n):
        """Step the matrices sharded over one group of n ranks, round by round (deal)."""
        rounds = [[matrices[i] for i in round_] for round_ in deal([tuple(p.shape) for p in matrices], n)]
        stepped_here = [round_[rank] for round_ in rounds if rank < len(round_)]
        # One set of buffers for the step, the largest any round needs, rather than fresh tensors
        # each round: a backend may hold a collective's tensors a moment after it returns (seen on
        # gloo: a round's buffers still allocated when the next round's were made).
        like = matrices[0].to_local()
        here = lambda p: row_counts(p.shape[0], n)[rank] * p.shape[1]  # the elements of p's rows on this rank
        sent = like.new_empty(max(sum(here(p) for p in round_) for round_ in rounds))
        whole = like.new_empty(3, max((p.numel() for p in stepped_here), default=0))  # weight, gradient, momentum
        for round_ in rounds:
            tensors = [[rows_over_fsdp(t) for t in (p, p.grad, self.state[p]["momentum_buffer"])] for p in round_]
            shards = [[t.to_local() for t in ts] for ts in tensors]
            mine = round_[rank] if rank < len(round_) else None
            wholes = [whole[k, :mine.numel()].view(mine.shape) if mine is not None else None for k in range(3)]
            for k in range(3):
                exchange_rows([s[k] for s in shards], wholes[k], sent, pg, n, gather=True)
            if mine is not None:
                step_whole(self.muon_class, *wholes, settings)
            for k in (0, 2):  # the new weight and momentum back; the gradient is read only
                exchange_rows([s[k] for s in shards], wholes[k], sent, pg, n, gather=False)
            for p, (weight, _, momentum) in zip(round_, tensors):  # and under TP into its shards
                for new, old in ((weight, p), (momentum, self.state[p]["momentum_buffer"])):
                    if new is not old:
                        old.to_local().copy_(new.redistribute(placements=old.placements).to_local())


def exchange_rows(shards, whole, buffer, pg, n, gather):
    """One all_to_all over the group's n ranks for a round: shards[j] is this rank's rows of the
    round's j-th matrix, which rank j holds whole; whole is the matrix this rank holds (or None),
    buffer a flat scratch tensor. gather: every rank sends its rows to the matrix's rank, which
    receives them into whole, in rank order; else the rows go back from whole into the shards."""
    sizes = [s.numel() for s in shards] + [0] * (n - len(shards))
    flat = buffer[:sum(sizes)]
    if whole is None:
        whole_flat, whole_sizes = buffer[:0], [0] * n
    else:
        whole_flat, whole_sizes = whole.view(-1), [r * whole.size(1) for r in row_counts(whole.size(0), n)]
    if gather:
        torch.cat([s.reshape(-1) for s in shards], out=flat)
        dist.all_to_all_single(whole_flat, flat, whole_sizes, sizes, group=pg)
    else:
        dist.all_to_all_single(flat, whole_flat, sizes, whole_sizes, group=pg)
        for shard, part in zip(shards, flat.split(sizes[:len(shards)])):
            shard.copy_(part.view_as(shard))


def step_whole(muon_class, weight, grad, buf, settings):
    """torch's Muon step on one whole matrix, with this group's settings and momentum buffer:
    weight and buf are updated in place, as DDP's Muon updates its own."""
    opt = muon_class([weight])
    opt.param_groups[0].update(settings)
    opt.state[weight]["momentum_buffer"] = buf
    weight.grad = grad
    opt.step()
    # A torch optimizer lives in a reference cycle, freed by the garbage collector's next pass, not
    # when it goes out of scope: emptied here, it does not keep the whole tensors alive after the
    # step (seen, when each round made its own: one round's still allocated through the next).
    opt.state.clear()
    opt.param_groups.clear()


# ----------------------------------------------------------------------------------------------
# What a step costs (tools/plan.py), from the same deal the step makes

def traffic(shapes, n, element_size=4):
    """Bytes each of the n ranks of a shard group receives in one step over matrices of these
    shapes (as many as it sends): the other ranks' rows of the weight, gradient and momentum of
    the matrices it steps, and its own rows of the new weight and momentum of the others'."""
    received = [0] * n
    for round_ in deal(shapes, n):
        for owner, i in enumerate(round_):
            rows, cols = shapes[i]
            for rank, count in enumerate(row_counts(rows, n)):
                if rank != owner:
                    received[owner] += 3 * element_size * count * cols
                    received[rank] += 2 * element_size * count * cols
    return received


def newton_schulz_flops(shape, ns_steps):
    """FLOPs of torch's Newton-Schulz iteration on one matrix (torch/optim/_muon.py): on its wide
    orientation m x n (m <= n), each of ns_steps iterations multiplies X X^T (2 m^2 n), A A (2 m^3)
    and B X (2 m^2 n)."""
    m, n = sorted(shape)
    return ns_steps * (4 * m * m * n + 2 * m ** 3)


def step_flops(shapes, n, ns_steps):
    """The Newton-Schulz FLOPs of the slowest rank of the group in one step: every round waits
    for its largest matrix, the first (deal sorts them), before the rows go back."""
    return sum(newton_schulz_flops(shapes[round_[0]], ns_steps) for round_ in deal(shapes, n))

"""The training loss without the full logits: the mean cross-entropy of the lm_head's logits,
made and turned into gradients a chunk of rows at a time (chunked_cross_entropy, the model's loss_fn
when the trainer chooses it: support/fastpath.py). The (N, V) logits and their gradient are never
whole: at B=8, T=256 and GPT-2's vocabulary they would be 400 MB each in fp32."""

import torch

from model import IGNORE_INDEX, LOSS_CHUNK_ROWS, check_targets, softcap


def chunked_cross_entropy(model, h, targets):
    """GPT.loss_fn: model's mean loss on the final hidden states h (B, T, C) against targets
    (B, T), from chunks of rows (lm_head_cross_entropy), soft-capped and with the padded ids masked
    as model.logits does: the full logits' loss to fp32 rounding."""
    return lm_head_cross_entropy(h.flatten(0, 1), model.lm_head.weight, targets.flatten(), model.config.vocab_size,
                                 softcap=model.config.logit_softcap)


def vocab_parallel_cross_entropy(model, h, targets):
    """GPT.loss_fn under tensor parallelism (support/parallelize.py): the mean cross-entropy of the
    logits of h (B, T, C), whole and the same on every rank of the TP group, made by each rank for
    its own rows of the head (V/N of the vocabulary) and never gathered: torch's loss_parallel
    finds each row's maximum, sum of exponentials and target logit across the ranks. Soft-capped,
    and padded ids masked, as model.logits does. Call it, and its backward, inside torch's
    loss_parallel() (train_gpt.train_step), which is not re-entrant: that is where each rank's part of
    the gradient of h, from its rows alone, is summed over the group (the from_local below)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    weight = model.lm_head.weight  # (V, C): a DTensor, this rank's rows (Shard(0))
    mesh, vocab_size = weight.device_mesh, model.config.vocab_size
    logits = torch.nn.functional.linear(DTensor.from_local(h, mesh, [Replicate()], run_check=False), weight)
    if model.config.logit_softcap:
        logits = softcap(logits, model.config.logit_softcap)
    if weight.size(0) > vocab_size:  # padded ids: probability 0
        dead = torch.arange(weight.size(0), device=h.device) >= vocab_size
        logits = logits.masked_fill(distribute_tensor(dead, mesh, [Shard(0)], src_data_rank=None), float("-inf"))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).to_local()


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h @ weight.T) against targets, computed chunk by chunk of rows.

    The full logits are N x V (at B=8, T=256 with V=50304 that is 400 MB in fp32, and again as
    their gradient). Here each chunk's logits are made, turned into the loss and straight away
    into the gradients of h and weight (d loss / d logits = softmax - onehot), then dropped. The
    backward pass only scales the saved gradients, so nothing is computed twice. Without a
    gradient to make (under torch.no_grad, or no input needing one) only the loss is computed.

    On the CPU the passes over a chunk's n x V logits cost as much as its matmuls, so there are
    few: a fused softmax (fp32 inside, also for bf16 logits: the same values as the fp32 softmax
    rounded once to bf16, as autocast's full-logits path produces), and for bf16 one read-only row
    sum. That sum is what keeps the target's entry exact: in bf16 a probability above ~0.998 rounds
    to 1, so p - 1 would be 0 for every confident target. Instead 1 - p is the fp32 sum of the
    other probabilities (each exact to bf16 rounding), so the target's entry -(1 - p) is as exact as
    autocast's fp32 p - 1 rounded to bf16, and its loss -log1p(-(1 - p)) as exact too. A target
    less likely than fp32's smallest normal number (a loss above ~87.3 for that token) counts as
    87.3: finite, where its probability is 0.

    With a soft-cap (softcap > 0) the logits are cap * tanh(z / cap) of the matmul's z, and the
    gradient through it is (softmax - onehot) * (1 - tanh^2), one n x V buffer more per chunk (the
    tanh, kept until that product).

    The chunk's n x V buffers (the logits, their softmax, and with a soft-cap the capped logits)
    are made once a call and every chunk reuses them. Made afresh for each chunk they fragmented
    the heap glibc keeps on the CPU (support/fastpath.keep_freed_memory): a freed buffer that a
    small allocation has split no longer fits the next chunk's, so the heap grows, and the float32
    demo's RSS grew by 0.2 GB (docs/memory.md, "The loss chunk").

    An ignored target (ignore_index) drops its row from the loss and from both gradient products:
    its target is read as id 0, and its rows of xc and of the gradient of h are zeroed after (n x C
    each, not another n x V pass). The mean is over the `counted` targets. With none ignored (as in
    training) none of that runs."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_size, compute_dtype, need_grad, ignore_index, counted,
                softcap):
        N = h.size(0)
        x, w = h.to(compute_dtype), weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # the loss and weight-gradient sums
        loss_sum = torch.zeros((), dtype=acc, device=h.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = None
        masked = counted < N  # some targets are ignored
        rows, V = min(chunk_size, N), w.size(0)  # the chunk's n x V buffers, made once a call (above)
        z_buf, p_buf = (torch.empty(rows, V, dtype=compute_dtype, device=h.device) for _ in range(2))
        y_buf = torch.empty_like(z_buf) if softcap else None
        for s in range(0, N, chunk_size):
            xc, tc = x[s:s + chunk_size], targets[s:s + chunk_size]
            n = xc.size(0)
            if masked:
                ignored = tc == ignore_index
                tc = tc.masked_fill(ignored, 0)
            logits = torch.mm(xc, w.t(), out=z_buf[:n])  # (n, V)
            if softcap:
                tanh = logits.div_(softcap).tanh_()  # in place: z's buffer becomes tanh(z / cap)
                logits = torch.mul(tanh, softcap, out=y_buf[:n])
            if logits.size(1) > vocab_size:
                logits[:, vocab_size:] = float("-inf")  # padded ids: probability 0
            probs = torch.softmax(logits, dim=1, out=p_buf[:n])
            log_p = _target_log_probs(probs, tc, acc, need_grad)  # probs[target] = p - 1 if need_grad
            loss_sum -= (log_p.masked_fill(ignored, 0.0) if masked else log_p).sum()
            if need_grad:
                if softcap:  # through the cap: d(cap tanh(z / cap)) / dz = 1 - tanh^2; as probs - probs * tanh^2,
                    probs.addcmul_(probs, tanh.square_(), value=-1.0)  # two passes over the n x V buffers, not four
                torch.mm(probs, w, out=grad_x[s:s + chunk_size])
                if masked:
                    grad_x[s:s + chunk_size].masked_fill_(ignored[:, None], 0.0)
                    xc = xc.masked_fill(ignored[:, None], 0.0)  # so the weight's product leaves the row out
                grad_w = _add_product(grad_w, probs.t(), xc, acc)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.scale = 1.0 / max(counted, 1)  # none counted: the gradients are zeros, as F.cross_entropy's
            ctx.dtypes = (h.dtype, weight.dtype)
        return loss_sum / counted  # none counted: 0 / 0, NaN, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        g = grad_loss * ctx.scale
        return (_scaled(grad_x, g, ctx.dtypes[0]), _scaled(grad_w, g, ctx.dtypes[1])) + (None,) * 8


def _target_log_probs(probs, targets, acc, make_grad):
    """log p(target) of each row of the (n, V) softmax probs, in acc (fp32 at least); with
    make_grad, also turn probs into d loss / d logits in place (the target's entry minus 1)."""
    rows = torch.arange(targets.size(0), device=targets.device)
    p = probs[rows, targets].to(acc)
    tiny = torch.finfo(acc).tiny
    if probs.dtype == acc:  # fp32 / fp64: p - 1 is exact enough in the softmax's own precision
        if make_grad:
            probs[rows, targets] -= 1.0
        return p.clamp_min(tiny).log()
    probs[rows, targets] = 0.0
    rest = probs.sum(dim=1, dtype=acc)  # 1 - p, from the other probabilities: exact where p is near 1
    if make_grad:
        probs[rows, targets] = (-rest).to(probs.dtype)
    return torch.where(p > 0.5, torch.log1p(-rest.clamp_max(1.0 - 2**-24)), p.clamp_min(tiny).log())


def _scaled(grad, g, dtype):
    """grad * g as dtype: a bf16 gradient is converted, then scaled in place (one buffer, not two)."""
    return grad * g if grad.dtype == dtype else grad.to(dtype).mul_(g)


def _add_product(total, a, b, acc):
    """total + a @ b. The first product is kept as it comes (one chunk: no extra pass); from the
    second on the sum is carried in acc (fp32 at least), so bf16 products are not summed in bf16."""
    if total is None:
        return a @ b
    if total.dtype != acc:
        total = total.to(acc)
    return total.addmm_(a, b) if a.dtype == acc else total.add_(a @ b)


def lm_head_cross_entropy(h, weight, targets, vocab_size, chunk_size=LOSS_CHUNK_ROWS, ignore_index=IGNORE_INDEX,
                          softcap=0.0):
    """Mean cross-entropy of the logits h @ weight.T (soft-capped to softcap * tanh(. / softcap)
    when softcap > 0), equal to F.cross_entropy on the full logits (ids past vocab_size masked) to
    fp32 rounding. h: (N, C), weight: (V, C), targets: (N,).
    Under autocast the matmuls run in the autocast dtype, the softmax in fp32, as F.cross_entropy
    would be run. A target equal to ignore_index (F.cross_entropy's default, -100) counts for
    nothing, as there: the mean is over the others (NaN, with zero gradients, if none is left).
    Any other target outside 0..vocab_size-1 is refused with a ValueError."""
    counted = check_targets(targets, vocab_size, ignore_index)
    device_type = h.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(device_type=device_type, enabled=False):
        return _LMHeadCrossEntropy.apply(h, weight, targets, vocab_size, chunk_size, compute_dtype, need_grad,
                                         ignore_index, counted, softcap)

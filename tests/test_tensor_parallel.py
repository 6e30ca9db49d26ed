"""Tensor parallelism (--tensor_parallel, support/parallelize.py) on the CPU: real torchrun jobs of 2
and 4 gloo processes train the one-process losses (fp32, with the gradient clipped at its global
norm every step), with GPT-3's banded attention and the modern recipe too (the modern GPT's options,
Muon), resume exactly, reshard across degrees through DCP, and evaluate as one process does; bad
layouts stop in one line. Each job runs several trainings one after the other
(test_distributed.runs_in_one_job) to spare process starts."""

import json
import os

import pytest

import train_gpt
from conftest import read_metrics, tiny_args, train_losses
from support.cli import SettingsError
from support.settings import check_tensor_parallel

# 4 steps of 8 sequences (one process: 2 micro steps), clipped at 0.5: TINY's norms are 0.6-0.9, so
# every step but the last is scaled by the norm, and a wrong global norm (a TP shard counted twice,
# or missed) would show in the next step's loss.
STEPS = dict(max_steps=4, checkpoint_every=2, val_every=4, val_tokens=1024, grad_clip=0.5)
# GPT-3's banded attention (layer 1 banded to the last 8 of 32 positions) and the modern recipe: the
# modern GPT's options (rotary positions and QK-norm on each rank's heads, ReLU², an untied head, the
# soft-cap inside the vocabulary-parallel loss, ...) and Muon (ShardedMuon gathers TP's shards)
BEYOND_GPT2 = dict(attention="gpt3", attention_band=8, recipe="modern")
TP2 = dict(fsdp=True, tensor_parallel=2)

# The evaluations under TP against one process, on the weights of a checkpoint (argv[4]): every
# position's loss of a validation batch, validation loss and bits per byte, HellaSwag on 6 made-up
# examples (scored by 1 TP group: n must be 6, not 12) and sampled text.
EVALS = r"""
import types, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from dataloader import ValidationData
from model import GPT
from support import evals
from support.parallelize import parallelize
from support.tokenizer import gpt2_tokenizer
plain = evals.load_checkpoint_model(sys.argv[4])
with torch.device("meta"):
    tp = GPT(plain.config)
parallelize(tp, types.SimpleNamespace(tensor_parallel=2, fsdp_shard_size=0, activation_checkpointing="none",
                                      compile=False), types.SimpleNamespace(world_size=2, device=torch.device("cpu"), amp_dtype=None))
tp.to_empty(device="cpu")
set_model_state_dict(tp, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
val = ValidationData(sys.argv[5], 32, 1024)
x, y = next(val.batches(4))
endings = [" the cat sat", " on the mat", " and ran", " far away"]
examples = [dict(ctx=f"Story {i}: once upon a time", endings=endings[i % 4:] + endings[:i % 4], label=i % 4)
            for i in range(6)]
tokenizer = gpt2_tokenizer()
with torch.no_grad():
    result = dict(token_loss_gap=(evals.token_losses(tp, x, y) - evals.token_losses(plain, x, y)).abs().max().item())
for name, model, rank, size in (("tp", tp, 0, 1), ("plain", plain, 0, 1)):
    result[name] = dict(validation=evals.validation(model, val, 4, rank, size),
                        hellaswag=evals.hellaswag(model, examples, rank, size, batch_size=4, tokenizer=tokenizer),
                        samples=evals.sample_text(model, tokenizer, num_samples=2, max_new_tokens=12, seed=3))
if dist.get_rank() == 0:
    print("EVALS " + json.dumps(result), flush=True)
"""


def tp_job(runs, nproc, tmp_path, evals=(), compile_backend=None):
    """One torchrun job of nproc processes that trains each of runs (argument lists) in turn
    (test_distributed.runs_in_one_job); returns (the exit codes, rank 0's EVALS or None, the output)."""
    from test_distributed import runs_in_one_job
    checks = tmp_path / "evals.py"
    checks.write_text(EVALS)
    codes, out = runs_in_one_job(runs, tmp_path, nproc, then=(str(checks), *evals) if evals else (),
                                 compile_backend=compile_backend)
    found = lambda tag: json.loads(next(line for line in out.splitlines() if line.startswith(tag))[len(tag):])
    return codes, found("EVALS ") if evals else None, out


def assert_trains_as(reference, log_dir, steps=range(4), validation=True):
    """The train losses of `steps`, and the validation's loss and bits per byte, within 1e-5 relative
    of the reference's, and so the gradient's global norm of step 0, from the same weights (seen:
    7e-7). The norms of later steps drift further apart (seen: 1.0e-4, and between FSDP and one
    process without TP 4.5e-4) than the losses, from directions the loss does not see (a key's bias:
    softmax ignores it, and AdamW scales its rounding noise up): within 1e-3. Returns the worst
    relative gap of each."""
    ref, got = read_metrics(reference), read_metrics(log_dir)
    pick = lambda events, key, steps: {e["step"]: e[key] for e in events if key in e and e["step"] in steps}
    gaps = {}
    for key, rtol in (("train_loss", 1e-5), ("val_loss", 1e-5), ("val_bpb", 1e-5), ("grad_norm", 1e-3)):
        if key.startswith("val") and not validation:
            continue
        at = [max(steps) + 1] if key.startswith("val") else steps  # validation: after the last step
        a, b = pick(ref, key, at), pick(got, key, at)
        assert sorted(a) == sorted(b) and a, (key, a, b)
        gaps[key] = max((abs(a[step] - b[step]) / abs(a[step]) for step in a), default=0.0)
        assert gaps[key] < rtol and (0 not in a or abs(a[0] - b[0]) < 1e-5 * a[0]), (key, a, b)
    return gaps


@pytest.fixture(scope="module")
def references(shards, tmp_path_factory):
    """One process: GPT-2's architecture and AdamW, and GPT-3's banded attention with the modern recipe."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dense, beyond = str(tmp_path_factory.mktemp("dense")), str(tmp_path_factory.mktemp("beyond"))
    train_gpt.main(tiny_args(shards, dense, sample_every=4, **STEPS))
    train_gpt.main(tiny_args(shards, beyond, **BEYOND_GPT2, **STEPS))
    torch.set_num_threads(threads)
    return dense, beyond


def test_tp2_trains_the_one_process_losses_resumes_exactly_reshards_and_evaluates(shards, references, tmp_path):
    """One job of 2 processes, one TP group (FSDP over 1 x 2-way TP): the one-process losses, the
    gradient's global norm, validation loss and bits per byte, within 1e-5 relative, in fp32 with 2
    micro steps a step; and with GPT-3's banded attention and the modern recipe under selective
    activation checkpointing, compiled (aot_eager: dynamo's and AOTAutograd's graphs; inductor on
    the GPU: tools/gpu_check.sh; this failed in AOTAutograd while the checkpoint was traced into
    the compiled graph). Resumed from its step-2 checkpoint it trains its steps 2-3 bit for bit.
    Its step-2 checkpoint resumes under plain FSDP (2-way, no TP), whose step-3 checkpoint resumes
    at TP 2 again: DCP reshards both ways, and both train on the one-process losses. The NaN guard
    stops a TP run whose update made the weights NaN. Then the evaluations of the trained weights
    under TP against one process's (EVALS), and the samples each run logged."""
    dense, beyond = references
    tp, resumed, fsdp, back, modern, nan = (str(tmp_path / name) for name in
                                            ("tp", "resumed", "fsdp", "back", "modern", "nan"))
    last = dict(STEPS, checkpoint_every=4)  # a checkpoint at the end only
    runs = [tiny_args(shards, tp, sample_every=4, **TP2, **STEPS),
            tiny_args(shards, resumed, resume=os.path.join(tp, "ckpt_0000002"), **TP2, **last),
            tiny_args(shards, fsdp, fsdp=True, stop_step=3, resume=os.path.join(tp, "ckpt_0000002"), **last),
            tiny_args(shards, back, resume=os.path.join(fsdp, "ckpt_0000003"), **TP2, **last),
            tiny_args(shards, modern, activation_checkpointing="selective", compile=True, **BEYOND_GPT2, **TP2, **last),
            tiny_args(shards, nan, max_lr=1e39, **TP2, **dict(last, max_steps=2))]
    codes, result, out = tp_job(runs, 2, tmp_path, evals=(os.path.join(tp, "ckpt_0000004"), shards),
                                compile_backend="aot_eager")
    assert codes[:5] == [0] * 5 and "step 0's update made the weights NaN/Inf" in codes[5], codes
    assert "FSDP (1-way) x 2-way TP" in out and "4 x 32 x 1 TP groups x 2 accumulation steps" in out
    assert "ShardedMuon: each matrix gathered whole" in out
    worst = {"TP 2": assert_trains_as(dense, tp), "TP 2, gpt3 + modern recipe": assert_trains_as(beyond, modern),
             "TP 2 -> FSDP": assert_trains_as(dense, fsdp, [2], validation=False),  # validated at its stop, 3
             "FSDP -> TP 2": assert_trains_as(dense, back, [3])}
    print(f"worst relative gaps to one process: {worst}")  # docs/distributed.md
    assert train_losses(resumed) == {s: v for s, v in train_losses(tp).items() if s >= 2}  # bit for bit
    assert f"resumed from {os.path.join(fsdp, 'ckpt_0000003')} at step 3" in out
    assert abs(train_losses(dense)[3] - train_losses(beyond)[3]) > 1e-3  # the options are on
    samples = lambda log_dir: [line for line in open(os.path.join(log_dir, "log.txt")) if line.startswith("sample")]
    assert len(samples(tp)) == 4 and samples(tp) == samples(dense)
    assert result["token_loss_gap"] < 1e-5
    for key in ("validation", "hellaswag"):
        assert result["tp"][key] == pytest.approx(result["plain"][key], rel=1e-6), key
    assert result["tp"]["hellaswag"]["n"] == 6 and result["tp"]["samples"] == result["plain"]["samples"]


def test_fsdp2_x_tp2_trains_the_one_process_losses(shards, references, tmp_path):
    """One job of 4 processes: 2-way FSDP x 2-way TP (ranks 0-1 and 2-3 the TP groups) trains the
    one-process losses within 1e-5 relative, GPT-2's architecture and GPT-3's banded attention with
    the modern recipe (Muon's matrices gathered from FSDP's and TP's shards; every block recomputed in
    backward); and so does DDP's layout across the TP groups, replicas of each other
    (--fsdp_shard_size=2: HSDP of 2 replicas x 1-way FSDP)."""
    dense, beyond = references
    fsdp_tp, modern, hsdp_tp = (str(tmp_path / name) for name in ("fsdp_tp", "modern", "hsdp_tp"))
    last = dict(STEPS, checkpoint_every=4, val_every=0)  # a checkpoint at the end only, no validation
    runs = [tiny_args(shards, fsdp_tp, micro_batch_size=2, **TP2, **last),
            tiny_args(shards, modern, micro_batch_size=2, activation_checkpointing="full", **BEYOND_GPT2, **TP2, **last),
            tiny_args(shards, hsdp_tp, fsdp_shard_size=2, **TP2, **dict(last, max_steps=2))]
    codes, _, out = tp_job(runs, 4, tmp_path)
    assert codes == [0, 0, 0], codes
    assert "FSDP (2-way) x 2-way TP" in out and "HSDP (2 replicas x 1-way FSDP) x 2-way TP" in out
    assert "ShardedMuon: each matrix gathered whole" in out
    worst = {"FSDP 2 x TP 2": assert_trains_as(dense, fsdp_tp, validation=False),
             "gpt3 + modern recipe": assert_trains_as(beyond, modern, validation=False),
             "HSDP 2 x 1 x TP 2": assert_trains_as(dense, hsdp_tp, steps=range(2), validation=False)}
    print(f"worst relative gaps to one process: {worst}")  # docs/distributed.md


@pytest.mark.parametrize("change, world, local, message", [
    (dict(fsdp=False), 2, 2, "--tensor_parallel=2 splits each block over 2 ranks, and FSDP2 is what runs across"),
    ({}, 3, 3, "this run has 3: start it with torchrun --nproc_per_node=2"),
    (dict(tensor_parallel=4), 8, 2, "--tensor_parallel=4 does not fit in a node's 2 ranks"),
    (dict(tensor_parallel=3, n_head=2), 6, 6, "n_head=2 (heads) is not divisible by --tensor_parallel=3"),
    (dict(tensor_parallel=5, n_head=5, n_embd=40), 5, 5, "the padded vocabulary 50304 is not divisible by"),
    (dict(tensor_parallel=8, n_head=8, n_embd=64, seq_len=20), 8, 8, "seq_len=20 (sequence parallelism"),
    (dict(tensor_parallel=4, n_head=4, fsdp_shard_size=2), 4, 4, "--fsdp_shard_size=2 counts ranks"),
    (dict(chunked_loss=True), 2, 2, "--chunked_loss makes the loss from the whole head"),
])
def test_layouts_tensor_parallelism_cannot_split_are_refused_naming_what_works(change, world, local, message):
    """Every refusal names the problem and the TP degrees that work here (or the fix)."""
    from support.presets import preset_config
    args = dict(model="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32, seq_len=32, fsdp=True,
                tensor_parallel=2, chunked_loss=False)
    args.update(change)
    s = train_gpt.Settings(**args)
    config = preset_config("tiny", n_layer=2, n_head=s.n_head, n_embd=s.n_embd, block_size=32)
    with pytest.raises(SettingsError) as refused:
        check_tensor_parallel(s, config, world, local)
    text = str(refused.value)
    assert message in text and "\n" not in text, text
    if "Values that work" in text:
        assert "--tensor_parallel in [1" in text


def test_one_process_asked_for_tp_stops_in_one_line_before_any_work(shards, tmp_path):
    log_dir = str(tmp_path / "log")
    with pytest.raises(SystemExit) as stopped:
        train_gpt.main(tiny_args(shards, log_dir, **TP2))
    assert str(stopped.value.code) == ("train_gpt.py: error: --tensor_parallel=2 splits each block over 2 ranks, "
                                       "but this run has 1: start it with torchrun --nproc_per_node=2 (or a multiple "
                                       "of 2 ranks). Values that work here: --tensor_parallel in [1].")
    assert not os.path.exists(log_dir)

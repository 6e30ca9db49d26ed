"""Evaluate a GPT from a checkpoint or a Hugging Face GPT-2: validation loss, HellaSwag accuracy,
text samples, and lm-evaluation-harness tasks (support/evals.py and support/lm_harness.py do the work).

    python evaluate.py --checkpoint=log/ckpt_0019073.pt --val --data_dir=edu_fineweb10B --hellaswag --sample
    python evaluate.py --hf=gpt2 --hellaswag          # GPT-2 124M: acc_norm 0.2945
    python evaluate.py --checkpoint=log/ckpt_0019073.pt --lm_eval=hellaswag,arc_easy,piqa,lambada_openai
"""

import os
import sys
import time

import torch

from dataloader import DataError, DataNotFound, ValidationData
from fineweb import SOURCES
from model import ConfigError
from support import checkpoint, cli, lm_harness
from support.evals import hellaswag, hellaswag_examples, load_checkpoint, sample_text, validation
from support.hf import gpt_from_hf
from support.tokenizer import gpt2_tokenizer


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
                        "a plain GPT-2 is exported to Hugging Face format beside the checkpoint, any other model "
                        "(GPT-3's banded attention) is scored as it is; by the harness "
                        "(pip install -r requirements-extras.txt)")
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
               OSError)  # OSError: the disk's and the file system's problems (its message names the file)


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
        v = validation(model, data, args.batch_size, amp_dtype=amp_dtype, progress=progress)
        results["val_loss"], results["val_bpb"] = v["loss"], v["bpb"]
        print(f"val_loss {v['loss']:.4f} ({v['bpb']:.4f} bits/byte) over {data.num_tokens:,} tokens "
              f"({v['bytes']:,} bytes) of {data_dir} ({time.time() - t0:.1f}s)")
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
    if args.lm_eval:  # last: a plain GPT-2 moves to the CPU for its export, and the harness loads the export
        results["lm_eval"] = lm_harness.run(
            model, tasks, lm_eval_stem(args), manager, batch_size=args.batch_size,
            device=device, dtype="bfloat16" if amp_dtype else "float32", limit=args.lm_eval_limit,
            num_fewshot=args.lm_eval_fewshot, log_samples=args.lm_eval_samples, quiet=args.quiet)["results"]
    return results


if __name__ == "__main__":
    main()

"""GPT-2 weights in and out of the Hugging Face format (transformers.GPT2LMHeadModel).

Our parameter names are GPT-2's, so the mapping is one to one, except that
- GPT-2 fuses attention's queries, keys and values into one attn.c_attn, where we have three
  (attn.c_q, c_k, c_v): export concatenates them, import splits them;
- HF's GPT-2 uses Conv1D, which stores the four matmul weights (attn.c_attn, attn.c_proj,
  mlp.c_fc, mlp.c_proj) transposed relative to nn.Linear;
- our embedding and lm_head have padded_vocab_size rows (50304); HF has vocab_size (50257). The
  extra rows are dead (never predicted), so export drops them and import adds zero rows.

    python convert_hf.py export log/ckpt_0019073.pt gpt2-ours/   # then GPT2LMHeadModel.from_pretrained("gpt2-ours")
                                                                 # and AutoTokenizer.from_pretrained("gpt2-ours")
    python convert_hf.py import gpt2 gpt2.pt                     # a checkpoint training can start from
"""

import dataclasses
import json
import os
import sys

from model import ConfigError
from support import checkpoint, cli
from support.evals import load_checkpoint_model
from support.hf import export_hf, import_hf

# What ends the program with one line (the message says what to do); anything else is a bug. OSError:
# the disk's and the file system's problems (its message names the file).
USER_ERRORS = (cli.UserError, ConfigError, checkpoint.CorruptCheckpoint, OSError)


def main(argv=None):
    p = cli.ArgumentParser(description="Convert GPT-2 weights between our checkpoints and Hugging Face.")
    sub = p.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face folder")
    exp.add_argument("checkpoint", help="a checkpoint file or sharded checkpoint folder from training")
    exp.add_argument("out_dir")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp = sub.add_parser("import", help="Hugging Face folder or hub name -> checkpoint file")
    imp.add_argument("hf_path", help="a folder with config.json + weights, or a hub name such as gpt2")
    imp.add_argument("out_checkpoint")
    args = p.parse_args(argv)
    try:
        convert(args)
    except USER_ERRORS as e:
        sys.exit(f"convert_hf.py: error: {e}")


def convert(args):
    # Each stage says what it does before it starts: reading or writing a large model's weights takes
    # a while (~1 GB a second from a local disk; a hub name downloads first).
    if args.command == "export":
        print(f"reading {args.checkpoint}", flush=True)
        model = load_checkpoint_model(args.checkpoint, "cpu")
        export_hf(model, model.config, args.out_dir, progress=not args.quiet)
        print(f"wrote {args.out_dir}/: config.json, model.safetensors and the GPT-2 tokenizer's files")
    else:
        print(f"reading {args.hf_path}" + ("" if os.path.isdir(args.hf_path) else
                                           " (from the Hugging Face Hub unless cached)"), flush=True)
        config, state = import_hf(args.hf_path)
        print(f"writing {args.out_checkpoint}", flush=True)
        checkpoint.save_file({"model": state, "model_config": dataclasses.asdict(config)}, args.out_checkpoint)
        print(f"wrote {args.out_checkpoint} ({json.dumps(dataclasses.asdict(config))})")


if __name__ == "__main__":
    main()

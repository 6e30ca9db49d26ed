"""GPT-2 weights in and out of the Hugging Face format (transformers.GPT2LMHeadModel).

Our parameter names are GPT-2's, so the mapping is one to one, except that
- GPT-2 fuses the attention's queries, keys and values into one matrix, attn.c_attn, where we have
  three, attn.c_q, c_k and c_v: export concatenates them, import splits them (support/fused_qkv.py);
- HF's GPT-2 uses Conv1D, which stores the four matmul weights (attn.c_attn, attn.c_proj,
  mlp.c_fc, mlp.c_proj) transposed relative to nn.Linear;
- our embedding and lm_head have padded_vocab_size rows (50304); HF has vocab_size (50257). The
  extra rows are dead (never predicted), so export drops them and import adds zero rows.

The command line is convert_hf.py's.
"""

import dataclasses
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from model import GPT, GPTConfig, padded_vocab
from support import cli
from support.files import replace_atomically
from support.fused_qkv import fuse_model_state, fused_name, split_model_state
from support.tokenizer import gpt2_tokenizer_files

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # older transformers' causal masks, not weights


def parameter_names(config):
    """Our state_dict keys for a config (the model is built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(GPT(config).state_dict())


def hf_names(config):
    """GPT-2's tensors for a config: ours, with q, k and v as one c_attn."""
    return [name for name in map(fused_name, parameter_names(config)) if name is not None]


def hf_config(config):
    """transformers.GPT2Config equal to our architecture: tanh GELU ('gelu_new'), LayerNorm eps
    1e-5, MLP width 4*n_embd, tied lm_head. Dropout 0: we train without it."""
    from transformers import GPT2Config
    eot = config.vocab_size - 1  # <|endoftext|> is the last GPT-2 id
    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot,
                      architectures=["GPT2LMHeadModel"])


SIZES = ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd")  # GPT-2's format holds any


def not_plain_gpt2(config: GPTConfig):
    """How config's architecture differs from GPT-2's, one "field=value (GPT-2: value)" each; empty
    when GPT-2's format holds the model exactly. Every GPTConfig field beyond the sizes is an
    architecture option whose default is GPT-2's, so any other value is a difference (the band
    only where some layer bands)."""
    plain = GPTConfig()
    differences = []
    for field in dataclasses.fields(GPTConfig):
        value, gpt2 = getattr(config, field.name), getattr(plain, field.name)
        if field.name in SIZES or value == gpt2 or (field.name == "attention_band" and config.attention == "dense"):
            continue
        differences.append(f"{field.name}={value!r} (GPT-2: {gpt2!r})")
    return differences


def check_plain_gpt2(config: GPTConfig):
    """Refuse, in one line, a model that Hugging Face's GPT-2 format cannot hold exactly."""
    differences = not_plain_gpt2(config)
    if differences:
        raise cli.BadInput(f"this model is not plain GPT-2 ({', '.join(differences)}): Hugging Face's GPT-2 "
                           f"format has no place for that, so an export would compute other logits. "
                           f"evaluate.py --lm_eval scores such a model through our own model (support/lm_harness.py)")


def export_hf(model_or_state_dict, config: GPTConfig, out_dir, progress=False):
    """Write a Hugging Face GPT-2 folder (config.json + model.safetensors) that
    GPT2LMHeadModel.from_pretrained(out_dir) loads, with our logits on the real ids, and the GPT-2
    tokenizer's files, so AutoTokenizer.from_pretrained(out_dir) works offline too. Takes a GPT
    (also torch.compile'd) or its full state_dict (not a sharded one: gather it first). progress:
    a progress bar over the tensors. A model that is not plain GPT-2 (GPT-3's banded attention)
    is refused: check_plain_gpt2."""
    check_plain_gpt2(config)
    model = getattr(model_or_state_dict, "_orig_mod", model_or_state_dict)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    missing = [k for k in parameter_names(config) if k not in state]
    if missing:
        raise ValueError(f"the state_dict does not fit the config: {len(missing)} tensors missing, "
                         f"e.g. {missing[:3]}. Pass the model's own config and an unwrapped state_dict.")
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise cli.BadInput("lm_head.weight differs from transformer.wte.weight; HF GPT-2 ties them, so the "
                         "export would change the model")
    ours = fuse_model_state({name: state[name].detach().cpu() for name in parameter_names(config)})
    tensors = {}
    names = [name for name in ours if name != "lm_head.weight"]  # tied to wte in HF too
    for name in tqdm(names, desc="export", unit="tensor", disable=not progress):
        t = ours[name]
        if name.endswith(TRANSPOSED):
            t = t.t()
        if name in VOCAB_ROWS:
            t = t[:config.vocab_size]
        tensors[name] = t.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    with replace_atomically(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with replace_atomically(os.path.join(out_dir, "config.json")) as tmp:
        hf_config(config).to_json_file(tmp)
    write_tokenizer_files(out_dir, config.block_size)
    return out_dir


def write_tokenizer_files(out_dir, max_length):
    """GPT-2's tokenizer for transformers: OpenAI's vocab.bpe and encoder.json (the files our
    tokenizer is built from, fineweb.gpt2_tokenizer) under their Hugging Face names, merges.txt and
    vocab.json, plus a tokenizer_config.json. <|endoftext|> is bos, eos and unk, as in the hub's gpt2."""
    vocab_bpe, encoder_json = gpt2_tokenizer_files()
    for src, name in ((vocab_bpe, "merges.txt"), (encoder_json, "vocab.json")):
        with replace_atomically(os.path.join(out_dir, name)) as tmp:
            shutil.copyfile(src, tmp)
    eot = "<|endoftext|>"
    tokenizer_config = dict(tokenizer_class="GPT2Tokenizer", model_max_length=max_length, bos_token=eot,
                            eos_token=eot, unk_token=eot, add_prefix_space=False)
    with replace_atomically(os.path.join(out_dir, "tokenizer_config.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(tokenizer_config, f, indent=2)


def check_architecture(hf):
    """Refuse HF configs our GPT cannot represent exactly."""
    wrong = {key: getattr(hf, key, None) for key, ok in [
        ("model_type", lambda v: v == "gpt2"),
        ("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", lambda v: v in (None, 4 * hf.n_embd)),
        ("layer_norm_epsilon", lambda v: v == 1e-5),
        ("scale_attn_weights", lambda v: v),
        ("scale_attn_by_inverse_layer_idx", lambda v: not v),
        ("tie_word_embeddings", lambda v: v),
    ] if not ok(getattr(hf, key, None))}
    if wrong:
        raise cli.BadInput(f"this Hugging Face model is not plain GPT-2 ({wrong}); our GPT cannot load it exactly")


def is_hub_name(path_or_name):
    """Whether path_or_name can name a Hugging Face Hub repo ("gpt2", "org/name"): no local path
    exists there, and it does not look like one (absolute, ./ or ../, deeper than org/name, .pt)."""
    path = os.path.expanduser(path_or_name)
    return not (os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1 or path.endswith(".pt"))


def local_folder(path_or_name):
    """A folder holding the model: path_or_name itself, or its snapshot downloaded from the hub
    (config and weights only, safetensors preferred; the hub repos also hold TF/Flax/ONNX copies)."""
    path = os.path.expanduser(path_or_name)
    if os.path.isdir(path):
        return path
    if not is_hub_name(path_or_name):
        raise cli.NotFound(f"{path_or_name!r} is not a folder with config.json and model.safetensors "
                                f"(or pytorch_model.bin)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        folder = snapshot_download(path_or_name, allow_patterns=["config.json", "model*.safetensors*"])
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(path_or_name, allow_patterns=["config.json", "pytorch_model*.bin*"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise cli.Unreachable(f"could not get {path_or_name!r} from the Hugging Face Hub ({e}). Offline, pass a "
                           f"local folder with config.json and model.safetensors, e.g. one made on a connected "
                           f"machine by GPT2LMHeadModel.from_pretrained({path_or_name!r}).save_pretrained(DIR)") from e
    return folder


def import_hf(path_or_name):
    """(GPTConfig, state_dict) of a Hugging Face GPT-2: a local folder (safetensors or
    pytorch_model.bin, read with weights_only) or a hub name such as 'gpt2' (needs internet once;
    cached after). The vocabulary is padded with zero rows; wte and lm_head share one tensor."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(local_folder(path_or_name), dtype=torch.float32)
    check_architecture(hf.config)
    config = GPTConfig(block_size=hf.config.n_positions, vocab_size=hf.config.vocab_size,
                       padded_vocab_size=padded_vocab(hf.config.vocab_size), n_layer=hf.config.n_layer,
                       n_head=hf.config.n_head, n_embd=hf.config.n_embd)
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.endswith(HF_BUFFERS)}
    names = hf_names(config)
    unexpected = sorted(set(hf_state) - set(names))
    if unexpected:
        raise cli.BadInput(f"unexpected tensors in the Hugging Face model, e.g. {unexpected[:3]}: not plain GPT-2")
    state = {}
    for name in names:
        t = hf_state[name]
        if name.endswith(TRANSPOSED):
            t = t.t()
        if name in VOCAB_ROWS:
            t = torch.cat([t, t.new_zeros(config.padded_vocab_size - config.vocab_size, t.size(1))])
        state[name] = t.contiguous()
    state = split_model_state(state)  # GPT-2's c_attn: our c_q, c_k and c_v
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, as in our GPT
    return config, state


def gpt_from_hf(path_or_name, device="cpu"):
    """Our GPT with a Hugging Face GPT-2's weights (see import_hf)."""
    config, state = import_hf(path_or_name)
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(state)
    return model

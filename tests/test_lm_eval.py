"""evaluate.py --lm_eval: lm-evaluation-harness on a checkpoint, offline, on local tasks this file
writes. Its HellaSwag scores agree with evals.hellaswag on the same items: the same
loglikelihoods, the same acc; its acc_norm divides by the ending's characters where ours divides
by its tokens; and its own hellaswag task prompts with a preprocessed context."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from support import checkpoint, evals, lm_harness
import evaluate
from fineweb import gpt2_tokenizer
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)

ACTIVITIES = ["Making tea", "Washing a car", "Painting a fence", "Walking a dog"]
STARTS = ["A man fills a kettle with water", "A woman sprays the wheels with soap",
          "A boy dips a brush in red paint", "A girl clips a leash to the collar"]
NEXTS = ["then he", "she then", "after that he [title] slowly", "and then she"]
ENDINGS = ["puts it on the stove and waits.", "rinses the foam off with a hose.", "brushes the boards one by one.",
           "walks out of the door happily.", "sits down.", "laughs at the camera for a long while."]


def hellaswag_items(n=12):
    """Official-format HellaSwag examples (ctx = ctx_a + " " + ctx_b); some with the WikiHow
    "[title]" artifact the harness's preprocessing removes."""
    items = []
    for i in range(n):
        ctx_a, ctx_b = STARTS[i % 4], NEXTS[(i // 4) % 4]
        endings = [ENDINGS[(i + k) % len(ENDINGS)] for k in range(4)]
        items.append(dict(ind=i, activity_label=ACTIVITIES[i % 4], ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}",
                          endings=endings, label=i % 4, split="val", split_type="indomain", source_id=f"t~{i}"))
    return items


def ours_task_yaml(data):
    """evals.hellaswag's prompt as a harness task: the context as it is, then " " + each ending."""
    return f"""task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def harness_hellaswag_yaml(data):
    """The harness's own hellaswag task (its prompt and preprocessing) on the local file."""
    import lm_eval
    original = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "hellaswag", "hellaswag.yaml")
    return f"""include: {original}
task: hellaswag_harness_local
dataset_path: json
training_split: null
dataset_kwargs:
  data_files:
    validation: {data}
"""


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """A tiny GPT (weights moved off their init, so endings score apart), its checkpoint, and the
    one command, run offline with no Hugging Face cache to fall back on."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    model = GPT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.transformer.wte.weight[CONFIG.vocab_size:] = 0
    ckpt = str(tmp / "run" / "ckpt_0000010.pt")
    os.makedirs(os.path.dirname(ckpt))
    checkpoint.save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(CONFIG)}, ckpt)
    data = tmp / "tasks" / "hellaswag_local.jsonl"
    os.makedirs(data.parent)
    data.write_text("".join(json.dumps(e) + "\n" for e in hellaswag_items()))
    (tmp / "tasks" / "hellaswag_local.yaml").write_text(ours_task_yaml(data))
    (tmp / "tasks" / "hellaswag_harness_local.yaml").write_text(harness_hellaswag_yaml(data))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "evaluate.py", f"--checkpoint={ckpt}", "--device=cpu", "--dtype=float32",
               "--lm_eval=hellaswag_local,hellaswag_harness_local", f"--lm_eval_include={tmp / 'tasks'}",
               "--lm_eval_samples", "--quiet"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stem = ckpt.removesuffix(".pt")
    with open(stem + "_lm_eval.json") as f:
        results = json.load(f)["results"]
    samples = {}
    with open(stem + "_lm_eval_samples.jsonl") as f:
        for line in f:
            sample = json.loads(line)
            samples.setdefault(sample["task"], {})[sample["doc_id"]] = sample
    return dict(model=evals.load_checkpoint_model(ckpt), stem=stem, stdout=run.stdout, stderr=run.stderr,
                results=results, samples=samples)


def ending_logliks(model, items):
    """evaluate.py's summed log-likelihood of each ending, and its token counts: (N, 4) each."""
    tokenizer = gpt2_tokenizer()
    rows, starts = [], []
    for item in items:
        item_rows, item_starts = evals.render_example(item, tokenizer, CONFIG.block_size)
        rows += item_rows
        starts += item_starts
    model.eval()
    with torch.no_grad():
        loss_sum, n_tokens = evals.ending_losses(model, rows, starts, torch.device("cpu"), None)
    return -loss_sum.view(-1, 4).double(), n_tokens.view(-1, 4)


def accuracy(scores, items):
    return sum(int(row.argmax()) == item["label"] for row, item in zip(scores, items)) / len(items)


def harness_logliks(samples):
    return torch.tensor([[ll for ll, _ in samples[i]["filtered_resps"]] for i in sorted(samples)], dtype=torch.double)


def test_lm_eval_command_runs_offline_and_saves_its_table(lm_eval_run):
    stem, results = lm_eval_run["stem"], lm_eval_run["results"]
    for task in ("hellaswag_local", "hellaswag_harness_local"):
        assert 0 <= results[task]["acc,none"] <= 1 and 0 <= results[task]["acc_norm,none"] <= 1
        assert len(lm_eval_run["samples"][task]) == len(hellaswag_items())
    with open(stem + "_lm_eval.md") as f:
        table = f.read()
    assert "hellaswag_local" in table and "hellaswag_harness_local" in table and "acc_norm" in table
    assert table.strip() in lm_eval_run["stdout"]  # the table printed is the table saved
    assert "it/s" not in lm_eval_run["stderr"] and "export" not in lm_eval_run["stderr"]  # --quiet: no progress bars
    assert sorted(os.listdir(stem + "_hf")) == ["config.json", "merges.txt", "model.safetensors",
                                                "tokenizer_config.json", "vocab.json"]


def test_harness_hellaswag_agrees_with_evaluate_py(lm_eval_run):
    """Same prompt: the same per-ending loglikelihoods and acc. acc_norm: the harness divides by
    the ending's length in characters; evals.hellaswag by its tokens."""
    model, items = lm_eval_run["model"], hellaswag_items()
    harness = lm_eval_run["results"]["hellaswag_local"]
    ours_ll, n_tokens = ending_logliks(model, items)
    theirs_ll = harness_logliks(lm_eval_run["samples"]["hellaswag_local"])
    torch.testing.assert_close(theirs_ll, ours_ll, atol=1e-4, rtol=0)
    ours = evals.hellaswag(model, items)
    assert harness["acc,none"] == ours["acc"] == accuracy(ours_ll, items)
    chars = torch.tensor([[len(e) for e in item["endings"]] for item in items], dtype=torch.double)
    assert harness["acc_norm,none"] == accuracy(ours_ll / chars, items)
    assert ours["acc_norm"] == accuracy(ours_ll / n_tokens, items)


def test_harness_own_hellaswag_task_prompts_differently(lm_eval_run):
    """The harness's hellaswag task scores `activity_label: ctx_a Ctx_b`, cleaned of WikiHow's
    bracket tags: evals.hellaswag on items with that context gives its numbers."""
    model, items = lm_eval_run["model"], hellaswag_items()
    samples = lm_eval_run["samples"]["hellaswag_harness_local"]
    docs = [samples[i]["doc"] for i in sorted(samples)]  # each item as the harness's preprocessing left it
    assert docs[0]["query"] == "Making tea: A man fills a kettle with water Then he"
    assert docs[8]["query"] == "Making tea: A man fills a kettle with water After that he. slowly"
    rewritten = [dict(item, ctx=doc["query"], endings=doc["choices"]) for item, doc in zip(items, docs)]
    ours_ll, _ = ending_logliks(model, rewritten)
    theirs_ll = harness_logliks(samples)
    torch.testing.assert_close(theirs_ll, ours_ll, atol=1e-4, rtol=0)
    harness = lm_eval_run["results"]["hellaswag_harness_local"]
    assert harness["acc,none"] == evals.hellaswag(model, rewritten)["acc"]


def test_hugging_face_evaluate_is_found_inside_the_harness_run():
    """Tasks that `import evaluate` find Hugging Face's package, not this repo's evaluate.py."""
    ours = os.path.join(REPO, "evaluate.py")
    with lm_harness.hf_evaluate_importable():
        assert "evaluate" not in sys.modules
        assert importlib.util.find_spec("evaluate").origin != ours
    assert sys.modules["evaluate"] is evaluate and importlib.util.find_spec("evaluate").origin == ours


def test_local_tasks_skip_the_harness_index(tmp_path):
    (tmp_path / "mine.yaml").write_text(ours_task_yaml(tmp_path / "none.jsonl").replace("hellaswag_local", "mine"))
    assert lm_harness.task_manager(["mine"], str(tmp_path)).all_tasks == ["mine"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        lm_harness.task_manager(["mine"], str(tmp_path / "missing"))


def test_lm_eval_without_the_harness_installed_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(lm_harness, "installed", lambda: False)
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint=any.pt", "--lm_eval=hellaswag"])
    assert "pip install -r requirements-extras.txt" in capsys.readouterr().err

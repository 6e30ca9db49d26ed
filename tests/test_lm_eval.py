"""evaluate.py --lm_eval: lm-evaluation-harness on a checkpoint, offline, on local tasks this file
writes. Its HellaSwag scores agree with evals.hellaswag on the same items: the same
loglikelihoods, the same acc; its acc_norm divides by the ending's characters where ours divides
by its tokens; and its own hellaswag task prompts with a preprocessed context. A model GPT-2's
format cannot hold (GPT-3's banded attention, the modern GPT's options) is scored through GPTLM, the harness's model
interface over our GPT, which on a plain GPT-2 gives HFLM's numbers."""

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
from model import ARCHITECTURES, GPT, GPTConfig

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
def tasks_dir(tmp_path_factory):
    """The local task YAMLs and their data."""
    tasks = tmp_path_factory.mktemp("tasks")
    data = tasks / "hellaswag_local.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in hellaswag_items()))
    (tasks / "hellaswag_local.yaml").write_text(ours_task_yaml(data))
    (tasks / "hellaswag_harness_local.yaml").write_text(harness_hellaswag_yaml(data))
    return tasks


def evaluate_offline(tmp, config, tasks_dir, tasks):
    """A tiny GPT (weights moved off their init, so endings score apart), its checkpoint, and
    evaluate.py --lm_eval on it, run offline with no Hugging Face cache to fall back on."""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.transformer.wte.weight[config.vocab_size:] = 0
    ckpt = str(tmp / "run" / "ckpt_0000010.pt")
    os.makedirs(os.path.dirname(ckpt))
    checkpoint.save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(config)}, ckpt)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "evaluate.py", f"--checkpoint={ckpt}", "--device=cpu", "--dtype=float32",
               f"--lm_eval={tasks}", f"--lm_eval_include={tasks_dir}", "--lm_eval_samples", "--quiet"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return ckpt, run


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, tasks_dir):
    """Plain GPT-2: exported, scored by the harness's HFLM."""
    ckpt, run = evaluate_offline(tmp_path_factory.mktemp("lm_eval"), CONFIG, tasks_dir,
                                 "hellaswag_local,hellaswag_harness_local")
    return results_of(ckpt, run)


def results_of(ckpt, run):
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


# ----------------------------------------------------------------------------------------------
# GPTLM: the harness's model interface over our GPT, for models GPT-2's format cannot hold

# GPT-3's banded attention and the modern GPT's options (--arch=modern): neither fits GPT-2's format.
BANDED = dataclasses.replace(CONFIG, attention="gpt3", attention_band=8, **ARCHITECTURES["modern"])
LONG_TEXT = " ".join(f"{start.lower()} {next_} {ending}" for start, next_ in zip(STARTS, NEXTS) for ending in ENDINGS)


def instances(request_type, arguments):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def choice_requests(items):
    """The requests hellaswag_local makes: the context, then " " + each ending."""
    return instances("loglikelihood", [(item["ctx"], " " + ending) for item in items for ending in item["endings"]])


@pytest.fixture(scope="module")
def banded_lm_eval_run(tmp_path_factory, tasks_dir):
    """GPT-3's pattern on the modern GPT: evaluate.py --lm_eval scores it through GPTLM, with no export."""
    ckpt, run = evaluate_offline(tmp_path_factory.mktemp("lm_eval_banded"), BANDED, tasks_dir, "hellaswag_local")
    return results_of(ckpt, run)


def test_a_banded_modern_model_is_scored_by_our_model_with_its_pattern(banded_lm_eval_run):
    run, items = banded_lm_eval_run, hellaswag_items()
    model = run["model"]
    assert model.config.attention == "gpt3" and not os.path.exists(run["stem"] + "_hf")  # nothing exported
    assert model.config.rope and model.config.untied_head and model.config.logit_softcap == 15
    theirs_ll = harness_logliks(run["samples"]["hellaswag_local"])
    ours_ll, _ = ending_logliks(model, items)  # evals.ending_losses: the model's forward, banded
    torch.testing.assert_close(theirs_ll, ours_ll, atol=1e-4, rtol=0)
    dense = GPT(dataclasses.replace(BANDED, attention="dense"))
    dense.load_state_dict(model.state_dict())
    assert (ending_logliks(dense, items)[0] - theirs_ll).abs().max() > 1e-2  # the band mattered
    assert run["results"]["hellaswag_local"]["acc,none"] == accuracy(ours_ll, items)


def test_our_model_interface_gives_hflm_loglikelihoods_on_plain_gpt2(lm_eval_run):
    """The same plain GPT-2 through GPTLM and through the HF export (the command's HFLM): the same
    log-likelihoods and greedy flags, in batches of 5 (so padded), as the harness would ask."""
    lm = lm_harness.lm_class()(lm_eval_run["model"], batch_size=5)
    ours = lm.loglikelihood(choice_requests(hellaswag_items()))
    samples = lm_eval_run["samples"]["hellaswag_local"]
    theirs = [response for i in sorted(samples) for response in samples[i]["filtered_resps"]]
    torch.testing.assert_close(torch.tensor([ll for ll, _ in ours], dtype=torch.double),
                               torch.tensor([ll for ll, _ in theirs], dtype=torch.double), atol=1e-4, rtol=0)
    assert [greedy for _, greedy in ours] == [bool(greedy) for _, greedy in theirs]


def test_rolling_loglikelihood_and_greedy_generation_equal_hflms(lm_eval_run):
    """A text of several context windows (loglikelihood_rolling, as perplexity tasks ask) and
    greedy continuations cut at a stop string, GPTLM against HFLM on the exported folder."""
    from lm_eval.models.huggingface import HFLM
    ours = lm_harness.lm_class()(lm_eval_run["model"], batch_size=3)
    with lm_harness.progress_bars_hidden(True):
        theirs = HFLM(pretrained=lm_eval_run["stem"] + "_hf", device="cpu", batch_size=3, dtype="float32")
        rolling = instances("loglikelihood_rolling", [(LONG_TEXT,), (LONG_TEXT[:100],)])
        assert len(ours.tok_encode(LONG_TEXT)) > 3 * CONFIG.block_size
        torch.testing.assert_close(torch.tensor(ours.loglikelihood_rolling(rolling), dtype=torch.double),
                                   torch.tensor(theirs.loglikelihood_rolling(rolling), dtype=torch.double),
                                   atol=1e-3, rtol=0)
        prompts = instances("generate_until", [(ctx, dict(until=["."], max_gen_toks=12)) for ctx in STARTS[:2]]
                            + [(STARTS[2], dict(until=["zzz"], max_gen_toks=6))])
        generated = ours.generate_until(prompts)
        assert generated == theirs.generate_until(prompts) and len(ours.tok_encode(generated[2])) == 6
    with pytest.raises(ValueError, match="greedily only"):
        ours.generate_until(instances("generate_until", [("Hi", dict(do_sample=True))]))
    with pytest.raises(ValueError, match="longer than the model's context"):
        ours.loglikelihood(instances("loglikelihood", [("Hi", " b" * 100)]))

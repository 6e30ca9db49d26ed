"""EleutherAI's lm-evaluation-harness on our models, scored by the harness's own evaluator
(lm_eval.simple_evaluate) through one of two of its model interfaces:
- plain GPT-2 (every gpt2-* preset): the model is exported to a Hugging Face GPT-2 folder
  (convert_hf.py, tokenizer files included) and scored through the harness's Hugging Face model
  class (HFLM, the one its `--model hf` uses);
- any other architecture (GPT-3's banded attention), which that format cannot hold: GPTLM, the
  harness's model interface (lm_eval.api.model.TemplateLM) over our GPT itself, its forward with
  its attention pattern and our tokenizer. On a plain GPT-2 both give the same log-likelihoods
  (tests/test_lm_eval.py).
Optional: pip install -r requirements-extras.txt. The command line is evaluate.py's:

    python evaluate.py --checkpoint=log/ckpt_0019073.pt --lm_eval=hellaswag,arc_easy,piqa,lambada_openai

How the harness's HellaSwag differs from support/evals.py's: docs/evaluation.md.
"""

import contextlib
import functools
import importlib.util
import json
import logging
import os
import sys

import torch
import torch.nn.functional as F

from support import cli
from support.evals import autocast, evaluating, model_device
from support.files import replace_atomically
from support.hf import export_hf, not_plain_gpt2
from support.tokenizer import gpt2_tokenizer

INSTALL = "pip install -r requirements-extras.txt"


def installed():
    return importlib.util.find_spec("lm_eval") is not None


def task_manager(tasks, include_path=None):
    """The harness's TaskManager for these tasks. Indexing the harness's own tasks reads thousands
    of YAML files (seconds to minutes): when include_path (a folder of the user's task YAMLs) defines
    every task asked for, that index is skipped. Unknown names are an error here, before any work."""
    from lm_eval.tasks import TaskManager
    if include_path:
        if not os.path.isdir(include_path):
            raise FileNotFoundError(f"--lm_eval_include={include_path}: no such folder of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks and not os.path.isfile(task)]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks: {', '.join(unknown)}. `lm-eval ls tasks` lists the harness's; "
                         f"a task of your own is a YAML file (its path, or its folder in --lm_eval_include)")
    return manager


@contextlib.contextmanager
def hf_evaluate_importable():
    """Some harness tasks `import evaluate`, meaning Hugging Face's package, which this repo's
    evaluate.py would shadow (its folder is on sys.path). Inside, that name finds Hugging Face's;
    after, ours again."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    ours = sys.modules.pop("evaluate", None)
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("evaluate", None)
        if ours is not None:
            sys.modules["evaluate"] = ours


@contextlib.contextmanager
def progress_bars_hidden(hidden):
    """The harness's progress bars (tqdm, on stderr) are not printed; its log messages go to their
    own handlers and still show."""
    if not hidden:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


def run(model, tasks, out_stem, manager=None, *, batch_size=16, device="cpu", dtype="float32", limit=None,
        num_fewshot=None, log_samples=False, quiet=False):
    """Score `model` (our GPT) on `tasks` (harness task names, or task YAML paths) with
    lm_eval.simple_evaluate, print the harness's results table and save it (out_stem +
    "_lm_eval.md") with the full results (out_stem + "_lm_eval.json"); with log_samples, each
    example's scores too (out_stem + "_lm_eval_samples.jsonl"). A plain GPT-2 is exported to
    out_stem + "_hf/" (on the CPU: the harness loads its own copy on `device`) and scored by HFLM;
    any other model is scored where it is, by GPTLM. manager: from task_manager(tasks). Returns the
    harness's results dict. quiet: no progress bars, and of the harness's log messages only warnings."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = manager or task_manager(tasks)
    hf_dir = out_stem + "_hf" if not not_plain_gpt2(model.config) else None
    if hf_dir:
        export_hf(model.cpu(), model.config, hf_dir, progress=not quiet)
    with progress_bars_hidden(quiet):
        if hf_dir:
            from lm_eval.models.huggingface import HFLM
            lm = HFLM(pretrained=hf_dir, backend="causal", device=str(device), batch_size=batch_size, dtype=dtype)
        else:
            lm = lm_class()(model.to(device), batch_size, torch.bfloat16 if dtype == "bfloat16" else None)
        with hf_evaluate_importable():
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, log_samples=log_samples)
    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    print(table)
    samples = results.pop("samples", None)
    with replace_atomically(out_stem + "_lm_eval.md") as tmp, open(tmp, "w") as f:
        f.write(table)
    with replace_atomically(out_stem + "_lm_eval.json") as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    if samples is not None:
        with replace_atomically(out_stem + "_lm_eval_samples.jsonl") as tmp, open(tmp, "w") as f:
            for task, task_samples in samples.items():
                for sample in task_samples:
                    f.write(json.dumps({"task": task, **sample}, default=handle_non_serializable) + "\n")
    if not quiet:
        print(f"wrote {out_stem}_lm_eval.md and .json" + (", _lm_eval_samples.jsonl" if samples else "")
              + (f"; the model as Hugging Face GPT-2: {hf_dir}/" if hf_dir else "; scored by our own model (GPTLM)"))
    return results


@functools.cache
def lm_class():
    """GPTLM, made on first use: lm-eval is optional, and importing it takes a third of a second."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class GPTLM(TemplateLM):
        """The harness's model interface over our GPT: its forward (with its attention pattern, under
        autocast to amp_dtype if given), our GPT-2 tokenizer, batch_size sequences a forward. The
        harness's TemplateLM splits each (context, continuation) pair into tokens as HFLM does;
        scoring and rolling windows follow HFLM too (the harness's own get_rolling_token_windows),
        so a plain GPT-2 gets HFLM's log-likelihoods. generate_until decodes greedily."""

        def __init__(self, model, batch_size=16, amp_dtype=None):
            super().__init__()
            self.model, self.batch_size, self.amp_dtype = model, batch_size, amp_dtype
            self._device = model_device(model)  # LM.device
            self.encoding = gpt2_tokenizer()
            self.max_length = model.config.block_size

        @property
        def eot_token_id(self):
            return self.encoding.eot_token

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.encoding.encode(string, allowed_special="all")  # <|endoftext|> is one token, as HF's

        def tok_decode(self, tokens):
            return self.encoding.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            """(sum of log p(continuation), whether it is the greedy continuation) for each
            (key, context tokens, continuation tokens); a sequence longer than the model's
            context loses tokens from the left, as in HFLM. Longest first, batch_size a forward,
            right-padded (attention is causal: padding changes no earlier position)."""
            too_long = [len(c) for _, _, c in requests if len(c) > self.max_length]
            if too_long:
                raise cli.BadInput(f"a continuation of {too_long[0]} tokens is longer than the model's context "
                                 f"({self.max_length}): it cannot be scored in one window")
            rows = [((context + continuation)[-(self.max_length + 1):][:-1], continuation)
                    for _, context, continuation in requests]
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            results = [None] * len(rows)
            with evaluating(self.model):
                for start in range(0, len(order), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    tokens = torch.zeros(len(batch), len(rows[batch[0]][0]), dtype=torch.long)
                    for j, i in enumerate(batch):
                        tokens[j, :len(rows[i][0])] = torch.tensor(rows[i][0])
                    with autocast(self.device, self.amp_dtype):
                        logits = self.model(tokens.to(self.device))
                    for j, i in enumerate(batch):
                        inputs, continuation = rows[i]
                        span = logits[j, len(inputs) - len(continuation):len(inputs)].float()
                        target = torch.tensor(continuation, device=span.device)
                        log_probs = F.log_softmax(span, dim=-1)
                        results[i] = (float(log_probs.gather(1, target[:, None]).sum()),
                                      bool((span.argmax(dim=-1) == target).all()))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """The log-likelihood of each whole text, in windows of the model's context (the
            first predicted after <|endoftext|>), as the harness's perplexity tasks ask."""
            windows, owners = [], []
            for n, (text,) in enumerate(request.args for request in requests):
                for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                        self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                    windows.append((None, context, continuation))
                    owners.append(n)
            totals = [0.0] * len(requests)
            for n, (log_p, _) in zip(owners, self._loglikelihood_tokens(windows)):
                totals[n] += log_p
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy continuations, one request at a time (the learned positions leave no room
            to left-pad a batch), each cut before the first of its `until` strings, at
            <|endoftext|>, or after max_gen_toks tokens. Sampling is refused: one line."""
            out = []
            with evaluating(self.model):
                for request in requests:
                    context, gen_kwargs = request.args
                    gen_kwargs = dict(gen_kwargs)
                    if gen_kwargs.get("do_sample"):  # without it a temperature is ignored, as by HF's generate
                        raise cli.BadInput("GPTLM decodes greedily only, and this task asks for sampling (do_sample)")
                    until = gen_kwargs.get("until") or []
                    until = [until] if isinstance(until, str) else list(until)
                    max_new = int(gen_kwargs.get("max_gen_toks", 256))
                    tokens = self.tok_encode(context)[-max(1, self.max_length - max_new):]
                    new = []
                    for _ in range(max_new):
                        idx = torch.tensor([(tokens + new)[-self.max_length:]], device=self.device)
                        with autocast(self.device, self.amp_dtype):
                            logits = self.model(idx)
                        token = int(logits[0, -1].argmax())
                        if token == self.eot_token_id:
                            break
                        new.append(token)
                        text = self.tok_decode(new)
                        if any(stop in text for stop in until):
                            break
                    text = self.tok_decode(new)
                    for stop in until:
                        text = text.split(stop)[0]
                    out.append(text)
            return out

    return GPTLM

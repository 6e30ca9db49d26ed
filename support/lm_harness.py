"""EleutherAI's lm-evaluation-harness on our models: the model is exported to a Hugging Face GPT-2
folder (convert_hf.py, tokenizer files included), and the harness's own evaluator
(lm_eval.simple_evaluate) scores it through the harness's Hugging Face model class (HFLM, the one
its `--model hf` uses). Optional: pip install -r requirements-extras.txt. The command line is
evaluate.py's:

    python evaluate.py --checkpoint=log/ckpt_0019073.pt --lm_eval=hellaswag,arc_easy,piqa,lambada_openai

How the harness's HellaSwag differs from support/evals.py's: docs/evaluation.md.
"""

import contextlib
import importlib.util
import json
import logging
import os
import sys

from support.files import replace_atomically
from support.hf import export_hf

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
    """Export `model` (our GPT) to out_stem + "_hf/", score it on `tasks` (harness task names, or
    task YAML paths) with lm_eval.simple_evaluate, print the harness's results table and save it
    (out_stem + "_lm_eval.md") with the full results (out_stem + "_lm_eval.json"); with
    log_samples, each example's scores too (out_stem + "_lm_eval_samples.jsonl"). manager: from
    task_manager(tasks). Returns the harness's results dict. quiet: no progress bars, and of the
    harness's log messages only warnings."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable, make_table

    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = manager or task_manager(tasks)
    hf_dir = out_stem + "_hf"
    export_hf(model, model.config, hf_dir, progress=not quiet)
    with progress_bars_hidden(quiet):
        lm = HFLM(pretrained=hf_dir, backend="causal", device=str(device), batch_size=batch_size, dtype=dtype)
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
              + f"; the model as Hugging Face GPT-2: {hf_dir}/")
    return results

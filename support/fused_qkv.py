"""Attention's queries, keys and values in GPT-2's fused layout: one `c_attn` weight (3C, C) and
bias (3C,), rows [q; k; v], where the model has three projections, c_q, c_k and c_v. Hugging Face's
GPT-2 format holds them fused (support/hf.py fuses on export and splits on import), and so do the
checkpoints written before the model split them: their model and optimizer state (AdamW's
moments, Muon's momentum) is split as it loads (support/resume.py, support/evals.py), so such a
run resumes where it stopped. Each part of a split tensor is a copy of its own."""

import torch

PARTS = ("c_q", "c_k", "c_v")  # the fused tensor's rows, in order


def is_fused(names):
    """Whether state names (a model state_dict's keys, or a sharded checkpoint's) hold a fused c_attn."""
    return any(".attn.c_attn." in name for name in names)


def split_names(name):
    """The three names a fused name (`...attn.c_attn.weight`) becomes, or [name] for any other."""
    head, fused, tail = name.partition(".attn.c_attn.")
    return [f"{head}.attn.{part}.{tail}" for part in PARTS] if fused else [name]


def fused_name(name):
    """The fused name of c_q's tensor, None for c_k's and c_v's (they are c_q's fused tensor's
    rows), and any other name as it is."""
    for part in PARTS:
        head, found, tail = name.partition(f".attn.{part}.")
        if found:
            return f"{head}.attn.c_attn.{tail}" if part == "c_q" else None
    return name


def split_tensor(value, i):
    """The i-th third (by rows) of a fused tensor; a 0-dim tensor (a step count) copied whole."""
    return value.clone() if value.dim() == 0 else value.chunk(3)[i].clone()


def split_model_state(state):
    """A model state_dict with each fused c_attn tensor replaced by c_q's, c_k's and c_v's."""
    out = {}
    for name, value in state.items():
        names = split_names(name)
        out.update({name: value} if len(names) == 1 else {n: split_tensor(value, i) for i, n in enumerate(names)})
    return out


def fuse_model_state(state):
    """The inverse of split_model_state: c_q's, c_k's and c_v's tensors concatenated into c_attn's."""
    out = {}
    for name, value in state.items():
        fused = fused_name(name)
        if fused != name and fused is not None:
            out[fused] = torch.cat([state[n] for n in split_names(fused)])
        elif fused is not None:
            out[name] = value
    return out


def split_named_optimizer_state(saved):
    """An optimizer state keyed by parameter name (DCP's, or support/resume.py's
    optimizer_state_by_name) of the fused layout, split: each fused tensor's state (moments,
    momentum buffers: tensors shaped as it; a step count: copied) goes to its three parts."""
    state = {}
    for name, values in saved["state"].items():
        names = split_names(name)
        if len(names) == 1:
            state[name] = values
        else:
            state.update({n: {k: split_tensor(v, i) if torch.is_tensor(v) else v for k, v in values.items()}
                          for i, n in enumerate(names)})
    groups = [{**group, "params": [n for name in group["params"] for n in split_names(name)]}
              for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def split_optimizer_state(saved, optimizer, model):
    """A checkpoint file's optimizer state of the fused layout (torch's state_dict, which numbers
    the parameters in the order of their param groups, or a CombinedOptimizer's dict of them), split
    and numbered as `optimizer`, built by the same settings for the split `model`, numbers them:
    the fused layout listed c_attn where the split one lists c_q, and c_k and c_v not at all."""
    if hasattr(optimizer, "optimizers"):  # support/optim.py's CombinedOptimizer
        return {name: split_optimizer_state(saved[name], part, model) for name, part in optimizer.optimizers.items()}
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    fused_order = [n for n in map(fused_name, order) if n is not None]
    by_name = {"state": {fused_order[i]: values for i, values in saved["state"].items()},
               "param_groups": [{**g, "params": [fused_order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    split = split_named_optimizer_state(by_name)
    number = {name: i for i, name in enumerate(order)}
    return {"state": {number[n]: values for n, values in split["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in split["param_groups"]]}

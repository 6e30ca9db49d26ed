"""The checkpoint policy of a run, across its ranks: what is saved and when it is written, which
checkpoint a run resumes from (one decision for every rank), what makes a checkpoint good, and
that the settings given now are the ones that train after a resume. The file format itself is
support/checkpoint.py's."""

import dataclasses
import json
import os
import socket

import torch.distributed as dist

from support import checkpoint, fused_qkv
from support.cli import RunError, SettingsError
from support.files import write_failure_advice
from support.runtime import count_on_all_ranks


@dataclasses.dataclass
class Progress:
    """Where a run is: what a checkpoint restores besides the weights, optimizer, data and RNG."""
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained
    bad_steps: int = 0  # NaN/Inf steps in a row just before
    last_val: float = None  # the newest validation loss


class Checkpointer:
    """A run's checkpoints: when they are written (every checkpoint_every steps, at the end, and
    now when the run stops on a signal), what they hold, and the resume from the newest good one
    (load_resume_state: one decision for every rank). It logs the settings that train: all of
    them for a fresh run, and those that changed since the checkpoint for a resumed one."""

    def __init__(self, s, rt, log, raw_model, optimizer, loader):
        self.s, self.rt, self.log = s, rt, log
        self.raw_model, self.optimizer, self.loader = raw_model, optimizer, loader

    def resume(self, candidates):
        """The Progress of the newest good checkpoint of candidates (choose_checkpoints), its model,
        optimizer state, data position and RNG states restored; a fresh Progress if there is none."""
        s, log = self.s, self.log
        state = load_resume_state(s, self.rt, candidates, self.raw_model, self.optimizer, log)
        if state is None:
            log(f"settings: {json.dumps(dataclasses.asdict(s))}")
            return Progress()
        self.loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"], self.rt, log)
        changes = settings_changes(state.get("settings", {}), dataclasses.asdict(s))
        if changes:
            log(f"settings changed since the checkpoint (these train now): {'; '.join(changes)}")
        if state["tokens_seen"] >= s.max_tokens:
            log(f"{s.log_dir} already holds a finished run ({state['tokens_seen']:,} of {s.max_tokens:,} tokens, "
                f"{state['step']} steps). To train again use another --log_dir, or raise --max_tokens to continue it.")
        return Progress(state["step"], state["tokens_seen"], 0, state["val_loss"])

    def save(self, progress, last=False, now=False):
        """Write the checkpoint of progress.step if it is due (every checkpoint_every steps, the
        last step) or asked for now; returns its path, or None."""
        if not (now or last or progress.step % self.s.checkpoint_every == 0):
            return None
        if progress.bad_steps:  # the NaN guard distrusts these weights until a step from them is finite
            bad = "the last step" if progress.bad_steps == 1 else f"the last {progress.bad_steps} steps"
            self.log(f"step {progress.step:5d} | no checkpoint: {bad} from these weights had a NaN/Inf loss or "
                     f"gradient")
            return None
        extra = dict(tokens_seen=progress.tokens, bad_steps=progress.bad_steps, val_loss=progress.last_val)
        return save_checkpoint(self.s, self.rt, progress.step, self.raw_model, self.optimizer, self.loader, extra,
                               self.log)


def model_and_optimizer_state(s, raw_model, optimizer):
    if s.fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        return get_state_dict(raw_model, optimizer_parts(optimizer))
    return raw_model.state_dict(), optimizer.state_dict()


def optimizer_parts(optimizer):
    """The torch optimizers an optimizer is made of: a CombinedOptimizer's parts (support/optim.py:
    AdamW and Muon), or the optimizer itself. DCP's get_state_dict / set_state_dict take them as a list and
    key the state of all of them by parameter name, in one sharded state dict."""
    return list(getattr(optimizer, "optimizers", {"": optimizer}).values())


def save_checkpoint(s, rt, step, raw_model, optimizer, loader, extra, log):
    """Write this step's checkpoint, then prune old ones. State holding a NaN/Inf is never written
    (the run stops instead); a write the system refuses (disk full, permissions...) stops the run
    naming the error and the disk."""
    model_state, optim_state = model_and_optimizer_state(s, raw_model, optimizer)
    bad = checkpoint.nonfinite_tensors({"model": model_state, "optimizer": optim_state})
    if count_on_all_ranks(len(bad), rt, s.fsdp):
        raise RunError(f"step {step}: {len(bad) or 'some'} weight or optimizer tensors hold NaN/Inf (e.g. "
                       f"{bad[:3]}), so no checkpoint was written. The newest checkpoint in {s.log_dir} holds "
                       f"no NaN: lower --max_lr or raise --warmup_tokens and resume from it.")
    state = {"model": model_state, "optimizer": optim_state, "step": step,
             "model_config": dataclasses.asdict(raw_model.config), "settings": dataclasses.asdict(s),
             "data": loader.state_dict(), "rng": rng_states(rt), **extra}
    path = checkpoint.checkpoint_path(s.log_dir, step, sharded=s.fsdp)
    try:
        if s.fsdp:
            checkpoint.save_sharded(state, path, rt.rank, rt.world_size)
        elif rt.is_main:
            checkpoint.save_file(state, path)
    except checkpoint.WriteFailed as e:
        raise RunError(f"{e}. {write_failure_advice(e.errno)}, then resume: the checkpoints written before are "
                       f"intact.") from e
    if rt.is_main:
        # and the one before it: the newest is trusted only once a step from it is finite (run_guard.NanGuard)
        checkpoint.prune(s.log_dir, max(s.keep_checkpoints, 2), step)
        log(f"saved checkpoint {path}")
    return path


def is_sharded_checkpoint(path):
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                       for name in (checkpoint.MANIFEST, ".metadata", "extra.pt"))


def rng_states(rt):
    """Every rank's RNG states (torch, CUDA, numpy, python), as a list indexed by rank: rank 0
    writes the checkpoint. Every rank calls this."""
    mine = checkpoint.rng_state(rt.device)
    if rt.world_size == 1:
        return [mine]
    states = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng_state(states, rt, log):
    """Each rank takes back its own RNG states. Ranks the checkpoint has none for (it was written
    by fewer processes) keep their fresh ones, and the log says so."""
    if rt.rank < len(states):
        checkpoint.set_rng_state(states[rt.rank], rt.device)
    if len(states) != rt.world_size:
        log(f"note: the checkpoint holds the RNG states of {len(states)} ranks, this run has "
            f"{rt.world_size}: ranks {len(states)} and up start theirs afresh")


def resume_candidates(s):
    """The checkpoints to try, newest first, as (folder, names): log_dir's (auto), a given log
    folder's, or (None, [the checkpoint given])."""
    if s.resume == "off":
        return None, []
    if s.resume == "auto":
        return s.log_dir, [os.path.basename(path) for _, path in checkpoint.list_checkpoints(s.log_dir)]
    if os.path.isdir(s.resume) and not is_sharded_checkpoint(s.resume):  # a log folder
        found = checkpoint.list_checkpoints(s.resume)
        if not found:
            raise SettingsError(f"--resume={s.resume} is a folder without checkpoints (ckpt_<step>.pt files or "
                             f"ckpt_<step>/ folders): give a checkpoint, a log folder holding them, auto or off")
        return s.resume, [os.path.basename(path) for _, path in found]
    return None, [s.resume]


def check_one_run_per_log_dir(s):
    """A log_dir holds one run's checkpoints. Another run started there (fresh, or from another
    checkpoint than its newest) would mix with them: pruning keeps the highest steps, whichever run
    wrote them, and a later --resume=auto picks the highest. Refuse, with the choices."""
    existing = checkpoint.list_checkpoints(s.log_dir)
    if not existing or s.resume == "auto":
        return
    if s.resume != "off" and os.path.realpath(s.resume) in (os.path.realpath(s.log_dir),
                                                            os.path.realpath(existing[0][1])):
        return  # the log folder itself (as auto), or its newest checkpoint
    what = "a fresh run (--resume=off)" if s.resume == "off" else f"a run from --resume={s.resume}"
    raise RunError(f"{s.log_dir} already holds checkpoints of a run (the newest: {existing[0][1]}), and {what} "
                   f"there would mix with them. Choose: continue that run (--resume=auto); start this one in "
                   f"another --log_dir; or, to start over here, delete the old checkpoints first "
                   f"(rm -r {os.path.join(s.log_dir, 'ckpt_')}*).")


def choose_checkpoints(s, rt):
    """The checkpoints this run may resume from, newest first, as rank 0 sees them: one decision
    for the whole job. Ranks that each listed their own log_dir could disagree (node-local disks:
    only rank 0 writes checkpoints under DDP), and a rank that started fresh beside ranks that
    resumed would train on, silently wrong. Rank 0 also refuses a second run in a log_dir that
    holds one (check_one_run_per_log_dir); that refusal, too, reaches every rank. Names are sent
    relative to the folder they were found in, so each rank looks in its own log_dir."""
    decision = [None]
    if rt.is_main:
        try:
            check_one_run_per_log_dir(s)
            folder, names = resume_candidates(s)
            decision[0] = ("ok", (folder is not None, names))
        except (RunError, SettingsError) as e:
            decision[0] = (type(e).__name__, str(e))
    if rt.world_size > 1:
        dist.broadcast_object_list(decision, src=0)
    kind, found = decision[0]
    if kind != "ok":
        raise {"RunError": RunError, "SettingsError": SettingsError}[kind](found)
    in_folder, names = found
    folder = s.log_dir if s.resume == "auto" else s.resume
    return [os.path.join(folder, name) for name in names] if in_folder else names


def load_resume_state(s, rt, candidates, raw_model, optimizer, log):
    """Restore the newest good checkpoint of candidates (choose_checkpoints) into model and
    optimizer; return its plain values (or None to start fresh). Good: its checksum matches, it
    loads, and no tensor is NaN/Inf. Under --resume=auto (or a log folder) a bad one is reported
    and the one before it tried; if there are checkpoints but none is good, the run stops instead
    of starting over on top of them. Every rank loads the same one, or the job stops."""
    one_file = s.resume not in ("auto", "off") and candidates == [s.resume]
    failures = []
    for path in candidates:
        check_every_rank_has(path, s, rt)
        try:
            state = load_checkpoint(rt, path, raw_model, optimizer, log, unverified_ok=one_file,
                                    optimizer_name=s.optimizer)
        except checkpoint.CorruptCheckpoint as e:
            if one_file:
                raise
            log(f"warning: {e}; trying the checkpoint before it")
            failures.append((path, str(e)))
            continue
        log(f"resumed from {path} at step {state['step']}")
        return state
    if failures:
        raise RunError(none_loaded_message(s, failures))
    return None


def none_loaded_message(s, failures):
    """What to do when every checkpoint failed. One that only lacks its checksum file (written
    before checksums, or its sidecar lost) can be loaded unverified by naming it, but a log_dir
    resumes only from its newest checkpoint (check_one_run_per_log_dir): the newer ones have to
    be moved aside first. The advice names the exact commands."""
    folder = os.path.dirname(failures[0][0]) or "."
    text = (f"{folder} holds {len(failures)} checkpoints and none could be loaded (the reasons are above), so the "
            f"run does not start over on top of them. To start a new run, use another --log_dir; to start over "
            f"here, delete them first (rm -r {os.path.join(folder, 'ckpt_')}*)")
    unverified = [i for i, (path, _) in enumerate(failures) if not os.path.exists(checkpoint.checksum_record(path))]
    if not unverified:
        return text + "."
    i = unverified[0]
    path, newer = failures[i][0], [p for p, _ in failures[:i]]
    aside = os.path.join(folder, "damaged")
    move = (f"move the newer ones aside (mkdir -p {aside} && mv {' '.join(p + '*' for p in newer)} {aside}/), "
            f"then " if newer else "")
    return text + (f"; {path} lacks its checksum file ({checkpoint.checksum_record(path)}), so it could not be "
                   f"verified: to load it unverified, {move}give --resume={path}.")


def check_every_rank_has(path, s, rt):
    """Stop the job, naming the ranks, if a rank cannot see the checkpoint rank 0 chose."""
    if rt.world_size == 1:
        return
    mine = None if os.path.exists(path) else socket.gethostname()
    seen = [None] * rt.world_size
    dist.all_gather_object(seen, mine)
    missing = [(rank, host) for rank, host in enumerate(seen) if host is not None]
    if missing:
        who = ", ".join(f"rank {rank} on host {host}" for rank, host in missing[:4])
        raise RunError(f"log_dir is not shared: {who} {'has' if len(missing) == 1 else 'have'} no "
                       f"{path}, the checkpoint rank 0 resumes from; every rank must load it. Put --log_dir on a "
                       f"filesystem every node shares (the default for torchrun across nodes), or copy the "
                       f"checkpoint to the same path on every node.")


def agree(reason, rt, path, each_reads_all):
    """Every rank's verdict on one checkpoint, made one. reason: this rank's (None: fine). If every
    rank failed, or the ranks read different parts of it (shards), the checkpoint is bad:
    CorruptCheckpoint, and the next one is tried on every rank. If ranks that read the same
    whole file disagree, some rank's storage or memory failed: the job stops (RunError) rather
    than fall back on some ranks, or on a good checkpoint."""
    if rt.world_size == 1:
        if reason:
            raise checkpoint.CorruptCheckpoint(reason)
        return
    verdicts = [None] * rt.world_size
    dist.all_gather_object(verdicts, None if reason is None else (socket.gethostname(), reason))
    failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
    if not failed:
        return
    if len(failed) == rt.world_size or not each_reads_all:
        raise checkpoint.CorruptCheckpoint(failed[0][1][1])
    rank, (host, why) = failed[0]
    raise RunError(f"rank {rank} on host {host} could not read {path} ({why}), which "
                   f"{rt.world_size - len(failed)} other ranks read: that rank's disk or memory failed. The "
                   f"checkpoint is kept; fix that machine (or run without it) and start the job again.")


def load_checkpoint(rt, path, raw_model, optimizer, log, unverified_ok=False, optimizer_name="adamw"):
    """Verify one checkpoint, load it into model and optimizer and check it holds no NaN/Inf;
    every rank reaches the same verdict (agree). The optimizer keeps this run's settings
    (keep_settings). A file (one process or DDP) loads into an FSDP model too, each rank taking
    its shards of the full tensors. A checkpoint written before the model split attention's q, k
    and v (one c_attn) is split as it loads (support/fused_qkv.py); a sharded one is read whole
    first, on every rank. Returns its plain values; raises CorruptCheckpoint."""
    sharded = os.path.isdir(path)
    verify = not (unverified_ok and not os.path.exists(checkpoint.checksum_record(path)))
    state, reason, whole = None, None, not sharded  # whole: full tensors (a file's), not this rank's shards
    try:
        if sharded:
            if verify:
                agree(checkpoint.verify_folder(path, rt.rank, rt.world_size), rt, path, each_reads_all=False)
            names = checkpoint.sharded_names(path)
            if fused_qkv.is_fused(names) or saved_group_count(names) != group_count(optimizer):
                # another layout (q, k and v fused; an empty param group, saved before optimizers
                # left them out): read whole, split and dropped below
                (tensors, state), whole = checkpoint.load_sharded_whole(path), True
                model_state, optim_state = tensors["model"], without_empty_groups(tensors["optimizer"])
            else:
                from torch.distributed.checkpoint.state_dict import get_state_dict
                model_state, optim_state = get_state_dict(raw_model, optimizer_parts(optimizer))
                state = checkpoint.load_sharded(path, model_state, optim_state)
        else:
            if verify:
                checkpoint.verify_file(path)
            state = checkpoint.load_file(path)
    except checkpoint.CorruptCheckpoint as e:
        reason = str(e)
    agree(reason, rt, path, each_reads_all=not sharded)
    check_resumable(state, path, sharded)
    if not sharded:
        model_state, optim_state = state["model"], without_empty_groups(state["optimizer"])
    check_compatible(state, raw_model.config)
    check_same_optimizer(state, optimizer_name)
    if fused_qkv.is_fused(model_state):
        log(f"{path} holds attention's q, k and v fused in one c_attn (written before they were split): split as "
            f"it loads")
        model_state = fused_qkv.split_model_state(model_state)
        optim_state = (fused_qkv.split_named_optimizer_state(optim_state) if sharded
                       else fused_qkv.split_optimizer_state(optim_state, optimizer, raw_model))
    bad = checkpoint.nonfinite_tensors({"model": model_state, "optimizer": optim_state})
    nan = f"checkpoint {path} holds NaN/Inf in {len(bad)} tensors (e.g. {bad[:3]})" if bad else None
    agree(nan, rt, path, each_reads_all=not sharded)

    def load():
        if sharded or is_sharded_model(raw_model):
            # Full tensors (a file's: one process or DDP) go into FSDP's shards as a full state dict
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(raw_model, optimizer_parts(optimizer), model_state_dict=model_state,
                           optim_state_dict=optim_state if sharded else optimizer_state_by_name(
                               optim_state, optimizer, raw_model),
                           options=StateDictOptions(full_state_dict=whole))
        else:
            raw_model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
    keep_settings(optimizer, load)
    if not verify:
        log(checkpoint.unverified_warning(path))
    return state


def check_resumable(state, path, sharded):
    """A run resumes from what training wrote: the weights, the optimizer state and the step. A
    file of weights alone (convert_hf.py import writes them) starts a run instead."""
    needed = {"model_config", "step"} | (set() if sharded else {"model", "optimizer"})
    missing = sorted(needed - set(state)) if isinstance(state, dict) else sorted(needed)
    if not missing:
        return
    if isinstance(state, dict) and {"model", "model_config"} <= set(state):
        raise SettingsError(f"{path} holds a model's weights but no training state to resume (no "
                            f"{' or '.join(missing)}: convert_hf.py import writes such files): start a run from "
                            f"its weights with --init_from={path} instead of --resume")
    raise SettingsError(f"{path} is not a checkpoint of a training run (it lacks {', '.join(missing)}): give a "
                        f"ckpt_<step>.pt file or ckpt_<step>/ folder from a --log_dir")


def without_empty_groups(saved):
    """A checkpoint file's optimizer state (torch's, or a CombinedOptimizer's dict of them) without
    param groups of no tensors, which optimizers no longer hold (model.optimizer_groups): a modern
    GPT's file saved before still loads. A group lists its tensors' numbers, so dropping an empty
    one renumbers nothing."""
    if "param_groups" not in saved:
        return {name: without_empty_groups(part) for name, part in saved.items()}
    return {**saved, "param_groups": [group for group in saved["param_groups"] if group["params"]]}


def saved_group_count(names):
    """The param groups a sharded folder's optimizer state has (DCP flattens them to
    "optimizer.param_groups.<i>.<setting>")."""
    return len({name.split(".")[2] for name in names if name.startswith("optimizer.param_groups.")})


def group_count(optimizer):
    return sum(len(part.param_groups) for part in optimizer_parts(optimizer))


def is_sharded_model(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def optimizer_state_by_name(saved, optimizer, model):
    """A checkpoint file's optimizer state (torch's state_dict, or a CombinedOptimizer's dict of
    them), keyed by parameter name as DCP's full optimizer state dict is. torch numbers each
    optimizer's parameters in the order of its param groups, and an optimizer made by the same
    settings lists them in the same order under FSDP: the name of number i is the name of its
    i-th parameter."""
    names = {p: name for name, p in model.named_parameters()}
    parts = optimizer_parts(optimizer)
    saved_parts = [saved[name] for name in optimizer.optimizers] if hasattr(optimizer, "optimizers") else [saved]
    state, groups = {}, []
    for part, saved_part in zip(parts, saved_parts):
        order = [names[p] for group in part.param_groups for p in group["params"]]
        state.update({order[i]: values for i, values in saved_part["state"].items()})
        groups += [{**group, "params": [order[i] for i in group["params"]]} for group in saved_part["param_groups"]]
    return {"state": state, "param_groups": groups}


def keep_settings(optimizer, load):
    """load() the checkpoint's optimizer state (moments, momentum buffers, step counts) and keep
    this run's hyperparameters: load_state_dict also restores each param group's settings as
    saved (weight decay, Muon's momentum, lr_scale, adjust_lr_fn, ...), which would silently train
    with the checkpoint's values instead of the ones given now. The LR is the schedule's, set
    every step. Returns the group fields that changed: [(name, checkpoint's, now's)]."""
    asked = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load()
    changed = []
    for now, group in zip(asked, optimizer.param_groups):
        changed += [(k, group.get(k), v) for k, v in now.items() if k != "lr" and group.get(k) != v]
        group.update(now)
    return changed


def settings_changes(saved, now):
    """'name a -> b' for each setting that differs from the checkpoint's (what trains now)."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k in saved and saved[k] != v]


def check_compatible(state, config):
    """A checkpoint of another model or data must not be loaded into this run. A field the
    checkpoint lacks (written before the field existed) has its default, the architecture it
    was trained with then."""
    defaults = dataclasses.asdict(type(config)())
    saved = {**defaults, **state["model_config"]}
    for name, value in dataclasses.asdict(config).items():
        if saved.get(name) != value:
            raise SettingsError(f"the checkpoint's model has {name}={saved.get(name)}, these settings give "
                             f"{value}: resume with the checkpoint's --{name} (or --model), or start a "
                             f"new --log_dir")


def check_same_optimizer(state, optimizer_name):
    """A checkpoint's optimizer state only loads into the optimizer it was saved from."""
    saved = state.get("settings", {}).get("optimizer", "adamw")
    if saved != optimizer_name:
        raise SettingsError(f"the checkpoint was trained with --optimizer={saved}, these settings give "
                            f"--optimizer={optimizer_name}: resume with --optimizer={saved}, or start a new --log_dir")

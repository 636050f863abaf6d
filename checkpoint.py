"""
checkpoint.py: saving, finding and loading the checkpoints of every run, each save beside its load (as nanochat's
checkpoint manager pairs them). A companion of transformer.py, which imports it; it never imports transformer.py.

Two formats, both read by any number of processes:
    ckpt.pt        one file, the whole state (gathered from the shards under --fsdp), written by rank 0
    step_NNNNNN/   a folder written by torch.distributed.checkpoint (DCP), each process its own shards
Both are read back with weights_only=True: tensors and plain containers, never code. A one-process run that
saves ckpt.pt never imports DCP or FSDP: they load where a sharded checkpoint or a sharded model needs them.
"""

import contextlib
import errno
import glob
import os
import shutil
import sys
import warnings

import torch

from files import atomic_open

CKPT_FORMAT = "transformer.py/1"  # stored in every checkpoint, so other files are told apart
# Tensors renamed since a checkpoint was written, old name -> new: old checkpoints still sample, evaluate, resume.
RENAMED = {"transformer.wpe.weight": "positions.weight"}


def save_checkpoint(path, state):
    """torch.save, atomically (files.atomic_open): a kill -9 mid-write leaves the old file or the new one."""
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path):
    """A checkpoint of either format, or a run's --out-dir (its newest complete checkpoint), as one dict.
    weights_only=True: only tensors and plain containers are rebuilt, so a file can never run code.
    mmap=True: tensors are read from the file as they are used, so eight processes resuming on one
    machine do not each copy the whole checkpoint into host RAM first."""
    path = newest(path) if os.path.isdir(path) else path
    if os.path.isdir(path):  # a sharded step folder: its weights read whole, in this one process
        return {**read_train_state(path), "model": read_model_state(path)}
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle asking for code or unknown classes, or not a torch file at all
        reason = str(e).strip().splitlines()[0][:200]
        raise Unreadable(f"{path}: refused to load: not a plain transformer.py checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a transformer.py checkpoint (no '{CKPT_FORMAT}' format tag)")
    if isinstance(ckpt.get("model"), dict):
        ckpt["model"] = renamed(ckpt["model"], RENAMED)
    return ckpt


def renamed(obj, names):
    """obj with every dict key and string in it renamed by names ({old: new}), tensors untouched."""
    if isinstance(obj, dict):
        return {renamed(k, names): renamed(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [renamed(v, names) for v in obj]
    return names.get(obj, obj) if isinstance(obj, str) else obj


# -----------------------------------------------------------------------------
# Sharded checkpoints (--ckpt-format sharded, the default under --fsdp): DCP writes each process's own shards, so
# no process ever holds the whole state, and reads them back under any number of processes (it reshards on load:
# the keys are parameter names, whatever the layout). A save is a folder:
#   OUT_DIR/step_000010/  __0_0.distcp __1_0.distcp .metadata   weights, AdamW state, each process's RNG state
#                         train.pt                              rank 0: step, loader, config, args (plain values)
#                         COMPLETE                              written last, then the folder is renamed
# written as step_000010.tmp/ first: a kill at any moment leaves a .tmp folder, which is never read, and the last
# complete folder. --keep-checkpoints K keeps the newest K.


def find_checkpoints(out_dir):
    """The complete checkpoints in out_dir, newest first: step_* folders with their COMPLETE marker and ckpt.pt (a
    run may change formats on resuming: the one written last comes first)."""
    found = [os.path.join(f, "COMPLETE") for f in glob.glob(os.path.join(glob.escape(out_dir), "step_*[0-9]"))]
    found = [f for f in [*found, os.path.join(out_dir, "ckpt.pt")] if os.path.isfile(f)]
    return [f.removesuffix(os.sep + "COMPLETE") for f in sorted(found, key=os.path.getmtime, reverse=True)]


def newest(path):
    """A step folder as it is; a run's --out-dir: its newest complete checkpoint, a step folder or ckpt.pt."""
    found = [path] if os.path.isfile(os.path.join(path, "COMPLETE")) else find_checkpoints(path)
    if not found:
        raise ValueError(f"{path}: no complete checkpoint in this folder (step_*/COMPLETE or ckpt.pt)")
    return found[0]


def read_state(path):
    """What a checkpoint of either format says, weights included only for ckpt.pt (memory-mapped: read as used)."""
    return read_train_state(path) if os.path.isdir(path) else load_checkpoint(path)


def trained_args(out_dir):
    """The command line (vars(args)) that wrote out_dir's newest readable checkpoint, or {} where there is none:
    what --resume continues."""
    for path in find_checkpoints(out_dir):
        try:
            return dict(read_state(path)["args"])
        except (ValueError, KeyError):  # unreadable, or not ours: resuming says so, or falls back to an older one
            continue
    return {}


class Unreadable(ValueError):
    """A checkpoint that is there but cannot be read (truncated, corrupt): resuming falls back to an older one."""


def read_train_state(folder):
    """The plain values of a sharded checkpoint (as ckpt.pt holds them, less tensors): weights_only, no code."""
    try:
        return torch.load(os.path.join(folder, "train.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or asking for code
        raise Unreadable(f"{folder}: unreadable checkpoint ({str(e).strip().splitlines()[0][:200]})") from None


def read_model_state(folder):
    """One process, no process group: the checkpoint's weights as whole tensors, {name: tensor}, sized from DCP's
    metadata; the optimizer's state is not read at all (--sample, --eval, the exports)."""
    dcp, CheckpointException = import_dcp()
    reader = dcp.FileSystemReader(folder)
    try:
        meta = reader.read_metadata().state_dict_metadata
        state = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                 for k, m in meta.items() if k.startswith("model.")}
        with quiet():
            dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:
        raise Unreadable(f"{folder}: unreadable checkpoint ({first_line(e)})") from None
    return renamed(state, RENAMED)


def import_dcp():
    """torch.distributed.checkpoint and its exception (a BaseException), imported where a sharded checkpoint
    needs them: a run that saves ckpt.pt never pays for it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    return dcp, CheckpointException


@contextlib.contextmanager
def quiet():
    """DCP in one process (no_dist) warns at every call that it assumes one process: it is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is .*single process")
        yield


def first_line(e):
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    e = next(iter(failures.values()))[0] if failures else e
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class Checkpoints:
    """A run's saves, in either format, and its loads. Every process calls save and load together. Sharded saves
    can be asynchronous: DCP copies the state to host memory (the step waits for that), then writes on a
    background thread while training goes on; the folder is completed at the next save or at wait().

    NOTE: DCP's collectives (plans, the gathered write results) run on a gloo group of their own: on a background
    thread they would otherwise interleave with the training loop's collectives on the default group, in a
    different order on each process (torchtitan does the same)."""

    def __init__(self, out_dir, format, keep, asynchronous, rank, world):
        self.out_dir, self.format, self.keep, self.asynchronous = out_dir, format, keep, asynchronous
        self.rank, self.world = rank, world
        self.group = torch.distributed.new_group(backend="gloo") if torch.distributed.is_initialized() else None
        self.pending = None  # (future, tmp folder, folder, bytes) of the save in flight

    def state(self, model, optimizer, rng):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)  # this process's shards, keyed by name
        return {"model": model_state, "optim": optimizer_state, f"rng_{self.rank}_of_{self.world}": rng}

    def save(self, model, optimizer, rng, train_state, done=False):
        """Save the model, the optimizer, this process's RNG state and the train state (plain values). done: the
        run's last save, completed before returning even when asynchronous. A failure (a full disk, a folder that
        cannot be written) is the same one line on every process, the previous checkpoint intact."""
        if self.format == "file":
            return self.save_file(model, optimizer, rng, train_state)
        self.wait()
        dcp, CheckpointException = import_dcp()
        folder = os.path.join(self.out_dir, f"step_{train_state['step']:06d}")
        tmp, state = folder + ".tmp", self.state(model, optimizer, rng)
        size = sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors(state))
        error = None
        if self.rank == 0:  # the folder, and the plain values; a full disk is said before anything big is written
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # a save a kill cut short: never read, replaced
                os.makedirs(tmp)
                if shutil.disk_usage(tmp).free < size * self.world:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                torch.save(train_state, os.path.join(tmp, "train.pt"))
            except (OSError, RuntimeError) as e:
                error = save_error_line(e, tmp, size, self.world)
        if error := self.gather(error)[0]:  # every process learns it (and the folder exists once they have)
            self.remove(tmp)
            raise ValueError(error)
        kw = {"checkpoint_id": tmp, "process_group": self.group, "no_dist": self.group is None}
        try:
            with quiet():
                future = dcp.async_save(state, **kw) if self.asynchronous else dcp.save(state, **kw)
        except (Exception, CheckpointException) as e:
            self.fail(e, tmp, size)
        self.pending = (future if self.asynchronous else None, tmp, folder, size)
        if done or not self.asynchronous:
            self.wait()

    def save_file(self, model, optimizer, rng, train_state):
        """ckpt.pt: every weight and AdamW moment whole (gathered from the shards under FSDP), every process's RNG
        state; rank 0 writes it (save_checkpoint: atomically)."""
        state = {**train_state, "rng": self.gather(rng)}
        if sharded(model):
            state["model"], state["optimizer"] = import_fsdp().full_state(model, optimizer)
        else:
            state["model"], state["optimizer"] = model.state_dict(), optimizer.state_dict()
        path, error = os.path.join(self.out_dir, "ckpt.pt"), None
        if self.rank == 0:
            try:
                save_checkpoint(path, state)
            except (OSError, RuntimeError) as e:  # torch's zip writer raises a RuntimeError when the disk fills
                error = save_error_line(e, path, state_bytes(state))
        if error := self.gather(error)[0]:
            raise ValueError(error)

    def gather(self, obj):
        """obj from every process, in rank order."""
        if self.group is None:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def fail(self, e, tmp, size):
        """Every process raises the same line: DCP gathers each process's failure and raises them on all."""
        self.remove(tmp)  # the previous checkpoint is untouched: only tmp was written
        raise ValueError(save_error_line(e, tmp, size, self.world)) from None

    def remove(self, tmp):
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def wait(self):
        """Complete the save in flight. When rank 0's DCP save returns every process's shards are on disk (it
        gathers their write results before it writes .metadata), so rank 0 marks and renames with no barrier."""
        if self.pending is None:
            return
        future, tmp, folder, size = self.pending
        self.pending = None
        _, CheckpointException = import_dcp()
        try:
            if future is not None:
                future.result()
        except (Exception, CheckpointException) as e:
            self.fail(e, tmp, size)
        if self.rank != 0:
            return
        with open(os.path.join(tmp, "COMPLETE"), "wb") as f:
            os.fsync(f.fileno())
        shutil.rmtree(folder, ignore_errors=True)  # the same step saved again after a restart
        os.replace(tmp, folder)
        fd = os.open(self.out_dir, os.O_RDONLY)
        os.fsync(fd)  # the rename itself, durable
        os.close(fd)
        for old in [f for f in find_checkpoints(self.out_dir) if os.path.isdir(f)][self.keep:]:
            os.remove(os.path.join(old, "COMPLETE"))  # first: a kill inside rmtree leaves no "complete" half
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path, ckpt, model, optimizer, rng):
        """Fill model and optimizer (sharded or not) from path, a step folder or ckpt.pt (its contents: ckpt, with
        whole tensors that each process takes its shard of); returns the train state, with this process's RNG
        state under "rng" when the number of processes is the one that saved (else seed_rng seeds afresh).
        rng: this process's RNG state now, for its shape."""
        if not os.path.isdir(path):
            if sharded(model):
                import_fsdp().load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
            else:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            return ckpt
        from torch.distributed.checkpoint.state_dict import set_state_dict

        dcp, CheckpointException = import_dcp()
        folder, train_state = path, ckpt
        state = self.state(model, optimizer, rng)
        key = f"rng_{self.rank}_of_{self.world}"
        try:
            saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
            if not any(k.startswith(key) for k in saved):
                del state[key]  # saved by another number of processes
            as_saved = {new: old for old, new in RENAMED.items() if f"model.{old}" in saved}  # an older folder
            state = renamed(state, as_saved)
            with quiet():
                dcp.load(state, checkpoint_id=folder, process_group=self.group, no_dist=self.group is None)
            state = renamed(state, {saved_as: name for name, saved_as in as_saved.items()})
        except (Exception, CheckpointException) as e:
            raise Unreadable(f"{folder}: unreadable checkpoint ({first_line(e)})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_state["rng"] = [state[key]] * self.world if key in state else []
        return train_state


def sharded(model):
    """Whether fsdp.shard sharded model: FSDP is loaded by then (a parameter can be whole for a while, as FSDP
    swaps them in and out, so the model is asked, not its weights)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def import_fsdp():
    import fsdp  # gathering and scattering a sharded model's state: only a model fsdp.shard sharded needs it

    return fsdp


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict | list | tuple):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from tensors(v)


def state_bytes(state):
    """What a state takes on disk: each tensor's storage once (a tied weight is one tensor under two names)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(state)}.values())


def save_error_line(e, path, size, world=1):
    """A failed save in one line: the path, the reason (an OSError found anywhere in the chain, or in any process's
    failure under DCP; torch's zip writer raises a RuntimeError with none when the disk fills), the space needed."""
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    chain = [f[0] for f in failures.values()] if failures else [e]
    reason = None
    while chain and reason is None:
        e = chain.pop(0)
        if isinstance(e, OSError) and e.errno:
            reason = os.strerror(e.errno)
        chain += [c for c in (e.__cause__, e.__context__) if c is not None]
    parent = path
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent) or "."
    free = shutil.disk_usage(parent).free
    if reason is None:
        reason = "No space left on device" if free < size * world else first_line(e)
    each = " per process" if world > 1 else ""
    return f"cannot save a checkpoint to {path}: {reason} (this save needs {size / 2**20:.1f} MiB{each} or more, " \
           f"{free / 2**20:.1f} MiB free)"

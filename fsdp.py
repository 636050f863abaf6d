"""
fsdp.py: what --fsdp needs beyond DDP. A companion of transformer.py, which imports it only under --fsdp;
it never imports transformer.py.

FSDP (fully_shard, FSDP2) shards each Block, then the root (embeddings, final norm, head), so a
forward gathers one block's weights at a time and frees them after; the weights become DTensors, each
process holding a 1/N slice, and the optimizer built over them keeps 1/N of AdamW's state. A tied
weight stays one parameter (wte and lm_head both live in the root's group). With bf16, FSDP's
mixed-precision policy gathers bf16 copies of the fp32 master weights (half the traffic and memory of
a gathered block) and reduces gradients in fp32. autocast stays on around the forward as on every other
path, so the ops it keeps in fp32 (layer_norm, pow, rsqrt, exp, ...) run in fp32 here too; what differs
from DDP is that FSDP casts each block's inputs (the residual stream, the RoPE tables) to bf16, as
torchtitan does. fp16 is refused: its GradScaler would have to find an inf in any process's shard.

The model is built on the meta device and each process initialises only its own shards (DeferredInit), to
the values a whole build has. Checkpoints come in two formats, both read by any number of processes
(Checkpoints): the single file (ckpt.pt: full_state gathers the shards into whole tensors for rank 0,
load_full_state hands each process its shard of them) and sharded step folders written by
torch.distributed.checkpoint, each process its own shards, optionally in the background.
"""

import contextlib
import errno
import glob
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode


def shard(model, dtype, init=None, device=None, hsdp=False):
    """Shard model in place over the processes of the default group, block by block, then the rest. A model built
    on the meta device inside init (a DeferredInit) then gets its initial values, on device. hsdp: HSDP, each
    weight sharded over the processes of a node (torchrun's LOCAL_WORLD_SIZE) and replicated across the nodes,
    so that only gradients (an all-reduce of shards) cross between nodes, not every forward's gathers."""
    if dtype == torch.float16:
        raise ValueError("--fsdp trains in bfloat16 or float32, not float16 (its loss scaling is not shard-aware "
                         "here): pass --dtype bfloat16 or --dtype float32")
    policy = MixedPrecisionPolicy()  # fp32: nothing cast
    if dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = None
    if hsdp:
        world, local = torch.distributed.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])
        mesh = init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
    named = list(model.named_parameters())
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # what is left: embeddings, ln_f, lm_head
    if init is not None and init.on:
        init.materialize(model, named, device)


class DeferredInit(TorchFunctionMode):
    """`with DeferredInit(on) as init:` builds a model on the meta device (no memory) and records every in-place op
    that initialises a parameter (nn.init's functions, normal_, zero_, ...). After shard(), init.materialize gives
    each process its shards: the ops are replayed in their order on one whole CPU tensor at a time, drawing the
    same random numbers a build on the CPU draws, and the process keeps its slice of the result. So a sharded model
    starts bit for bit where a one-process build from the same seed starts, and no process ever holds more than
    its shards and the largest single parameter. With on=False it does nothing (a build as usual).

    NOTE: replaying the ops, rather than giving each parameter its own seed, keeps the initial weights of every
    other path (one process, DDP, earlier checkpoints' runs) as they were. Buffers are left to the caller: the
    model's tables are computed, not drawn, and to_empty leaves them unset."""

    def __init__(self, on=True):
        super().__init__()
        self.on, self.ops, self.device = on, [], torch.device("meta")

    def __enter__(self):
        if self.on:
            self.device.__enter__()
            super().__enter__()
        return self

    def __exit__(self, *exc):
        if self.on:
            super().__exit__(*exc)
            self.device.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):  # in place: an nn.init function or a tensor op
            if "tensor" in kwargs:  # nn.init's functions hand their tensor over by name
                target, rest = kwargs["tensor"], (args, {k: v for k, v in kwargs.items() if k != "tensor"})
            else:
                target, rest = args[0] if args else None, (args[1:], kwargs)
            if isinstance(target, torch.nn.Parameter):
                self.ops.append((func, target, *rest))
        return func(*args, **kwargs)

    def materialize(self, model, named, device):
        """After shard(model): real memory for this process's shards, then their initial values. named: the
        model's named_parameters() from before shard() replaced them with their shards."""
        model.to_empty(device=device)
        names = {id(p): name for name, p in named}
        params = dict(model.named_parameters())
        after = {}  # op index -> the index of the next op on the same parameter (None: the last)
        for i, (_, p, _, _) in reversed(list(enumerate(self.ops))):
            after[i], after[id(p)] = after.get(id(p)), i
        kept = {}  # parameters whose next op reads what the last one wrote (rare: nn.init's ops overwrite)
        with torch.no_grad():
            for i, (func, p, args, kwargs) in enumerate(self.ops):
                x = kept.pop(id(p), None)
                x = torch.empty(p.shape, dtype=p.dtype) if x is None else x  # on the CPU: its random numbers
                func(x, *args, **kwargs)
                nxt = after[i]
                if nxt is not None and getattr(self.ops[nxt][0], "__name__", "") not in OVERWRITE:
                    kept[id(p)] = x
                elif nxt is None and id(p) in names:  # its final value (a weight replaced by a tie has no name)
                    param = params[names[id(p)]]
                    x = x.to(param.device)  # every process has it whole: no communication
                    local = distribute_tensor(x, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(local.to_local())


# The in-place ops that set every element whatever was there: the values before them need not be kept.
OVERWRITE = {"normal_", "uniform_", "fill_", "zero_", "ones_", "zeros_", "constant_", "kaiming_uniform_",
             "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_", "orthogonal_"}


def full_state(model, optimizer):
    """(model state, optimizer state) as one process's model.state_dict() and optimizer.state_dict() would be,
    whole CPU tensors on rank 0 ({} and {} on the others). Every process must call it: each weight and each
    AdamW moment is gathered from its shards.

    NOTE: this costs rank 0 the host RAM of the whole model and optimizer state at every save (~12 bytes a
    parameter: fp32 weights and AdamW's two moments)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only
    model_state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)  # keyed by parameter name
    if not model_state:
        return {}, {}
    first = {}  # a tied weight comes back as two copies: make it one tensor under both names, as in state_dict()
    for name, p in model.named_parameters(remove_duplicate=False):
        model_state[name] = model_state[first.setdefault(id(p), name)]
    ids = optimizer.state_dict()  # torch.optim's layout (ids 0, 1, ... and the groups' settings), local shards
    ids["state"] = {i: optim_state["state"][name] for i, name in enumerate(optimizer_param_names(model, optimizer))
                    if name in optim_state["state"]}
    return model_state, ids


def load_full_state(model, optimizer, model_state, optimizer_state):
    """full_state's other half: every process reads the whole tensors (mapped from the file, see
    transformer.load_checkpoint) and keeps its own shard of each."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=full)
    names = optimizer_param_names(model, optimizer)  # torch.optim's ids -> the names FSDP's loader expects
    by_name = {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def optimizer_param_names(model, optimizer):
    """The name of each parameter the optimizer updates, in the order of its state_dict() ids 0, 1, 2, ..."""
    names = {id(p): name for name, p in model.named_parameters()}  # a tied weight under its first name
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


# -----------------------------------------------------------------------------
# Sharded checkpoints (--ckpt-format sharded, the default under --fsdp): torch.distributed.checkpoint (DCP) writes
# each process's own shards, so no process ever holds the whole state, and reads them back under any number of
# processes (it reshards on load: the keys are parameter names, whatever the layout). A save is a folder:
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
    reader = dcp.FileSystemReader(folder)
    try:
        meta = reader.read_metadata().state_dict_metadata
        state = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                 for k, m in meta.items() if k.startswith("model.")}
        with quiet():
            dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:
        raise Unreadable(f"{folder}: unreadable checkpoint ({first_line(e)})") from None
    return state


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

    def __init__(self, out_dir, format, keep, asynchronous, rank, world, write_file):
        self.out_dir, self.format, self.keep, self.asynchronous = out_dir, format, keep, asynchronous
        self.rank, self.world, self.write_file = rank, world, write_file
        self.group = torch.distributed.new_group(backend="gloo") if torch.distributed.is_initialized() else None
        self.pending = None  # (future, tmp folder, folder, bytes) of the save in flight

    def state(self, model, optimizer, rng):
        model_state, optimizer_state = get_state_dict(model, optimizer)  # this process's shards, keyed by name
        return {"model": model_state, "optim": optimizer_state, f"rng_{self.rank}_of_{self.world}": rng}

    def save(self, model, optimizer, rng, train_state, done=False):
        """Save the model, the optimizer, this process's RNG state and the train state (plain values). done: the
        run's last save, completed before returning even when asynchronous. A failure (a full disk, a folder that
        cannot be written) is the same one line on every process, the previous checkpoint intact."""
        if self.format == "file":
            return self.save_file(model, optimizer, rng, train_state)
        self.wait()
        folder = os.path.join(self.out_dir, f"step_{train_state['step']:06d}")
        tmp, state = folder + ".tmp", self.state(model, optimizer, rng)
        size = sum(t.to_local().nbytes if isinstance(t, DTensor) else t.nbytes for t in tensors(state))
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
        state; rank 0 writes it (write_file: atomically)."""
        state = {**train_state, "rng": self.gather(rng)}
        if sharded(model):
            state["model"], state["optimizer"] = full_state(model, optimizer)
        else:
            state["model"], state["optimizer"] = model.state_dict(), optimizer.state_dict()
        path, error = os.path.join(self.out_dir, "ckpt.pt"), None
        if self.rank == 0:
            try:
                self.write_file(path, state)
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
                load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
            else:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            return ckpt
        folder, train_state = path, ckpt
        state = self.state(model, optimizer, rng)
        key = f"rng_{self.rank}_of_{self.world}"
        try:
            if not any(k.startswith(key) for k in dcp.FileSystemReader(folder).read_metadata().state_dict_metadata):
                del state[key]  # saved by another number of processes
            with quiet():
                dcp.load(state, checkpoint_id=folder, process_group=self.group, no_dist=self.group is None)
        except (Exception, CheckpointException) as e:
            raise Unreadable(f"{folder}: unreadable checkpoint ({first_line(e)})") from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_state["rng"] = [state[key]] * self.world if key in state else []
        return train_state


def sharded(model):
    return isinstance(model, FSDPModule)  # (a parameter can be whole for a while: FSDP swaps them in and out)


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

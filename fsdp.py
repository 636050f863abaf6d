"""
fsdp.py: sharding a model over the processes of a torchrun job (--fsdp), and gathering and scattering its state
for checkpoint.py. A companion of transformer.py, which imports it where --fsdp needs it (and checkpoint.py where
a sharded model is saved or loaded); it never imports transformer.py. Importing it loads FSDP (~0.6 s), which a
one-process run never does.

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
the values a whole build has. For ckpt.pt, full_state gathers the shards into whole tensors for rank 0 and
load_full_state hands each process its shard of them; the sharded step folders are checkpoint.py's.
"""

import os

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
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
    checkpoint.load_checkpoint) and keeps its own shard of each."""
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

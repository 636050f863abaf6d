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

A checkpoint is the same file whether one process, DDP or FSDP wrote it: full_state gathers the shards
into whole tensors, load_full_state hands each process its shard of them.
"""

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard(model, dtype):
    """Shard model in place over the processes of the default group, block by block, then the rest."""
    if dtype == torch.float16:
        raise ValueError("--fsdp trains in bfloat16 or float32, not float16 (its loss scaling is not shard-aware "
                         "here): pass --dtype bfloat16 or --dtype float32")
    policy = MixedPrecisionPolicy()  # fp32: nothing cast
    if dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # what is left: embeddings, ln_f, lm_head


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

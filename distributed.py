"""
distributed.py: the processes a run is made of. A companion of transformer.py, which imports it; it never imports
transformer.py. Each process's device (pick_device), the process group torchrun's processes join (Distributed:
what the story uses is its rank, world size, sum and barrier; the rest is the plumbing that makes a group start
and end cleanly, gloo's teardown and TorchElastic's stores, each workaround beside what it works around), the
signals that ask a run to stop (StopSignal), waiting for the GPU (synchronize), the model wrapped for the steps:
compiled, in DDP or sharded by FSDP (wrap_model), and each process's RNG state, saved in a checkpoint and put back
(rng_state, seed_rng).
"""

import contextlib
import os
import signal
import warnings

import torch


def pick_device(name, local_rank=0):
    """'auto': cuda > mps > cpu. Under torchrun each process drives its own GPU, so a bare 'cuda'
    becomes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def synchronize(device):
    """Wait for the GPU to finish what was queued (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StopSignal:
    """Inside `with StopSignal() as stop:`, SIGINT / SIGTERM only set stop.requested, so the loop
    can finish its step, save a checkpoint and exit cleanly; the old handlers come back after."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True


class Distributed:
    """Rank and world size from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); one process otherwise."""

    finished_on_gloo = False  # set when a gloo group was torn down after success: see running's NOTE

    def __init__(self):
        self.enabled = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0

    @contextlib.contextmanager
    def running(self, device):
        """The process group for the block inside `with`: NCCL moves GPU tensors between GPUs directly, gloo
        runs the same collectives on CPU tensors (tests). Alone, there is nothing to set up.

        NOTE: a process that dies at exit fails the whole torchrun job, and gloo can make one die: a worker
        thread of its freeing the tensors of a finished collective after Python has begun shutting down aborts
        the process (SIGABRT, "terminate called without an active exception", 1 finished run in 20 to 40 on a
        busy machine). Hence:
        - FSDP (--fsdp uses it; transformers and torch.distributed.checkpoint import it) is imported before
          the group exists: its ShardedGradScaler takes `group.WORLD` as a default argument, so imported
          later it would keep the group, and its threads, alive after destroy_process_group.
        - On success every process waits for the others before tearing down. After an error there is no
          waiting: a peer may never arrive.
        - On gloo (CPU) a finished process ends right after destroy_process_group, everything written, closed
          and flushed, skipping Python's shutdown: under --fsdp torch's DTensor keeps the group and gloo's
          threads alive regardless. transformer.py's entry (the end of that file) does that, when running has set
          Distributed.finished_on_gloo: library code never ends its caller's process."""
        if not self.enabled:
            yield
            return
        import torch.distributed.fsdp  # noqa: F401  (see the NOTE: before init_process_group)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        # NOTE: torchrun --max-restarts keeps one store for every attempt, the killed attempt's keys still in it:
        # a restarted gloo group reads a dead peer's address and hangs or fails. Each attempt gets its own keys.
        store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and torch.distributed.PrefixStore(
            f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}",
            torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False))
        torch.distributed.init_process_group(backend, store=store or None, rank=self.rank, world_size=self.world,
                                             device_id=device_id)
        try:
            yield
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
        Distributed.finished_on_gloo = backend == "gloo"

    def sum(self, t):
        """Sum a tensor over processes, in place."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self):
        # wait until every process gets here (rank 0 preparing data or downloading, the others waiting)
        if self.enabled:
            torch.distributed.barrier()


def wrap_model(model, args, dist, device, dtype, init=None):
    """What runs the steps: the model, compiled, and under torchrun inside DDP or, with --fsdp, sharded in place
    (fsdp.py; a model built inside init, an fsdp.DeferredInit, is then initialised shard by shard).
    NOTE: gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no copy); broadcast_buffers=False:
    our only buffers (RoPE, ALiBi) are computed from the config, the same on every process."""
    if args.fsdp:
        import fsdp  # FSDP is loaded where it is used: a one-process run never pays for it

        fsdp.shard(model, dtype, init, device, hsdp=args.fsdp == "hsdp")
        if init is not None:  # built on the meta device: the position tables, computed not drawn, are still unset
            with device:
                model.positions.make_tables()
    if args.compile:  # compiled first, then wrapped by DDP (as nanoGPT does)
        model = torch.compile(model)
    if dist.enabled and not args.fsdp:
        with warnings.catch_warnings():  # newer torch prefers forward_sync_buffers, which older ones lack
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True, broadcast_buffers=False,
            )
    return model


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_rng(ckpt, seed, dist, device):
    """Set the global RNGs (dropout masks) for the loop: a resumed run restores its own process's state,
    so its masks continue exactly; a new run seeds each process differently, so their masks differ."""
    if ckpt is not None and len(ckpt["rng"]) == dist.world:
        torch.set_rng_state(ckpt["rng"][dist.rank]["cpu"])
        if "cuda" in ckpt["rng"][dist.rank] and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][dist.rank]["cuda"], device)
        return
    # A new run, or a resume under another number of processes (the masks cannot continue exactly then).
    torch.manual_seed(seed + dist.rank + (ckpt["step"] if ckpt is not None else 0))

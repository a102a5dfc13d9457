"""Process-group setup and the few collectives the trainer needs.

One code path serves a single process, torchrun on CPU (gloo) and torchrun on GPUs (NCCL):
with no torchrun environment the world is one process and every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtl_dist.errors import ConfigError


@dataclass(frozen=True)
class World:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def init_world(device: str = "auto", deepspeed: bool = False) -> World:
    """Join the process group started by torchrun (or make a world of one)."""
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device", device, "use --device cpu (no GPU is visible)")
    if use_cuda:
        # One GPU per local rank; set before any collective so NCCL and the object
        # collectives pick the right device.
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if deepspeed:
        # DeepSpeed wants its own communication layer initialised, even for one process.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # DeepSpeed picks its device by probing at import; name ours so that
        # --device cpu on a GPU machine stays on the CPU (and the probe's warning goes).
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
        import deepspeed as ds

        # DeepSpeed adopts a torch group that already exists, so a restarted worker
        # gets the same fresh rendezvous keys as under DDP.
        with _port_in_use_is_a_user_error():
            if world_size > 1:
                _init_process_group(backend, dev if use_cuda else None)
            ds.init_distributed(dist_backend=backend)
    elif world_size > 1:
        with _port_in_use_is_a_user_error():
            _init_process_group(backend, dev if use_cuda else None)
    return World(rank, local_rank, world_size, dev)


@contextlib.contextmanager
def _port_in_use_is_a_user_error() -> Iterator[None]:
    """A rendezvous port held by another program, said as a ConfigError.

    Under torchrun the launcher's agent opens the port before any worker starts and
    reports a busy one itself; a worker meets it only when it opens the store, as a
    single DeepSpeed process does on ``MASTER_PORT``.
    """
    try:
        yield
    except RuntimeError as exc:  # torch's DistNetworkError
        text = str(exc)
        if "EADDRINUSE" not in text and "address already in use" not in text.lower():
            raise
        raise ConfigError(
            "MASTER_PORT",
            os.environ.get("MASTER_PORT"),
            "pick a free port (torchrun --master_port PORT), or unset MASTER_PORT "
            "for a single process",
            f"already in use on {os.environ.get('MASTER_ADDR', '127.0.0.1')}",
        ) from None


def _init_process_group(backend: str, device_id: torch.device | None) -> None:
    if dist.is_initialized():
        return
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend, device_id=device_id)
        return
    # Workers that torchrun restarts (--max-restarts) meet in the agent's store again,
    # and with the static rendezvous it still holds the keys of the previous attempt:
    # the new ranks read the dead ranks' addresses and fail to connect (seen with gloo
    # in torch 2.13). A prefix per attempt gives every attempt keys of its own.
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"mtl_dist/attempt_{restart}", store),
        rank=rank,
        world_size=world_size,
        device_id=device_id,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a world of one)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collect one picklable object per rank on rank 0; other ranks get None."""
    if not active():
        return [obj]
    out: list[Any] | None = (
        [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    )
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_main_first(world: World) -> Iterator[None]:
    """Let local rank 0 build shared on-disk caches before the other ranks read them."""
    if world.local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if world.local_rank == 0:
            barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Data-parallel training across processes: ``torchrun --nproc_per_node=N -m robustfeat train ...``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`setup` reads them and
joins the process group (NCCL for CUDA, gloo on the CPU). Without them (or with WORLD_SIZE=1) every
function here is a cheap no-op, so the single-process path is unchanged.

Design (why N processes compute what one process computes on the same global batch):

* **Data.** Every rank builds the same global batch ``loader.batch(step)`` (the data lives on the device
  and batches are a function of (seed, step), so this costs one gather) and keeps its contiguous
  slice of ``global_batch / N`` rows (:meth:`Dist.shard`). The global batch must divide by N.
* **Attack.** The random starts are drawn for the whole global batch from the step's generator and
  sliced the same way, so every row starts where it would in one process.
  The attack itself runs on the plain (unwrapped) model: it needs input gradients only.
* **Gradients.** Each rank's loss is the mean over its shard; after ``backward`` the gradients are
  averaged over ranks (one all-reduce of a single flat buffer, :meth:`Dist.average_gradients`). With
  equal shards the average of the shard means is the global mean, i.e. the gradient of the
  single-process loss. We reduce explicitly instead of wrapping the model in
  ``DistributedDataParallel`` because the method loss calls ``model.forward_features`` and
  ``model.forward_head`` (and the attack calls the model many times with input gradients only);
  DDP's gradient hooks only see calls of ``DDP.forward``, so submethod calls would silently skip the
  synchronisation. One flat all-reduce after backward gives the same update and keeps the model code
  untouched; the loss rides in the same buffer, so the non-finite check is the same on every rank.
* **BatchNorm.** Without ``run.sync_bn`` each rank normalizes with its shard's batch statistics (as
  DDP does), so BN models equal a single-process run only up to that; the BN-free MNIST CNN equals it
  up to float reduction order. ``run.sync_bn=true`` converts BN to ``SyncBatchNorm`` (CUDA only).
* **Side effects.** Evaluation, metrics, progress bars, run.json and checkpoints happen on rank 0;
  the other ranks wait at a barrier. A resumed run loads the same ``last`` checkpoint on every rank.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ConfigError


class DistributedError(ConfigError):
    """A multi-process launch that cannot work (message is one line for the user)."""


class Discard:
    """Stands in for the metrics log (and similar writers) on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in every single-process run)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        _dist().barrier()


@dataclass
class Dist:
    """The process's place in a data-parallel run (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """Whether :func:`setup` created the process group (and :meth:`close` destroys it)."""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            _dist().barrier()

    def check_batch(self, global_batch: int) -> int:
        """The per-rank batch; the global batch must split into equal shards."""
        if global_batch % self.world:
            raise DistributedError(
                f"optim.batch_size={global_batch} does not divide by the {self.world} processes; "
                f"use a multiple of {self.world} (each rank takes an equal contiguous slice)"
            )
        return global_batch // self.world

    def shard(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous slice of a global-batch tensor (identity in one process)."""
        if not self.active:
            return t
        n = t.shape[dim] // self.world
        return t.narrow(dim, self.rank * n, n)

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Make every rank's parameters and buffers rank 0's (as DDP does at construction)."""
        if not self.active:
            return
        dist = _dist()
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)

    def average_gradients(self, params: Iterable[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the parameters' gradients over ranks in place; return the rank-averaged loss.

        One all-reduce of one flat buffer holding every gradient and the loss. A parameter without a
        gradient takes part with zeros (so every rank reduces the same layout) and gets the averaged
        gradient, which is what DDP gives an unused parameter on one rank and a used one on another.
        """
        if not self.active:
            return loss.detach()
        params = [p for p in params if p.requires_grad]
        chunks = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flat = torch.cat([*chunks, loss.detach().reshape(1).to(chunks[0].dtype if chunks else loss.dtype)])
        _dist().all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p in params:
            n = p.numel()
            g = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += n
        return flat[-1]

    def average(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank-averaged 0-d metric tensors (one all-reduce; identity in one process)."""
        if not self.active or not values:
            return values
        keys = list(values)  # the same insertion order on every rank
        flat = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(self.device)
        _dist().all_reduce(flat)
        flat.div_(self.world)
        return {k: flat[i] for i, k in enumerate(keys)}

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one all-reduce; ``flag`` itself in one process)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        _dist().all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (identity in one process)."""
        if not self.active:
            return obj
        box = [obj]
        _dist().broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and is_initialized():
            _dist().destroy_process_group()
            self.owns_group = False


def setup(device: torch.device, timeout_s: float = 1800.0) -> Dist:
    """Join the process group that torchrun's environment describes; the device this rank trains on.

    No environment (or WORLD_SIZE=1): a single-process :class:`Dist` on ``device``. CUDA: backend NCCL
    and device ``cuda:LOCAL_RANK``; otherwise gloo on ``device``. An already initialized group (set up
    by the caller) is used as it is.
    """
    world = env_world_size()
    if world <= 1 and not is_initialized():
        return Dist(device=device)
    if not torch.distributed.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise DistributedError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    dist = _dist()
    if not is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if key not in os.environ:
                raise DistributedError(f"WORLD_SIZE={world} but {key} is not set; launch with torchrun")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                owns_group=owns)


def convert_sync_batchnorm(model: nn.Module, ctx: Dist) -> nn.Module:
    """BatchNorm -> SyncBatchNorm over the whole group (``run.sync_bn``); CUDA only."""
    if not ctx.active:
        return model
    if ctx.device.type != "cuda":
        raise DistributedError(
            "run.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm has no CPU implementation; "
            "drop run.sync_bn (each rank then normalizes with its shard's statistics)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)

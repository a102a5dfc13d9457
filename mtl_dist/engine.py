"""Training engines: plain torch (one process or DDP) and DeepSpeed, behind one interface.

The trainer only calls ``forward``, ``backward``, ``step`` and ``no_sync``; how gradients
are reduced, clipped, scaled and stepped is the engine's business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mtl_dist.config import Config
from mtl_dist.distributed import World
from mtl_dist.errors import ConfigError
from mtl_dist.model import MultiTaskModel

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def param_groups(model: MultiTaskModel, cfg: Config) -> tuple[list[dict[str, Any]],
                                                              list[str]]:
    """AdamW groups (encoder / heads, each with its own peak LR, x decay / no decay) and
    the name of each group (``encoder`` or ``heads``), in the same order."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = not name.startswith("encoder.")
        decay = not any(name.endswith(n) for n in NO_DECAY)
        groups.setdefault((is_head, decay), []).append(param)
    ordered = sorted(groups.items())
    return ([{"params": params, "lr": cfg.head_lr if is_head else cfg.lr,
              "weight_decay": cfg.weight_decay if decay else 0.0}
             for (is_head, decay), params in ordered],
            ["heads" if is_head else "encoder" for (is_head, _), _ in ordered])


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup to the peak, then linear decay to zero at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class Engine:
    """What the trainer needs from an engine."""

    module: MultiTaskModel
    """The unwrapped model (for evaluation, export and parameter counts)."""
    loss_scale_for_reduction: float
    """Factor on each micro-step's loss so the engine's gradient averaging yields the
    gradient of the global-batch loss (see the trainer's loss normalisation)."""
    zero_stage: int = -1
    """ZeRO stage, or -1 without DeepSpeed."""
    group_names: list[str]
    """``encoder`` or ``heads`` for each optimizer parameter group, in order."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor | None:
        """Clip, update, advance the LR schedule, clear gradients; returns the grad norm."""
        raise NotImplementedError

    def lrs(self) -> list[float]:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None elsewhere). Every rank must call it."""
        raise NotImplementedError

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        self.module.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.module.train()


class TorchEngine(Engine):
    """A single process, or DDP across processes; autocast for bf16/fp16."""

    def __init__(self, model: MultiTaskModel, cfg: Config, world: World,
                 total_steps: int, warmup_steps: int) -> None:
        if cfg.precision == "fp16" and world.device.type != "cuda":
            raise ConfigError("precision", "fp16", "use --precision bf16 (or fp32) on "
                              "CPU", "fp16 autocast needs a GPU")
        self.module = model.to(world.device)
        self.world = world
        self.cfg = cfg
        self.model: nn.Module = model
        if world.distributed:
            # Every head runs on every batch, so no find_unused_parameters is needed.
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
        fused = world.device.type == "cuda"
        groups, self.group_names = param_groups(model, cfg)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr,
                                           betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                           fused=fused, foreach=None if fused else True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup_steps))
        self.scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.precision)
        # DDP averages gradients over ranks; the trainer's losses are already shares of
        # the global sum, so undo the average.
        self.loss_scale_for_reduction = float(world.world_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.world.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        # Reducing gradients on every micro-step would waste bandwidth: only the last
        # micro-step of a step all-reduces (DDP sums the accumulated gradients then).
        if skip and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def step(self) -> torch.Tensor | None:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        # Returns a tensor: no host sync here; the trainer reads it at logging steps only.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lrs(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.world.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3 (optionally with CPU offload) from a resolved JSON config."""

    def __init__(self, model: MultiTaskModel, cfg: Config, world: World,
                 ds_config: dict[str, Any], total_steps: int, warmup_steps: int) -> None:
        import deepspeed

        if cfg.precision == "fp16" and world.device.type != "cuda":
            raise ConfigError("precision", "fp16", "use --precision bf16 (or fp32) on "
                              "CPU", "fp16 needs a GPU")
        self.world = world
        self.cfg = cfg
        groups, self.group_names = param_groups(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(total_steps, warmup_steps)))
        self.module = self.engine.module
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.dtype = (torch.bfloat16 if cfg.precision == "bf16" else
                      torch.float16 if cfg.precision == "fp16" else None)
        # DeepSpeed divides each micro-step's loss by the accumulation count and averages
        # gradients over ranks; the trainer's losses are already shares of the global
        # sum, so undo both.
        self.loss_scale_for_reduction = float(
            world.world_size * ds_config["gradient_accumulation_steps"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        # DeepSpeed counts micro-steps through its step(): call it on every micro-step
        # but the last (where it is a no-op), and let the trainer's step() take the last.
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> torch.Tensor | None:
        assert self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    def lrs(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:
            import deepspeed

            # Every rank must enter the gather: the partitions live on all of them.
            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = ({k: v.detach().cpu().clone()
                          for k, v in self.module.state_dict().items()}
                         if self.world.rank == 0 else None)
            return state
        if self.world.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


def build_engine(model: MultiTaskModel, cfg: Config, world: World, micro_batch_size: int,
                 accumulation: int, total_steps: int, warmup_steps: int) -> Engine:
    if cfg.deepspeed is None:
        return TorchEngine(model, cfg, world, total_steps, warmup_steps)
    from mtl_dist.ds_config import resolve_ds_config

    ds_config = resolve_ds_config(cfg.deepspeed, cfg, micro_batch_size, accumulation,
                                  on_cpu=world.device.type == "cpu")
    return DeepSpeedEngine(model, cfg, world, ds_config, total_steps, warmup_steps)

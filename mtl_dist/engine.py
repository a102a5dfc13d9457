"""Training engines: plain torch (one process or DDP) and DeepSpeed, behind one interface.

The trainer only calls ``forward``, ``backward``, ``step`` and ``no_sync``; how gradients
are reduced, clipped, scaled and stepped is the engine's business.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_dist.config import Config
from mtl_dist.distributed import World
from mtl_dist.errors import ConfigError
from mtl_dist.host_memory import keep_freed_memory
from mtl_dist.model import MultiTaskModel

TORCH_STATE = "torch_state.pt"
DEEPSPEED_TAG = "deepspeed"
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def param_groups(
    model: MultiTaskModel, cfg: Config
) -> tuple[list[dict[str, Any]], list[str]]:
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
    return (
        [
            {
                "params": params,
                "lr": cfg.head_lr if is_head else cfg.lr,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            for (is_head, decay), params in ordered
        ],
        ["heads" if is_head else "encoder" for (is_head, _), _ in ordered],
    )


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, a 0-dim fp32 tensor (no host sync).

    On the CPU, each fp32 gradient's sum of squares is one BLAS dot product: torch's
    ``vector_norm`` (what ``clip_grad_norm_`` runs there, tensor by tensor) is slower
    on large tensors and pays tens of microseconds on each small one; for MiniLM's
    106 gradients, 3.4 ms against 6-7 ms a step on 2 cores. On a GPU, one multi-tensor
    kernel (``_foreach_norm``).
    """
    if not grads:
        return torch.zeros(())
    if grads[0].device.type == "cpu":
        squares = [
            torch.dot(g.reshape(-1), g.reshape(-1))
            if g.dtype == torch.float32
            else torch.linalg.vector_norm(g, dtype=torch.float32).square()
            for g in grads
        ]
        return torch.stack(squares).sum().sqrt()
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup to the peak, then linear decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def check_precision(cfg: Config, device: torch.device) -> None:
    """Refuse a precision the device cannot run (fp16 autocast and loss scaling are
    GPU-only here)."""
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "precision",
            "fp16",
            "use --precision bf16 (or fp32) on CPU",
            "fp16 autocast needs a GPU",
        )


class Engine:
    """What the trainer needs from an engine."""

    module: MultiTaskModel
    """The unwrapped model (for evaluation, export and parameter counts)."""
    loss_scale_for_reduction: float
    """Factor on each micro-step's loss so the engine's gradient averaging yields the
    gradient of the global-batch loss (see the trainer's loss normalisation)."""
    zero_stage: int = -1
    """ZeRO stage, or -1 without DeepSpeed."""
    compiled: bool = False
    """Whether the encoder runs under ``torch.compile`` in training."""
    keeps_freed_memory: bool = False
    """Whether the C allocator keeps freed memory for the next step (CPU, glibc; see
    :func:`mtl_dist.host_memory.keep_freed_memory`)."""
    compile_reason: str = "off"
    """Why it does or does not, in words (see :func:`compile_decision`)."""
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

    def skip_step(self) -> None:
        """Instead of ``step()``, on every rank at the same step, after a last backward
        whose loss was NaN: clear the gradients and leave the weights, the optimizer
        state and the LR schedule as they were."""
        raise NotImplementedError

    def lrs(self) -> list[float]:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None elsewhere). Every rank must call it."""
        raise NotImplementedError

    def save_state(self, directory: Path) -> None:
        """Write weights, optimizer, LR schedule and loss scaler into ``directory``.
        Every rank calls it (each may write its own shard)."""
        raise NotImplementedError

    def load_state(self, directory: Path) -> None:
        """Restore what :meth:`save_state` wrote. Every rank calls it."""
        raise NotImplementedError

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        self.module.eval()
        try:
            # A compiled encoder would compile again for inference (a second graph
            # without backward, tens of seconds on a small CPU) for a pass that the
            # eager fused attention kernel already runs well.
            with eager_if(self.compiled), torch.inference_mode():
                yield
        finally:
            self.module.train()


def eager_if(condition: bool) -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside this block when ``condition`` holds."""
    if not condition:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def attention_kernels(
    device: torch.device, training: bool
) -> contextlib.AbstractContextManager:
    """The kernels SDPA attention may use: the math kernel when training on CPU, SDPA's
    own choice otherwise.

    The fused CPU kernel's backward is slow on sentence-length inputs: on 2 cores, with
    MiniLM on DailyDialog (17 tokens on average), it took more time than all the matmuls
    of a step, and the math kernel (plain matmuls and softmax, as ``eager`` attention)
    made training about 1.4x faster. Without a backward (evaluation) the fused kernel is
    as fast or slightly faster, so it stays. Models with ``attn_implementation=eager``
    are not affected.
    """
    if device.type != "cpu" or not training:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class TorchEngine(Engine):
    """A single process, or DDP across processes; autocast for bf16/fp16."""

    def __init__(
        self,
        model: MultiTaskModel,
        cfg: Config,
        world: World,
        total_steps: int,
        warmup_steps: int,
    ) -> None:
        check_precision(cfg, world.device)
        self.module = model.to(world.device)
        self.world = world
        self.cfg = cfg
        self.model: nn.Module = model
        if world.distributed:
            # Every head runs on every batch, so no find_unused_parameters is needed.
            self.model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[world.local_rank] if world.device.type == "cuda" else None,
            )
        groups, self.group_names = param_groups(model, cfg)
        # The fused kernel updates each tensor in one pass, on CPU (torch >= 2.4) as on
        # GPU. Measured on 2 CPU cores with MiniLM (22.7 M parameters, half of them the
        # embedding table, which AdamW updates in full every step): 14 ms a step
        # against 75 ms with foreach, which on CPU loops over tensors op by op.
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup_steps)
        )
        self.scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.precision
        )
        # DDP averages gradients over ranks; the trainer's losses are already shares of
        # the global sum, so undo the average.
        self.loss_scale_for_reduction = float(world.world_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with (
            torch.autocast(
                self.world.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ),
            attention_kernels(self.world.device, self.module.training),
        ):
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
        grads = [
            p.grad
            for g in self.optimizer.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        # A tensor: no host sync here; the trainer reads it at logging steps only.
        norm = grad_norm(grads)
        if self.cfg.max_grad_norm > 0:
            # clip_grad_norm_'s factor: brings the total norm down to the limit.
            factor = (self.cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if self.scaler.is_enabled():
                # Under fp16 GradScaler sets the optimizer's grad_scale itself (for
                # the loss scale), so the clipping goes onto the gradients.
                torch._foreach_mul_(grads, factor)
            else:
                # Fused AdamW divides each gradient by `grad_scale` as it reads it (the
                # protocol GradScaler uses): the clipped update without a separate
                # pass that rewrites every gradient, 4 ms a step on 2 CPU cores. Were
                # torch to stop reading it, clipping would silently stop:
                # tests/test_engine_step.py compares with clip_grad_norm_ + AdamW.
                self.optimizer.grad_scale = 1.0 / factor
        try:
            self.scaler.step(self.optimizer)
        finally:
            vars(self.optimizer).pop("grad_scale", None)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lrs(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.world.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_state(self, directory: Path) -> None:
        # Every rank holds the same replica after an update: one copy is enough.
        if self.world.rank == 0:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                },
                directory / TORCH_STATE,
            )

    def load_state(self, directory: Path) -> None:
        state = torch.load(
            directory / TORCH_STATE, map_location=self.world.device, weights_only=True
        )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3 (optionally with CPU offload) from a resolved JSON config."""

    def __init__(
        self,
        model: MultiTaskModel,
        cfg: Config,
        world: World,
        ds_config: dict[str, Any],
        total_steps: int,
        warmup_steps: int,
    ) -> None:
        import deepspeed

        check_precision(cfg, world.device)
        self.world = world
        self.cfg = cfg
        # ZeRO calls collectives that this torch deprecates, and the warning comes back
        # on every step of every rank, burying the training log.
        warnings.filterwarnings(
            "ignore",
            category=FutureWarning,
            message=r"`torch\.distributed\.(all_gather_into_tensor|"
            r"reduce_scatter_tensor)` is deprecated",
        )
        groups, self.group_names = param_groups(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(total_steps, warmup_steps)
            ),
        )
        self.module = self.engine.module
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        # DeepSpeed's optimizer wrappers (ZeRO, bf16, fp16) record the global grad norm;
        # with fp32 and no ZeRO it steps the bare torch optimizer and records none.
        self.norm_from_deepspeed = hasattr(self.engine.optimizer, "_global_grad_norm")
        _undo_init_step(self.engine.optimizer, self.engine.basic_optimizer)
        self.dtype = (
            torch.bfloat16
            if cfg.precision == "bf16"
            else torch.float16
            if cfg.precision == "fp16"
            else None
        )
        # DeepSpeed divides each micro-step's loss by the accumulation count and averages
        # gradients over ranks; the trainer's losses are already shares of the global
        # sum, so undo both.
        self.loss_scale_for_reduction = float(
            world.world_size * ds_config["gradient_accumulation_steps"]
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with attention_kernels(self.world.device, self.module.training):
            return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        # DeepSpeed counts micro-steps through its step(): call it on every micro-step
        # but the last (where it is a no-op), and let the trainer's step() take the last.
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> torch.Tensor | None:
        assert self.engine.is_gradient_accumulation_boundary()
        norm = None
        if not self.norm_from_deepspeed:
            # Gradients are already averaged over ranks here (DeepSpeed all-reduces in
            # backward at the boundary), and step() clears them, so measure them now.
            norm = grad_norm(
                [p.grad for p in self.module.parameters() if p.grad is not None]
            )
        self.engine.step()
        if self.norm_from_deepspeed:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        # A tensor stays on the device (no host sync); some wrappers keep a float.
        if isinstance(norm, torch.Tensor):
            return norm.detach().clone()
        return torch.tensor(norm)

    def skip_step(self) -> None:
        # DeepSpeed's step() must still run: it counts the micro-steps that place the
        # accumulation boundary, and ZeRO keeps the reduced gradients in its own buffers.
        assert self.engine.is_gradient_accumulation_boundary()
        if hasattr(self.engine.optimizer, "overflow"):
            # ZeRO and the mixed-precision wrappers: the trainer's NaN factor on every
            # rank's last loss makes their overflow guard drop the update, the gradient
            # buffers and the LR step.
            self.engine.step()
            if self.engine.was_step_applied():
                raise RuntimeError(
                    "DeepSpeed applied an update that every rank had "
                    "agreed to skip: set bf16.check_grad_overflow to true "
                    "in the DeepSpeed config"
                )
            return
        # fp32 without ZeRO steps the bare torch optimizer, which has no such guard:
        # hold back its update and the LR step for this one call.
        with _steps_held_back(self.engine.optimizer, self.engine.lr_scheduler):
            self.engine.step()

    def lrs(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.zero_stage == 3:
            import deepspeed

            # Every rank must enter the gather: the partitions live on all of them.
            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = (
                    {
                        k: v.detach().cpu().clone()
                        for k, v in self.module.state_dict().items()
                    }
                    if self.world.rank == 0
                    else None
                )
            return state
        if self.world.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_state(self, directory: Path) -> None:
        # Collective: every rank writes its own ZeRO partitions of the optimizer state
        # (and of the weights under stage 3).
        self.engine.save_checkpoint(
            str(directory), tag=DEEPSPEED_TAG, save_latest=False
        )

    def load_state(self, directory: Path) -> None:
        # TODO(deepspeed-pickle): DeepSpeed's loader unpickles its own files (no
        # weights-only mode); load only checkpoints your own runs wrote.
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        # Not inference_mode: ZeRO-3 gathers parameters inside forward, and parameters
        # small enough to stay gathered (stage3_param_persistence_threshold) would keep
        # inference-mode storage, which the next backward cannot differentiate.
        self.module.eval()
        try:
            with eager_if(self.compiled), torch.no_grad():
                yield
        finally:
            self.module.train()


def _undo_init_step(wrapper: Any, basic: torch.optim.Optimizer) -> None:
    """Undo the optimizer step that DeepSpeed's bf16/fp16 wrappers without ZeRO take at
    construction to allocate Adam's state.

    That zero-gradient step counts as Adam's first, so every later update used the
    bias correction of one step too many (the first update was ~0.74x too small), and
    AdamW decayed the fp32 master weights once. ZeRO 1-3 no longer take it.
    TODO(deepspeed-init-step): drop once DeepSpeed's bf16 / fp16 optimizers without
    ZeRO stop stepping at construction (seen in DeepSpeed 0.19.8).
    """
    if not any(state.get("step") for state in basic.state.values()):
        return
    # Adam allocates its state lazily again on the first real step.
    basic.state.clear()
    # The fp32 masters were copied from the 16-bit weights, which that step left alone.
    if hasattr(wrapper, "fp32_groups_flat"):  # the fused wrapper
        pairs = zip(wrapper.fp32_groups_flat, wrapper.fp16_groups_flat)
    else:
        pairs = zip(
            (p for g in getattr(wrapper, "fp32_groups", []) for p in g),
            (p for g in getattr(wrapper, "fp16_groups", []) for p in g),
        )
    with torch.no_grad():
        for master, low in pairs:
            master.copy_(low)


@contextlib.contextmanager
def _steps_held_back(*objects: Any) -> Iterator[None]:
    """Make ``step()`` of each object a no-op inside the block."""
    saved = [
        vars(obj).get("step") for obj in objects
    ]  # an instance-level wrapper, if any
    for obj in objects:
        obj.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for obj, step in zip(objects, saved):
            if step is None:
                del obj.step
            else:
                obj.step = step


def compile_decision(
    cfg: Config, device: torch.device, total_steps: int
) -> tuple[bool, str]:
    """Whether to compile the encoder, and why, in words for the start-up log.

    ``auto`` compiles long runs only: compiling costs a minute of start-up on a small
    CPU and saves a share of every step, so short runs (the tests, the default UCI run)
    would lose by it. DeepSpeed is left out of ``auto``: its ZeRO stages hook into the
    modules' forward, which compiling in place changes, and that pairing is untested
    here.
    """
    if cfg.compile == "false":
        return False, "off"
    check_compile(cfg, device)
    if cfg.compile == "true":
        return True, "on (compile true)"
    missing = missing_compiler(device)
    # TODO(compile-deepspeed): `auto` stays eager under DeepSpeed because compiling a
    # module that ZeRO hooks into is untried here; measure it (DeepSpeed has its own
    # engine.compile) before letting `auto` turn it on.
    if cfg.deepspeed is not None:
        return False, "off (auto: not with DeepSpeed)"
    if missing:
        return False, f"off (auto: no {missing} on this machine)"
    if total_steps < cfg.compile_min_steps:
        return False, (
            f"off (auto: {total_steps} planned steps < compile_min_steps "
            f"{cfg.compile_min_steps})"
        )
    return True, (
        f"on (auto: {total_steps} planned steps >= compile_min_steps "
        f"{cfg.compile_min_steps}; the first step compiles)"
    )


def check_compile(cfg: Config, device: torch.device) -> None:
    """Refuse ``compile true`` on a machine that cannot compile (before any writing:
    otherwise the first training step would fail after the data was loaded)."""
    missing = missing_compiler(device) if cfg.compile == "true" else None
    if missing:
        raise ConfigError(
            "compile",
            "true",
            f"install {missing}, or set --compile auto or false",
            f"torch.compile on {device.type} needs {missing}",
        )


def missing_compiler(device: torch.device) -> str | None:
    """What inductor lacks on this machine to compile for ``device``, or None."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton"
    # Inductor's CPU kernels are C++, built with $CXX (g++ unless set).
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"a C++ compiler ({cxx})"


def inductor_options(device: torch.device) -> dict[str, Any]:
    """Inductor settings for compiling the encoder on ``device``.

    On the CPU, dropout's random numbers come from ATen (``fallback_random``):
    inductor's own generated C++ draws them one element at a time, which took 40 ms of
    a 224 ms MiniLM step on 2 cores (all 19 dropout masks, in the step's first
    kernel), against about 22 ms in ATen's ``bernoulli_``; the whole step took 191 ms.
    The masks are then also the ones the eager encoder draws from the same seed. On a
    GPU inductor's generated random numbers are fast and stay.
    """
    return {"fallback_random": True} if device.type == "cpu" else {}


def build_engine(
    model: MultiTaskModel,
    cfg: Config,
    world: World,
    micro_batch_size: int,
    accumulation: int,
    total_steps: int,
    warmup_steps: int,
) -> Engine:
    # Data is loaded: from here on, large blocks freed in one step serve the next.
    kept = cfg.reuse_freed_memory and world.device.type == "cpu" and keep_freed_memory()
    compiled, reason = compile_decision(cfg, world.device, total_steps)
    if compiled:
        # In place (nn.Module.compile), so that parameter names, and with them
        # checkpoints and the export, stay those of the plain model. Dynamic shapes:
        # every batch has its own length.
        model.encoder.compile(dynamic=True, options=inductor_options(world.device))
    if cfg.deepspeed is None:
        engine: Engine = TorchEngine(model, cfg, world, total_steps, warmup_steps)
    else:
        from mtl_dist.ds_config import resolve_ds_config

        ds_config = resolve_ds_config(
            cfg.deepspeed,
            cfg,
            micro_batch_size,
            accumulation,
            on_cpu=world.device.type == "cpu",
        )
        engine = DeepSpeedEngine(
            model, cfg, world, ds_config, total_steps, warmup_steps
        )
    engine.compiled, engine.compile_reason = compiled, reason
    engine.keeps_freed_memory = kept
    return engine

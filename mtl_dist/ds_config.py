"""DeepSpeed JSON: fill every ``"auto"`` from the training config, refuse contradictions.

The training config owns batch sizes, accumulation, clipping, precision and the optimizer's
hyper-parameters. A DeepSpeed file may leave those as ``"auto"`` or repeat the same value;
any other value is a contradiction, and all of them are reported in one error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mtl_dist.config import Config
from mtl_dist.errors import ConfigError, ConfigErrors

AUTO = "auto"
STAGES = (0, 1, 2, 3)


def read_ds_json(path: str) -> dict[str, Any]:
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "deepspeed",
            path,
            f"fix the JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})",
            "malformed JSON",
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "deepspeed",
            path,
            "save the file as UTF-8",
            f"not UTF-8 (byte offset {exc.start})",
        ) from None
    if not isinstance(values, dict):
        raise ConfigError(
            "deepspeed", path, "write the DeepSpeed config as a JSON object"
        )
    return values


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    zero = ds.get("zero_optimization")
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(offload, dict) and offload.get("device") not in (None, "none")


def resolve_ds_config(
    path: str, cfg: Config, micro_batch_size: int, accumulation: int, on_cpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config to hand to ``deepspeed.initialize``, with no ``"auto"`` left."""
    ds = copy.deepcopy(read_ds_json(path))
    errors: list[ConfigError] = []

    def section(parent: dict[str, Any], key: str, dotted: str) -> dict[str, Any]:
        value = parent.setdefault(key, {})
        if isinstance(value, dict):
            return value
        errors.append(
            ConfigError(
                dotted, value, "write it as a JSON object {...}", "not a section"
            )
        )
        return {}  # keep checking the rest; the error above is raised at the end

    def fill(
        where: dict[str, Any], key: str, value: Any, dotted: str, owner: str
    ) -> None:
        current = where.get(key, AUTO)
        if current == AUTO:
            where[key] = value
        elif current != value:
            errors.append(
                ConfigError(
                    dotted,
                    current,
                    f'set it to "auto" (or {value!r}) and change {owner} in '
                    "the training config instead",
                    f"contradicts {owner}={value!r}",
                )
            )

    fill(
        ds,
        "train_micro_batch_size_per_gpu",
        micro_batch_size,
        "train_micro_batch_size_per_gpu",
        "micro_batch_size",
    )
    fill(
        ds,
        "gradient_accumulation_steps",
        accumulation,
        "gradient_accumulation_steps",
        "global_batch_size / (micro_batch_size x world_size)",
    )
    fill(
        ds,
        "train_batch_size",
        cfg.global_batch_size,
        "train_batch_size",
        "global_batch_size",
    )
    fill(
        ds, "gradient_clipping", cfg.max_grad_norm, "gradient_clipping", "max_grad_norm"
    )
    for name in ("bf16", "fp16"):
        fill(
            section(ds, name, name),
            "enabled",
            cfg.precision == name,
            f"{name}.enabled",
            "precision",
        )

    zero = section(ds, "zero_optimization", "zero_optimization")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in STAGES:
        errors.append(
            ConfigError(
                "zero_optimization.stage",
                stage,
                f"use one of {STAGES}",
                "no such ZeRO stage",
            )
        )
    if "scheduler" in ds:
        errors.append(
            ConfigError(
                "scheduler",
                ds["scheduler"],
                "remove the scheduler section: warmup_ratio and the "
                "linear decay come from the training config",
                "the training config owns the LR schedule",
            )
        )
    optimizer = section(ds, "optimizer", "optimizer")
    optimizer.setdefault("type", "AdamW")
    if str(optimizer["type"]).lower() != "adamw":
        errors.append(
            ConfigError(
                "optimizer.type",
                optimizer["type"],
                'use "AdamW" (the toolkit\'s optimizer)',
            )
        )
    params = section(optimizer, "params", "optimizer.params")
    fill(params, "lr", cfg.lr, "optimizer.params.lr", "lr")
    fill(params, "betas", list(cfg.adam_betas), "optimizer.params.betas", "adam_betas")
    fill(params, "eps", cfg.adam_eps, "optimizer.params.eps", "adam_eps")
    fill(
        params,
        "weight_decay",
        cfg.weight_decay,
        "optimizer.params.weight_decay",
        "weight_decay",
    )
    # On the CPU, torch's AdamW spares compiling DeepSpeed's fused GPU kernel. An
    # offloaded optimizer steps on the CPU anyway, with DeepSpeed's CPU Adam, the
    # vectorised kernel made for it (compiled once into ~/.cache/torch_extensions).
    if params.get("torch_adam", AUTO) == AUTO:
        params["torch_adam"] = on_cpu and not offloads_optimizer(ds)

    # "auto" anywhere else (bucket sizes, say) has nothing in the training config to
    # fill it from, and DeepSpeed would fail on it with a message that names no key.
    reported = {e.key for e in errors}
    for dotted in _autos(ds):
        if dotted not in reported:
            errors.append(
                ConfigError(
                    dotted,
                    AUTO,
                    "write a value: only batch sizes, "
                    "gradient_clipping, bf16/fp16.enabled and "
                    'optimizer.params can be "auto"',
                    "nothing in the training config to fill it from",
                )
            )
    if errors:
        raise ConfigErrors(
            errors, f"DeepSpeed config {path} does not fit the training config"
        )
    ds.setdefault("steps_per_print", 10**9)  # the toolkit logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _autos(values: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every ``"auto"`` left in a JSON tree."""
    if isinstance(values, dict):
        return [k for key, v in values.items() for k in _autos(v, f"{prefix}{key}.")]
    if isinstance(values, list):
        return [k for i, v in enumerate(values) for k in _autos(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if values == AUTO else []

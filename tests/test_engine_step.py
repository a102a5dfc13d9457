"""TorchEngine.step: the gradient norm and the clipping folded into fused AdamW give the
update of torch's own ``clip_grad_norm_`` followed by AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from mtl_dist.config import config_from_dict
from mtl_dist.distributed import World
from mtl_dist.engine import TorchEngine, grad_norm, param_groups
from mtl_dist.model import build_model

LABELS = {"topic": ["a", "b", "c"], "mood": ["neg", "pos"]}


def batches(steps: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for length in range(5, 5 + steps):
        ids = torch.randint(1000, 2000, (4, length), generator=generator)
        targets = torch.randint(0, 2, (4,), generator=generator)
        out.append(
            ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, targets)
        )
    return out


def loss_of(logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return sum(
        torch.nn.functional.cross_entropy(v.float(), targets) for v in logits.values()
    )


@pytest.mark.parametrize(
    "max_grad_norm", [0.05, 1e6, 0.0], ids=["clips", "below-limit", "off"]
)
def test_step_matches_clip_grad_norm_then_adamw(tiny_model_dir, max_grad_norm):
    cfg = config_from_dict(
        {
            "data": {"dataset": "builtin:uci_sentences"},
            "model": {
                "name_or_path": str(tiny_model_dir),
                "random_init": True,
                "dropout": 0.0,
                "head_dropout": 0.0,
            },
            "max_grad_norm": max_grad_norm,
            "precision": "fp32",
            "compile": "false",
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, LABELS)
    reference = copy.deepcopy(model)
    world = World(0, 0, 1, torch.device("cpu"))
    engine = TorchEngine(model, cfg, world, total_steps=100, warmup_steps=0)
    groups, _ = param_groups(reference, cfg)
    optimizer = torch.optim.AdamW(
        groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, foreach=False
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]

    clipped = 0
    for batch, targets in batches(3):
        engine.backward(loss_of(engine.forward(batch), targets))
        norm = engine.step()
        loss_of(reference(**batch), targets).backward()
        expected = torch.nn.utils.clip_grad_norm_(
            params, max_grad_norm if max_grad_norm > 0 else float("inf")
        )
        clipped += bool(max_grad_norm and expected > max_grad_norm)
        torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
        optimizer.step()
        optimizer.zero_grad()
        # The schedule is flat (no warmup, 100 steps): the same learning rate, scaled
        # the same way, for the reference.
        for group, lr in zip(optimizer.param_groups, engine.lrs()):
            group["lr"] = lr
    # The first case must really clip, or it would test nothing.
    assert clipped == (3 if max_grad_norm == 0.05 else 0)
    for (name, got), want in zip(
        engine.module.named_parameters(), reference.parameters()
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    # The optimizer kept no clipping factor for a later step.
    assert not hasattr(engine.optimizer, "grad_scale")


def test_grad_norm_of_mixed_dtypes_and_none():
    grads = [torch.randn(300), torch.randn(7, 5).bfloat16(), torch.randn(0)]
    expected = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads]))
    torch.testing.assert_close(grad_norm(grads), expected, rtol=1e-6, atol=0)
    assert grad_norm([]).item() == 0.0

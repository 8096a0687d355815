"""Textual inversion: train new token vectors for a name, keep everything else frozen.

The vectors are spliced into the text encoder's token embeddings wherever the name appears in a
prompt (``TextEncoder.encode``); only they are trainable and only they live in the optimizer.
Files: ``<embeddings_dir>/<name>.safetensors`` (+ ``.optim`` resume sidecar), numbered copies and the
loss log in ``<log_dir>/<name>/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from lib_trainer.config import (
    CONFIG_VERSION,
    DataConfig,
    TrainConfig,
    build_versioned,
    check_settings,
    setting,
    to_json,
)
from lib_trainer.data.dataset import check_image_folders, load_training_set
from lib_trainer.data.templates import load_template
from lib_trainer.errors import ConfigError, FormatError
from lib_trainer.formats.embedding import (
    EMBEDDING_EXTENSIONS,
    EmbeddingFile,
    embedding_metadata,
    read_embedding,
    save_embedding,
)
from lib_trainer.formats.files import check_name, path_in
from lib_trainer.loop.checkpoint import ResumeState, find_resume_state, save_sidecar, tensors_checksum
from lib_trainer.loop.hooks import TrainingHooks
from lib_trainer.loop.optimizers import check_optimizer
from lib_trainer.loop.precision import resolve_precision
from lib_trainer.loop.train import Objective, TrainResult
from lib_trainer.methods.common import check_log_folder, check_total_steps, resumed_step, train_on_dataset
from lib_trainer.models.parts import ModelParts
from lib_trainer.models.text import check_prompt_word

MAX_VECTORS = 75


@dataclass(frozen=True)
class EmbeddingConfig:
    """A new embedding: its name (the prompt word), initialisation text and size."""

    SECTION: ClassVar[str] = "embedding"

    name: str = ""
    init_text: str = setting("*", free_text=True)
    num_vectors: int = setting(
        1, low=1, high=MAX_VECTORS, hint="one prompt chunk holds 75 tokens; 1-8 vectors are typical"
    )
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "embedding.name")
        check_settings(self, self.SECTION)


@dataclass(frozen=True)
class TextualInversionConfig:
    """Everything a textual-inversion run needs; embedded in every saved file's metadata."""

    embedding: EmbeddingConfig
    data: DataConfig
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(learning_rate="0.005"))
    resume_from: str = setting("", path="file")  # start from this embedding file instead of <name> in the folder
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> TextualInversionConfig:
        """Build from a plain dict (UI, API, saved metadata), upgrading old versions."""
        return build_versioned(cls, data)


@dataclass(frozen=True)
class OutputPaths:
    """Folders the host configured: where embeddings live, and where run logs/numbered copies go."""

    embeddings_dir: Path
    log_dir: Path


def initial_vectors(parts: ModelParts, init_text: str, num_vectors: int) -> torch.Tensor:
    """Vectors from the token embeddings of ``init_text`` (first n tokens, repeated to n); zeros if empty.

    Same rule as the WebUI's create-embedding: vector i is token ``i * m // n`` of the m tokens.
    """
    encoder = parts.text_encoder
    ids = encoder.tokenize(init_text)[:num_vectors] if init_text.strip() else []
    vectors = torch.zeros(num_vectors, encoder.dim)
    if ids:
        rows = encoder.token_vectors(ids)
        for i in range(num_vectors):
            vectors[i] = rows[i * len(ids) // num_vectors]
    return vectors


def embedding_path(embeddings_dir: Path, name: str) -> Path:
    """The file an embedding called ``name`` is written to."""
    return path_in(embeddings_dir, f"{name}.safetensors")


def create_embedding(config: EmbeddingConfig, parts: ModelParts, embeddings_dir: Path) -> Path:
    """Write a new embedding (step 0); refuse an existing one unless ``overwrite``."""
    path = embedding_path(embeddings_dir, config.name)
    check_prompt_word(parts.text_encoder, config.name, "embedding.name")
    _check_name_free(embeddings_dir, config.name, allow=path if config.overwrite else None)
    vectors = initial_vectors(parts, config.init_text, config.num_vectors)
    meta = embedding_metadata(
        config.name,
        0,
        parts.family,
        parts.prediction,
        parts.model_name,
        parts.model_hash,
        json.dumps(dataclasses.asdict(config), sort_keys=True),
    )
    return save_embedding(path, parts.text_encoder.split_vectors(vectors), meta)


def _check_name_free(embeddings_dir: Path, name: str, allow: Path | None) -> None:
    """Refuse when a file would give the prompt word ``name`` twice (the WebUI walks the whole folder)."""
    taken = [p for p in _files_named(embeddings_dir, name) if allow is None or p.resolve() != allow.resolve()]
    if taken:
        hint = "choose another name" + ("" if allow else ", or turn on overwrite")
        raise ConfigError(f"embedding.name {name!r} is already used by {taken[0]}; {hint}", field="embedding.name")


def _files_named(folder: Path, name: str) -> list[Path]:
    if not folder.is_dir():
        return []
    wanted = name.lower()
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.stem.lower() == wanted and p.suffix.lower() in (*EMBEDDING_EXTENSIONS, ".png", ".webp")
    )


class EmbeddingTrainable:
    """The trainable vectors of one embedding, and how they are saved."""

    def __init__(self, config: TextualInversionConfig, parts: ModelParts, paths: OutputPaths, start: EmbeddingFile):
        self.config, self.parts, self.paths = config, parts, paths
        self.name = config.embedding.name
        self.vectors = start.vectors.to(parts.text_encoder.device()).requires_grad_(True)
        self.start_step = start.step
        self.resume: ResumeState | None = None
        self.main_path = embedding_path(paths.embeddings_dir, self.name)
        self.run_dir = paths.log_dir / self.name

    def parameters(self) -> list[torch.Tensor]:
        """Only the new vectors."""
        return [self.vectors]

    def attach(self, parts: ModelParts) -> contextlib.AbstractContextManager:
        """Nothing in the host model changes: the vectors enter through conditioning."""
        return contextlib.nullcontext()

    def condition(self, parts: ModelParts, prompts: list[str]) -> torch.Tensor:
        """Conditioning with the vectors spliced in wherever the name appears."""
        return parts.condition(prompts, {self.name: self.vectors})

    def metadata(self, step: int) -> dict[str, str]:
        """Metadata strings for a file saved at ``step``."""
        p = self.parts
        return embedding_metadata(
            self.name, step, p.family, p.prediction, p.model_name, p.model_hash, to_json(self.config)
        )

    def save(self, step: int, resume: ResumeState) -> list[Path]:
        """A numbered copy in the run folder, the resume sidecar, then the main file."""
        meta, tensors = self.metadata(step), self.parts.text_encoder.split_vectors(self.vectors)
        numbered = save_embedding(numbered_path(self.paths, self.name, step), tensors, meta)
        save_sidecar(self.main_path, resume, _checksum_of(numbered))  # read back: checked as written
        main = save_embedding(self.main_path, tensors, meta)
        return [numbered, main]

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The current vectors as the embedding file's tensors (what the host registers for previews)."""
        return {k: v.detach().float().cpu() for k, v in self.parts.text_encoder.split_vectors(self.vectors).items()}


def check(config: TextualInversionConfig, parts: ModelParts, paths: OutputPaths) -> None:
    """Everything knowable before training, without loading the images (run when a job is queued and at its start)."""
    check_log_folder(paths.log_dir, paths.embeddings_dir, "embedding")
    resolve_precision(config.train.mixed_precision, parts.device)
    check_optimizer(config.train.optimizer, parts.device, config.train.optimizer_args)
    check_prompt_word(parts.text_encoder, config.embedding.name, "embedding.name")
    load_template(config.data.template)
    check_image_folders(config.data)
    start, _ = _starting_point(config, parts, paths, None)
    check_total_steps(start.step, config, f"embedding {config.embedding.name!r}")


def prepare(
    config: TextualInversionConfig, parts: ModelParts, paths: OutputPaths, hooks: TrainingHooks
) -> tuple[list, list[str], EmbeddingFile, ResumeState | None]:
    """Validate everything and load the data before anything is written; returns what ``run`` needs."""
    check(config, parts, paths)
    samples, template = load_training_set(config.data, hooks.on_warning)
    if not any("[name]" in line for line in template) and not any(
        config.embedding.name.lower() in (s.caption or "").lower() for s in samples
    ):
        raise ConfigError(
            f"template {config.data.template!r} has no [name] and no caption mentions "
            f"{config.embedding.name!r}: the embedding would never be trained. Use a template with [name]",
            field="data.template",
        )
    start, resume = _starting_point(config, parts, paths, hooks)
    return samples, template, start, resume


def numbered_path(paths: OutputPaths, name: str, step: int) -> Path:
    """The run folder's copy of the embedding at ``step``."""
    return paths.log_dir / name / "embeddings" / f"{name}-{step}.safetensors"


def _checksum_of(path: Path) -> str:
    return tensors_checksum([read_embedding(path).vectors])


def _starting_point(
    config: TextualInversionConfig, parts: ModelParts, paths: OutputPaths, hooks: TrainingHooks | None
) -> tuple[EmbeddingFile, ResumeState | None]:
    emb = config.embedding
    main = embedding_path(paths.embeddings_dir, emb.name)
    _check_name_free(paths.embeddings_dir, emb.name, allow=main)
    source = Path(config.resume_from).expanduser() if config.resume_from else main
    if config.resume_from and not source.is_file():
        raise ConfigError(
            f"resume_from {config.resume_from!r} is not an existing file; give an embedding file path",
            field="resume_from",
        )
    if config.resume_from and source.resolve() != main.resolve() and main.exists() and not emb.overwrite:
        raise ConfigError(
            f"{main} already exists; turn on embedding.overwrite to replace it with the resumed run",
            field="embedding.overwrite",
        )
    if source.is_file() and not (source == main and emb.overwrite):
        field = "resume_from" if config.resume_from else "embedding.name"
        start = read_embedding(source, field)
        if start.vectors.shape[1] != parts.text_encoder.dim:
            raise FormatError(
                f"{source.name} has vectors of width {start.vectors.shape[1]} but this model's text encoder uses "
                f"{parts.text_encoder.dim} (an embedding for another model family?); pick a matching file",
                field=field,
            )
        resume = find_resume_state(
            source,
            tensors_checksum([start.vectors]),
            lambda step: numbered_path(paths, emb.name, step),
            _checksum_of,
        )
        start.step = resumed_step(start.step, resume, hooks)
        return start, resume
    return EmbeddingFile(initial_vectors(parts, emb.init_text, emb.num_vectors), 0, emb.name), None


def train_embedding(
    config: TextualInversionConfig,
    parts: ModelParts,
    paths: OutputPaths,
    hooks: TrainingHooks | None = None,
    objective: Objective | None = None,
) -> TrainResult:
    """Train (or continue) the embedding ``config.embedding.name``; saves every ``save_every`` and at the end."""
    hooks = hooks or TrainingHooks()
    samples, template, start, resume = prepare(config, parts, paths, hooks)
    trainable = EmbeddingTrainable(config, parts, paths, start)
    trainable.resume = resume
    data = (samples, template, config.embedding.name)
    return train_on_dataset(config, parts, trainable, data, paths.log_dir, hooks, objective)

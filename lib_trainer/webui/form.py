"""The tab's form, declared once without gradio: which config field each control edits, and how.

ui.py turns these into components; the drift test checks them against the config dataclasses and the API
schema, so a new config field cannot be forgotten in the tab (adetailer's args/UI sync test).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from lib_trainer.config import PER_CONCEPT
from lib_trainer.data.preprocess import PreprocessConfig
from lib_trainer.data.templates import builtin_templates
from lib_trainer.methods.dreambooth import DreamBoothConfig
from lib_trainer.methods.hypernetwork import HypernetworkConfig
from lib_trainer.methods.lora import LoraConfig
from lib_trainer.methods.textual_inversion import TextualInversionConfig
from lib_trainer.methods.token_finetune import EmbeddingFinetuneConfig


@dataclass(frozen=True)
class FormField:
    """One control: the dotted config path it edits, its label and its kind."""

    path: str
    label: str
    kind: Literal["text", "number", "int", "slider", "checkbox", "dropdown", "radio"]
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    info: str = ""
    default: Any = None  # None: the config dataclass's default


DATA_FIELDS: tuple[FormField, ...] = (
    FormField("data.data_dir", "Dataset folder", "text"),
    FormField(
        "data.template",
        "Prompt template",
        "dropdown",
        choices=tuple(builtin_templates()),
        info="or the path of your own .txt",
    ),
    FormField("data.width", "Width", "slider", 64, 2048, 64),
    FormField("data.height", "Height", "slider", 64, 2048, 64),
    FormField("data.caption_extension", "Caption extension", "text"),
    FormField("data.missing_caption", "Images without caption", "radio", choices=("error", "filename", "empty")),
    FormField("data.shuffle_tags", "Shuffle tags", "checkbox"),
    FormField("data.keep_tags", "Keep first N tags in place", "int", 0, 100, 1),
    FormField("data.tag_dropout", "Tag drop-out", "slider", 0.0, 0.95, 0.05),
    FormField("data.latent_sampling", "Latent sampling", "radio", choices=("once", "deterministic", "random")),
    FormField("data.caption_dropout", "Caption drop-out", "slider", 0.0, 1.0, 0.05),
    FormField("data.trigger_word", "Trigger word (prefixed to captions)", "text"),
    FormField("data.flip", "Also train on mirrored images", "checkbox"),
    FormField("data.buckets", "Aspect-ratio buckets (area = width x height)", "checkbox"),
    FormField("data.bucket_min_side", "Bucket min side", "int", 64, 4096, 64),
    FormField("data.bucket_max_side", "Bucket max side", "int", 64, 4096, 64),
    FormField("data.bucket_step", "Bucket step", "int", 64, 512, 64),
    FormField("data.bucket_no_upscale", "Never upscale small images", "checkbox"),
    FormField("data.alpha_mask", "Use transparency as a loss mask", "checkbox"),
    FormField("data.reg_dir", "Regularisation (class) images folder (optional)", "text"),
    FormField("data.prior_loss_weight", "Prior-loss weight of regularisation images", "number", 0.0, 100.0),
    FormField("data.latent_cache", "Latent cache", "radio", choices=("memory", "disk")),
)
TRAIN_FIELDS: tuple[FormField, ...] = (
    FormField("train.steps", "Max steps (total)", "int", 1, 10_000_000, 1),
    FormField("train.batch_size", "Batch size", "int", 1, 1024, 1),
    FormField("train.gradient_accumulation", "Gradient accumulation", "int", 1, 1024, 1),
    FormField("train.learning_rate", "Learning rate", "text", info="e.g. 0.005 or 0.005:100, 1e-3:1000, 1e-5"),
    FormField(
        "train.lr_schedule",
        "LR schedule",
        "dropdown",
        choices=("constant", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    ),
    FormField("train.lr_warmup_steps", "Warmup steps", "int", 0, 1_000_000, 1),
    FormField("train.lr_cycles", "Cosine cycles (cosine_with_restarts)", "int", 1, 1000, 1),
    FormField("train.lr_power", "Power (polynomial)", "number", 0.1, 10.0),
    FormField(
        "train.optimizer",
        "Optimizer",
        "dropdown",
        choices=("adamw", "adamw8bit", "adafactor", "lion", "prodigy", "adamw_schedulefree", "sgd"),
        info="adafactor: least memory; adamw8bit (CUDA), lion, prodigy (learning rate 1.0), adamw_schedulefree "
        "(constant schedule) need their package: Settings -> Trainer",
    ),
    FormField("train.optimizer_args", "Optimizer args", "text", info="key=value ..., e.g. betas=(0.9,0.99) eps=1e-6"),
    FormField("train.weight_decay", "Weight decay", "number", 0.0, 10.0),
    FormField("train.clip_grad", "Gradient clipping", "radio", choices=("off", "norm", "value")),
    FormField("train.clip_grad_value", "Clipping value", "number", 0.0),
    FormField(
        "train.mixed_precision",
        "Mixed precision",
        "dropdown",
        choices=("auto", "no", "fp16", "bf16", "full_bf16"),
        info="full_bf16: UNet weights in bf16 for the run, fp32 masters of what trains (TI, LoRA): least memory",
    ),
    FormField("train.gradient_checkpointing", "Gradient checkpointing (much less VRAM, ~30% slower)", "checkbox"),
    FormField(
        "train.cache_text_encoder_outputs",
        "Cache text-encoder outputs (when the text encoder does not train and captions never change)",
        "checkbox",
    ),
    FormField("train.offload_idle_models", "Idle VAE / cached text encoder wait on the CPU while training", "checkbox"),
    FormField("train.compile", "torch.compile the UNet (slow start; faster steps on recent GPUs)", "checkbox"),
    FormField(
        "train.attention",
        "Training attention",
        "radio",
        choices=("sdpa", "host"),
        info="sdpa: PyTorch's fast kernels whatever the WebUI's optimisation (xformers is kept); host: the WebUI's",
    ),
    FormField("train.seed", "Seed", "int"),
    FormField(
        "train.clip_skip", "Clip skip", "slider", 0, 12, 1, info="0 = the WebUI's Clip skip setting (shown above)"
    ),
    FormField("train.save_every", "Save a copy every N steps (0 = only at the end)", "int", 0, None, 1),
    FormField("train.preview_every", "Preview every N steps (0 = never)", "int", 0, None, 1),
    FormField(
        "train.noise_offset", "Noise offset", "slider", 0.0, 1.0, 0.01, info="0 = off; ~0.05-0.1 helps dark/bright"
    ),
    FormField("train.min_snr_gamma", "Min-SNR gamma", "number", 0.0, 100.0, info="0 = off; 5 is common"),
)
TI_FIELDS: tuple[FormField, ...] = (
    FormField("embedding.name", "Name (the word you type in prompts)", "text"),
    FormField("embedding.init_text", "Initialization text", "text", info="empty = zeros"),
    FormField("embedding.num_vectors", "Vectors per token", "slider", 1, 75, 1),
    FormField("embedding.overwrite", "Overwrite an existing embedding of that name", "checkbox"),
    FormField("resume_from", "Resume from file (optional)", "text", info=".safetensors, WebUI .pt or kohya file"),
    *DATA_FIELDS,
    *TRAIN_FIELDS,
)
LORA_FIELDS: tuple[FormField, ...] = (
    FormField("network.name", "Name (used as <lora:name:1>)", "text"),
    FormField("network.algo", "Algorithm", "radio", choices=("lora", "locon", "loha", "lokr")),
    FormField("network.rank", "Rank (dim)", "slider", 1, 256, 1),
    FormField("network.alpha", "Alpha", "number", 0.0, None),
    FormField("network.conv_rank", "Conv rank (0 = no ResBlock convs; not for plain lora)", "slider", 0, 256, 1),
    FormField("network.conv_alpha", "Conv alpha", "number", 0.0, None),
    FormField("network.dropout", "Dropout", "slider", 0.0, 0.95, 0.05),
    FormField("network.rank_dropout", "Rank dropout", "slider", 0.0, 0.95, 0.05),
    FormField("network.module_dropout", "Module dropout", "slider", 0.0, 0.95, 0.05),
    FormField("network.train_unet", "Train the UNet", "checkbox"),
    FormField("network.train_text_encoder", "Train the text encoder(s) (SDXL: both)", "checkbox"),
    FormField("network.text_encoder_lr", "Text encoder LR (0 = same as UNet)", "number", 0.0, 1.0),
    FormField("network.stop_text_encoder_at", "Stop training the text encoder at step (0 = never)", "int", 0),
    FormField("network.save_precision", "Save precision", "radio", choices=("fp16", "bf16", "fp32")),
    FormField("network.overwrite", "Overwrite an existing LoRA of that name", "checkbox"),
    FormField("resume_from", "Resume from a LoRA file (optional)", "text"),
    FormField("epochs", "Epochs (0 = use max steps)", "int", 0, 100_000, 1),
    FormField("save_every_epochs", "Save every N epochs (0 = use save every N steps)", "int", 0, 100_000, 1),
    *(dataclasses.replace(f, default="none") if f.path == "data.template" else f for f in DATA_FIELDS),
    *TRAIN_FIELDS,
)
HN_FIELDS: tuple[FormField, ...] = (
    FormField("hypernetwork.name", "Name (used as <hypernet:name:1>)", "text"),
    FormField(
        "hypernetwork.sizes",
        "Sizes ('auto' = the model's; 768 SD1 / 1024 SD2 / 2048 SDXL text, 320/640/1280 features)",
        "text",
    ),
    FormField("hypernetwork.layer_structure", "Layer structure", "text", info="e.g. 1, 2, 1 (starts and ends with 1)"),
    FormField(
        "hypernetwork.activation",
        "Activation",
        "dropdown",
        choices=("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "mish", "softsign"),
    ),
    FormField(
        "hypernetwork.weight_init",
        "Weight initialization",
        "dropdown",
        choices=("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"),
    ),
    FormField("hypernetwork.layer_norm", "Layer normalization", "checkbox"),
    FormField("hypernetwork.use_dropout", "Use dropout", "checkbox"),
    FormField("hypernetwork.dropout_structure", "Dropout structure (optional)", "text", info="e.g. 0, 0.3, 0"),
    FormField("hypernetwork.last_layer_dropout", "Dropout before the last layer", "checkbox"),
    FormField("hypernetwork.activate_output", "Activate the output layer", "checkbox"),
    FormField("hypernetwork.overwrite", "Overwrite an existing hypernetwork of that name", "checkbox"),
    FormField("resume_from", "Resume from a hypernetwork .pt (optional)", "text"),
    *(dataclasses.replace(f, default="hypernetwork") if f.path == "data.template" else f for f in DATA_FIELDS),
    *TRAIN_FIELDS,
)
ROWS_FIELDS: tuple[FormField, ...] = (
    FormField("finetune.name", "Name of the rows file (and of the checkpoint copy)", "text"),
    FormField("finetune.tokens", "Words whose token rows train", "text", info="e.g. person, dog"),
    FormField("finetune.whole_matrix", "Train the whole token-embedding matrix instead", "checkbox"),
    FormField("finetune.save_precision", "Save precision", "radio", choices=("fp16", "bf16", "fp32")),
    FormField("finetune.apply_to_checkpoint", "Also write a checkpoint with the rows applied", "checkbox"),
    FormField("finetune.overwrite", "Overwrite files of that name", "checkbox"),
    *DATA_FIELDS,
    *TRAIN_FIELDS,
)
CONCEPT_ROWS = 3  # concept rows the tab shows (the API takes any number)
ROW = "[]."  # marks the fields of one row of a list setting: "concepts[].instance_dir"
DB_FIELDS: tuple[FormField, ...] = (
    FormField("dreambooth.name", "New checkpoint name (written to models/Stable-diffusion)", "text"),
    FormField("dreambooth.train_unet", "Train the UNet", "checkbox"),
    FormField(
        "dreambooth.unet_blocks", "Only these UNet blocks (optional)", "text", info="e.g. output_blocks, middle_block"
    ),
    FormField("dreambooth.train_text_encoder", "Train the text encoder(s)", "checkbox"),
    FormField("dreambooth.text_encoder_lr", "Text encoder LR (0 = same as UNet)", "number", 0.0, 1.0),
    FormField("dreambooth.stop_text_encoder_at", "Stop training the text encoder at step (0 = never)", "int", 0),
    FormField(
        "dreambooth.weights_precision",
        "Trained weights in",
        "radio",
        choices=("fp32", "bf16"),
        info="bf16 halves their memory (SDXL in 24 GB)",
    ),
    FormField("dreambooth.save_precision", "Save precision", "radio", choices=("fp16", "bf16", "fp32")),
    FormField("dreambooth.extract_lora_rank", "Also save a LoRA of the change, rank (0 = no)", "int", 0, 1024, 1),
    FormField("dreambooth.keep_loaded", "Keep the trained model loaded afterwards", "checkbox"),
    FormField("dreambooth.overwrite", "Overwrite a checkpoint of that name", "checkbox"),
    FormField("epochs", "Epochs (0 = use max steps)", "int", 0, 100_000, 1),
    FormField("save_every_epochs", "Save every N epochs (0 = use save every N steps)", "int", 0, 100_000, 1),
    FormField("concepts[].instance_dir", "Instance images folder", "text"),
    FormField("concepts[].instance_prompt", "Instance prompt", "text", info="e.g. photo of zkw person; [filewords]"),
    FormField("concepts[].class_prompt", "Class prompt", "text", info="e.g. photo of a person"),
    FormField("concepts[].class_dir", "Class images folder (empty = no prior preservation)", "text"),
    FormField("concepts[].class_images", "Class images wanted", "int", 0, 100_000, 1),
    FormField("concepts[].prior_loss_weight", "Prior-loss weight", "number", 0.0, 100.0),
    FormField("class_generation.negative_prompt", "Negative prompt", "text"),
    FormField("class_generation.sampler", "Sampler", "dropdown"),
    FormField("class_generation.steps", "Sampling steps", "slider", 1, 150, 1),
    FormField("class_generation.cfg_scale", "CFG scale", "slider", 1.0, 30.0, 0.5),
    FormField("class_generation.seed", "Seed (image k uses seed + k)", "int", 0),
    FormField("class_generation.width", "Width (0 = dataset width)", "slider", 0, 2048, 64),
    FormField("class_generation.height", "Height (0 = dataset height)", "slider", 0, 2048, 64),
    *(f for f in DATA_FIELDS if f.path.split(".")[1] not in PER_CONCEPT),
    *TRAIN_FIELDS,
)
PREPROCESS_FIELDS: tuple[FormField, ...] = (
    FormField("input_dir", "Input folder (photos)", "text"),
    FormField("output_dir", "Output folder (training set; input files are never changed)", "text"),
    FormField("crop", "Crop to the training size around faces / detail", "checkbox"),
    FormField("width", "Width", "slider", 64, 2048, 64),
    FormField("height", "Height", "slider", 64, 2048, 64),
    FormField("buckets", "Crop to the nearest aspect-ratio bucket instead", "checkbox"),
    FormField("face_weight", "Face weight", "slider", 0.0, 1.0, 0.05),
    FormField("entropy_weight", "Entropy weight", "slider", 0.0, 1.0, 0.05),
    FormField("edges_weight", "Edges weight", "slider", 0.0, 1.0, 0.05),
    FormField("debug_images", "Also save focal-point debug images", "checkbox"),
    FormField("caption_blip", "Caption with BLIP (downloads ~0.9 GB on first use)", "checkbox"),
    FormField("caption_deepbooru", "Tag with DeepBooru (downloads on first use)", "checkbox"),
    FormField("trigger_word", "Trigger word (put first in every caption)", "text"),
    FormField(
        "existing_caption",
        "When an image already has a caption",
        "radio",
        choices=("keep", "replace", "prepend", "append"),
    ),
    FormField("caption_extension", "Caption extension", "text"),
)
FORMS: dict[str, tuple[type, tuple[FormField, ...]]] = {
    "textual_inversion": (TextualInversionConfig, TI_FIELDS),
    "lora": (LoraConfig, LORA_FIELDS),
    "hypernetwork": (HypernetworkConfig, HN_FIELDS),
    "dreambooth": (DreamBoothConfig, DB_FIELDS),
    "embedding_finetune": (EmbeddingFinetuneConfig, ROWS_FIELDS),
    "preprocess": (PreprocessConfig, PREPROCESS_FIELDS),
}
NOT_IN_FORM = {"version"}  # set by the extension itself


def size_defaults(side: int) -> dict[str, int]:
    """Image sizes that follow the loaded model when not given: its training side (SDXL 1024), buckets from half
    to twice that side, previews at it. Empty for 512 (the config defaults already)."""
    if side == 512:
        return {}
    return {
        "data.width": side,
        "data.height": side,
        "data.bucket_min_side": side // 2,
        "data.bucket_max_side": 2 * side,
        "preview.width": side,
        "preview.height": side,
    }


def config_paths(cls: type = TextualInversionConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf setting of a config dataclass."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if get_origin(hint) is None and dataclasses.is_dataclass(hint):
            paths += config_paths(hint, f"{prefix}{f.name}.")
        elif _row_class(hint) is not None:
            paths += config_paths(_row_class(hint), f"{prefix}{f.name}{ROW}")
        else:
            paths.append(prefix + f.name)
    return paths


def _row_class(hint: Any) -> type | None:
    """The item dataclass of a list setting (``tuple[ConceptConfig, ...]``), else None."""
    if get_origin(hint) in (list, tuple):
        item = get_args(hint)[0]
        return item if dataclasses.is_dataclass(item) else None
    return None


def default_values(method: str = "textual_inversion") -> dict[str, Any]:
    """Each field's default (the form's own, else the config dataclass's): what the tab shows first."""
    cls, fields = FORMS[method]
    defaults = _defaults(cls)
    return {f.path: f.default if f.default is not None else defaults.get(f.path) for f in fields}


def _defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if _row_class(hint) is not None:
            out.update(_defaults(_row_class(hint), f"{prefix}{f.name}{ROW}"))
        elif dataclasses.is_dataclass(hint):
            if f.default_factory is not dataclasses.MISSING:
                out.update(_flatten(dataclasses.asdict(f.default_factory()), f"{prefix}{f.name}."))
            else:
                out.update(_defaults(hint, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
    return out


def _flatten(data: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in data.items()}


def row_path(path: str, index: int) -> str:
    """The control path of a row field in row ``index``: ``concepts[].x`` -> ``concepts.0.x``."""
    return path.replace(ROW, f".{index}.")


def to_config_dict(values: dict[str, Any], fields: tuple[FormField, ...]) -> dict[str, Any]:
    """Nested config dict from ``{path: value}`` (numbers from sliders become ints where the field is int).

    Row controls (``concepts.1.instance_dir``) become list items in row order; a row whose first field is empty
    is unused and left out."""
    nested: dict[str, Any] = {}
    kinds = {f.path: f for f in fields}
    for path, value in values.items():
        field = kinds[re.sub(r"\.\d+\.", ROW, path)]
        if field.kind in ("int", "slider") and isinstance(value, float) and value.is_integer():
            value = int(value)
        if field.kind == "dropdown" and not field.choices and value is None:
            continue
        node = nested
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return _rows_to_lists(nested, fields)


def _rows_to_lists(nested: dict[str, Any], fields: tuple[FormField, ...]) -> dict[str, Any]:
    firsts = {}
    for f in fields:
        if ROW in f.path:
            name, rest = f.path.split(ROW, 1)
            firsts.setdefault(name, rest)
    for name, first in firsts.items():
        rows = nested.get(name)
        if isinstance(rows, dict):
            ordered = [rows[k] for k in sorted(rows, key=int)]
            nested[name] = [row for row in ordered if str(row.get(first) or "").strip()]
    return nested


def to_form_values(config: dict[str, Any], method: str) -> dict[str, Any]:
    """The control values showing a (partial) nested config of ``method``: ``{path: value}`` for every path it
    sets that the form has; list settings fill the first CONCEPT_ROWS rows (and clear the rows after them)."""
    fields = {f.path: f for f in FORMS[method][1]}
    values: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = prefix + str(key)
            if isinstance(value, dict):
                walk(value, path + ".")
            elif isinstance(value, list | tuple) and any(p.startswith(path + ROW) for p in fields):
                for index in range(CONCEPT_ROWS):
                    row = value[index] if index < len(value) and isinstance(value[index], dict) else {}
                    for field_path in (p for p in fields if p.startswith(path + ROW)):
                        empty = "" if fields[field_path].kind == "text" else fields[field_path].default
                        values[row_path(field_path, index)] = row.get(field_path.split(ROW, 1)[1], empty)
            elif path in fields:
                values[path] = _form_value(value, fields[path])

    walk(config, "")
    return {p: v for p, v in values.items() if v is not None}


def _form_value(value: Any, field: FormField) -> Any:
    """A config value as its control shows it (lists of numbers or words as text, as the user types them)."""
    if field.kind == "text" and isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if field.kind == "text" and value is not None and not isinstance(value, str):
        return str(value)
    return value


def literal_choices(path: str, cls: Any = TextualInversionConfig) -> tuple[str, ...]:
    """The allowed values of a Literal config field of ``cls`` (empty for other types)."""
    *parents, leaf = path.replace(ROW, ".").split(".")
    for parent in parents:
        cls = typing.get_type_hints(cls)[parent]
        cls = _row_class(cls) or cls
    hint = typing.get_type_hints(cls)[leaf]
    return get_args(hint) if get_origin(hint) is Literal else ()

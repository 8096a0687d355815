"""Everything the extension touches in Stable Diffusion WebUI Forge main (2.x), in one file.

Forge keeps A1111's ``modules`` surface for the UI, the queue, settings, progress, txt2img and the Extras tab, so
those functions come from ``host`` (the A1111 glue) unchanged. What differs is the model and what refreshes it:
    modules.shared.sd_model: a backend.diffusion_engine engine (see models/forge.py for the attributes read),
        .current_lora_hash, .text_processing_engine / _l / _g .embeddings (EmbeddingDatabase:
        load_textual_inversion_embeddings(), register_embedding_by_name(embedding, name)),
        sd_checkpoint_info (.model_name, .shorthash, .filename)
    modules.sd_models.forge_model_reload() (the model loads at the first generation otherwise)
    backend.memory_management: unload_all_models(), get_torch_device(), soft_empty_cache()
    backend.patcher.lora: model_lora_keys_unet(model, key_map), model_lora_keys_clip(model, key_map),
        load_lora(state_dict, keys) -> (matched, unmatched)  (Forge's LoRA loader rejects a file with > 12 unmatched)
    backend.text_processing.textual_inversion.create_embedding_from_data(data, name)
    sys.modules["networks"] (the built-in sd_forge_lora extension): load_lora_state_dict (an lru_cache by file
        name: cleared so a retrained file is read again), list_available_networks(), available_networks /
        available_network_aliases (name -> network.NetworkOnDisk(name, filename)), network.NetworkOnDisk
Training runs on copies of Forge's modules made for each run on Forge's torch device, after Forge's memory
manager has unloaded its own models; the copies are dropped when the run ends, so Forge's model is never changed.
Hypernetworks have no effect in Forge main, DreamBooth and token rows need the whole LDM model: those are refused.
LoRA previews: the network trains on the copies, not on the model txt2img uses, so each preview writes the current
network to a file in the run's previews folder and renders with ``<lora:NAME-trainer-preview:1>`` added to the
prompt, through Forge's own LoRA loader (its own name, so Forge's metadata/hash cache of the real file is untouched).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend import memory_management
from modules import sd_models, shared

from lib_trainer.errors import UnsupportedModelError
from lib_trainer.models.forge import family_of, parts_from_forge
from lib_trainer.models.parts import ModelParts
from lib_trainer.webui import host as a1111
from lib_trainer.webui.host import (  # noqa: F401  (the same in Forge: re-exported as this host's surface)
    INSTALL_OPTION,
    add_settings,
    allowed_roots,
    captioners,
    extras_source_path,
    folders,
    input_accordion,
    interrupted,
    open_folder,
    postprocessing_script_base,
    queue_lock,
    refresh_checkpoints,
    register_callbacks,
    release_captioners,
    report_progress,
    report_status,
    reset_conditioning_cache,
    route_access,
    sampler_names,
    show_image,
    webui_clip_skip,
    yunet_model,
)

NAME = "Forge"
REFUSED = {
    "hypernetwork": "hypernetworks have no effect in Forge main (it parses <hypernet:...> but never applies it)",
    "dreambooth": "DreamBooth writes a whole LDM checkpoint, which Forge's engine objects do not give",
    "embedding_finetune": "token rows are placed in a whole LDM checkpoint, which Forge's engine objects do not give",
}

PREVIEW_SUFFIX = "-trainer-preview"

_run: dict[int, ModelParts] | None = None  # the current run's copies by clip skip (None outside a run)
_preview_tags: list[str] = []  # prompt additions while a network preview renders


def engine() -> Any:
    """The loaded engine (Forge loads it at the first generation; here on first use)."""
    model = shared.sd_model
    if model is None or not hasattr(model, "forge_objects"):
        sd_models.forge_model_reload()
        model = shared.sd_model
    if model is None or getattr(model, "forge_objects", None) is None:
        raise UnsupportedModelError("no model is loaded; pick a checkpoint in Forge first")
    return model


def _names(model: Any) -> tuple[str | None, str | None]:
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "model_name", None), getattr(info, "shorthash", None)


def model_label() -> str:
    """The loaded model for the tab, and what Forge cannot train."""
    model = shared.sd_model
    if model is None or not hasattr(model, "forge_objects"):
        return "Forge: the model loads at the first generation or training"
    name = _names(model)[0] or "?"
    try:
        family = family_of(model, name).upper()
    except UnsupportedModelError as exc:
        return f"Forge: {exc}"
    predictor = getattr(model.forge_objects.unet.model, "predictor", None)
    kind = getattr(predictor, "prediction_type", "?")
    return f"Forge {family} ({kind}) - {name}; hypernetworks have no effect in Forge main"


def unavailable_methods() -> dict[str, str]:
    """Methods Forge cannot run, with why (shown on their tabs, refused at submit on ``method``)."""
    return dict(REFUSED)


def model_parts(clip_skip: int | None = None) -> ModelParts:
    """ModelParts over copies of the loaded model: on Forge's device for a run (made once per run, after Forge
    unloaded its models so both fit), on the CPU for the checks at submit."""
    model = engine()
    skip = clip_skip or webui_clip_skip()
    name, short_hash = _names(model)
    if _run is None:
        return _build(model, "cpu", skip, name, short_hash)
    if skip not in _run:
        _run.clear()
        memory_management.unload_all_models()
        _run[skip] = _build(model, memory_management.get_torch_device(), skip, name, short_hash)
    return _run[skip]


def _build(model: Any, device: Any, skip: int, name: str | None, short_hash: str | None) -> ModelParts:
    parts = parts_from_forge(model, device, clip_skip=skip, model_name=name, model_hash=short_hash)
    parts.checkpoint_file = getattr(getattr(model, "sd_checkpoint_info", None), "filename", None)
    return parts


@contextlib.contextmanager
def job_state(title: str, total_steps: int) -> Iterator[None]:
    """The WebUI's progress state for the run; the run's model copies live until it ends."""
    global _run
    with a1111.job_state(title, total_steps):
        _run = {}
        try:
            yield
        finally:
            _run = None
            memory_management.soft_empty_cache()


def native_resolution() -> int:
    """1024 for SDXL, else 512."""
    model = shared.sd_model
    return 1024 if getattr(model, "is_sdxl", False) else 512


def token_counter():
    """Counts a caption's tokens with the loaded model's tokenizer (None when no model is loaded yet)."""
    model = shared.sd_model
    objects = getattr(model, "forge_objects", None)
    if objects is None:
        return None
    tokenizer = next(iter(vars(objects.clip.tokenizer).values()), None) if hasattr(objects.clip, "tokenizer") else None
    if tokenizer is None:
        return None
    return lambda text: len(tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])


def clear_merged_networks() -> None:
    """Forge merges LoRAs into the weights while a model is on the GPU and restores them when it unloads: unload
    everything, so the copies are made from the base weights."""
    memory_management.unload_all_models()


def _text_engines(model: Any) -> list[Any]:
    names = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")
    return [getattr(model, n) for n in names if getattr(model, n, None) is not None]


def refresh_embeddings() -> None:
    """Reload every text engine's embeddings (Forge reads them only when the model is built)."""
    reset_conditioning_cache()
    model = shared.sd_model
    for text_engine in _text_engines(model) if model is not None else []:
        text_engine.embeddings.load_textual_inversion_embeddings()


def register_embedding(name: str, tensors: dict[str, Any]) -> None:
    """Make the current vectors usable as ``name`` in prompts (previews), in every text engine."""
    from backend.text_processing.textual_inversion import create_embedding_from_data

    embedding = create_embedding_from_data(dict(tensors), name)
    for text_engine in _text_engines(engine()):
        text_engine.embeddings.register_embedding_by_name(embedding, name)
    reset_conditioning_cache()


def refresh_loras() -> None:
    """Rescan the Lora folder and forget what Forge cached by file name, so a retrained file is really used."""
    reset_conditioning_cache()
    networks = sys.modules.get("networks")
    if shared.sd_model is not None:
        _forget_loaded_loras(networks, shared.sd_model)
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


@contextlib.contextmanager
def network_preview(name: str, state: Any, step: int, folder: Path) -> Iterator[None]:
    """While a preview renders: the current network as a file Forge's LoRA extension loads under
    ``NAME-trainer-preview`` (added to the prompt by render_txt2img); afterwards the file and the entry are gone and
    Forge re-applies the user's own LoRAs at the next generation."""
    networks = sys.modules.get("networks")
    if networks is None or not hasattr(state, "write_file"):
        raise UnsupportedModelError(
            "previews of a network need Forge's built-in LoRA extension (sd_forge_lora), which is not loaded; turn "
            "previews off or enable it"
        )
    preview_name = name + PREVIEW_SUFFIX
    path = folder / f"{preview_name}.safetensors"
    model = engine()
    tables = (networks.available_networks, networks.available_network_aliases)
    kept = [table.get(preview_name) for table in tables]
    with state.for_preview():
        state.write_file(path, step)
        entry = networks.network.NetworkOnDisk(preview_name, str(path))
        for table in tables:
            table[preview_name] = entry
        _forget_loaded_loras(networks, model)
        _preview_tags.append(f"<lora:{preview_name}:1>")
        try:
            yield
        finally:
            _preview_tags.clear()
            for table, old in zip(tables, kept, strict=True):
                table.pop(preview_name, None) if old is None else table.__setitem__(preview_name, old)
            _forget_loaded_loras(networks, model)
            path.unlink(missing_ok=True)


def _forget_loaded_loras(networks: Any, model: Any) -> None:
    """Forge applies LoRAs again at the next generation, read from their files."""
    cached = getattr(networks, "load_lora_state_dict", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    if hasattr(model, "current_lora_hash"):
        model.current_lora_hash = str([])
    original = getattr(model, "forge_objects_original", None)
    if original is not None and hasattr(original, "shallow_copy"):
        model.forge_objects_after_applying_lora = original.shallow_copy()


def render_txt2img(settings: dict[str, Any]) -> list[Any]:
    """Forge's own txt2img (A1111's processing surface), with a preview network's tag when one is shown."""
    if _preview_tags:
        settings = {**settings, "prompt": " ".join([settings["prompt"], *_preview_tags])}
    return a1111.render_txt2img(settings)


def refresh_hypernetworks() -> None:
    """Nothing to show: Forge main has no hypernetwork panel."""
    reset_conditioning_cache()


def load_checkpoint(path: Path) -> None:
    """Not reached (DreamBooth is refused in Forge)."""
    raise UnsupportedModelError(f"switching Forge to {path.name} from the trainer is not supported")


def unmatched_lora_keys(path: Path) -> list[str]:
    """Keys of a saved LoRA that Forge's own loader (its ComfyUI key maps) cannot place; empty = all load."""
    import safetensors.torch
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    objects = engine().forge_objects_original
    keys = model_lora_keys_unet(objects.unet.model, {})
    keys = model_lora_keys_clip(objects.clip.cond_stage_model, keys)
    _matched, unmatched = load_lora(safetensors.torch.load_file(str(path)), keys)
    return sorted({key.partition(".")[0] for key in unmatched})

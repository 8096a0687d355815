"""Everything the extension touches in the WebUI (AUTOMATIC1111 1.7-1.10), in one file.

The host surface used here, kept honest by tests/test_webui_real.py against a real WebUI checkout:
    modules.shared: sd_model, state (begin/end/interrupt, job, job_no, job_count, textinfo, interrupted,
        assign_current_image), opts.CLIP_stop_at_last_layers, opts.add_option, OptionInfo(restrict_api=).needs_restart,
        cmd_opts (embeddings_dir, hypernetwork_dir, lora_dir, lowvram, medvram, api, nowebui, api_auth),
        reload_hypernetworks()
    the FastAPI app given to on_app_started: gradio's App, whose ``auth`` is set under --gradio-auth and whose
        ``tokens`` maps the login cookie ("access-token...") to the user
    modules.paths_internal.data_path
    modules.util.open_folder(path); cmd_opts.hide_ui_dir_config (no folder opening when set)
    modules.devices.autocast (replaced by a no-op inside training steps: the trainer's autocast decides)
    modules.call_queue.queue_lock
    modules.sd_hijack.model_hijack.embedding_db: load_textual_inversion_embeddings(force_reload),
        register_embedding_by_name(embedding, model, name)
    modules.textual_inversion.textual_inversion.create_embedding_from_data(data, name)
    modules.processing: StableDiffusionProcessing.cached_c/cached_uc, StableDiffusionProcessingTxt2Img
        (override_settings), process_images
    modules.sd_samplers.samplers_map, all_samplers
    modules.sd_models: model_path, list_models(), CheckpointInfo(filename) (.register(), .title),
        reload_model_weights(info=); cmd_opts.ckpt_dir; opts.data["sd_model_checkpoint"]
    modules.scripts_postprocessing.ScriptPostprocessing, modules.ui_components.InputAccordion,
    modules.paths_internal.models_path, shared.interrogator (load, generate_caption, send_blip_to_ram),
    modules.deepbooru.model (start, tag_multi, stop)
    sys.modules["networks"] (the built-in Lora extension, when loaded): loaded_networks, list_available_networks(),
        assign_network_names_to_compvis_modules(sd_model), convert_diffusers_name_to_compvis(key, is_sd2),
        re_x_proj, network_apply_weights(module) and modules' network_current_names;
        shared.sd_model.network_layer_mapping
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import html
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, HTTPException, Request
from modules import call_queue, devices, paths_internal, processing, sd_hijack, sd_models, sd_samplers, shared

from lib_trainer.errors import ConfigError, UnsupportedModelError
from lib_trainer.formats.files import safetensors_keys
from lib_trainer.loop.hooks import Progress
from lib_trainer.models.ldm import parts_from_ldm
from lib_trainer.models.parts import ModelParts
from lib_trainer.models.sgm import is_sgm, parts_from_sgm
from lib_trainer.webui.jobs import Folders


def folders() -> Folders:
    """The host's model folders and our log folder (``<data>/trainer``, beside the WebUI's textual_inversion)."""
    opts = shared.cmd_opts
    data = Path(paths_internal.data_path)
    lora = getattr(opts, "lora_dir", None) or data / "models" / "Lora"
    logs = getattr(shared.opts, "trainer_log_dir", "") or data / "trainer"
    checkpoints = getattr(opts, "ckpt_dir", None) or sd_models.model_path
    return Folders(Path(opts.embeddings_dir), Path(opts.hypernetwork_dir), Path(lora), Path(logs), Path(checkpoints))


INSTALL_OPTION = "trainer_install_optimizers"  # read by install.py from the WebUI's config.json
INSTALLABLE = ("bitsandbytes", "lion-pytorch", "prodigyopt", "schedulefree")


def add_settings() -> None:
    """The trainer's section in Settings (not changeable through the API: they decide what the trainer may touch)."""
    section = ("trainer", "Trainer")
    options = {
        "trainer_log_dir": ("", "Folder for training logs, numbered copies and previews (empty: <data dir>/trainer)"),
        "trainer_allowed_folders": (
            "",
            "Allowed folders: datasets, templates and files to resume from may only come from the WebUI's own "
            "folders and these (separate with ';')",
        ),
        "trainer_allow_any_folder": (False, "Allow any folder on this computer (only if nobody else can reach it)"),
    }
    for key, (default, label) in options.items():
        shared.opts.add_option(key, shared.OptionInfo(default, label, section=section, restrict_api=True))
    install = shared.OptionInfo(
        "",
        f"Optional optimizer packages to install at the next start, comma-separated ({', '.join(INSTALLABLE)})",
        section=section,
        restrict_api=True,
    )
    shared.opts.add_option(INSTALL_OPTION, install.needs_restart())


def allowed_roots() -> list[Path] | None:
    """The folders jobs may read and write: the WebUI's own plus the listed ones (None: any folder)."""
    opts = shared.opts
    if getattr(opts, "trainer_allow_any_folder", False):
        return None
    f = folders()
    roots = [Path(paths_internal.data_path), Path(paths_internal.models_path), f.embeddings, f.hypernetworks, f.lora]
    roots.append(f.logs)
    extra = getattr(opts, "trainer_allowed_folders", "") or ""
    roots += [Path(part.strip()).expanduser() for part in re.split(r"[;\n]", extra) if part.strip()]
    unique: list[Path] = []
    for root in (r.resolve() for r in roots):
        if root not in unique:
            unique.append(root)
    return unique


def webui_clip_skip() -> int:
    """The WebUI's Clip skip setting (used when a job leaves train.clip_skip at 0)."""
    return int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1) or 1)


@dataclass(frozen=True)
class RouteAccess:
    """Which trainer routes exist and who may call them, following the WebUI's own rules."""

    full_api: bool  # the REST API for jobs and files: only where the WebUI serves its API (--api / --nowebui)
    api: list[Any]  # FastAPI dependencies of those routes: --api-auth, as the WebUI's API
    ui: list[Any]  # dependencies of the routes the tab's page script polls: the --gradio-auth login (or --api-auth)


def route_access(app: Any) -> RouteAccess:
    """Route access for ``app``: the API's basic auth under --api-auth, the gradio login under --gradio-auth."""
    opts = shared.cmd_opts
    credentials = _api_credentials(getattr(opts, "api_auth", None))
    login = getattr(app, "auth", None) is not None

    def refuse() -> HTTPException:
        return HTTPException(status_code=401, detail="Incorrect username or password", headers=_CHALLENGE)

    def api_guard(request: Request) -> None:
        if credentials and not _basic_auth_ok(request, credentials):
            raise refuse()

    def ui_guard(request: Request) -> None:
        if login and not (_logged_in(app, request) or (credentials and _basic_auth_ok(request, credentials))):
            raise refuse()

    full_api = bool(getattr(opts, "api", False) or getattr(opts, "nowebui", False))
    return RouteAccess(full_api, [Depends(api_guard)], [Depends(ui_guard)])


_CHALLENGE = {"WWW-Authenticate": "Basic"}


def _api_credentials(text: str | None) -> dict[str, str]:
    """``--api-auth user:password[,user2:password2]`` parsed as the WebUI's API does."""
    credentials = {}
    for item in (text or "").split(","):
        user, sep, password = item.partition(":")
        if sep:
            credentials[user] = password
    return credentials


def _basic_auth_ok(request: Any, credentials: dict[str, str]) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return user in credentials and hmac.compare_digest(password, credentials[user])


def _logged_in(app: Any, request: Any) -> bool:
    """Whether the request carries the cookie of a gradio login (its name differs between gradio versions)."""
    tokens = getattr(app, "tokens", None) or {}
    return any(name.startswith("access-token") and value in tokens for name, value in request.cookies.items())


def model_label() -> str:
    """A short description of the loaded model for the tab ("SD1 (eps-prediction) - name, Clip skip 1")."""
    model = shared.sd_model
    info = getattr(model, "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", None) or getattr(info, "model_name", "?")
    if hasattr(model, "forge_objects"):
        return f"old Forge / reForge model (not supported; use Forge main or the A1111 WebUI) - {name}"
    if is_sgm(model):
        return f"SDXL ({getattr(model, 'parameterization', '?')}-prediction) - {name}"
    family = "SD2" if getattr(model, "is_sd2", False) else "SD1"
    skip = "" if family == "SD2" else f", WebUI Clip skip {webui_clip_skip()}"  # SD2 ignores it, as the WebUI does
    return f"{family} ({getattr(model, 'parameterization', '?')}-prediction) - {name}{skip}"


def unavailable_methods() -> dict[str, str]:
    """Methods this host cannot run, with why (shown on their tabs, refused at submit): none here."""
    return {}


def model_parts(clip_skip: int | None = None) -> ModelParts:
    """ModelParts over the loaded ``shared.sd_model``; refuses what cannot be trained with a clear message."""
    model = shared.sd_model
    if model is None:
        raise UnsupportedModelError("no model is loaded; pick a checkpoint in the WebUI first")
    if hasattr(model, "forge_objects"):
        raise UnsupportedModelError(
            "this is an old Forge / reForge model (A1111's LatentDiffusion with Forge's backend), which the trainer "
            "does not support; use Forge main (2.x) or the AUTOMATIC1111 WebUI 1.7-1.10"
        )
    if getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False):
        raise ConfigError(
            "training does not work with --lowvram/--medvram (the WebUI moves the model's parts between CPU and GPU "
            "in forward hooks, and a backward pass needs its weights where its forward used them); restart the WebUI "
            "without them and lower memory with train.gradient_checkpointing, train.cache_text_encoder_outputs, "
            "optimizer 'adafactor' and mixed precision 'full_bf16' (Check VRAM shows what fits)"
        )
    skip = clip_skip or webui_clip_skip()  # 0/None: the WebUI's setting
    info = getattr(model, "sd_checkpoint_info", None)
    name, short_hash = getattr(info, "model_name", None), getattr(info, "shorthash", None)
    if is_sgm(model):
        parts = parts_from_sgm(
            model,
            clip_skip=skip,
            model_name=name,
            model_hash=short_hash,
            clip_l_skip=bool(getattr(shared.opts, "sdxl_clip_l_skip", False)),
            checkpoint_keys=checkpoint_markers(getattr(info, "filename", None)),
        )
    else:
        parts = parts_from_ldm(model, clip_skip=skip, model_name=name, model_hash=short_hash)
    parts.checkpoint_file = getattr(info, "filename", None)
    parts.apply_model = _trainer_precision(parts.apply_model)
    return parts


def _trainer_precision(apply_model):
    """The WebUI's ``apply_model`` hijack enters ``devices.autocast()``, fp16 autocast on CUDA, which inside a
    training step would override the trainer's own choice (bf16 became fp16, without a gradient scaler). While
    gradients are on, that context is a no-op and the trainer's autocast decides; sampling is untouched."""

    def apply(x, t, cond, *args, **kwargs):
        if not torch.is_grad_enabled():
            return apply_model(x, t, cond, *args, **kwargs)
        host_autocast = devices.autocast
        devices.autocast = _no_autocast
        try:
            return apply_model(x, t, cond, *args, **kwargs)
        finally:
            devices.autocast = host_autocast

    return apply


def _no_autocast(disable: bool = False) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def checkpoint_markers(filename: str | None) -> frozenset[str]:
    """Marker keys (``v_pred``, ``ztsnr``) in the loaded checkpoint's safetensors header (none for other files)."""
    if not filename or not str(filename).endswith(".safetensors"):
        return frozenset()
    return frozenset(safetensors_keys(Path(filename)) & {"v_pred", "ztsnr"})


def native_resolution() -> int:
    """The loaded model's training side length (SDXL 1024, else 512), for default image sizes."""
    return 1024 if is_sgm(shared.sd_model) else 512


def token_counter():
    """Counts a caption's tokens with the loaded model's tokenizer (None when no supported model is loaded)."""
    try:
        encoder = model_parts().text_encoder
    except Exception:  # any model the trainer cannot use: the report then skips token counts
        return None
    return lambda text: len(encoder.tokenize(text))


def queue_lock() -> contextlib.AbstractContextManager:
    """The WebUI's global FIFO lock: while held, no generation runs (and we wait for running ones)."""
    return call_queue.queue_lock


def clear_merged_networks() -> None:
    """Unmerge LoRAs the built-in Lora extension left in the weights after a generation.

    With no networks loaded, its own ``network_apply_weights`` puts every layer that still holds merged weights back
    from its backup. Done here under ``no_grad`` for every such layer (UNet and text encoders alike): left to the
    first training forward, the extension would restore them in place on weights that then require grad
    (DreamBooth), which torch refuses.
    """
    networks = sys.modules.get("networks")
    loaded = getattr(networks, "loaded_networks", None)
    if loaded is None:
        return
    loaded.clear()
    apply = getattr(networks, "network_apply_weights", None)
    if apply is None:
        return
    with torch.no_grad():
        for module in shared.sd_model.modules():
            if getattr(module, "network_current_names", ()):
                apply(module)


def reset_conditioning_cache() -> None:
    """Forget cached prompt conditioning (its key ignores embedding contents)."""
    cls = processing.StableDiffusionProcessing
    cls.cached_c = [None] * len(cls.cached_c)  # Forge keeps three entries, A1111 two
    cls.cached_uc = [None] * len(cls.cached_uc)


def refresh_loras() -> None:
    """Rescan the Lora folder so a new LoRA shows in the Lora panel; forget cached conditioning."""
    reset_conditioning_cache()
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def unmatched_lora_keys(path: Path) -> list[str]:
    """Module names in a saved LoRA that the WebUI's own name mapping cannot place (empty = all load).

    Uses the built-in Lora extension's ``convert_diffusers_name_to_compvis``, its ``re_x_proj`` fallback (q/k/v
    of the fused OpenCLIP attention) and the model's ``network_layer_mapping`` as its loader does. Its LDM-name
    fallback (``lora_unet`` -> ``diffusion_model``, ``lora_te1_text_model`` -> ``0_transformer_text_model``) is
    how SDXL files load, so it is used for SDXL only: on SD1/SD2 a wrong diffusers name is reported rather than
    silently matched. Returns [] when the Lora extension is not loaded.
    """
    import safetensors

    networks = sys.modules.get("networks")
    model = shared.sd_model
    if networks is None or not hasattr(networks, "convert_diffusers_name_to_compvis"):
        return []
    if not hasattr(model, "network_layer_mapping"):
        networks.assign_network_names_to_compvis_modules(model)
    mapping = model.network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in mapping
    x_proj = getattr(networks, "re_x_proj", None)
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
        names = sorted({key.partition(".")[0] for key in fh.keys()})  # noqa: SIM118
    sdxl = is_sgm(model)
    unmatched = []
    for name in names:
        key = networks.convert_diffusers_name_to_compvis(name, is_sd2)
        proj = x_proj.match(key) if x_proj is not None else None
        if key in mapping or (proj and proj.group(1) in mapping):
            continue
        fallback = name.replace("lora_unet", "diffusion_model").replace(
            "lora_te1_text_model", "0_transformer_text_model"
        )
        if not (sdxl and fallback in mapping):
            unmatched.append(name)
    return unmatched


def refresh_checkpoints() -> None:
    """Rescan the checkpoint folders (the list the checkpoint dropdown's refresh button shows) and the Lora folder
    (an extracted LoRA). The selected checkpoint is kept: under ``--ckpt`` ``list_models`` resets the option to that
    file, and the next generation would silently load it instead of the model the user (or keep_loaded) chose."""
    selected = shared.opts.data.get("sd_model_checkpoint")
    sd_models.list_models()
    if selected is not None:
        shared.opts.data["sd_model_checkpoint"] = selected
    refresh_loras()


def load_checkpoint(path: Path) -> None:
    """Switch the WebUI to the checkpoint at ``path`` (DreamBooth's "keep trained model loaded"). Called under the
    queue lock, so the model is reloaded directly rather than through the option's queued onchange."""
    info = sd_models.CheckpointInfo(str(path))
    info.register()
    sd_models.reload_model_weights(info=info)
    shared.opts.data["sd_model_checkpoint"] = info.title
    reset_conditioning_cache()


def report_status(text: str) -> None:
    """What a job is doing outside its steps (e.g. generating class images), in the WebUI's progress text."""
    shared.state.textinfo = html.escape(text)


def refresh_hypernetworks() -> None:
    """Rescan the hypernetworks folder (the WebUI lists it only at start-up otherwise)."""
    reset_conditioning_cache()
    shared.reload_hypernetworks()


def refresh_embeddings() -> None:
    """Reload the embeddings folder so a new or retrained embedding shows up without a restart."""
    reset_conditioning_cache()
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)


@contextlib.contextmanager
def job_state(title: str, total_steps: int) -> Iterator[None]:
    """Show the run in the WebUI's progress state (like its own training); clear the flags afterwards."""
    state = shared.state
    state.begin(job=title)
    state.job_count = total_steps
    state.textinfo = f"{html.escape(title)}: preparing..."
    try:
        yield
    finally:
        state.end()
        state.interrupted = False
        state.skipped = False
        if hasattr(state, "stopping_generation"):
            state.stopping_generation = False


def report_progress(progress: Progress, name: str) -> None:
    """Step, loss, rate and ETA into ``shared.state`` (read by the WebUI's progress API)."""
    state = shared.state
    state.job_no = progress.step
    state.job_count = progress.total_steps
    state.textinfo = (
        f"Training {html.escape(name)}: step {progress.step}/{progress.total_steps}, "
        f"loss {progress.loss:.5f}, {progress.steps_per_s:.2f} it/s, ETA {progress.eta_s:.0f}s"
    )


def interrupted() -> bool:
    """Whether the user pressed the WebUI's Interrupt (or called /sdapi/v1/interrupt)."""
    return bool(shared.state.interrupted)


def show_image(image: Any) -> None:
    """Put a preview into the WebUI's live-preview slot."""
    shared.state.assign_current_image(image)


def network_preview(name: str, state: Any, step: int, folder: Path) -> contextlib.AbstractContextManager:
    """While previews render: the network trains attached to the WebUI's own model, so txt2img sees it as it is
    (in its ``for_preview`` mode)."""
    return state.for_preview()


def register_embedding(name: str, tensors: dict[str, Any]) -> None:
    """Make the current vectors usable as ``name`` in prompts (for previews), replacing a loaded one.

    ``tensors`` is what the file holds: ``{"emb_params": [n, d]}``, or SDXL's ``{"clip_l", "clip_g"}``.
    """
    from modules.textual_inversion import textual_inversion as host_ti  # absent in Forge main: import on use

    embedding = host_ti.create_embedding_from_data(dict(tensors), name)
    sd_hijack.model_hijack.embedding_db.register_embedding_by_name(embedding, shared.sd_model, name)
    reset_conditioning_cache()


def open_folder(path: Path) -> str:
    """Open ``path`` in the file manager of the machine the WebUI runs on, as its own folder buttons do; refused
    (with the reason) under --hide-ui-dir-config."""
    if getattr(shared.cmd_opts, "hide_ui_dir_config", False):
        return f"Opening folders is turned off in this WebUI (--hide-ui-dir-config); the folder is {path}"
    from modules import util  # imported on use: WebUIs before 1.8 have no util.open_folder

    if not callable(getattr(util, "open_folder", None)):
        return f"This WebUI cannot open folders from an extension; the folder is {path}"
    util.open_folder(str(path))
    return f"Opened {path}"


def sampler_names() -> list[str]:
    """Sampler names the host knows (for the preview settings)."""
    return sorted({s.name for s in getattr(sd_samplers, "all_samplers", [])}) or ["Euler a"]


def render_txt2img(settings: dict[str, Any]) -> list[Any]:
    """Render with the host's own txt2img (samplers, embeddings, options as the user has them)."""
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, do_not_save_grid=True, do_not_save_samples=True, do_not_reload_embeddings=True
    )
    p.prompt = settings["prompt"]
    p.negative_prompt = settings.get("negative_prompt", "")
    p.steps = settings.get("steps", 20)
    sampler = settings.get("sampler", "Euler a")
    p.sampler_name = sd_samplers.samplers_map.get(sampler.lower(), sampler)
    p.cfg_scale = settings.get("cfg_scale", 7.0)
    p.seed = settings.get("seed", -1)
    p.width, p.height = settings.get("width", 512), settings.get("height", 512)
    if settings.get("clip_skip"):  # previews at the Clip skip the run trains with, whatever the WebUI is set to
        p.override_settings = {
            **(getattr(p, "override_settings", None) or {}),
            "CLIP_stop_at_last_layers": settings["clip_skip"],
        }
    job_no, job_count = shared.state.job_no, shared.state.job_count
    try:
        with contextlib.closing(p):
            processed = processing.process_images(p)
    finally:
        shared.state.job_no, shared.state.job_count = job_no, job_count  # process_images advances the job counter
    return list(processed.images)


def register_callbacks(on_ui_tabs, on_ui_settings, on_app_started) -> None:
    """Register the extension's callbacks with ``modules.script_callbacks``."""
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)


def postprocessing_script_base() -> type:
    """The Extras-tab script base class (imported as a module attribute, so it is not re-registered)."""
    from modules import scripts_postprocessing

    return scripts_postprocessing.ScriptPostprocessing


def input_accordion():
    """The host's InputAccordion (a checkbox-headed accordion) for Extras-script UIs."""
    from modules import ui_components

    return ui_components.InputAccordion


def yunet_model() -> Path | None:
    """The WebUI's YuNet face model if its focal-crop already downloaded it (we never download it)."""
    folder = Path(paths_internal.models_path) / "opencv"
    for name in ("face_detection_yunet_2023mar.onnx", "face_detection_yunet.onnx"):
        if (folder / name).is_file():
            return folder / name
    return None


def captioners(blip: bool, deepbooru: bool) -> list:
    """Caption functions from the host's own models: BLIP (caption only, no CLIP ranking, no state reset) and
    DeepBooru (threshold, sorting and underscores from the host's settings). They download on first use."""
    found = []
    if blip:
        interrogator = shared.interrogator
        interrogator.load()
        found.append(lambda image: interrogator.generate_caption(image.convert("RGB")))
    if deepbooru:
        from modules import deepbooru as host_deepbooru

        host_deepbooru.model.start()
        found.append(lambda image: host_deepbooru.model.tag_multi(image.convert("RGB")))
    return found


def release_captioners() -> None:
    """Move caption models back to RAM after a preprocessing run."""
    interrogator = getattr(shared, "interrogator", None)
    if interrogator is not None and hasattr(interrogator, "send_blip_to_ram"):
        interrogator.send_blip_to_ram()
    with contextlib.suppress(ImportError, AttributeError):
        from modules import deepbooru as host_deepbooru

        host_deepbooru.model.stop()


def extras_source_path(image: Any) -> str:
    """The input file of the image the Extras tab is processing, when it is known.

    ``images.read`` returns a corrected copy without ``filename``; in batch-from-directory mode the runner puts
    the file's path into ``shared.state.textinfo`` just before running the scripts.
    """
    name = getattr(image, "filename", "") or getattr(shared.state, "textinfo", "") or ""
    return name if isinstance(name, str) and Path(name).is_file() else ""

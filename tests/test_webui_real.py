"""Opt-in: check the real WebUI still has every name host.py uses (the fake host's contract), or, for a Forge main
checkout, every name forge_host.py and models/forge.py use (tests/support/fake_forge.py's contract).

Skipped unless SD_WEBUI_DIR points at an AUTOMATIC1111 WebUI or Forge checkout. The check runs in the WebUI's own
Python (SD_WEBUI_PYTHON, default <SD_WEBUI_DIR>/venv/bin/python, else this interpreter), imports the real
modules after the WebUI's own initialisation, and also imports our host.py there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEBUI = os.environ.get("SD_WEBUI_DIR")
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not WEBUI, reason="set SD_WEBUI_DIR to a WebUI checkout")]

CHECK = r"""
import inspect, json, sys
import torch
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
sys.argv = [sys.argv[0]]
from modules import initialize, shared_init
initialize.imports()
shared_init.initialize()
from modules import call_queue, devices, paths_internal, processing, script_callbacks, sd_hijack, sd_hijack_unet
from modules import sd_samplers, shared
from modules import sd_models
from modules import deepbooru, scripts_postprocessing, ui_components
from modules.textual_inversion import textual_inversion
sys.path.insert(0, EXTENSION_ROOT)
import lib_trainer.webui.host as host  # our glue imports cleanly against the real modules
sys.path.insert(0, "extensions-builtin/Lora")
import networks  # the built-in Lora extension's module, as host.py finds it in sys.modules
db = sd_hijack.model_hijack.embedding_db


def sdxl_surface():
    # what lib_trainer/models/sgm.py (and the stand-in in tests/support/sdxl.py) read, on the real classes
    from sgm.models import autoencoder, diffusion
    from sgm.modules.encoders import modules as enc
    from modules import sd_hijack_clip, sd_hijack_open_clip, sd_models_xl
    src = lambda obj: inspect.getsource(obj)
    wrapper_init = src(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.__init__)
    first_stage = getattr(autoencoder, "AutoencoderKLInferenceWrapper", None) or autoencoder.AutoencoderKL
    return [
        "self.embedders" in src(enc.GeneralConditioner.__init__),
        "input_key" in src(enc.AbstractEmbModel),
        all(f"self.{a}" in src(enc.FrozenCLIPEmbedder.__init__)
            for a in ("tokenizer", "transformer", "layer", "layer_idx")),
        all(f"self.{a}" in src(enc.FrozenOpenCLIPEmbedder2.__init__) for a in ("model", "layer", "legacy")),
        all(k in src(enc.FrozenOpenCLIPEmbedder2.encode_with_transformer) for k in ('"pooled"', "self.legacy")),
        '"penultimate"' in src(enc.FrozenOpenCLIPEmbedder2.text_transformer_forward),
        "outdim" in src(enc.ConcatTimestepEmbedderND.__init__) and callable(enc.ConcatTimestepEmbedderND.forward),
        "self.wrapped" in wrapper_init and "input_key" in wrapper_init,
        issubclass(sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords, torch.nn.Module),
        issubclass(sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords, torch.nn.Module),
        all(k in src(sd_models_xl.extend_sdxl) for k in ("parameterization", "alphas_cumprod", "VScaling")),
        all(k in src(sd_models_xl.get_learned_conditioning) for k in SIZE_KEYS),
        callable(getattr(diffusion.DiffusionEngine, "apply_model", None)),
        all(a in src(diffusion.DiffusionEngine) for a in ("self.conditioner", "self.first_stage_model",
                                                                  "self.scale_factor", "self.denoiser")),
        "self.quant_conv" in src(autoencoder) and "self.encoder" in src(autoencoder),
        first_stage is not None,
        "sdxl_clip_l_skip" in src(sd_hijack_clip),
    ]
state = shared.state
params = lambda f: list(inspect.signature(f).parameters)
print(json.dumps({
    "state": [hasattr(state, n) for n in ("begin", "end", "interrupt", "assign_current_image", "job", "job_no",
                                          "job_count", "textinfo", "interrupted", "skipped")],
    "opts": hasattr(shared.opts, "CLIP_stop_at_last_layers") and hasattr(shared.opts, "add_option"),
    "cmd_opts": [hasattr(shared.cmd_opts, n) for n in ("embeddings_dir", "hypernetwork_dir", "lowvram", "medvram",
                                                       "api", "nowebui", "api_auth", "hide_ui_dir_config")],
    "open_folder": params(__import__("modules.util", fromlist=["open_folder"]).open_folder) == ["path"],
    "option_info": hasattr(shared, "OptionInfo") and "restrict_api" in params(shared.OptionInfo.__init__),
    "reload_hypernetworks": callable(getattr(shared, "reload_hypernetworks", None)),
    "data_path": isinstance(paths_internal.data_path, str),
    "devices_autocast": params(devices.autocast) == ["disable"]
                        and "devices.autocast()" in inspect.getsource(sd_hijack_unet.apply_model),
    "queue_lock": hasattr(call_queue.queue_lock, "__enter__"),
    "embedding_db": params(db.load_textual_inversion_embeddings) == ["force_reload"]
                    and params(db.register_embedding_by_name) == ["embedding", "model", "name"],
    "create_embedding_from_data": params(textual_inversion.create_embedding_from_data)[:2] == ["data", "name"],
    "processing": all(hasattr(processing.StableDiffusionProcessing, n) for n in ("cached_c", "cached_uc"))
                  and {"sd_model", "do_not_save_grid", "do_not_save_samples", "do_not_reload_embeddings"}
                  <= set(params(processing.StableDiffusionProcessingTxt2Img.__init__))
                  and "override_settings" in params(processing.StableDiffusionProcessing.__init__)
                  and callable(processing.process_images),
    "samplers_map": isinstance(sd_samplers.samplers_map, dict),
    "all_samplers": bool(sd_samplers.all_samplers) and all(isinstance(s.name, str) for s in sd_samplers.all_samplers)
                    and host.sampler_names() == sorted({s.name for s in sd_samplers.all_samplers}),
    "callbacks": all(callable(getattr(script_callbacks, n, None))
                     for n in ("on_ui_tabs", "on_ui_settings", "on_app_started")),
    "sd_models": [callable(sd_models.list_models), "info" in params(sd_models.reload_model_weights),
                  callable(getattr(sd_models.CheckpointInfo, "register", None)),
                  "filename" in params(sd_models.CheckpointInfo.__init__), isinstance(sd_models.model_path, str),
                  hasattr(shared.cmd_opts, "ckpt_dir"), isinstance(shared.opts.data, dict)],
    "host_imported": host.__name__,
    "sdxl": sdxl_surface(),
    "extras": [hasattr(scripts_postprocessing, "ScriptPostprocessing"), callable(ui_components.InputAccordion),
               isinstance(paths_internal.models_path, str)]
              + [callable(getattr(shared.interrogator, n, None))
                 for n in ("load", "generate_caption", "send_blip_to_ram")]
              + [callable(getattr(deepbooru.model, n, None)) for n in ("start", "tag_multi", "stop")],
    "networks": [callable(getattr(networks, n, None)) for n in
                 ("convert_diffusers_name_to_compvis", "assign_network_names_to_compvis_modules",
                  "list_available_networks", "network_apply_weights")] + [isinstance(networks.loaded_networks, list),
                 hasattr(networks.re_x_proj, "match")],
}))
"""


FORGE_CHECK = r"""
import inspect, json, sys
sys.argv = [sys.argv[0], "--always-cpu", "--skip-torch-cuda-test"]
from modules_forge.initialization import initialize_forge
initialize_forge()
from modules import initialize
initialize.imports()
from modules import processing, sd_models, shared
from backend import memory_management, operations
from backend.diffusion_engine import base
from backend.nn import unet
from backend.patcher import lora
from backend.text_processing import classic_engine, textual_inversion
sys.path.insert(0, EXTENSION_ROOT)
import lib_trainer.webui.hosts as hosts
import lib_trainer.webui.forge_host as forge_host  # our glue imports cleanly against the real modules
sys.path.insert(0, "extensions-builtin/sd_forge_lora")
import network, networks  # the built-in LoRA extension's modules, as forge_host.py finds them in sys.modules
src = lambda obj: inspect.getsource(obj)
params = lambda f: list(inspect.signature(f).parameters)
ops = operations.ForgeOperations
print(json.dumps({
    "host_selected": hosts.host_module().__name__ == "lib_trainer.webui.forge_host",
    "memory": [callable(memory_management.unload_all_models), callable(memory_management.get_torch_device),
               "force" in params(memory_management.soft_empty_cache)],
    "forge_model_reload": callable(sd_models.forge_model_reload),
    "engine": [all(f"self.{a} =" in src(base.ForgeDiffusionEngine.__init__) for a in (
                   "forge_objects", "forge_objects_original", "forge_objects_after_applying_lora",
                   "current_lora_hash")),
               callable(base.ForgeObjects.shallow_copy),
               "forge_objects_after_applying_lora.shallow_copy()" in src(processing)],
    "lora": [params(lora.model_lora_keys_unet)[:2] == ["model", "key_map"],
             params(lora.model_lora_keys_clip)[:2] == ["model", "key_map"],
             params(lora.load_lora)[:2] == ["lora", "to_load"]],
    "networks": [hasattr(networks.load_lora_state_dict, "cache_clear"), callable(networks.list_available_networks),
                 isinstance(networks.available_networks, dict), isinstance(networks.available_network_aliases, dict),
                 networks.network is network, params(network.NetworkOnDisk.__init__) == ["self", "name", "filename"]],
    "embeddings": [params(textual_inversion.create_embedding_from_data)[:2] == ["data", "name"],
                   params(textual_inversion.EmbeddingDatabase.load_textual_inversion_embeddings) == ["self"],
                   params(textual_inversion.EmbeddingDatabase.register_embedding_by_name)
                   == ["self", "embedding", "name"]],
    "text_engine": all(f"self.{a} =" in src(classic_engine.ClassicTextProcessingEngine.__init__) for a in (
                       "embeddings", "text_projection", "minimal_clip_skip", "clip_skip", "final_layer_norm")),
    "layers": [hasattr(getattr(ops, n), "forward") and "self.parameters_manual_cast" in src(getattr(ops, n))
               for n in ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "Embedding")],
    "unet": [all(a in src(unet.BasicTransformerBlock.__init__) for a in (
                 "self.ff_in", "self.is_res", "self.norm3", "self.n_heads", "self.d_head", "self.disable_self_attn")),
             "x += n" in src(unet.BasicTransformerBlock._forward),  # why the copies use their own out-of-place copy
             {"value", "transformer_options"} <= set(params(unet.CrossAttention.forward)),
             params(unet.IntegratedUNet2DConditionModel.forward)[:6]
             == ["self", "x", "timesteps", "context", "y", "control"],
             all(n in src(unet.IntegratedUNet2DConditionModel) for n in (
                 "self.input_blocks", "self.middle_block", "self.output_blocks", "self.in_channels"))],
    "shared": [hasattr(shared, "sd_model"), hasattr(shared.opts, "CLIP_stop_at_last_layers")],
}))
"""


def _is_forge(webui: Path) -> bool:
    return (webui / "backend" / "diffusion_engine").is_dir()


def test_real_webui_has_the_host_surface_we_use():
    webui = Path(WEBUI)
    python = os.environ.get("SD_WEBUI_PYTHON") or next(
        (str(p) for p in (webui / "venv" / "bin" / "python", webui / "venv" / "Scripts" / "python.exe") if p.exists()),
        sys.executable,
    )
    env = {**os.environ, "IGNORE_CMD_ARGS_ERRORS": "1", "HF_HUB_OFFLINE": "1"}
    script = (FORGE_CHECK if _is_forge(webui) else CHECK).replace("EXTENSION_ROOT", repr(str(ROOT)))
    done = subprocess.run([python, "-c", script], cwd=webui, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in report.items() if v is False or (isinstance(v, list) and not all(v))}
    glue = "forge_host.py / models/forge.py" if _is_forge(webui) else "host.py"
    assert failed == {}, f"the WebUI lacks names {glue} uses: {failed}"

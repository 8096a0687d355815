"""A fake of exactly the Forge main surface lib_trainer/webui/forge_host.py and models/forge.py use.

``build_engine(ldm_model)`` turns a real tiny ldm model into Forge's layout: an engine with ``forge_objects``
(a KModel-like holder of the UNet, which keeps its LDM module names, and the predictor), HF CLIP in an
IntegratedCLIP-like holder with the token embedding wrapped for textual inversion, and the VAE; Linear layers
become a Forge-style layer that is NOT an ``nn.Linear``, convolutions a Forge-style ``nn.Conv2d`` subclass, and
every weight an inference tensor, as Forge creates them under ``torch.inference_mode``. ``install`` adds the
``backend`` modules to the fake ``modules`` of fake_webui. Written from HOST.md 2.5 and the documented behaviour,
not from Forge's code.
"""

from __future__ import annotations

import copy
import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.support import fake_webui, webui_lora_names

BACKEND = (
    "backend",
    "backend.diffusion_engine",
    "backend.memory_management",
    "backend.patcher",
    "backend.patcher.lora",
    "backend.text_processing",
    "backend.text_processing.textual_inversion",
)


class Linear(nn.Module):
    """Forge's ``ForgeOperations.Linear``: an ``nn.Module`` with weight/bias, cast to the input dtype."""

    def __init__(self, source: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = source.weight
        self.bias = source.bias
        self.parameters_manual_cast = False

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Conv2d):
    """Forge's ``ForgeOperations.Conv2d`` (a subclass with its own forward)."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class TextualInversionEmbedding(nn.Module):
    """Forge's ``CLIPEmbeddingForTextualInversion``: the token embedding, wrapped."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.weight = wrapped.weight

    def forward(self, ids):
        return self.wrapped(ids)


class CrossAttention(nn.Module):
    """Forge's ``CrossAttention`` call signature (``value``, ``transformer_options``) over ldm's attention."""

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        assert value is None, "the fake has no attention patches"
        return super().forward(x, context=context, mask=mask)


class BasicTransformerBlock(nn.Module):
    """Forge's transformer block as far as training meets it: the attention outputs and the feed-forward are added
    into ``x`` IN PLACE (``x += n``), after LayerNorm saved ``x`` for backward, so autograd refuses to train
    through the block as it is; attributes ``ff_in``, ``is_res``, ``n_heads``, ``d_head`` as in Forge."""

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        return self._forward(x, context, transformer_options)

    def _forward(self, x, context=None, transformer_options={}):  # noqa: B006
        extra = dict(transformer_options, n_heads=self.n_heads, dim_head=self.d_head)
        n = self.norm1(x)
        n = self.attn1(n, context=context if self.disable_self_attn else None, value=None, transformer_options=extra)
        x += n
        n = self.attn2(self.norm2(x), context=context, value=None, transformer_options=extra)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def _forge_blocks(unet: nn.Module) -> None:
    for module in unet.modules():
        name = type(module).__name__
        if name == "BasicTransformerBlock":
            module.__class__ = BasicTransformerBlock
            module.ff_in, module.is_res = False, True
            module.n_heads, module.d_head = module.attn1.heads, module.attn1.to_q.out_features // module.attn1.heads
        elif name == "CrossAttention" and type(module) is not CrossAttention:
            module.__class__ = type("CrossAttention", (CrossAttention, type(module)), {})


def _forge_layers(root: nn.Module) -> None:
    for module in list(root.modules()):
        for name, child in list(module._modules.items()):
            if type(child) is nn.Linear:
                module._modules[name] = Linear(child)
            elif type(child) is nn.Conv2d:
                child.__class__ = Conv2d
                child.parameters_manual_cast = False


def _inference_tensors(root: nn.Module) -> None:
    with torch.inference_mode():
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()


class EmbeddingDatabase:
    """A text engine's ``embeddings``: Forge's signatures (no force flag; register by name without a model)."""

    def __init__(self):
        self.reloads = 0
        self.registered: dict[str, Any] = {}

    def load_textual_inversion_embeddings(self):
        self.reloads += 1

    def register_embedding_by_name(self, embedding, name):
        self.registered[name] = embedding


class ForgeObjects(types.SimpleNamespace):
    """``backend.diffusion_engine.base.ForgeObjects``: unet, clip, vae; ``shallow_copy`` as processing uses it."""

    def shallow_copy(self):
        return ForgeObjects(**vars(self))


class Engine:
    """``backend.diffusion_engine.sd15.StableDiffusion`` as forge_host reads it."""

    def __init__(self, objects, text_engine, name: str):
        self.forge_objects = objects
        self.forge_objects_original = objects.shallow_copy()
        self.forge_objects_after_applying_lora = objects.shallow_copy()
        self.text_processing_engine = text_engine
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_inpaint = True, False, False, False
        self.cond_stage_model = self.first_stage_model = None
        self.current_lora_hash = "[['some.safetensors', 1.0]]"
        self.sd_checkpoint_info = types.SimpleNamespace(model_name=name, shorthash="0123456789", filename=None)


def build_engine(ldm_model: nn.Module, name: str = "tiny-sd1") -> Engine:
    """A Forge SD1 engine over copies of ``ldm_model``'s UNet, CLIP and VAE (the ldm model is not changed)."""
    unet = copy.deepcopy(ldm_model.model.diffusion_model)
    embedder = getattr(ldm_model.cond_stage_model, "wrapped", ldm_model.cond_stage_model)
    clip = nn.Module()
    clip.transformer = copy.deepcopy(embedder.transformer)
    vae = nn.Module()
    vae.encoder = copy.deepcopy(ldm_model.first_stage_model.encoder)
    vae.quant_conv = copy.deepcopy(ldm_model.first_stage_model.quant_conv)
    vae.scaling_factor, vae.shift_factor = float(ldm_model.scale_factor), 0.0
    _forge_blocks(unet)
    for root in (unet, clip, vae):
        _forge_layers(root)
    embeddings = clip.transformer.text_model.embeddings
    embeddings.token_embedding = TextualInversionEmbedding(embeddings.token_embedding)
    for root in (unet, clip, vae):
        _inference_tensors(root)
    alphas = ldm_model.alphas_cumprod.detach().float().clone()
    predictor = types.SimpleNamespace(
        prediction_type="epsilon", alphas_cumprod=alphas, sigmas=((1 - alphas) / alphas) ** 0.5
    )
    kmodel = types.SimpleNamespace(
        diffusion_model=unet, predictor=predictor, storage_dtype=torch.float32, computation_dtype=torch.float32
    )
    objects = ForgeObjects(
        unet=types.SimpleNamespace(model=kmodel),
        clip=types.SimpleNamespace(
            cond_stage_model=types.SimpleNamespace(clip_l=clip),
            tokenizer=types.SimpleNamespace(clip_l=embedder.tokenizer),
        ),
        vae=types.SimpleNamespace(first_stage_model=vae),
    )
    text_engine = types.SimpleNamespace(
        clip_skip=1, minimal_clip_skip=1, final_layer_norm=True, return_pooled=False, embeddings=EmbeddingDatabase()
    )
    return Engine(objects, text_engine, name)


def engine_state(engine: Engine) -> list[tuple[str, torch.Tensor, bool, bool, torch.device]]:
    """Every tensor of the engine's modules with its flags, for before/after comparisons."""
    objects = engine.forge_objects
    roots = {
        "unet": objects.unet.model.diffusion_model,
        "clip": objects.clip.cond_stage_model.clip_l,
        "vae": objects.vae.first_stage_model,
    }
    state = []
    for root_name, root in roots.items():
        for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
            state.append((f"{root_name}.{name}", tensor, tensor.requires_grad, tensor.is_inference(), tensor.device))
    return state


def _lora_keys_unet(kmodel, key_map):
    """ComfyUI-style map: ``lora_unet_<LDM path>`` for every UNet weight (diffusers names via ``load_lora``)."""
    for name, module in kmodel.diffusion_model.named_modules():
        if getattr(module, "weight", None) is not None:
            key_map["lora_unet_" + name.replace(".", "_")] = f"diffusion_model.{name}.weight"
    return key_map


def _lora_keys_clip(cond_stage_model, key_map):
    for name, module in cond_stage_model.clip_l.transformer.named_modules():
        if getattr(module, "weight", None) is not None:
            key_map["lora_te_" + name.replace(".", "_")] = f"clip_l.transformer.{name}.weight"
    return key_map


def _load_lora(lora: dict, to_load: dict) -> tuple[dict, dict]:
    """(matched, unmatched) as Forge's ``load_lora``: a module's keys match when its name or its LDM name (the
    WebUI rules for diffusers-style kohya names) is in ``to_load``."""
    matched, unmatched = {}, {}
    for key, value in lora.items():
        name = key.partition(".")[0]
        ldm = webui_lora_names.convert_diffusers_name_to_compvis(name, False).replace("diffusion_model_", "lora_unet_")
        (matched if name in to_load or ldm in to_load else unmatched)[key] = value
    return matched, unmatched


class NetworkOnDisk:
    """``network.NetworkOnDisk`` of Forge's sd_forge_lora extension: a name and its file."""

    def __init__(self, name, filename):
        self.name, self.filename = name, filename


def _lora_extension(engine: Engine, fake) -> types.ModuleType:
    """sd_forge_lora's ``networks`` module, and its effect on txt2img: a ``<lora:NAME:w>`` in the prompt is looked up
    by alias, read through the lru-cached ``load_lora_state_dict`` and matched with Forge's key maps (recorded in
    ``networks.applied`` with the tensors it read)."""
    import functools
    import re

    from safetensors.torch import load_file

    networks = types.ModuleType("networks")
    networks.network = types.SimpleNamespace(NetworkOnDisk=NetworkOnDisk)
    networks.available_networks, networks.available_network_aliases = {}, {}
    networks.applied, networks.listed = [], []
    networks.load_lora_state_dict = functools.lru_cache(maxsize=5)(lambda filename: load_file(filename))
    networks.list_available_networks = lambda: networks.listed.append(True)
    processing = sys.modules["modules.processing"]
    render = processing.process_images

    def process_images(p):
        for name in re.findall(r"<lora:([^:>]+):[^>]*>", p.prompt):
            entry = networks.available_network_aliases[name]
            lora = networks.load_lora_state_dict(entry.filename)
            objects = engine.forge_objects_original
            keys = _lora_keys_clip(objects.clip.cond_stage_model, _lora_keys_unet(objects.unet.model, {}))
            matched, unmatched = _load_lora(lora, keys)
            networks.applied.append({"name": name, "matched": len(matched), "unmatched": sorted(unmatched), "sd": lora})
            patched = types.SimpleNamespace(model=objects.unet.model, patches=lora)  # a patched clone, as Forge's
            engine.forge_objects_after_applying_lora = ForgeObjects(**{**vars(objects), "unet": patched})
            engine.current_lora_hash = str([[entry.filename, 1.0, 1.0, False]])
        return render(p)

    processing.process_images = process_images
    return networks


def install(engine: Engine, root: Path) -> types.SimpleNamespace:
    """fake_webui's ``modules`` around ``engine`` plus the ``backend`` modules forge_host imports."""
    fake = fake_webui.install(engine, root)
    mods = {name: types.ModuleType(name) for name in BACKEND}
    for name, module in mods.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    memory = mods["backend.memory_management"]
    memory.calls = []
    memory.unload_all_models = lambda: memory.calls.append("unload_all_models")
    memory.get_torch_device = lambda: torch.device("cpu")
    memory.soft_empty_cache = lambda force=False: memory.calls.append("soft_empty_cache")
    lora = mods["backend.patcher.lora"]
    lora.model_lora_keys_unet, lora.model_lora_keys_clip, lora.load_lora = _lora_keys_unet, _lora_keys_clip, _load_lora
    mods["backend.text_processing.textual_inversion"].create_embedding_from_data = fake_webui.create_embedding_from_data
    sys.modules["modules.sd_models"].forge_model_reload = lambda: memory.calls.append("forge_model_reload")
    for name, module in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, module)
        sys.modules[name] = module
    fake.memory = memory
    fake.networks = sys.modules["networks"] = _lora_extension(engine, fake)
    return fake


def uninstall() -> None:
    """Remove the fake backend and modules (and the glue imported against them)."""
    sys.modules.pop("networks", None)
    for name in [n for n in sys.modules if n == "backend" or n.startswith("backend.")]:
        del sys.modules[name]
    fake_webui.uninstall()

"""Adapter: ModelParts from a Forge main (2.x) diffusion engine, on trainable copies of its modules.

Forge builds its models under ``torch.inference_mode`` (its weights are inference tensors, which autograd refuses
to save for backward), with its own layer classes (``ForgeOperations.Linear`` is not an ``nn.Linear``; weights may
be stored in fp8 and cast in each forward) and under its own memory manager. Training therefore runs on copies:
``trainable_copy`` rebuilds a module tree with plain torch layers over fresh, gradient-capable tensors on the
training device, and Forge's own modules are only read. After the run the copies are dropped and Forge's model is
as it was. What it touches (duck-typed; nothing here imports Forge):
    engine.is_sd1 / is_sd2 / is_sdxl / is_inpaint, engine.forge_objects_original (else forge_objects):
        .unet.model (KModel): .diffusion_model (UNet with LDM module names: input_blocks, middle_block,
            output_blocks, time_embed, out; ``in_channels``; forward(x, timesteps, context=, y=,
            transformer_options=)), .predictor (prediction_type 'epsilon'/'v_prediction', alphas_cumprod, sigmas),
            .storage_dtype, .computation_dtype
        .clip.cond_stage_model.clip_l / clip_h / clip_g (``transformer``: HF CLIPTextModel; clip_g also has
            ``transformer.text_projection``), .clip.tokenizer.<same names> (HF CLIPTokenizer)
        .vae.first_stage_model: ``encoder``, ``quant_conv`` (or None), ``scaling_factor``, ``shift_factor``
    engine.text_processing_engine (SD1/SD2) or text_processing_engine_l / _g (SDXL): ``clip_skip``,
        ``minimal_clip_skip``, ``final_layer_norm``, ``text_projection`` (how Forge encodes prompts at inference)
    engine.embedder (SDXL): the sinusoidal size embedder, ``[N] -> [N, 256]``
Forge layer classes are recognised by their ``parameters_manual_cast`` attribute and class name.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lib_trainer.errors import UnsupportedModelError
from lib_trainer.models.kohya_names import ldm_key_table
from lib_trainer.models.parts import LatentEncoder, ModelParts
from lib_trainer.models.sgm import RESOLUTION as SDXL_RESOLUTION
from lib_trainer.models.sgm import SIZE_KEYS, SdxlConditioning, vae_encode_fn
from lib_trainer.models.text import DualTextEncoder, HFClipTextEncoder

PLAIN_LAYERS: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d,
    "GroupNorm": nn.GroupNorm,
    "LayerNorm": nn.LayerNorm,
    "Embedding": nn.Embedding,
}
FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
FORGE_ONLY = ("parameters_manual_cast", "forge_online_loras", "scale_weight", "dummy")


def trainable_copy(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``module``'s tree for training: the same classes and attributes, plain torch layers in place of
    Forge's, and every parameter and buffer a new ordinary tensor on ``device`` (floating ones in ``dtype`` when
    given, else in their own dtype; fp8 storage needs ``dtype``), with ``requires_grad`` off. ``module`` itself
    and its tensors are not changed. Quantized storage (bitsandbytes nf4/fp4, GGUF) is refused by name."""
    memo: dict[int, nn.Module] = {}

    def tensor(value: torch.Tensor, name: str, owner: nn.Module) -> torch.Tensor:
        _refuse_quantized(value, name, owner)
        target = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if target not in FLOAT_STORAGE and value.is_floating_point():
            raise UnsupportedModelError(f"a weight stored as {value.dtype} needs a compute dtype to be trained")
        out = value.detach().to(device=device, dtype=target, copy=True)
        scale = getattr(owner, "scale_weight", None) if name == "weight" else None
        if scale is not None:  # Forge's scaled fp8: the forward multiplies the cast weight by scale_weight
            out = out * scale.detach().to(device=device, dtype=target)
        return out

    def visit(node: nn.Module) -> nn.Module:
        if id(node) in memo:
            return memo[id(node)]
        new = copy.copy(node)
        memo[id(node)] = new
        for key in FORGE_ONLY:
            new.__dict__.pop(key, None)
        plain = PLAIN_LAYERS.get(type(node).__name__)
        if plain is not None and hasattr(node, "parameters_manual_cast"):
            new.__class__ = plain
        elif _is_forge_transformer_block(node):
            new.__class__ = _out_of_place_block(type(node))
        new._parameters = {
            name: None if p is None else nn.Parameter(tensor(p, name, node), requires_grad=False)
            for name, p in node._parameters.items()
            if name not in FORGE_ONLY
        }
        if isinstance(new, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) and "bias" not in new._parameters:
            new._parameters["bias"] = None
        new._buffers = {name: None if b is None else tensor(b, name, node) for name, b in node._buffers.items()}
        new._non_persistent_buffers_set = set(node._non_persistent_buffers_set)
        new._modules = {name: None if m is None else visit(m) for name, m in node._modules.items()}
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs"):
            if hooks in node.__dict__:
                new.__dict__[hooks] = type(node.__dict__[hooks])()
        new.__dict__.pop("forward", None)  # an instance forward (a host patch) is not copied
        new.train(False)
        return new

    with torch.inference_mode(False), torch.no_grad():
        return visit(module)


def _is_forge_transformer_block(node: nn.Module) -> bool:
    return type(node).__name__ == "BasicTransformerBlock" and all(
        hasattr(node, name) for name in ("_forward", "is_res", "ff_in", "norm3")
    )


@functools.cache
def _out_of_place_block(forge_class: type) -> type:
    """Forge's ``BasicTransformerBlock`` with the same computation out of place. Forge adds the attention outputs
    into ``x`` in place (``x += n``) after LayerNorm saved ``x`` for backward, which autograd refuses. Calls with
    transformer patches (never made in training: UnetCall passes fresh options) run Forge's own code."""

    def _forward(self, x, context=None, transformer_options={}):  # noqa: B006 (Forge's signature)
        if transformer_options.get("patches") or transformer_options.get("patches_replace"):
            return forge_class._forward(self, x, context, transformer_options)
        extra = dict(transformer_options, n_heads=self.n_heads, dim_head=self.d_head)
        if self.ff_in:
            skip = x
            x = self.ff_in(self.norm_in(x))
            if self.is_res:
                x = x + skip
        self_context = context if self.disable_self_attn else None
        n = self.attn1(self.norm1(x), context=self_context, value=None, transformer_options=extra)
        x = x + n
        if self.attn2 is not None:
            n = self.attn2(self.norm2(x), context=context, value=None, transformer_options=extra)
        x = x + n
        out = self.ff(self.norm3(x))
        return out + x if self.is_res else out

    return type(forge_class.__name__, (forge_class,), {"_forward": _forward, "__module__": __name__})


def _refuse_quantized(value: torch.Tensor, name: str, owner: nn.Module) -> None:
    kind = type(value).__name__
    storage = None
    if "GGUF" in kind.upper() or hasattr(value, "gguf_cls"):
        storage = "GGUF"
    elif "4bit" in kind.lower() or hasattr(value, "quant_state") or hasattr(value, "bnb_quantized"):
        storage = f"bitsandbytes {getattr(owner, 'quant_type', None) or 'nf4/fp4'}"
    elif not value.is_floating_point() and name == "weight":
        storage = f"quantized ({value.dtype})"
    if storage is not None:
        raise UnsupportedModelError(
            f"the loaded model's weights are stored as {storage} ({type(owner).__name__}.{name}); the trainer cannot "
            "train on top of them correctly. Load the same model as an fp16/bf16/fp8 checkpoint, or set Forge's "
            "'Diffusion in Low Bits' to Automatic, then train"
        )


class ForgeTextEncoder(HFClipTextEncoder):
    """One of Forge's HF CLIP text encoders (a trainable copy), encoding prompts as Forge's text engine does:
    ``hidden_states[-max(clip_skip, minimal_clip_skip)]``, the final LayerNorm when the engine applies it, padding
    after the first EOS with the tokenizer's pad id, and SDXL bigG's pooled output through its text projection."""

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: Any,
        skip: int,
        final_layer_norm: bool,
        pooled_projection: bool = False,
    ):
        super().__init__(SimpleNamespace(transformer=transformer, tokenizer=tokenizer), clip_skip=skip)
        self.final_layer_norm = final_layer_norm
        self.pooled_projection = pooled_projection
        pad = tokenizer.pad_token_id
        self.pad = self.eos if pad is None else int(pad)

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        transformer = self.embedder.transformer
        out = transformer(input_ids=ids, output_hidden_states=True)
        z = out.hidden_states[-self.clip_skip]
        if self.final_layer_norm:
            z = transformer.text_model.final_layer_norm(z)
        if not self.pooled_projection:
            return z
        return z, transformer.text_projection(out.pooler_output)


def prediction_type(kmodel: Any, label: str) -> str:
    """ "eps" or "v" from Forge's predictor; other kinds (flow, EDM, zero terminal SNR) are refused."""
    predictor = kmodel.predictor
    kind = PREDICTIONS.get(getattr(predictor, "prediction_type", None))
    alphas = getattr(predictor, "alphas_cumprod", None)
    if kind is None or alphas is None:
        raise UnsupportedModelError(
            f"{label} predicts {getattr(predictor, 'prediction_type', '?')!r} with {type(predictor).__name__}; the "
            "trainer supports eps- and v-prediction SD1/SD2/SDXL models"
        )
    sigmas = getattr(predictor, "sigmas", None)
    if sigmas is not None:
        expected = ((1 - alphas.double()) / alphas.double()) ** 0.5
        if sigmas.shape != expected.shape or not torch.allclose(sigmas.double().cpu(), expected.cpu(), rtol=1e-3):
            raise UnsupportedModelError(
                f"{label}'s noise schedule was changed (zero terminal SNR or a custom schedule), which the trainer "
                "does not train with; load it without that option"
            )
    return kind


def family_of(engine: Any, label: str) -> str:
    """ "sd1", "sd2" or "sdxl" from the engine's flags; other engines (Flux, SD3, Chroma) and inpainting models are
    refused by name."""
    family = next((name for name in ("sd1", "sd2", "sdxl") if getattr(engine, f"is_{name}", False)), None)
    if family is None:
        raise UnsupportedModelError(
            f"{label} is a {type(engine).__name__} model; the trainer supports SD1.x, SD2.x and SDXL checkpoints"
        )
    if getattr(engine, "is_inpaint", False):
        raise UnsupportedModelError(f"{label} is an inpainting model; training needs a plain text-to-image checkpoint")
    return family


def parts_from_forge(
    engine: Any,
    device: torch.device | str,
    clip_skip: int = 1,
    model_name: str | None = None,
    model_hash: str | None = None,
) -> ModelParts:
    """ModelParts over trainable copies of the engine's UNet, text encoder(s) and VAE encoder on ``device``.

    ``clip_skip`` is the run's (the engine's own minimum still applies, as at inference)."""
    label = model_name or "the loaded model"
    family = family_of(engine, label)
    objects = getattr(engine, "forge_objects_original", None) or engine.forge_objects
    kmodel = objects.unet.model
    prediction = prediction_type(kmodel, label)
    source_unet = kmodel.diffusion_model
    in_channels = getattr(source_unet, "in_channels", 4)
    if in_channels != 4:
        raise UnsupportedModelError(
            f"{label}'s UNet takes {in_channels} input channels (an inpainting or edit model); training needs a plain "
            "text-to-image checkpoint"
        )
    unet_dtype = _training_dtype(kmodel.storage_dtype, kmodel.computation_dtype, device)
    vae_source = objects.vae.first_stage_model
    if float(getattr(vae_source, "shift_factor", 0.0) or 0.0) != 0.0:
        raise UnsupportedModelError(f"{label}'s VAE uses a latent shift, which SD1/SD2/SDXL models do not")
    unet = trainable_copy(source_unet, device, unet_dtype)
    encoder = _text_encoder(engine, objects.clip, family, clip_skip, device, kmodel.computation_dtype)
    vae = _vae_encoder(vae_source, device)
    alphas = kmodel.predictor.alphas_cumprod.detach().to(device=device, dtype=torch.float32, copy=True)
    sdxl = family == "sdxl"
    return ModelParts(
        family=family,
        prediction=prediction,
        text_encoder=encoder,
        unet=unet,
        apply_model=UnetCall(unet, sdxl),
        latent_encoder=LatentEncoder(vae_encode_fn(vae), float(vae_source.scaling_factor)),
        alphas_cumprod=alphas,
        host_modules={"unet": unet, "text_encoder": _Group(encoder), "vae": vae},
        model_name=model_name,
        model_hash=model_hash,
        conditioning=SdxlConditioning(encoder, _size_embedders(engine)) if sdxl else None,
        resolution=SDXL_RESOLUTION if sdxl else 512,
        unet_lora_names=ldm_key_table if sdxl else None,
        size_conditioned=sdxl,
    )


class UnetCall:
    """``apply_model(x_t, t, cond)`` on the copied UNet: the DDPM step as ``timesteps``, the text conditioning as
    ``context`` (SDXL: the dict's ``crossattn``, with ``vector`` as ``y``), a fresh ``transformer_options`` each
    call (Forge's UNet writes into it)."""

    def __init__(self, unet: nn.Module, sdxl: bool):
        self.unet, self.sdxl = unet, sdxl

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if self.sdxl:
            return self.unet(x, t, context=cond["crossattn"], y=cond["vector"], transformer_options={})
        return self.unet(x, t, context=cond, transformer_options={})


class _Group(nn.Module):
    """The text encoders' copies as one module (for freezing and offloading)."""

    def __init__(self, encoder: Any):
        super().__init__()
        parts = getattr(encoder, "encoders", (encoder,))
        self.encoders = nn.ModuleList([part.embedder.transformer for part in parts])


def _training_dtype(storage: torch.dtype, computation: torch.dtype, device) -> torch.dtype | None:
    """The copies' dtype: fp32 on the CPU (Forge keeps fp16 text encoders there, whose LayerNorm fails on fp32
    input, and the CPU trains in fp32 anyway); elsewhere float storage as it is and fp8 in the computation dtype."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return None if storage in FLOAT_STORAGE else computation


def _engines(engine: Any, family: str) -> list[Any]:
    if family == "sdxl":
        return [engine.text_processing_engine_l, engine.text_processing_engine_g]
    return [engine.text_processing_engine]


def _text_encoder(engine: Any, clip: Any, family: str, clip_skip: int, device, computation: torch.dtype) -> Any:
    names = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}[family]
    encoders = []
    for name, text_engine in zip(names, _engines(engine, family), strict=True):
        source = getattr(clip.cond_stage_model, name)
        dtype = _training_dtype(next(source.parameters()).dtype, computation, device)
        copied = trainable_copy(source, device, dtype)
        transformer = copied.transformer
        embeddings = transformer.text_model.embeddings
        embeddings.token_embedding = getattr(embeddings.token_embedding, "wrapped", embeddings.token_embedding)
        skip = max(int(clip_skip or 1), int(getattr(text_engine, "minimal_clip_skip", 1) or 1))
        pooled = bool(getattr(text_engine, "return_pooled", False))
        if pooled and not hasattr(transformer, "text_projection"):
            raise UnsupportedModelError(f"Forge's {name} text encoder has no text projection for its pooled output")
        encoders.append(
            ForgeTextEncoder(
                transformer,
                getattr(clip.tokenizer, name),
                skip,
                bool(getattr(text_engine, "final_layer_norm", True)),
                pooled_projection=pooled,
            )
        )
    if family == "sdxl":
        return DualTextEncoder(*encoders)
    return encoders[0]


def _vae_encoder(vae: nn.Module, device) -> nn.Module:
    """A copy of the VAE's encoder half (encoder + quant_conv), which is all training uses."""
    holder = nn.Module()
    dtype = _training_dtype(next(vae.parameters()).dtype, torch.float32, device)
    holder.encoder = trainable_copy(vae.encoder, device, dtype)
    quant = getattr(vae, "quant_conv", None)
    holder.quant_conv = trainable_copy(quant, device, dtype) if quant is not None else nn.Identity()
    return holder


def _size_embedders(engine: Any) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """SDXL's size conditioning as Forge computes it: each number of each (height, width) / (top, left) pair
    through the engine's sinusoidal embedder, in original size, crop, target order."""
    embedder = engine.embedder

    def embed(pairs: torch.Tensor) -> torch.Tensor:
        flat = embedder(pairs.reshape(-1).float().cpu())
        return flat.reshape(pairs.shape[0], -1)

    return [(key, embed) for key in SIZE_KEYS]

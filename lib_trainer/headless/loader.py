"""Load an SD1.x / SD2.x checkpoint file into the real ldm classes, without the WebUI.

Like the WebUI: a ``.yaml`` beside the checkpoint is its config; otherwise the config is picked from the keys and
fitted to the tensors' shapes (``configs/``: the published v1 / v2 / v2-v hyper-parameters). v-prediction comes
from the yaml, a ``v_pred`` marker key, or for SD2 the WebUI's own test (a v-model's output at t=999 on a grey
latent is far below it). ``.ckpt``/``.pt`` files are read with ``weights_only=True``: a pickle that holds code is
refused, never run. The text encoders are built from configs (``encoders.py``); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lib_trainer.errors import FormatError, UnsupportedModelError
from lib_trainer.formats.files import load_torch_weights

CONFIGS = Path(__file__).parent / "configs"
UNET = "model.diffusion_model."
SD1_TEXT = "cond_stage_model.transformer.text_model."
SD2_TEXT = "cond_stage_model.model."
VAE = "first_stage_model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# checkpoints saved with transformers < 4.x name the CLIP text model without "text_model." (the WebUI maps them too)
OLD_CLIP_PREFIXES = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass
class LoadedModel:
    """What ``load_model`` built: the ldm model and what the host reports about it."""

    model: torch.nn.Module
    family: str  # "sd1" | "sd2"
    prediction: str  # "eps" | "v"
    name: str  # the file name without suffix, as the WebUI's model_name
    short_hash: str  # sha256 of the file, first 10 hex digits (the WebUI's shorthash)
    config_source: str  # "<file>.yaml" or "detected"
    path: Path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors, or a weights-only pickle); FormatError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"the checkpoint {path} does not exist; give the path of a .safetensors or .ckpt file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise FormatError(
                f"{path.name} cannot be read as a .safetensors file (it is damaged, truncated or of another kind: "
                f"{exc}); download or copy it again"
            ) from exc
    elif suffix in PICKLE_SUFFIXES:
        state = load_torch_weights(path, "a checkpoint")
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    else:
        raise FormatError(f"{path.name}: unknown checkpoint type {suffix!r}; give a .safetensors or .ckpt file")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path.name} holds no tensor state dict; it is not a Stable Diffusion checkpoint")
    return {_modern_key(k): v for k, v in state.items()}


def _modern_key(key: str) -> str:
    for old in OLD_CLIP_PREFIXES:
        if key.startswith("cond_stage_model.transformer." + old):
            return SD1_TEXT + key[len("cond_stage_model.transformer.") :]
    return key


def detect_family(state: Mapping[str, torch.Tensor], name: str) -> str:
    """ "sd1" or "sd2" from the keys; UnsupportedModelError for SDXL, inpainting and what is not SD at all."""
    if any(k.startswith("conditioner.") for k in state):
        raise UnsupportedModelError(
            f"{name} is an SDXL checkpoint; the headless trainer builds SD1.x and SD2.x models (SDXL's model code, "
            "sgm, is not installable from a package registry). Train SDXL in the WebUI's Trainer tab, where the "
            "WebUI provides sgm"
        )
    first = state.get(UNET + "input_blocks.0.0.weight")
    if first is None:
        raise UnsupportedModelError(
            f"{name} is not a Stable Diffusion checkpoint (it has no {UNET}input_blocks.0.0.weight); give an SD1.x "
            "or SD2.x model file (a LoRA, embedding or VAE file is not a checkpoint)"
        )
    if first.shape[1] != 4 or UNET + "label_emb.0.0.weight" in state:
        raise UnsupportedModelError(
            f"{name} takes {first.shape[1]} latent channels or a class embedding (an inpainting, instruct or unCLIP "
            "model); training needs a plain text-to-image checkpoint"
        )
    if SD2_TEXT + "transformer.resblocks.0.attn.in_proj_weight" in state:
        return "sd2"
    if SD1_TEXT + "embeddings.token_embedding.weight" in state:
        return "sd1"
    raise UnsupportedModelError(
        f"{name} has a UNet but no SD1 (CLIP ViT-L) or SD2 (OpenCLIP ViT-H) text encoder; give a full checkpoint"
    )


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype, prediction: str = "auto", work_dir: Path | None = None
) -> LoadedModel:
    """Build the ldm LatentDiffusion of the checkpoint at ``path`` on ``device``: UNet and text encoder in ``dtype``
    (the VAE and the noise schedule stay fp32, as the WebUI keeps the schedule)."""
    path = Path(path)
    state = read_state_dict(path)
    family = detect_family(state, path.name)
    yaml_file = path.with_suffix(".yaml")
    config = _user_config(yaml_file) if yaml_file.is_file() else _detected_config(state, family)
    params = config["params"]
    params["use_ema"] = False
    params["unet_config"].setdefault("params", {})["use_checkpoint"] = False
    params["unet_config"]["params"]["use_fp16"] = False
    guess_v = prediction == "auto" and not yaml_file.is_file() and "v_pred" not in state
    if prediction == "auto":
        prediction = "v" if "v_pred" in state else params.get("parameterization", "eps")
    params["parameterization"] = prediction
    with tempfile.TemporaryDirectory(prefix="trainer-clip-") as tmp:
        params["cond_stage_config"] = _offline_text_encoder(params["cond_stage_config"], state, family, Path(tmp))
        model = _build(config)
    _load_weights(model, state, path.name)
    del state
    if family == "sd2" and guess_v and _predicts_v(model):
        model.parameterization = "v"
    model.eval()
    _place(model, device, dtype)
    source = yaml_file.name if yaml_file.is_file() else "detected"
    return LoadedModel(model, family, model.parameterization, path.stem, file_hash(path), source, path)


def _user_config(yaml_file: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(yaml_file), resolve=True)
        model = config["model"]
        _ = model["params"]["unet_config"], model["params"]["cond_stage_config"]["target"]
    except Exception as exc:  # omegaconf's parse errors, a missing section
        raise FormatError(
            f"{yaml_file.name} beside the checkpoint is not a usable model config ({exc}); fix it, or move it away "
            "to let the trainer pick the config from the checkpoint"
        ) from exc
    return model


def _detected_config(state: Mapping[str, torch.Tensor], family: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{family}.yaml"))["model"]
    params = config["params"]
    unet = params["unet_config"]["params"]
    unet.update(unet_sizes(state))
    if family == "sd2":
        unet["num_head_channels"] = min(64, unet["model_channels"])
    params["first_stage_config"]["params"].update(vae_sizes(state))
    return config


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices ``{}`` takes in keys matching ``pattern`` (a prefix with one ``{}``)."""
    before, after = pattern.split("{}")
    rx = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    return len({m.group(1) for k in state if (m := rx.match(k))})


def unet_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The UNet's config sizes read from its tensors: channels, levels, res blocks, attention, context width."""
    channels = state[UNET + "input_blocks.0.0.weight"].shape[0]
    mult, attention, res_blocks, level, blocks_here, depth, linear = [], [], [], 0, 0, 1, False
    for i in range(1, _count(state, UNET + "input_blocks.{}.")):
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in state:  # a downsample ends the level
            res_blocks.append(blocks_here)
            level, blocks_here = level + 1, 0
            continue
        blocks_here += 1
        if blocks_here == 1:
            mult.append(state[block + "0.out_layers.3.weight"].shape[0] // channels)
        if block + "1.proj_in.weight" in state and 2**level not in attention:
            attention.append(2**level)
            depth = _count(state, block + "1.transformer_blocks.{}.")
            linear = state[block + "1.proj_in.weight"].dim() == 2
    res_blocks.append(blocks_here)
    context = next(v.shape[1] for k, v in state.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    return {
        "model_channels": channels,
        "channel_mult": mult,
        "num_res_blocks": max(res_blocks),
        "attention_resolutions": attention,
        "transformer_depth": depth,
        "context_dim": context,
        "use_linear_in_transformer": linear,
    }


def vae_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The VAE's ``embed_dim`` and ``ddconfig`` sizes read from its tensors."""
    enc = VAE + "encoder."
    ch = state[enc + "conv_in.weight"].shape[0]
    levels = _count(state, enc + "down.{}.block.0.conv1.weight")
    ch_mult = [state[f"{enc}down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
    return {
        "embed_dim": state[VAE + "quant_conv.weight"].shape[0] // 2,
        "ddconfig": {
            "double_z": True,
            "z_channels": state[enc + "conv_out.weight"].shape[0] // 2,
            "resolution": 256,
            "in_channels": state[enc + "conv_in.weight"].shape[1],
            "out_ch": state[VAE + "decoder.conv_out.weight"].shape[0],
            "ch": ch,
            "ch_mult": ch_mult,
            "num_res_blocks": _count(state, enc + "down.0.block.{}.conv1.weight"),
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }


def clip_text_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """SD1's HF CLIPTextConfig: the published ViT-L/14 text config with the checkpoint's widths and depth."""
    config = json.loads((CONFIGS / "clip-vit-l-14-text.json").read_text(encoding="utf-8"))
    config.pop("_comment", None)
    tokens = state[SD1_TEXT + "embeddings.token_embedding.weight"]
    width = tokens.shape[1]
    config.update(
        vocab_size=tokens.shape[0],
        hidden_size=width,
        projection_dim=width,
        intermediate_size=state[SD1_TEXT + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(state, SD1_TEXT + "encoder.layers.{}."),
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=state[SD1_TEXT + "embeddings.position_embedding.weight"].shape[0],
    )
    return config


def open_clip_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """SD2's open_clip model config: ViT-H-14's text tower with the checkpoint's widths and depth."""
    config = json.loads((CONFIGS / "open-clip-vit-h-14-text.json").read_text(encoding="utf-8"))
    config.pop("_comment", None)
    tokens = state[SD2_TEXT + "token_embedding.weight"]
    width = tokens.shape[1]
    mlp = state[SD2_TEXT + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    projection = state.get(SD2_TEXT + "text_projection")
    config["embed_dim"] = projection.shape[1] if projection is not None else width
    config["text_cfg"].update(
        context_length=state[SD2_TEXT + "positional_embedding"].shape[0],
        vocab_size=tokens.shape[0],
        width=width,
        heads=max(1, width // 64),
        layers=_count(state, SD2_TEXT + "transformer.resblocks.{}."),
    )
    if mlp != 4 * width:  # open_clip 2.20 (the WebUI's) has no other ratio; newer versions take it
        config["text_cfg"]["mlp_ratio"] = mlp / width
    return config


def _offline_text_encoder(
    cond: dict[str, Any], state: Mapping[str, torch.Tensor], family: str, tmp: Path
) -> dict[str, Any]:
    """The config's text embedder as an offline build of the same ldm class (sizes from the checkpoint)."""
    params = dict(cond.get("params") or {})
    params["device"] = "cpu"
    if family == "sd1":
        return {
            "target": "lib_trainer.headless.encoders.OfflineCLIPEmbedder",
            "params": _clip_params(params, state, tmp),
        }
    import open_clip

    known = open_clip.get_model_config(str(params.get("arch", "")))  # the config's arch, when open_clip has it
    config = open_clip_config(state)
    if known:  # its text tower exactly (heads cannot be read from shapes); the vision tower stays a token one
        config.update(embed_dim=known["embed_dim"], text_cfg=dict(known["text_cfg"]))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    arch = f"sd-trainer-text-{digest}"
    (tmp / f"{arch}.json").write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(tmp / f"{arch}.json")
    params.update(arch=arch, version=None)
    return {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": params}


def _clip_params(params: dict[str, Any], state: Mapping[str, torch.Tensor], tmp: Path) -> dict[str, Any]:
    """SD1's embedder settings: a ``version`` that is a local folder (as a yaml may give) supplies the text config
    and tokenizer files, as it would in the WebUI; else the published config fitted to the tensors and the CLIP
    tokenizer files written from open_clip's copy of the same vocabulary."""
    from transformers import CLIPTextConfig

    from lib_trainer.models.clip_files import write_clip_tokenizer

    version = Path(str(params.pop("version", "") or "")).expanduser()
    local = version.is_dir() and (version / "config.json").is_file()
    text_config = CLIPTextConfig.from_pretrained(str(version)).to_dict() if local else clip_text_config(state)
    tokenizer = version if local and (version / "vocab.json").is_file() else write_clip_tokenizer(tmp / "tokenizer")
    return {**params, "text_config": text_config, "tokenizer_dir": str(tokenizer)}


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip random initialisation while building (every parameter is then loaded from the checkpoint, or the
    load is refused), as the WebUI does: initialising a full model on the CPU takes longer than loading it."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "constant_", "zeros_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _build(config: dict[str, Any]) -> torch.nn.Module:
    from ldm.util import instantiate_from_config

    with _no_init():
        return instantiate_from_config(copy.deepcopy(config))


def _load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: a yaml beside the file that does not fit it
        raise FormatError(
            f"{name} does not fit its model config ({str(exc).splitlines()[-1].strip()}); if a .yaml lies beside it, "
            "check that it is this model's config"
        ) from exc
    params = {k for k, _ in model.named_parameters()}
    absent = sorted(k for k in missing if k in params)
    if absent:
        raise FormatError(
            f"{name} lacks {len(absent)} weight(s) of the model, e.g. {', '.join(absent[:3])}; it is incomplete or "
            "not the model its config describes"
        )


def _predicts_v(model: torch.nn.Module) -> bool:
    """The WebUI's test for SD2 checkpoints without a config: a v-model's output minus the input, at t=999 on a
    grey latent with a grey context, averages below -1 (an eps-model's stays near 0)."""
    unet = model.model.diffusion_model
    context = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    with torch.no_grad():
        x = torch.ones((1, 4, 8, 8)) * 0.5
        out = unet(x, torch.asarray([999]), context=torch.ones((1, 2, context)) * 0.5)
    return (out - x).mean().item() < -1


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """UNet and text encoder to ``dtype`` (ldm's UNet casts its input to ``.dtype``), the VAE kept fp32, the
    schedule buffers fp32; everything on ``device``."""
    for part in (model.model, model.cond_stage_model):
        part.to(dtype)
    model.model.diffusion_model.dtype = dtype
    model.to(device)
    model.cond_stage_model.device = str(device)
    for param in model.parameters():
        param.requires_grad_(False)


def file_hash(path: Path) -> str:
    """sha256 of the file, first 10 hex digits (what the WebUI shows and records as the model hash)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]

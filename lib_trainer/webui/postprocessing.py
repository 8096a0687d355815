"""Extras-tab scripts "Trainer: crop" and "Trainer: caption" (names distinct from the WebUI's built-ins).

scripts/trainer.py re-exports the two classes so the WebUI registers them; the base class comes from
host.py (the only file importing the WebUI). The work itself is lib_trainer.data's.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lib_trainer.data.captions import read_caption
from lib_trainer.data.crop import FocalWeights, focal_crop
from lib_trainer.data.preprocess import PreprocessConfig, caption_image, merge_caption, target_size
from lib_trainer.webui.hosts import host_module

host = host_module()

Base = host.postprocessing_script_base()


class TrainerCropScript(Base):
    """Resize and crop to the training size (or nearest bucket) around faces, detail and edges."""

    name = "Trainer: crop"
    order = 4015

    def ui(self):
        with host.input_accordion()(False, label="Trainer: crop (focal point)") as enable:
            with gr.Row():
                width = gr.Slider(64, 2048, value=512, step=64, label="Width", elem_id="trainer_pp_width")
                height = gr.Slider(64, 2048, value=512, step=64, label="Height", elem_id="trainer_pp_height")
            buckets = gr.Checkbox(False, label="Nearest aspect-ratio bucket of about width x height pixels")
            with gr.Row():
                face = gr.Slider(0.0, 1.0, value=0.9, step=0.05, label="Face weight")
                entropy = gr.Slider(0.0, 1.0, value=0.15, step=0.05, label="Entropy weight")
                edges = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Edges weight")
            debug = gr.Checkbox(False, label="Also save a debug image")
        return {
            "enable": enable,
            "width": width,
            "height": height,
            "buckets": buckets,
            "face": face,
            "entropy": entropy,
            "edges": edges,
            "debug": debug,
        }

    def process_firstpass(self, pp, **kwargs):
        pp.trainer_source = getattr(pp, "trainer_source", "") or host.extras_source_path(pp.image)

    def process(self, pp, enable, width, height, buckets, face, entropy, edges, debug):
        if not enable:
            return
        config = PreprocessConfig(
            input_dir=".", output_dir="-", width=int(width), height=int(height), buckets=bool(buckets)
        )
        cropped, view = focal_crop(
            pp.image, target_size(pp.image, config), FocalWeights(face, entropy, edges), host.yunet_model(), bool(debug)
        )
        pp.image = cropped
        pp.info["Trainer crop"] = f"{cropped.width}x{cropped.height}"
        if view is not None:
            pp.extra_images.append(pp.create_copy(view, nametags=["focal-debug"], disable_processing=True))


class TrainerCaptionScript(Base):
    """BLIP caption and/or DeepBooru tags through the host's captioners, merged with an existing caption."""

    name = "Trainer: caption"
    order = 4045

    def ui(self):
        with host.input_accordion()(False, label="Trainer: caption") as enable:
            models = gr.CheckboxGroup(["BLIP", "DeepBooru"], value=["DeepBooru"], label="Captioners")
            trigger = gr.Textbox(label="Trigger word (put first)", value="")
            policy = gr.Radio(
                ["keep", "replace", "prepend", "append"],
                value="keep",
                label="When the image already has a .txt caption",
            )
        return {"enable": enable, "models": models, "trigger": trigger, "policy": policy}

    def process_firstpass(self, pp, **kwargs):
        pp.trainer_source = getattr(pp, "trainer_source", "") or host.extras_source_path(pp.image)

    def process(self, pp, enable, models, trigger, policy):
        if not enable:
            return
        source = getattr(pp, "trainer_source", "")
        existing = read_caption(Path(source), ".txt") if source else None
        new = caption_image(pp.image, host.captioners("BLIP" in models, "DeepBooru" in models))
        if pp.caption:
            new = f"{pp.caption}, {new}" if new else pp.caption
        pp.caption = merge_caption(existing, new, policy, trigger.strip())

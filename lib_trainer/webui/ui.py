"""The Trainer tab (gradio 3.41 API, also run under Forge's gradio 4 shims). No torch math here.

Controls come from form.TI_FIELDS; Train submits a job to the same JobManager the REST API uses, and
javascript/trainer.js polls /trainer/v1/jobs/{id} to draw the progress bar, the loss chart and previews.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from lib_trainer.errors import TrainerError
from lib_trainer.webui.form import TI_FIELDS, FormField, default_values, to_config_dict
from lib_trainer.webui.jobs import JobManager

PREVIEW_DEFAULTS = {
    "prompt": "a photo of [name]",
    "negative_prompt": "",
    "steps": 20,
    "sampler": "Euler a",
    "cfg_scale": 7.0,
    "seed": -1,
    "width": 512,
    "height": 512,
}


def build_component(field: FormField, value: Any) -> gr.components.Component:
    """A gradio component for one form field, elem_id ``trainer_<path>``."""
    elem_id = "trainer_" + field.path.replace(".", "_")
    common = {"label": field.label, "elem_id": elem_id}
    if field.info:
        common["info"] = field.info
    if field.kind == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if field.kind == "slider":
        return gr.Slider(minimum=field.minimum, maximum=field.maximum, step=field.step, value=value, **common)
    if field.kind in ("int", "number"):
        return gr.Number(value=value, precision=0 if field.kind == "int" else None, **common)
    if field.kind == "dropdown":
        return gr.Dropdown(choices=list(field.choices), value=value, allow_custom_value=True, **common)
    if field.kind == "radio":
        return gr.Radio(choices=list(field.choices), value=value, **common)
    return gr.Textbox(value=value, lines=1, **common)


def create_tab(
    manager: JobManager, create_embedding: Callable[[dict], Any], model_label: Callable[[], str], samplers: list[str]
) -> gr.Blocks:
    """Build the Trainer tab's Blocks."""
    defaults = default_values()
    with gr.Blocks(analytics_enabled=False) as tab, gr.Column(elem_id="trainer_root"):
        model_info = gr.Markdown(elem_id="trainer_model_info")
        with gr.Tabs(elem_id="trainer_tabs"):
            with gr.Tab("Embedding", elem_id="trainer_tab_embedding"):
                components = _embedding_controls(defaults)
                preview = _preview_controls(samplers)
                _run_controls(manager, components, preview, create_embedding)
            for title in ("Hypernetwork", "LoRA", "Dataset"):
                with gr.Tab(title, elem_id=f"trainer_tab_{title.lower()}"):
                    gr.Markdown(f"{title} training arrives in a later version of the trainer.")
        tab.load(fn=lambda: f"**Loaded model:** {model_label()}", inputs=[], outputs=[model_info])
    return tab


def _embedding_controls(defaults: dict[str, Any]) -> dict[str, gr.components.Component]:
    groups = {"Embedding": "embedding.", "Dataset": "data.", "Training": "train."}
    components: dict[str, gr.components.Component] = {}
    for title, prefix in groups.items():
        with gr.Accordion(title, open=title != "Training", elem_id=f"trainer_acc_{title.lower()}"):
            for field in TI_FIELDS:
                if field.path.startswith(prefix) or (prefix == "embedding." and "." not in field.path):
                    components[field.path] = build_component(field, defaults[field.path])
    return components


def _preview_controls(samplers: list[str]) -> dict[str, gr.components.Component]:
    with gr.Accordion("Previews (rendered by txt2img)", open=False, elem_id="trainer_acc_previews"):
        d = PREVIEW_DEFAULTS
        return {
            "prompt": gr.Textbox(
                label="Prompt ([name] = the embedding)", value=d["prompt"], elem_id="trainer_preview_prompt"
            ),
            "negative_prompt": gr.Textbox(label="Negative prompt", value="", elem_id="trainer_preview_negative"),
            "steps": gr.Slider(
                1, 150, value=d["steps"], step=1, label="Sampling steps", elem_id="trainer_preview_steps"
            ),
            "sampler": gr.Dropdown(
                choices=samplers,
                value=d["sampler"] if d["sampler"] in samplers else samplers[0],
                label="Sampler",
                elem_id="trainer_preview_sampler",
            ),
            "cfg_scale": gr.Slider(
                1.0, 30.0, value=d["cfg_scale"], step=0.5, label="CFG scale", elem_id="trainer_preview_cfg"
            ),
            "seed": gr.Number(value=d["seed"], precision=0, label="Seed", elem_id="trainer_preview_seed"),
            "width": gr.Slider(64, 2048, value=d["width"], step=64, label="Width", elem_id="trainer_preview_width"),
            "height": gr.Slider(64, 2048, value=d["height"], step=64, label="Height", elem_id="trainer_preview_height"),
        }


def _run_controls(manager, components, preview, create_embedding) -> None:
    with gr.Row():
        create_btn = gr.Button("Create embedding", elem_id="trainer_create")
        train_btn = gr.Button("Train", variant="primary", elem_id="trainer_train")
        interrupt_btn = gr.Button("Interrupt", elem_id="trainer_interrupt")
        save_btn = gr.Button("Save now", elem_id="trainer_save_now")
    status = gr.HTML(elem_id="trainer_status")
    job_id = gr.Textbox(visible=False, elem_id="trainer_job_id")
    gr.HTML(
        '<div id="trainer_progress"></div><canvas id="trainer_loss_chart" width="640" height="200"></canvas>'
        '<div id="trainer_previews"></div>',
        elem_id="trainer_live",
    )
    paths, controls = list(components), list(components.values())
    preview_keys, preview_controls = list(preview), list(preview.values())

    def train(*values):
        config = to_config_dict(dict(zip(paths, values[: len(paths)], strict=True)))
        settings = dict(zip(preview_keys, values[len(paths) :], strict=True))
        try:
            job = manager.submit("textual_inversion", config, settings)
        except TrainerError as exc:
            raise gr.Error(str(exc)) from exc
        return job.id, f"Job {job.id} queued."

    def create(*values):
        config = to_config_dict(dict(zip(paths, values, strict=True)))
        try:
            path = create_embedding(config["embedding"])
        except TrainerError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Created {path}."

    def interrupt(current):
        return f"Interrupt requested for job {current}." if current and manager.cancel(current) else "No job running."

    def save_now(current):
        job = manager.get(current) if current else None
        if job is not None:
            job.save_requested = True
        return "Saving at the next step." if job else "No job running."

    train_btn.click(fn=train, inputs=controls + preview_controls, outputs=[job_id, status])
    create_btn.click(fn=create, inputs=controls, outputs=[status])
    interrupt_btn.click(fn=interrupt, inputs=[job_id], outputs=[status])
    save_btn.click(fn=save_now, inputs=[job_id], outputs=[status])

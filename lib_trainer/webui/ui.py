"""The Trainer tab (gradio 3.41 API, also run under Forge's gradio 4 shims). No torch math here.

Each method's controls come from form.FORMS; its Train button submits a job to the JobManager the REST API
uses. One run panel (interrupt, save now, progress, loss chart, previews) serves every method:
javascript/trainer.js polls /trainer/v1/jobs/{id} for the job whose id sits in ``#trainer_job_id``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import gradio as gr

from lib_trainer.errors import TrainerError
from lib_trainer.webui.form import FORMS, FormField, default_values, size_defaults, to_config_dict
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
GROUPS = {
    "textual_inversion": {"Embedding": ("embedding.", "resume_from"), "Dataset": ("data.",), "Training": ("train.",)},
    "lora": {
        "Network": ("network.", "resume_from", "epochs", "save_every_epochs"),
        "Dataset": ("data.",),
        "Training": ("train.",),
    },
    "hypernetwork": {"Hypernetwork": ("hypernetwork.", "resume_from"), "Dataset": ("data.",), "Training": ("train.",)},
    "preprocess": {"Prepare a training folder": ("",)},
}


def build_component(field: FormField, value: Any, method: str) -> gr.components.Component:
    """A gradio component for one form field, elem_id ``trainer_<method>_<path>``."""
    elem_id = f"trainer_{method}_" + field.path.replace(".", "_")
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
    manager: JobManager,
    actions: dict[str, Callable[[dict], Any]],
    model_label: Callable[[], str],
    samplers: list[str],
    model_side: Callable[[], int] = lambda: 512,
) -> gr.Blocks:
    """Build the Trainer tab's Blocks. ``actions``: "embedding"/"hypernetwork" create files, "report" checks data;
    ``model_side``: the loaded model's training side, which the size controls start at."""
    with gr.Blocks(analytics_enabled=False) as tab, gr.Column(elem_id="trainer_root"):
        model_info = gr.Markdown(elem_id="trainer_model_info")
        job_id = gr.Textbox(visible=False, elem_id="trainer_job_id")
        status = gr.HTML(elem_id="trainer_status")
        forms, checks = {}, {}
        with gr.Tabs(elem_id="trainer_tabs"):
            with gr.Tab("Embedding", elem_id="trainer_tab_embedding"):
                forms["textual_inversion"] = _method_controls("textual_inversion")
                checks["textual_inversion"] = gr.Button("Check dataset", elem_id="trainer_textual_inversion_check")
                create_btn = gr.Button("Create embedding", elem_id="trainer_create")
                train_ti = gr.Button("Train embedding", variant="primary", elem_id="trainer_train")
            with gr.Tab("LoRA", elem_id="trainer_tab_lora"):
                forms["lora"] = _method_controls("lora")
                checks["lora"] = gr.Button("Check dataset", elem_id="trainer_lora_check")
                train_lora = gr.Button("Train LoRA", variant="primary", elem_id="trainer_train_lora")
            with gr.Tab("Hypernetwork", elem_id="trainer_tab_hypernetwork"):
                forms["hypernetwork"] = _method_controls("hypernetwork")
                checks["hypernetwork"] = gr.Button("Check dataset", elem_id="trainer_hypernetwork_check")
                gr.Markdown(
                    "Hypernetworks need low learning rates: 1e-5 is a safe start; above 1e-4 runs often diverge."
                )
                create_hn = gr.Button("Create hypernetwork", elem_id="trainer_create_hypernetwork")
                train_hn = gr.Button("Train hypernetwork", variant="primary", elem_id="trainer_train_hypernetwork")
            with gr.Tab("Dataset", elem_id="trainer_tab_dataset"):
                prepare = _method_controls("preprocess")
                run_prepare = gr.Button("Prepare folder", variant="primary", elem_id="trainer_run_preprocess")
                gr.Markdown("The same steps run per image in the Extras tab as *Trainer: crop* and *Trainer: caption*.")
        preview = _preview_controls(samplers)
        _run_panel(manager, job_id, status)
        _wire_train(manager, train_ti, "textual_inversion", forms["textual_inversion"], preview, job_id, status)
        _wire_train(manager, train_lora, "lora", forms["lora"], preview, job_id, status)
        _wire_train(manager, train_hn, "hypernetwork", forms["hypernetwork"], preview, job_id, status)
        _wire_train(manager, run_prepare, "preprocess", prepare, {}, job_id, status)
        _wire_create(actions["embedding"], create_btn, forms["textual_inversion"], status, "embedding")
        _wire_create(actions["hypernetwork"], create_hn, forms["hypernetwork"], status, "hypernetwork")
        for method, components in forms.items():
            _wire_report(actions["report"], checks[method], components, status)
        sized = [(f"preview.{k}", c) for k, c in preview.items() if k in ("width", "height")]
        size_paths = set(size_defaults(1024))
        sized += [(p, c) for components in forms.values() for p, c in components.items() if p in size_paths]
        tab.load(
            fn=lambda: _on_load(model_label, model_side, sized),
            inputs=[],
            outputs=[model_info, *(c for _, c in sized)],
        )
    return tab


def _on_load(model_label: Callable[[], str], model_side: Callable[[], int], sized: list) -> list:
    """The model line, and size controls at the loaded model's defaults (SDXL: 1024); others unchanged."""
    try:
        defaults = size_defaults(model_side())
    except Exception:  # no model loaded yet: keep the form's values
        defaults = {}
    return [
        f"**Loaded model:** {model_label()}",
        *(gr.update(value=defaults[p]) if p in defaults else gr.update() for p, _ in sized),
    ]


def _method_controls(method: str) -> dict[str, gr.components.Component]:
    defaults = default_values(method)
    fields = FORMS[method][1]
    components: dict[str, gr.components.Component] = {}
    for title, prefixes in GROUPS[method].items():
        with gr.Accordion(
            title, open=title != "Training", elem_id=f"trainer_{method}_acc_{title.lower().replace(' ', '_')}"
        ):
            for field in fields:
                if field.path.startswith(prefixes) and field.path not in components:
                    components[field.path] = build_component(field, defaults[field.path], method)
    return components


def _preview_controls(samplers: list[str]) -> dict[str, gr.components.Component]:
    d = PREVIEW_DEFAULTS
    with gr.Accordion("Previews (rendered by txt2img)", open=False, elem_id="trainer_acc_previews"):
        return {
            "prompt": gr.Textbox(
                label="Prompt ([name] = the embedding/LoRA name)", value=d["prompt"], elem_id="trainer_preview_prompt"
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


def _run_panel(manager: JobManager, job_id, status) -> None:
    with gr.Row():
        interrupt_btn = gr.Button("Interrupt", elem_id="trainer_interrupt")
        save_btn = gr.Button("Save now", elem_id="trainer_save_now")
    gr.HTML(
        '<div id="trainer_progress"></div><canvas id="trainer_loss_chart" width="640" height="200"></canvas>'
        '<div id="trainer_previews"></div>',
        elem_id="trainer_live",
    )

    def interrupt(current):
        return f"Interrupt requested for job {current}." if current and manager.cancel(current) else "No job running."

    def save_now(current):
        job = manager.get(current) if current else None
        if job is not None:
            job.save_requested = True
        return "Saving at the next step." if job else "No job running."

    interrupt_btn.click(fn=interrupt, inputs=[job_id], outputs=[status])
    save_btn.click(fn=save_now, inputs=[job_id], outputs=[status])


def _wire_train(manager: JobManager, button, method: str, components, preview, job_id, status) -> None:
    paths, controls = list(components), list(components.values())
    preview_keys, preview_controls = list(preview), list(preview.values())
    fields = FORMS[method][1]

    def train(*values):
        config = to_config_dict(dict(zip(paths, values[: len(paths)], strict=True)), fields)
        settings = dict(zip(preview_keys, values[len(paths) :], strict=True))
        try:
            job = manager.submit(method, config, settings)
        except TrainerError as exc:
            raise gr.Error(str(exc)) from exc
        return job.id, f"Job {job.id} queued."

    button.click(fn=train, inputs=controls + preview_controls, outputs=[job_id, status])


def _wire_create(create_fn, button, components, status, section: str) -> None:
    paths, controls = list(components), list(components.values())
    fields = FORMS["textual_inversion" if section == "embedding" else section][1]

    def create(*values):
        config = to_config_dict(dict(zip(paths, values, strict=True)), fields)
        try:
            path = create_fn(config[section])
        except TrainerError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Created {path}."

    button.click(fn=create, inputs=controls, outputs=[status])


def _wire_report(report_fn, button, components, status) -> None:
    data_paths = [p for p in components if p.startswith("data.")]

    def check(*values):
        settings = {path.split(".", 1)[1]: value for path, value in zip(data_paths, values, strict=True)}
        for key in ("width", "height", "keep_tags", "bucket_min_side", "bucket_max_side", "bucket_step"):
            if isinstance(settings.get(key), float):
                settings[key] = int(settings[key])
        try:
            report = report_fn(settings)
        except TrainerError as exc:
            raise gr.Error(str(exc)) from exc
        return format_report(report)

    button.click(fn=check, inputs=[components[p] for p in data_paths], outputs=[status])


def format_report(report: dict[str, Any]) -> str:
    """The dataset report as a short HTML summary for the status area."""
    tags = {}
    for folder_tags in report["tag_frequency"].values():
        for tag, count in folder_tags.items():
            tags[tag] = tags.get(tag, 0) + count
    top = ", ".join(f"{html.escape(t)} ({n})" for t, n in sorted(tags.items(), key=lambda kv: -kv[1])[:15])
    folders = ", ".join(
        f"{html.escape(name)}: {s['img_count']} x{s['n_repeats']}" for name, s in report["folders"].items()
    )
    buckets = ", ".join(f"{size}: {n}" for size, n in report["buckets"].items())
    lines = [
        f"<b>{report['images']} images</b> ({report['images_with_repeats']} with repeats) - {folders}",
        f"Buckets: {buckets or '-'}",
        f"Top tags: {top or '-'}",
    ]
    for key, label in (
        ("missing_captions", "No caption"),
        ("too_small", "Smaller than their bucket"),
        ("over_length_captions", "Captions over 75 tokens"),
        ("unreadable", "Unreadable"),
    ):
        items = report[key]
        if items:
            shown = ", ".join(
                html.escape(
                    i if isinstance(i, str) else f"{i['file']} ({i.get('reason') or i.get('tokens') or i.get('size')})"
                )
                for i in items[:10]
            )
            lines.append(f"{label} ({len(items)}): {shown}")
    return "<div class='trainer-report'>" + "<br>".join(lines) + "</div>"

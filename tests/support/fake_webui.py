"""A small, honest fake of exactly the WebUI surface lib_trainer/webui/host.py uses (its docstring lists it).

``install(model, root)`` puts fake ``modules.*`` into ``sys.modules`` around a real tiny ldm model, so the real
host.py, jobs.py, api.py and ui.py run against it. tests/test_webui_real.py checks the same names against
a real WebUI checkout when SD_WEBUI_DIR is set.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

MODULE_NAMES = (
    "modules",
    "modules.shared",
    "modules.paths_internal",
    "modules.call_queue",
    "modules.sd_hijack",
    "modules.processing",
    "modules.sd_samplers",
    "modules.sd_models",
    "modules.script_callbacks",
    "modules.textual_inversion",
    "modules.textual_inversion.textual_inversion",
    "modules.scripts_postprocessing",
    "modules.ui_components",
    "modules.deepbooru",
    "modules.devices",
    "modules.util",
)


class FakeState:
    """modules.shared_state.State: the fields and methods host.py uses."""

    def __init__(self):
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.interrupted = self.skipped = self.stopping_generation = False
        self.current_image, self.id_live_preview = None, 0
        self.begun: list[str] = []

    def begin(self, job="(unknown)"):
        self.begun.append(job)
        self.job, self.job_no, self.job_count = job, 0, -1
        self.interrupted = self.skipped = False

    def end(self):
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image, self.id_live_preview = image, self.id_live_preview + 1


def host_tokenize(model) -> Any:
    """``cond_stage_model.tokenize`` of the WebUI's wrappers: token ids without BOS/EOS (HF CLIP or open_clip)."""
    cond = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
    if hasattr(cond, "tokenizer"):
        return lambda text: list(cond.tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])
    from open_clip import tokenizer

    return lambda text: list(tokenizer._tokenizer.encode(text))


class FakeEmbeddingDb:
    """sd_hijack.model_hijack.embedding_db: records reloads; registers and finds names the WebUI's way.

    The WebUI registers an embedding under the token ids of its name (``ids[0]`` must exist) and, in a prompt,
    checks at every token position whether the ids of a registered name follow, longest name first.
    """

    def __init__(self, model=None):
        self.reloads: list[bool] = []
        self.registered: dict[str, Any] = {}
        self.ids_lookup: dict[int, list[tuple[list[int], str]]] = {}
        self.tokenize = host_tokenize(model) if model is not None else None

    def load_textual_inversion_embeddings(self, force_reload=False):
        self.reloads.append(force_reload)

    def register_embedding_by_name(self, embedding, model, name):
        self.registered[name] = embedding
        ids = self.tokenize(name)
        first = ids[0]  # a name without tokens fails here, as in the WebUI
        entries = [e for e in self.ids_lookup.get(first, []) if e[1] != name] + [(ids, name)]
        self.ids_lookup[first] = sorted(entries, key=lambda e: len(e[0]), reverse=True)

    def found_in(self, prompt: str) -> list[str]:
        """Names of the registered embeddings the WebUI finds in ``prompt`` (find_embedding_at_position)."""
        tokens, found, i = self.tokenize(prompt), [], 0
        while i < len(tokens):
            match = next((e for e in self.ids_lookup.get(tokens[i], []) if tokens[i : i + len(e[0])] == e[0]), None)
            if match is None:
                i += 1
            else:
                found.append(match[1])
                i += len(match[0])
        return found


class FakeEmbedding:
    def __init__(self, vec, name):
        self.vec, self.name = vec, name


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    """Same acceptance rule as the WebUI's: SDXL's clip_l + clip_g (every value a tensor), else one tensor."""
    if "clip_l" in data and "clip_g" in data:
        return FakeEmbedding({k: v.detach() for k, v in data.items()}, name)
    assert len(data) == 1, "embedding file has multiple terms in it"
    return FakeEmbedding(next(iter(data.values())), name)


class StableDiffusionProcessing:
    """Class-level conditioning caches, shared by all instances as in the WebUI."""

    cached_c: ClassVar[list] = ["stale", "stale"]
    cached_uc: ClassVar[list] = ["stale", "stale"]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(
        self, sd_model=None, do_not_save_grid=False, do_not_save_samples=False, do_not_reload_embeddings=False
    ):
        self.sd_model = sd_model
        self.closed = False
        self.override_settings = {}

    def close(self):
        self.closed = True


class Processed:
    def __init__(self, images):
        self.images = images


def process_images(p):
    """Renders a flat image of the requested size; advances the job counter like the real one."""
    shared = sys.modules["modules.shared"]
    shared.state.job_no += 1
    shared.rendered.append(
        {"prompt": p.prompt, "sampler": p.sampler_name, "size": (p.width, p.height), "override": p.override_settings}
    )
    return Processed([Image.new("RGB", (p.width, p.height), "gray")])


class FakeCheckpointInfo:
    """modules.sd_models.CheckpointInfo: a file's title, registered in checkpoints_list."""

    def __init__(self, filename):
        self.filename, self.title = filename, f"{Path(filename).name} [0123456789]"

    def register(self):
        sys.modules["modules.sd_models"].checkpoints_list[Path(self.filename).name] = self


class OptionInfo:
    def __init__(
        self,
        default=None,
        label="",
        component=None,
        component_args=None,
        onchange=None,
        section=None,
        refresh=None,
        comment_before="",
        comment_after="",
        infotext=None,
        restrict_api=False,
        category_id=None,
    ):
        self.default, self.label, self.section, self.restrict_api = default, label, section, restrict_api

    def needs_restart(self):
        return self


class FakeOpts:
    def __init__(self):
        self.CLIP_stop_at_last_layers = 1
        self.options: dict[str, OptionInfo] = {}
        self.data: dict[str, Any] = {}

    def add_option(self, key, info):
        self.options[key] = info
        setattr(self, key, info.default)


class ScriptPostprocessing:
    """modules.scripts_postprocessing.ScriptPostprocessing: name, order, ui, process(_firstpass)."""

    name = None
    order = 1000


class PostprocessedImage:
    """The fields our Extras scripts touch."""

    def __init__(self, image):
        self.image, self.info, self.extra_images, self.caption, self.nametags = image, {}, [], None, []

    def create_copy(self, new_image, *, nametags=None, disable_processing=False):
        copy = PostprocessedImage(new_image)
        copy.nametags = self.nametags + (nametags or [])
        return copy


class FakeInterrogator:
    def __init__(self):
        self.loaded = 0

    def load(self):
        self.loaded += 1

    def generate_caption(self, image):
        return f"a blip caption of a {image.width}x{image.height} picture"

    def send_blip_to_ram(self):
        pass


class FakeDeepbooru:
    def start(self):
        pass

    def stop(self):
        pass

    def tag_multi(self, image, force_disable_ranks=False):
        return "1girl, solo"


def install(model: Any, root: Path) -> types.SimpleNamespace:
    """Put the fake ``modules`` package in sys.modules with ``model`` as ``shared.sd_model``."""
    mods = {name: types.ModuleType(name) for name in MODULE_NAMES}
    shared = mods["modules.shared"]
    shared.sd_model = model
    shared.state = FakeState()
    shared.opts = FakeOpts()
    shared.OptionInfo = OptionInfo
    shared.cmd_opts = types.SimpleNamespace(
        embeddings_dir=str(root / "embeddings"),
        hypernetwork_dir=str(root / "models" / "hypernetworks"),
        lora_dir=str(root / "models" / "Lora"),
        lowvram=False,
        medvram=False,
        api=True,
        nowebui=False,
        api_auth=None,
        hide_ui_dir_config=False,
    )
    shared.rendered = []
    shared.opened = []
    mods["modules.util"].open_folder = shared.opened.append
    shared.reload_hypernetworks = lambda: None
    mods["modules.paths_internal"].data_path = str(root)
    mods["modules.paths_internal"].models_path = str(root / "models")
    shared.interrogator = FakeInterrogator()
    mods["modules.deepbooru"].model = FakeDeepbooru()
    mods["modules.scripts_postprocessing"].ScriptPostprocessing = ScriptPostprocessing
    mods["modules.scripts_postprocessing"].PostprocessedImage = PostprocessedImage
    mods["modules.ui_components"].InputAccordion = lambda value, label="": None
    mods["modules.call_queue"].queue_lock = threading.Lock()
    mods["modules.sd_hijack"].model_hijack = types.SimpleNamespace(embedding_db=FakeEmbeddingDb(model))
    mods["modules.textual_inversion.textual_inversion"].create_embedding_from_data = create_embedding_from_data
    processing = mods["modules.processing"]
    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.process_images = process_images
    sampler = types.SimpleNamespace(name="Euler a")
    mods["modules.sd_samplers"].samplers_map = {"euler a": "Euler a"}
    mods["modules.sd_samplers"].all_samplers = [sampler]
    mods["modules.devices"].autocast = lambda disable=False: contextlib.nullcontext()
    sd_models = mods["modules.sd_models"]
    sd_models.model_path = str(root / "models" / "Stable-diffusion")
    sd_models.checkpoints_list, sd_models.loaded = {}, []

    def list_models():  # as under --ckpt: the selected checkpoint option is reset to that file
        sd_models.checkpoints_list.update({p.name: p for p in Path(sd_models.model_path).glob("*.safetensors")})
        shared.opts.data["sd_model_checkpoint"] = "the --ckpt file"

    sd_models.list_models = list_models
    sd_models.CheckpointInfo = FakeCheckpointInfo
    sd_models.reload_model_weights = lambda sd_model=None, info=None, forced_reload=False: sd_models.loaded.append(info)
    callbacks = mods["modules.script_callbacks"]
    callbacks.registered = {}
    for name in ("on_ui_tabs", "on_ui_settings", "on_app_started"):
        setattr(callbacks, name, lambda fn, _name=name: callbacks.registered.setdefault(_name, fn))
    for name, module in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, module)
        sys.modules[name] = module
    return types.SimpleNamespace(
        shared=shared,
        db=mods["modules.sd_hijack"].model_hijack.embedding_db,
        processing=processing,
        callbacks=callbacks,
    )


def uninstall() -> None:
    """Remove the fake modules and every lib_trainer.webui module imported against them."""
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]
    package = sys.modules.get("lib_trainer.webui")
    for name in [n for n in sys.modules if n.startswith("lib_trainer.webui.") and n != "lib_trainer.webui.form"]:
        del sys.modules[name]
        if package is not None:  # else "from lib_trainer.webui import host" would find the old module again
            package.__dict__.pop(name.rsplit(".", 1)[1], None)

"""Run by the WebUI at start-up in its own process: installs only what the host lacks. Never touches torch.

The WebUI already ships safetensors, numpy, pillow, open_clip, gradio and fastapi. lycoris-lora (the LoRA
family math; 3.4.0 on a torch older than 2.7, which lycoris 4.1 does not import on, and a 4.1 found there is
replaced) is installed without its dependencies so that its plain ``torch`` requirement can never
replace the WebUI's torch; its one extra dependency, toml, is listed on its own. ``launch.run_pip`` does
nothing under ``--skip-install``; when everything is present this script only checks and exits.

Optional optimizer packages (bitsandbytes, lion-pytorch, prodigyopt, schedulefree) are installed only when the
user lists them in Settings -> Trainer (``trainer_install_optimizers`` in the WebUI's config.json), also with
``--no-deps`` (none of them may change torch).
"""

import json
import sys
from pathlib import Path

import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib_trainer.requirements import lycoris_mismatch, lycoris_pin

# (module to look for, pip arguments); lycoris-lora's version follows the host's torch (lib_trainer/requirements.py)
REQUIREMENTS = (
    ("toml", "toml"),
    ("lycoris", f"lycoris-lora=={lycoris_pin()} --no-deps"),
)
OPTIONAL = {  # pip name -> (module, pip arguments)
    "bitsandbytes": ("bitsandbytes", "bitsandbytes --no-deps"),
    "lion-pytorch": ("lion_pytorch", "lion-pytorch --no-deps"),
    "prodigyopt": ("prodigyopt", "prodigyopt --no-deps"),
    "schedulefree": ("schedulefree", "schedulefree --no-deps"),
}
OPTION = "trainer_install_optimizers"


def settings_file():
    """The WebUI's config.json (``--ui-settings-file``), where Settings are kept."""
    args = getattr(launch, "args", None)
    path = getattr(args, "ui_settings_file", None)
    if path:
        return Path(path)
    return Path(getattr(args, "data_dir", None) or Path.cwd()) / "config.json"


def chosen_optional():
    """The optional packages ticked in Settings (unknown names are ignored)."""
    try:
        with settings_file().open(encoding="utf-8") as fh:
            value = json.load(fh).get(OPTION, "")
    except (OSError, ValueError, AttributeError):
        return []
    names = value if isinstance(value, list) else str(value).replace(";", ",").split(",")
    return [OPTIONAL[n.strip()] for n in names if n.strip() in OPTIONAL]


for module, pip_args in (*REQUIREMENTS, *chosen_optional()):
    if not launch.is_installed(module) or (module == "lycoris" and lycoris_mismatch()):
        launch.run_pip(f"install {pip_args}", f"sd-webui-trainer requirement: {pip_args.split()[0]}")

"""Run by the WebUI at start-up in its own process: installs only what the host lacks. Never touches torch.

The WebUI already ships safetensors, numpy, pillow, open_clip, gradio and fastapi. lycoris-lora (the LoRA
family math) is installed without its dependencies so that its plain ``torch`` requirement can never
replace the WebUI's torch; its one extra dependency, toml, is listed on its own. ``launch.run_pip`` does
nothing under ``--skip-install``; when everything is present this script only checks and exits.
"""

import launch

# (module to look for, pip arguments)
REQUIREMENTS = (
    ("toml", "toml"),
    ("lycoris", "lycoris-lora==4.1.3 --no-deps"),
)

for module, pip_args in REQUIREMENTS:
    if not launch.is_installed(module):
        launch.run_pip(f"install {pip_args}", f"sd-webui-trainer requirement: {pip_args.split()[0]}")

"""Run by the WebUI at start-up (separate process): installs only what the host lacks. Never touches torch.

Today every package the trainer needs (safetensors, numpy, pillow, open_clip, gradio, fastapi) ships with
the WebUI; lycoris-lora arrives with the LoRA issue. Idempotent and fast when nothing is missing.
"""

import launch

REQUIREMENTS = {}  # import name -> pip requirement; e.g. {"lycoris": "lycoris-lora==4.1.3"} once LoRA lands

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-trainer requirement: {requirement}")

"""sd-webui-trainer core: training on the loaded Stable Diffusion model. Never imports the WebUI."""

__version__ = "0.1.0"

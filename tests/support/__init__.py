"""Test support: builds tiny Stable Diffusion models from the real ldm classes, offline."""

"""The trainer without the WebUI: a checkpoint file loaded into the real ldm classes (``loader``), a host for the
job queue over it (``host``) and the command line (``cli``), one process or several (torchrun, accelerate)."""

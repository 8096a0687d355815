"""sd-webui-trainer entry: registers the tab, settings, API and Extras scripts with the WebUI. No logic here."""

from pathlib import Path

import lib_trainer

_HERE = Path(__file__).resolve().parents[1]
if Path(lib_trainer.__file__).resolve().parents[1] != _HERE:
    raise ImportError(
        f"sd-webui-trainer: the imported 'lib_trainer' comes from {Path(lib_trainer.__file__).parent}, "
        f"not from this extension ({_HERE}); another extension ships a package with the same name. "
        "Disable one of them."
    )

from lib_trainer.webui import entry  # noqa: E402

# the WebUI registers every ScriptPostprocessing subclass found in this module's namespace
from lib_trainer.webui.postprocessing import TrainerCaptionScript, TrainerCropScript  # noqa: E402, F401

entry.register()

"""Runs one small training job of a method, optionally SIGKILLing itself at a chosen moment (fault tests).

``python -m tests.support.fault_worker '<json plan>'`` with ``method``, ``root``, ``data``, ``steps`` and one of
``kill_step`` (right after that step's progress report) or ``kill_replace`` (just before the n-th file rename,
i.e. in the middle of a save: the temporary file is complete, the target not yet replaced). The same
``run_method`` continues the job in the test process, so a killed run and its resume can be compared with an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.stack import prepare_stack  # noqa: E402

METHODS = ("textual_inversion", "lora", "hypernetwork")


def method_paths(method: str, root: Path):
    """The method's OutputPaths under ``root`` (model folder and log folder)."""
    from lib_trainer.methods import hypernetwork, lora, textual_inversion

    module = {"textual_inversion": textual_inversion, "lora": lora, "hypernetwork": hypernetwork}[method]
    return module.OutputPaths(root / "models", root / "logs")


def main_file(method: str, root: Path) -> Path:
    """The file the job writes into the model folder."""
    suffix = ".pt" if method == "hypernetwork" else ".safetensors"
    return root / "models" / f"zqkill{suffix}"


def run_method(method: str, parts, root: Path, data: Path, steps: int, hooks=None):
    """Train (or continue) the job of ``method``: 2-image batches, a save every 2 steps, dropout on."""
    from lib_trainer.methods import hypernetwork, lora, textual_inversion

    data_config = {"data_dir": str(data), "width": 64, "height": 64, "template": "none", "flip": True}
    train = {"steps": steps, "save_every": 2, "preview_every": 0, "batch_size": 2, "seed": 7}
    paths = method_paths(method, root)
    if method == "textual_inversion":
        config = {"embedding": {"name": "zqkill", "num_vectors": 2}, "data": {**data_config, "template": "subject"}}
        config = textual_inversion.TextualInversionConfig.from_dict({**config, "train": train})
        return textual_inversion.train_embedding(config, parts, paths, hooks)
    if method == "lora":
        main = main_file(method, root)
        network = {"name": "zqkill", "algo": "locon", "rank": 4, "conv_rank": 2, "dropout": 0.1, "overwrite": True}
        config = {"network": network, "data": data_config, "train": {**train, "learning_rate": "1e-3"}}
        config = lora.LoraConfig.from_dict({**config, "resume_from": str(main) if main.exists() else ""})
        return lora.train_lora(config, parts, paths, hooks)
    spec = {
        "name": "zqkill",
        "sizes": "32, 64",
        "activation": "relu",
        "use_dropout": True,
        "layer_structure": "1,2,2,1",
    }
    config = {"hypernetwork": spec, "data": data_config, "train": {**train, "learning_rate": "1e-4"}}
    return hypernetwork.train_hypernetwork(hypernetwork.HypernetworkConfig.from_dict(config), parts, paths, hooks)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_rename_kill(count: int) -> None:
    original, calls = pathlib.Path.replace, [0]

    def replace(self, target):
        calls[0] += 1
        if calls[0] == count:
            _kill()
        return original(self, target)

    pathlib.Path.replace = replace


def main(plan: dict) -> None:
    """Build the tiny SD1 model, write its checksum, then train under the kill plan."""
    prepare_stack(threads=2)
    from lib_trainer.loop.checkpoint import tensors_checksum
    from lib_trainer.loop.hooks import TrainingHooks
    from lib_trainer.models.ldm import parts_from_ldm
    from tests.support.models import build_model

    root = Path(plan["root"])
    model = build_model("sd1", "tiny", Path(plan["models"]))
    (root / "model-checksum").write_text(tensors_checksum(list(model.state_dict().values())))

    class KillAtStep(TrainingHooks):
        def on_progress(self, progress):
            if progress.step == plan.get("kill_step"):
                _kill()

    if plan.get("kill_replace"):
        _arm_rename_kill(plan["kill_replace"])
    run_method(plan["method"], parts_from_ldm(model), root, Path(plan["data"]), plan["steps"], KillAtStep())


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

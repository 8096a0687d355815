"""Learning check with a known answer: recover a hidden embedding from the frozen model's own outputs.

Targets are the tiny model's predictions with hidden vectors v* at fixed (x_t, t); the real textual-inversion
trainable, conditioning and training loop start from a different initialisation and must cut the loss on
those targets by at least 100x within a few hundred CPU steps (SD1 eps-model and SD2 v-model).
"""

from __future__ import annotations

import pytest
import torch

from lib_trainer.formats.embedding import EmbeddingFile
from lib_trainer.loop.train import train
from lib_trainer.methods.textual_inversion import (
    EmbeddingTrainable,
    OutputPaths,
    TextualInversionConfig,
    initial_vectors,
)
from lib_trainer.models.diffusion import add_noise
from lib_trainer.models.ldm import parts_from_ldm
from tests.support.known_answer import FixedBatches, TeacherObjective, learning_train, noisy_latents

STEPS = {"sd1": 300, "sd2": 500}
REQUIRED_FACTOR = 100.0


@pytest.mark.slow
def test_textual_inversion_recovers_a_hidden_embedding(family, parts, tmp_path):
    gen = torch.Generator().manual_seed(1)
    prompts = ["a photo of zqtoken", "zqtoken, a picture"]
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([250, 700])
    x_t = add_noise(x0, noise, t, parts.alphas_cumprod)
    hidden = torch.randn(2, parts.text_encoder.dim, generator=gen) * 0.05
    with torch.no_grad():
        target = parts.apply_model(x_t, t, parts.text_encoder.encode(prompts, {"zqtoken": hidden})).float()
    objective = TeacherObjective(x_t, t, target)

    config = TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken", "init_text": "cat dog", "num_vectors": 2},
            "data": {"data_dir": str(tmp_path)},
            "train": {
                "steps": STEPS[family],
                "learning_rate": "0.004",
                "lr_schedule": "linear",
                "save_every": 0,
                "preview_every": 0,
            },
        }
    )
    start = EmbeddingFile(initial_vectors(parts, "cat dog", 2), 0, "zqtoken")
    trainable = EmbeddingTrainable(config, parts, OutputPaths(tmp_path / "emb", tmp_path / "log"), start)

    def loss_now() -> float:
        with torch.no_grad():
            return objective.loss(parts, x0, trainable.condition(parts, prompts), None).mean().item()

    before = loss_now()
    train(parts, trainable, FixedBatches(x0, prompts), objective, config.train)
    after = loss_now()
    print(f"{family}: loss {before:.3e} -> {after:.3e} ({before / after:.0f}x) in {STEPS[family]} steps")
    assert before / after >= REQUIRED_FACTOR


OPTIMIZER_RATES = {  # name -> (learning rate, optimizer args): each optimizer's usual scale for embeddings
    "adamw": ("0.004", ""),
    "lion": ("0.001", ""),
    "prodigy": ("1.0", ""),
    "adamw_schedulefree": ("0.004", ""),
    "adafactor": ("0.004", ""),
    "adafactor-relative": ("1.0", "relative_step=True scale_parameter=False"),
    "sgd": ("5.0", ""),
}


@pytest.mark.parametrize("choice", sorted(OPTIMIZER_RATES))
def test_every_optimizer_lowers_the_known_answer_loss(sd1_model, tmp_path, choice):
    """Each optimizer (optional packages: installed in the test stack) learns on the known-answer problem; for
    schedule-free AdamW the weights left after the run are its averaged point."""
    parts = parts_from_ldm(sd1_model)
    name = choice.split("-")[0]
    rate, args = OPTIMIZER_RATES[choice]
    prompts = ["a photo of zqtoken", "zqtoken, a picture"]
    x0, x_t, t = noisy_latents(parts, seed=3)
    hidden = torch.randn(2, parts.text_encoder.dim, generator=torch.Generator().manual_seed(4)) * 0.05
    with torch.no_grad():
        target = parts.apply_model(x_t, t, parts.text_encoder.encode(prompts, {"zqtoken": hidden})).float()
    objective = TeacherObjective(x_t, t, target)
    train_section = {**learning_train(40, rate, "constant"), "optimizer": name, "optimizer_args": args}
    config = TextualInversionConfig.from_dict(
        {
            "embedding": {"name": "zqtoken", "init_text": "cat dog", "num_vectors": 2},
            "data": {"data_dir": str(tmp_path)},
            "train": train_section,
        }
    )
    start = EmbeddingFile(initial_vectors(parts, "cat dog", 2), 0, "zqtoken")
    trainable = EmbeddingTrainable(config, parts, OutputPaths(tmp_path / "emb", tmp_path / "log"), start)

    def loss_now() -> float:
        with torch.no_grad():
            return objective.loss(parts, x0, trainable.condition(parts, prompts), None).mean().item()

    before = loss_now()
    result = train(parts, trainable, FixedBatches(x0, prompts), objective, config.train)
    after = loss_now()
    print(f"{choice}: loss {before:.3e} -> {after:.3e} ({before / after:.1f}x)")
    assert after < before / 2
    assert all(row["learning_rate"] > 0 for row in result.history[1:])

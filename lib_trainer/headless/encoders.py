"""ldm's text embedders built offline: the same classes (so ``models.ldm`` sees what it sees in the WebUI), with
the text model made from a config instead of a download (its weights come from the checkpoint)."""

from __future__ import annotations

from typing import Any

from ldm.modules.encoders.modules import AbstractEncoder, FrozenCLIPEmbedder
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


class OfflineCLIPEmbedder(FrozenCLIPEmbedder):
    """ldm's ``FrozenCLIPEmbedder`` (SD1) with ``CLIPTextModel(text_config)`` and the tokenizer from local files."""

    def __init__(
        self,
        text_config: dict[str, Any],
        tokenizer_dir: str,
        device: str = "cpu",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
    ):
        AbstractEncoder.__init__(self)
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        self.transformer = CLIPTextModel(CLIPTextConfig(**text_config))
        self.device, self.max_length = device, max_length
        if freeze:
            self.freeze()
        self.layer, self.layer_idx = layer, layer_idx

"""CLIP tokenizer files (vocab.json, merges.txt) written from open_clip's bundled BPE vocabulary.

Offline stand-in for openai/clip-vit-large-patch14's tokenizer: the same 49,408-token vocabulary,
so ids match the real tokenizer ("a photo of a cat" -> 49406, 320, 1125, 539, 320, 2368, 49407).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def write_clip_tokenizer(folder: Path) -> Path:
    """Write the tokenizer files HF ``CLIPTokenizer.from_pretrained`` reads into ``folder``."""
    import open_clip.tokenizer as oc_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe_path = oc_tokenizer.default_bpe()
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        merges = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(oc_tokenizer.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(pair) for pair in merge_pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder

"""Text encoders with trainable vectors spliced into the token embeddings.

A prompt is tokenized into 75-token chunks the way the WebUI builds them at inference
(``modules/sd_hijack_clip.py``: BOS + 75 tokens + EOS, placeholder names replaced by one slot per
vector, an embedding never split across chunks, text after a nearby comma moved to the next chunk).
While a chunk is encoded, a forward hook on the token-embedding module writes the vectors into
their slots; the hook is removed before ``encode`` returns, so the host model is never left patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_trainer.errors import ConfigError

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # the WebUI's default ``comma_padding_backtrack``
# How a prompt word meets its neighbours in real prompts: alone (an emphasis segment), between words and commas,
# next to punctuation without spaces, at a sentence end. The WebUI finds an embedding by its name's token ids.
PROMPT_CONTEXTS = ("{}", "a photo of {}, red", "red,{},blue", "art by {}.")
EMPHASIS = set("()[]\\")  # the WebUI's prompt parser reads these as emphasis, not as text


def embedding_table(module: nn.Module) -> nn.Embedding:
    """The plain ``nn.Embedding`` behind a token-embedding module (the WebUI wraps it in EmbeddingsWithFixes)."""
    return getattr(module, "wrapped", module)


@dataclass
class Chunk:
    """One 77-token window: ids (BOS..EOS, padded) and the vectors to write at given positions."""

    ids: list[int]
    splices: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class TextEncoder:
    """The text side of a model: tokenizer ids, raw token embeddings, and encoding with splices."""

    dim: int
    bos: int
    eos: int
    pad: int
    comma: int
    embedding_keys: tuple[str, ...] = ("emb_params",)  # the tensors an embedding file holds for this encoder

    @property
    def key_widths(self) -> dict[str, int]:
        """Each embedding-file tensor's width; a trained vector ``[n, dim]`` is their concatenation in this order."""
        return {self.embedding_keys[0]: self.dim}

    def split_vectors(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[n, dim]`` vectors as the embedding file's tensors (``emb_params``; SDXL: ``clip_l``, ``clip_g``)."""
        out, start = {}, 0
        for key, width in self.key_widths.items():
            out[key] = vectors[:, start : start + width]
            start += width
        return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        raise NotImplementedError

    def token_embedding_module(self) -> nn.Module:
        """The host module that maps token ids to embeddings (hooked to splice vectors)."""
        raise NotImplementedError

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode ``[B, 77]`` ids to ``[B, 77, dim]`` hidden states as the host does (+ ``[B, p]`` pooled, if any)."""
        raise NotImplementedError

    def lora_roots(self) -> list[nn.Module]:
        """Module trees whose paths name kohya text-encoder LoRA keys (HF CLIP layout), one per encoder."""
        return []

    def layers(self) -> list[nn.Module]:
        """The transformer layers (for gradient checkpointing when the text encoder trains)."""
        return []

    def token_vectors(self, ids: Sequence[int]) -> torch.Tensor:
        """The embedding-table rows for ``ids`` as fp32 ``[len(ids), dim]`` (no gradients)."""
        weight = embedding_table(self.token_embedding_module()).weight
        with torch.no_grad():
            return weight[torch.tensor(list(ids), dtype=torch.long, device=weight.device)].float().cpu()

    def device(self) -> torch.device:
        """Device of the token-embedding table."""
        return embedding_table(self.token_embedding_module()).weight.device

    def build_chunks(self, text: str, vectors: Mapping[str, torch.Tensor] | None = None) -> list[Chunk]:
        """Tokenize ``text`` into WebUI-style chunks, replacing each placeholder name with its vectors."""
        tokens = self.tokenize(text)
        lookup = {tuple(self.tokenize(name)): vec for name, vec in (vectors or {}).items()}
        builder = _ChunkBuilder(self)
        pos = 0
        while pos < len(tokens):
            match = _match_placeholder(tokens, pos, lookup)
            if match is None:
                builder.add_token(tokens[pos])
                pos += 1
            else:
                name_ids, vec = match
                builder.add_vectors(vec)
                pos += len(name_ids)
        return builder.finish()

    def encode(self, texts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Conditioning ``[B, 77*k, dim]`` for ``texts``, with placeholder names replaced by ``vectors``."""
        return self.encode_with_pooled(texts, vectors)[0]

    def encode_with_pooled(
        self, texts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encode`` and the pooled output of the first chunk (the WebUI's ``zs[0].pooled``; None without one)."""
        batch = [self.build_chunks(text, vectors) for text in texts]
        n_chunks = max(len(chunks) for chunks in batch)
        outputs, pooled = [], None
        for i in range(n_chunks):
            column = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch]
            out = self.encode_chunks(column)
            if isinstance(out, tuple):
                out, chunk_pooled = out
                pooled = chunk_pooled if pooled is None else pooled
            outputs.append(out)
        return torch.cat(outputs, dim=1), pooled

    def empty_chunk(self) -> Chunk:
        """A chunk holding no text (BOS, EOS, padding)."""
        return Chunk(self._pad_ids([]))

    def encode_chunks(self, chunks: Sequence[Chunk]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode one chunk per batch row, writing each chunk's spliced vectors in place (+ pooled, if any)."""
        ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=self.device())
        splices = [(row, pos, vec) for row, c in enumerate(chunks) for pos, vec in c.splices]
        with self._splice_hook(splices):
            return self._encode_ids(ids)

    @contextlib.contextmanager
    def _splice_hook(self, splices: list[tuple[int, int, torch.Tensor]]) -> Iterator[None]:
        if not splices:
            yield
            return

        def write_vectors(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for row, pos, vec in splices:
                output[row, pos : pos + vec.shape[0]] = vec.to(device=output.device, dtype=output.dtype)
            return output

        handle = self.token_embedding_module().register_forward_hook(write_vectors)
        try:
            yield
        finally:
            handle.remove()

    def _pad_ids(self, tokens: list[int]) -> list[int]:
        ids = [self.bos, *tokens, *([self.eos] * (CHUNK_TOKENS - len(tokens))), self.eos]
        first_eos = len(tokens) + 1
        return ids[: first_eos + 1] + [self.pad] * (len(ids) - first_eos - 1)


def _match_placeholder(
    tokens: list[int], pos: int, lookup: dict[tuple[int, ...], torch.Tensor]
) -> tuple[tuple[int, ...], torch.Tensor] | None:
    for name_ids in sorted(lookup, key=len, reverse=True):
        if name_ids and tuple(tokens[pos : pos + len(name_ids)]) == name_ids:
            return name_ids, lookup[name_ids]
    return None


def check_prompt_word(encoder: TextEncoder, name: str, field: str) -> None:
    """Refuse a name the WebUI could not find in prompts, with the reason (ConfigError naming ``field``).

    The WebUI registers an embedding under the token ids of its file name and finds it in a prompt where those
    ids occur in a row. A name made of no tokens fails to register; a name that starts or ends with punctuation,
    a symbol or an emoji merges with a neighbouring comma or period into other tokens and is never found.
    """
    emphasis = sorted(set(name) & EMPHASIS)
    if emphasis:
        raise ConfigError(
            f"{field} {name!r} contains {', '.join(map(repr, emphasis))}, which the WebUI's prompt parser reads as "
            "emphasis, so the name could not be typed in a prompt; use letters, digits, '-' or '_'",
            field=field,
        )
    for sub in getattr(encoder, "encoders", (encoder,)):  # SDXL: each encoder tokenizes prompts itself
        _check_found(sub.tokenize, name, field)


def _check_found(tokenize, name: str, field: str) -> None:
    """The name's ids occur in every context prompt, for one encoder's tokenizer (SDXL has two)."""
    ids = tokenize(name)
    if not ids:
        raise ConfigError(f"{field} {name!r} has no tokens for the text encoder; use letters or digits", field=field)
    for context in PROMPT_CONTEXTS:
        prompt = context.format(name)
        tokens = tokenize(prompt)
        if not any(tokens[i : i + len(ids)] == ids for i in range(len(tokens) - len(ids) + 1)):
            raise ConfigError(
                f"{field} {name!r} would not be recognised in a prompt such as {prompt!r}: its first or last "
                "character joins the punctuation next to it into other tokens. Start and end the name with a "
                "letter or digit",
                field=field,
            )


class _ChunkBuilder:
    """Accumulates tokens into 75-token chunks exactly as the WebUI's ``tokenize_line`` does."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.chunks: list[Chunk] = []
        self.tokens: list[int] = []
        self.splices: list[tuple[int, torch.Tensor]] = []
        self.last_comma = -1

    def add_token(self, token: int) -> None:
        if token == self.encoder.comma:
            self.last_comma = len(self.tokens)
        elif (
            len(self.tokens) == CHUNK_TOKENS
            and self.last_comma != -1
            and len(self.tokens) - self.last_comma <= COMMA_BACKTRACK
        ):
            cut = self.last_comma + 1
            moved = self.tokens[cut:]
            self.tokens = self.tokens[:cut]
            self.flush()
            self.tokens = moved
        if len(self.tokens) == CHUNK_TOKENS:
            self.flush()
        self.tokens.append(token)

    def add_vectors(self, vec: torch.Tensor) -> None:
        if len(self.tokens) == CHUNK_TOKENS or len(self.tokens) + vec.shape[0] > CHUNK_TOKENS:
            self.flush()
        self.splices.append((len(self.tokens) + 1, vec))  # +1: BOS comes first
        self.tokens += [0] * vec.shape[0]

    def flush(self) -> None:
        self.chunks.append(Chunk(self.encoder._pad_ids(self.tokens), self.splices))
        self.tokens, self.splices, self.last_comma = [], [], -1

    def finish(self) -> list[Chunk]:
        if self.tokens or not self.chunks:
            self.flush()
        return self.chunks


class HFClipTextEncoder(TextEncoder):
    """SD1's text encoder: ldm ``FrozenCLIPEmbedder`` (transformers ``CLIPTextModel`` + tokenizer); also SDXL's
    CLIP-L (sgm ``FrozenCLIPEmbedder``), which takes ``hidden_states[layer_idx]`` without the final LayerNorm."""

    def __init__(self, embedder: nn.Module, clip_skip: int = 1, layer_idx: int | None = None):
        self.embedder = embedder
        self.clip_skip = clip_skip
        self.layer_idx = layer_idx
        tokenizer = embedder.tokenizer
        vocab = tokenizer.get_vocab()
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = self.eos  # the WebUI pads SD1 prompts with EOS
        self.comma = vocab[",</w>"]
        self.dim = embedder.transformer.config.hidden_size
        self.n_layers = embedder.transformer.config.num_hidden_layers

    def tokenize(self, text: str) -> list[int]:
        return list(self.embedder.tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"])

    def token_embedding_module(self) -> nn.Module:
        return self.embedder.transformer.text_model.embeddings.token_embedding

    def layers(self) -> list[nn.Module]:
        return list(self.embedder.transformer.text_model.encoder.layers)

    def lora_roots(self) -> list[nn.Module]:
        return [self.embedder.transformer]

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        transformer = self.embedder.transformer
        if self.layer_idx is not None:
            return transformer(input_ids=ids, output_hidden_states=True).hidden_states[self.layer_idx]
        out = transformer(input_ids=ids, output_hidden_states=self.clip_skip > 1)
        if self.clip_skip > 1:
            return transformer.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        return out.last_hidden_state


class OpenClipTextEncoder(TextEncoder):
    """SD2's text encoder: ldm ``FrozenOpenCLIPEmbedder`` (open_clip model, its own layer choice); also SDXL's
    OpenCLIP bigG (sgm ``FrozenOpenCLIPEmbedder2``), whose ``encode_with_transformer`` returns a dict with the
    chosen ``layer`` and the ``pooled`` projection."""

    def __init__(self, embedder: nn.Module):
        from open_clip import tokenizer as oc_tokenizer

        self.embedder = embedder
        self._tokenizer = oc_tokenizer._tokenizer
        self.bos = self._tokenizer.encoder["<start_of_text>"]
        self.eos = self._tokenizer.encoder["<end_of_text>"]
        self.pad = 0  # open_clip pads with 0 after EOS
        self.comma = self._tokenizer.encoder[",</w>"]
        self.dim = embedding_table(embedder.model.token_embedding).weight.shape[1]
        self.n_layers = len(embedder.model.transformer.resblocks)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def token_embedding_module(self) -> nn.Module:
        return self.embedder.model.token_embedding

    def layers(self) -> list[nn.Module]:
        return list(self.embedder.model.transformer.resblocks)

    def used_layers(self) -> int:
        """Resblocks whose output reaches the conditioning (ldm's penultimate layer skips the last one; sgm's
        pooled output uses them all)."""
        if getattr(self.embedder, "legacy", True) is False or getattr(self.embedder, "layer", "") == "last":
            return self.n_layers
        return self.n_layers - int(getattr(self.embedder, "layer_idx", 0))

    def lora_roots(self) -> list[nn.Module]:
        from lib_trainer.models.fused_attention import hf_named_openclip

        return [hf_named_openclip(self.embedder.model, self.used_layers())]

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.embedder.encode_with_transformer(ids)
        if isinstance(out, dict):  # sgm: {"penultimate"/"last": ..., "pooled": ...}
            return out[self.embedder.layer], out["pooled"]
        return out


class DualTextEncoder(TextEncoder):
    """SDXL's two encoders side by side: one vector ``[n, dl + dg]`` is CLIP-L's part then bigG's part.

    Both use the same CLIP BPE vocabulary, so prompts chunk identically; the conditioning is their outputs
    concatenated along the width (``crossattn``, 768 + 1280 = 2048) and bigG's pooled output. Embedding files hold
    the parts as ``clip_l`` and ``clip_g``, as the WebUI and kohya write them.
    """

    embedding_keys = ("clip_l", "clip_g")

    def __init__(self, first: TextEncoder, second: TextEncoder):
        self.first, self.second = first, second
        self.encoders = (first, second)
        self.dim = first.dim + second.dim
        self.bos, self.eos, self.pad, self.comma = first.bos, first.eos, first.pad, first.comma
        self.clip_skip = getattr(first, "clip_skip", 1)

    @property
    def key_widths(self) -> dict[str, int]:
        return dict(zip(self.embedding_keys, (self.first.dim, self.second.dim), strict=True))

    def tokenize(self, text: str) -> list[int]:
        return self.first.tokenize(text)

    def token_embedding_module(self) -> nn.Module:
        return self.first.token_embedding_module()

    def layers(self) -> list[nn.Module]:
        return self.first.layers() + self.second.layers()

    def token_vectors(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.cat([self.first.token_vectors(ids), self.second.token_vectors(ids)], dim=1)

    def lora_roots(self) -> list[nn.Module]:
        return [root for encoder in self.encoders for root in encoder.lora_roots()]

    def encode_with_pooled(
        self, texts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        split = {name: self.split_vectors(vec) for name, vec in (vectors or {}).items()}
        outs = []
        for encoder, key in zip(self.encoders, self.embedding_keys, strict=True):
            outs.append(encoder.encode_with_pooled(texts, {name: parts[key] for name, parts in split.items()}))
        pooled = outs[1][1] if outs[1][1] is not None else outs[0][1]
        return torch.cat([outs[0][0], outs[1][0].to(outs[0][0].dtype)], dim=2), pooled

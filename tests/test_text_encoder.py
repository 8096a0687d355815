"""Conditioning built by the core equals the host model's own, with and without spliced vectors."""

from __future__ import annotations

import pytest
import torch

from lib_trainer.methods.textual_inversion import initial_vectors
from lib_trainer.models.text import CHUNK_TOKENS


def test_tokenizer_matches_clip_ids(parts):
    assert parts.text_encoder.tokenize("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_plain_prompt_equals_ldm_conditioning(sd_model, parts):
    prompts = ["a photo of a cat", "red, blue, green"]
    with torch.no_grad():
        expected = sd_model.get_learned_conditioning(prompts)
        got = parts.text_encoder.encode(prompts)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("word", ["cat", "photograph"])
def test_fresh_embedding_from_word_equals_the_words_prompt(sd_model, parts, word):
    vectors = initial_vectors(parts, word, len(parts.text_encoder.tokenize(word)))
    with torch.no_grad():
        expected = sd_model.get_learned_conditioning([f"a photo of a {word}, outdoors"])
        got = parts.text_encoder.encode(["a photo of a mytoken, outdoors"], {"mytoken": vectors})
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_vectors_replace_every_occurrence_and_carry_gradients(parts):
    vectors = torch.randn(3, parts.text_encoder.dim, requires_grad=True)
    chunks = parts.text_encoder.build_chunks("zq1 and zq1", {"zq1": vectors})
    assert [pos for pos, _ in chunks[0].splices] == [1, 5]  # BOS, 3 slots, "and", 3 slots
    parts.text_encoder.encode(["zq1 and zq1"], {"zq1": vectors}).sum().backward()
    assert vectors.grad is not None
    assert vectors.grad.abs().sum() > 0


def test_long_prompts_are_chunked_like_the_webui(parts):
    encoder = parts.text_encoder
    long_prompt = ", ".join(f"tag{i}" for i in range(60))
    cond = encoder.encode([long_prompt, "short"])
    n_chunks = len(encoder.build_chunks(long_prompt))
    assert n_chunks > 1
    assert cond.shape == (2, 77 * n_chunks, encoder.dim)
    for chunk in encoder.build_chunks(long_prompt):
        assert len(chunk.ids) == CHUNK_TOKENS + 2
        assert chunk.ids[0] == encoder.bos


def test_embedding_never_split_across_chunks(parts):
    encoder = parts.text_encoder
    vectors = torch.zeros(8, encoder.dim)
    prompt = "x " * 70 + "zq1"
    chunks = encoder.build_chunks(prompt, {"zq1": vectors})
    assert len(chunks) == 2
    assert chunks[0].splices == []
    assert chunks[1].splices[0][0] == 1


def test_comma_backtrack_moves_trailing_words_to_next_chunk(parts):
    encoder = parts.text_encoder
    prompt = "x " * 70 + ", " + "y " * 10
    first = encoder.build_chunks(prompt)[0]
    comma_at = first.ids.index(encoder.comma)
    assert all(t == encoder.eos or t == encoder.pad for t in first.ids[comma_at + 1 :])


def test_clip_skip_uses_earlier_layer_with_final_norm(sd1_model):
    from lib_trainer.models.ldm import parts_from_ldm

    encoder = parts_from_ldm(sd1_model, clip_skip=2).text_encoder
    ids = torch.tensor([encoder.build_chunks("a cat")[0].ids])
    transformer = sd1_model.cond_stage_model.transformer
    with torch.no_grad():
        hidden = transformer(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        expected = transformer.text_model.final_layer_norm(hidden)
        got = encoder.encode(["a cat"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_host_embedding_module_is_not_left_hooked(parts):
    module = parts.text_encoder.token_embedding_module()
    parts.text_encoder.encode(["zq1"], {"zq1": torch.zeros(1, parts.text_encoder.dim)})
    assert len(module._forward_hooks) == 0

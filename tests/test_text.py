"""Text encoders on transformers, and captions through a text-conditioned model."""

from __future__ import annotations

import socket

import pytest
import torch

from cmvae import CrossModalVAE
from cmvae.text import HFTextEncoder, TextEncoderUnavailable, flan_t5_large, minilm


@pytest.fixture(scope="module")
def no_network():
    """Any attempt to open a connection fails the test."""
    original = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    socket.socket.connect = refuse
    yield
    socket.socket.connect = original


@pytest.fixture(scope="module")
def minilm_encoder(no_network):
    return minilm()


def test_minilm_runs_offline(minilm_encoder):
    embeddings, mask = minilm_encoder(["a red car drives past", ""])
    assert minilm_encoder.dim == 384
    assert embeddings.shape == (2, minilm_encoder.max_length, 384)
    assert mask.shape == (2, minilm_encoder.max_length)
    assert mask[0].sum() > mask[1].sum() >= 2  # [CLS] and [SEP] even for the empty caption
    assert torch.isfinite(embeddings).all()


def test_text_model_encodes_and_decodes_with_captions(minilm_encoder):
    model = CrossModalVAE.from_preset("tiny-text").eval()
    model.set_text_encoder(minilm_encoder)
    video = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        none = model.encode(video).latent_dist.mode()
        empty = model.encode(video, captions="").latent_dist.mode()
        listed = model.encode(video, captions=[None]).latent_dist.mode()
        caption = model.encode(video, captions="a dog runs across a field").latent_dist.mode()
        decoded = model.decode(caption, captions="a dog runs across a field", image_mode=False).sample
    assert torch.equal(none, empty) and torch.equal(none, listed)
    assert (caption - empty).abs().max() > 1e-4
    assert decoded.shape == video.shape


def test_precomputed_embeddings_match_captions(minilm_encoder):
    model = CrossModalVAE.from_preset("tiny-text").eval()
    model.set_text_encoder(minilm_encoder)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    captions = ["waves on a beach", "a city street at night"]
    context, mask = minilm_encoder(captions)
    with torch.no_grad():
        a = model.encode(video, captions=captions).latent_dist.mode()
        b = model.encode(video, context=context, context_mask=mask).latent_dist.mode()
    assert torch.equal(a, b)


def test_text_model_without_text_says_what_to_do():
    model = CrossModalVAE.from_preset("tiny-text", text_encoder_name=None)  # a config that names no encoder
    with pytest.raises(ValueError, match="set_text_encoder"):
        model.encode(torch.zeros(1, 3, 4, 16, 16))


def test_text_encoder_width_must_match(minilm_encoder):
    model = CrossModalVAE.from_preset("small-4z-text")
    with pytest.raises(ValueError, match="384"):
        model.set_text_encoder(minilm_encoder)


def test_model_without_text_refuses_captions():
    model = CrossModalVAE.from_preset("tiny")
    with pytest.raises(ValueError, match="no text cross-attention"):
        model.encode(torch.zeros(1, 3, 4, 16, 16), captions="hello")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A random two-layer T5 encoder and a word-level T5 tokenizer, saved as a local folder."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    words = ["a", "dog", "runs", "on", "the", "beach", "red", "car", "city"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0 - i) for i, w in enumerate(words)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    folder = tmp_path_factory.mktemp("t5")
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_t5_path_pads_to_100_tokens_with_mask(tiny_t5, no_network):
    encoder = flan_t5_large(tiny_t5)
    assert encoder.max_length == 100 and encoder.dim == 16
    embeddings, mask = encoder(["a dog runs on the beach", ""])
    assert embeddings.shape == (2, 100, 16)
    assert mask[0].sum() == 7  # six words and </s>
    assert mask[1].sum() == 1  # the empty caption is just </s>
    assert mask[0, :7].all() and not mask[0, 7:].any()
    # padding does not change the real tokens' embeddings
    alone, _ = HFTextEncoder(tiny_t5, max_length=7)(["a dog runs on the beach"])
    assert torch.allclose(alone[0], embeddings[0, :7], atol=1e-5)

    model = CrossModalVAE.from_preset("tiny-text", context_dim=16).eval()
    model.set_text_encoder(encoder)
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = model.encode(video, captions="a red car").latent_dist.mode()
        assert model.decode(latent, captions="a red car", image_mode=False).sample.shape == video.shape


def test_missing_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextEncoderUnavailable, match="huggingface-cli download"):
        flan_t5_large()
    with pytest.raises(TextEncoderUnavailable, match="cannot load"):
        HFTextEncoder(tmp_path)

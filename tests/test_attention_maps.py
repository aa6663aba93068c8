"""Cross-attention maps per caption word: the recorded weights, the token -> word mapping, the maps, the command."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from cli_run import assert_one_error_line, run
from media import encode_file, moving_pattern

from cmvae.attention_maps import MapRecorder, attention_maps, layer_names, select_words, token_groups
from cmvae.models import CrossModalVAE
from cmvae.models.attention import CrossAttention, TextContext, recording_cross_attention
from cmvae.text import minilm
from cmvae.video_io import read_video


@pytest.fixture(scope="module")
def encoder():
    return minilm(max_length=16)


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(1)
    return CrossModalVAE.from_preset("tiny-text").eval().float()


def _captured(layer, x, text):
    found = []
    with recording_cross_attention(lambda module, probs, mask, grid, region: found.append((probs, mask, grid))):
        out = layer(x, text)
    return out, found


def test_recorded_probabilities_reproduce_the_layer_output():
    torch.manual_seed(0)
    layer = CrossAttention(channels=8, context_dim=12, heads=2, head_dim=4, patch_size=2).float()
    x = torch.randn(1, 8, 3, 4, 6)
    mask = torch.tensor([[1.0, 1, 1, 0, 0]])
    text = TextContext(torch.randn(1, 5, 12), mask)
    plain = layer(x, text)
    out, found = _captured(layer, x, text)
    assert torch.equal(out, plain)  # recording leaves the output alone
    (probs, _, grid), = found
    assert grid == (1, 3, 2, 3) and probs.dtype == torch.float32
    v = layer.to_v(text.embeddings).reshape(1, 5, 2, 4).transpose(1, 2)  # (1, heads, L, head_dim)
    mixed = (probs @ v).transpose(1, 2).flatten(2)  # (frames, patches, heads * head_dim)
    terms = layer.to_out(mixed)  # (frames, patches, p*p*c) in (row-in-patch, column-in-patch, channel) order
    expected = torch.zeros_like(x)
    for t in range(3):
        for patch in range(6):
            row, col = divmod(patch, 3)
            block = terms[t, patch].reshape(2, 2, 8).permute(2, 0, 1)
            expected[0, :, t, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = block
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_weights_over_unmasked_tokens_sum_to_one_and_masked_tokens_get_none(text_model, encoder):
    x = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    embeddings, mask = encoder(["a dog runs after a red ball"])
    assert 0 < mask.sum() < mask.shape[1]  # some padding to check
    found = []
    with torch.no_grad(), recording_cross_attention(lambda m, probs, k, grid, region: found.append((m, probs, k))):
        text_model(x, context=embeddings, context_mask=mask)
    assert {m for m, _, _ in found} == set(layer_names(text_model))  # spatial and temporal layers, both sides
    assert any("temporal" in name for _, name in layer_names(text_model).values())
    for _, probs, keep in found:
        kept = keep[:, None, None, :] > 0.5
        torch.testing.assert_close(probs.masked_fill(~kept, 0).sum(-1), torch.ones(probs.shape[:-1]),
                                   atol=1e-5, rtol=0)
        assert probs.masked_fill(kept, 0).abs().max() == 0


def test_left_and_right_halves_attend_to_their_own_words():
    layer = CrossAttention(channels=2, context_dim=2, heads=1, head_dim=2, patch_size=1).float()
    with torch.no_grad():
        layer.to_q.weight.copy_(10 * torch.eye(2))
        layer.to_k.weight.copy_(10 * torch.eye(2))
    x = torch.ones(1, 2, 2, 4, 8)
    x[:, 1, :, :, :4] = -1  # left half: features (1, -1); right half: (-1, 1), after LayerNorm too
    x[:, 0, :, :, 4:] = -1
    words = torch.tensor([[[1.0, -1.0], [-1.0, 1.0], [5.0, 5.0]]])  # word "left", word "right", padding
    text = TextContext(words, torch.tensor([[1.0, 1.0, 0.0]]))
    recorder = MapRecorder({layer: ("encoder", "layer")}, token_groups({"left": [0], "right": [1]}, 3),
                           frames=2, rows=4, cols=8)
    with recording_cross_attention(recorder):
        layer(x, text)
    left, right = recorder.means()["encoder"]
    assert left[..., :4].min() > 0.99 and left[..., 4:].max() < 0.01
    assert right[..., 4:].min() > 0.99 and right[..., :4].max() < 0.01


def test_masked_tokens_never_enter_a_map():
    layer = CrossAttention(channels=4, context_dim=3, heads=2, head_dim=2, patch_size=1).float()
    text = TextContext(torch.randn(1, 4, 3), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    recorder = MapRecorder({layer: ("decoder", "layer")}, token_groups({"real": [0, 1], "pad": [2, 3]}, 4),
                           frames=1, rows=2, cols=2)
    with recording_cross_attention(recorder):
        layer(torch.randn(1, 4, 1, 2, 2), text)
    real, pad = recorder.means()["decoder"]
    assert pad.abs().max() == 0
    torch.testing.assert_close(real, torch.ones_like(real), atol=1e-6, rtol=0)


def _positions(encoder, caption: str, word: str) -> list[int]:
    """Where the tokenizer's pieces of `word` sit among the caption's token ids (found by matching ids)."""
    ids = encoder.tokenizer(caption)["input_ids"]
    pieces = encoder.tokenizer.convert_tokens_to_ids(encoder.tokenizer.tokenize(word))
    found = [i + j for i in range(len(ids)) if ids[i:i + len(pieces)] == pieces for j in range(len(pieces))]
    assert found, (caption, word)
    return found


def test_a_split_word_sums_its_tokens(text_model, encoder):
    caption = "a xylophonist plays near the dog"
    assert len(encoder.tokenizer.tokenize("xylophonist")) > 1  # the tokenizer splits it
    pieces = _positions(encoder, caption, "xylophonist")
    assert select_words(encoder.words(caption), ["xylophonist"]) == {"xylophonist": pieces}
    frames = moving_pattern(4, 32, 32)
    found = []
    with recording_cross_attention(lambda m, probs, k, grid, region: found.append((m, probs, grid))):
        maps = attention_maps(text_model, frames, caption, encoder, ["Xylophonist"], per_layer=True,
                              chunk_frames=4, chunk_overlap=0)
    names = layer_names(text_model)
    layer, probs, (_, t, rows, cols) = next(item for item in found if names[item[0]][1] == "encoder.down.3.attn.0")
    expected = probs[..., pieces].sum(-1).mean(1).reshape(t, rows, cols)  # heads averaged
    recorded = maps.layers["encoder.down.3.attn.0"][0]  # on the map grid: one cell is one patch at this level
    torch.testing.assert_close(recorded, expected, atol=1e-6, rtol=0)


def test_a_repeated_word_gathers_every_occurrence(encoder):
    caption = "the dog sees another dog"
    dog = encoder.tokenizer.convert_tokens_to_ids("dog")
    ids = encoder.tokenizer(caption)["input_ids"]
    both = [i for i, token in enumerate(ids) if token == dog]
    assert len(both) == 2
    assert select_words(encoder.words(caption), ["dog"]) == {"dog": both}
    assert list(select_words(encoder.words(caption))) == ["the", "dog", "sees", "another"]


def test_a_word_not_in_the_caption_is_a_clear_error(encoder):
    with pytest.raises(ValueError, match="not in the caption: cat .*dog"):
        select_words(encoder.words("a dog"), ["dog", "cat"])


def test_overlapping_chunks_record_every_frame_once_per_layer(text_model, encoder):
    frames = moving_pattern(12, 32, 32)
    maps = attention_maps(text_model, frames, "a red ball", encoder, ["ball"], chunk_frames=8, chunk_overlap=4)
    sides = {side: sum(1 for s, _ in layer_names(text_model).values() if s == side) for side in ("encoder", "decoder")}
    for side, layers in sides.items():
        assert maps.records[side].tolist() == [layers] * 12
    assert maps.encoder.shape == (1, 12, 4, 4) and 0 < maps.encoder.max() <= 1


@pytest.mark.parametrize("settings, ways", [
    ({"tile": 32, "tile_overlap": 16}, None),  # tiles of the frame, exact statistics: layers run several passes
    ({"memory_budget": 1}, "tiles"),  # no room: every level in tiles the budget chooses
    ({"memory_budget": "room"}, "bands"),  # a little room: full-resolution levels in bands of rows
])
def test_tiles_and_bands_record_every_patch_once(text_model, encoder, settings, ways):
    """The maps made in tiles or bands are the maps of whole frames, every patch recorded once per layer."""
    from cmvae.budget import RESERVE_BYTES
    from cmvae.memory import memory_in_use
    from cmvae.pipeline import PipelineSettings, VideoPipeline

    if settings.get("memory_budget") == "room":
        settings = {"memory_budget": memory_in_use(torch.device("cpu")) + RESERVE_BYTES + 48 * 2**20}
    frames = moving_pattern(4, 64, 192) if ways == "bands" else moving_pattern(4, 64, 64)
    whole = attention_maps(text_model, frames, "a dog and a ball", encoder, ["dog", "ball"], chunk_frames=4)
    pipe = VideoPipeline(text_model, PipelineSettings(device="cpu", dtype="float32", **settings))
    parts = attention_maps(pipe.model, frames, "a dog and a ball", encoder, ["dog", "ball"], chunk_frames=4,
                           local_map=pipe.local_map())
    if ways is not None:
        assert ways in {record.how for record in pipe.levels.records}
    layers = {side: sum(1 for s, _ in layer_names(text_model).values() if s == side) for side in ("encoder", "decoder")}
    for side, count in layers.items():
        assert parts.records[side].tolist() == [count] * 4
        torch.testing.assert_close(parts.side(side), whole.side(side), atol=1e-4, rtol=0)


def test_attention_command_writes_maps_overlays_and_a_video(tmp_path, capsys):
    clip = encode_file(tmp_path / "clip.mp4", moving_pattern(8, 48, 64))
    out = tmp_path / "maps"
    code, stdout, err = run(capsys, "attention", clip, "--caption", "a dog chases a ball", "--words", "dog,ball",
                            "--model", "tiny-text", "--per-layer", "--chunk-frames", "8", "-o", out)
    assert code == 0, err
    with safe_open(str(out / "maps.safetensors"), "pt") as handle:
        assert handle.metadata()["words"] == '["dog", "ball"]'
        assert handle.get_tensor("encoder").shape == (2, 8, 6, 8)
        assert any(key.startswith("layer.encoder_temporal") for key in handle.keys())
    for name in ("encoder_dog.png", "decoder_ball.png"):
        image = read_video(out / name)
        assert image.shape == (1, 48, 64, 3)
    video = read_video(out / "overlay.mp4")
    assert video.shape == (8, 2 * (48 + 16), 2 * 64, 3)
    page = tmp_path / "page.html"
    code, _, err = run(capsys, "view", clip, clip, "--attention", out, "-o", page)
    assert code == 0, err
    assert page.read_text().count('src="data:image/png;base64,') == 4  # two words, two sides


@pytest.mark.parametrize("extra, message", [
    (["--words", "cat"], "not in the caption: cat"),
    (["--max-record-memory", "1KB"], "above the cap"),
])
def test_attention_command_errors_leave_nothing_behind(tmp_path, capsys, extra, message):
    clip = encode_file(tmp_path / "clip.mp4", moving_pattern(4, 32, 32))
    out = tmp_path / "maps"
    code, _, err = run(capsys, "attention", clip, "--caption", "a dog", "--model", "tiny-text", "-o", out, *extra)
    assert code == 1 and message in assert_one_error_line(err, "attention")
    assert not out.exists()


def test_attention_command_needs_a_text_model(tmp_path, capsys):
    clip = encode_file(tmp_path / "clip.mp4", moving_pattern(4, 32, 32))
    code, _, err = run(capsys, "attention", clip, "--caption", "a dog", "--model", "tiny", "-o", tmp_path / "m")
    assert code == 1 and "no text cross-attention" in assert_one_error_line(err, "attention")

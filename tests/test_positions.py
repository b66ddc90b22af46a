"""Position ids and vision indices built by the collator on the host are exactly what the model builds on
its own, and a forward, a loss and generate() give the same numbers with them as without."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_close_at_scale


def _model_and_samples(tiny_model_dir, encoded_demo, n: int = 8):
    from common.model.loading import load_for_inference
    from common.data.encode import load_tokenizer
    from common.data.shards import ShardStream
    model, _ = load_for_inference(str(tiny_model_dir), None, "hf")
    tok = load_tokenizer(str(tiny_model_dir))
    stream = ShardStream(encoded_demo.shards_dir("train"), encoded_demo.spec(), normalize=False)
    samples = list(itertools.islice(iter(stream), n))
    return model, tok, samples


def _collators(tok, model, **kw):
    from common.model.collate import for_tokenizer
    from common.speed.positions import HostLayout
    layout = HostLayout.from_model(model)
    assert layout is not None
    return for_tokenizer(tok, **kw), for_tokenizer(tok, **kw, host_ids=layout)


def test_generation_positions_equal_what_generate_builds(tiny_model_dir, encoded_demo):
    model, tok, samples = _model_and_samples(tiny_model_dir, encoded_demo)
    plain, host = _collators(tok, model, padding_side="left", with_labels=False)
    samples[2] = plain.without_image(samples[2])  # a row whose image failed: text only
    batch = host(samples)
    assert batch["input_ids"].shape[0] == 8 and (batch["attention_mask"] == 0).any()
    kwargs = {k: v for k, v in plain(samples).items() if k != "pixel_values"}
    model.model.rope_deltas = None
    expected = model._prepare_position_ids_for_generation(kwargs["input_ids"], dict(kwargs))
    assert batch["position_ids"].shape == expected.shape == (4, 8, batch["input_ids"].shape[1])
    assert torch.equal(batch["position_ids"], expected)
    # a batch without any image: generate() then repeats the text row
    text_only = [plain.without_image(s) for s in samples[:3]]
    kwargs = {k: v for k, v in plain(text_only).items() if k != "pixel_values"}
    assert torch.equal(host(text_only)["position_ids"],
                       model._prepare_position_ids_for_generation(kwargs["input_ids"], dict(kwargs)))


def test_training_positions_equal_the_forwards_own(tiny_model_dir, encoded_demo):
    model, tok, samples = _model_and_samples(tiny_model_dir, encoded_demo)
    plain, host = _collators(tok, model)
    samples[5] = plain.without_image(samples[5])
    batch = host(samples)
    reference = plain(samples)
    expected, _ = model.model.get_rope_index(reference["input_ids"], reference["mm_token_type_ids"],
                                             image_grid_thw=reference["image_grid_thw"],
                                             attention_mask=reference["attention_mask"])
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    assert torch.equal(batch["position_ids"], expected)


def test_vision_indices_equal_the_librarys_for_mixed_grids():
    from transformers.vision_utils import (get_vision_attention_seqlens, get_vision_position_ids,
                                           get_vision_window_index)
    from common.speed.positions import HostLayout, vision_indices

    class FlashConfig:  # the library computes max lengths only for flash-style attention
        _attn_implementation = "flash_attention_2"
    layout = HostLayout(image_token_id=0, merge_size=2, window_size=112, patch_size=14)
    grids = torch.tensor([[1, 32, 32], [1, 10, 14], [1, 22, 36], [1, 32, 32], [2, 8, 12], [1, 4, 4]])
    ours = vision_indices(grids, layout)
    cu, max_len = get_vision_attention_seqlens(grids, FlashConfig())
    window_index, cu_windows = get_vision_window_index(grids, 2, 112, 14)
    assert torch.equal(ours["image_position_ids"], get_vision_position_ids(grids, 2))
    assert torch.equal(ours["image_cu_seqlens"], cu) and ours["image_max_seqlen"] == max_len
    assert torch.equal(ours["image_window_index"], window_index)
    assert torch.equal(ours["image_cu_window_seqlens"], cu_windows)
    assert ours["image_cu_window_seqlens"].dtype == cu_windows.dtype
    assert ours["image_max_window_seqlen"] == int((cu_windows[1:] - cu_windows[:-1]).max()) == 64


@pytest.mark.parametrize("attention", ["bucketed", "sdpa"])
def test_a_forward_and_its_loss_are_the_same_with_host_built_ids(tiny_model_dir, encoded_demo, attention):
    """Training's forward (right padding, labels) with the host-built position ids and vision indices gives
    the model's own logits and loss, through either vision attention."""
    from common.model.predict import with_normalized_pixels
    from common.speed.vision_attention import use_bucketed_vision_attention
    model, tok, samples = _model_and_samples(tiny_model_dir, encoded_demo)
    if attention == "bucketed":
        assert use_bucketed_vision_attention(model)
    plain, host = _collators(tok, model)
    samples[1] = plain.without_image(samples[1])
    outs = []
    for collate in (plain, host):
        batch = with_normalized_pixels(collate(samples), encoded_demo.spec())
        model.model.rope_deltas = None
        with torch.no_grad():
            outs.append(model(**batch))
    assert "image_window_index" in host(samples) and "position_ids" not in plain(samples)
    real = plain(samples)["attention_mask"].bool()  # the host batch attends causally alone: padding differs
    assert not real.all()
    assert_close_at_scale(outs[1].logits[real], outs[0].logits[real])
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    # the model reads them: a wrong window permutation or wrong positions change the logits
    for key in ("image_window_index", "position_ids"):
        batch = with_normalized_pixels(host(samples), encoded_demo.spec())
        batch[key] = batch[key].flip(-1)
        with torch.no_grad():
            assert not torch.allclose(model(**batch).logits, outs[0].logits)


def test_generate_and_the_static_decoder_write_the_same_tokens_with_host_built_ids(tiny_model_dir, encoded_demo):
    from common.speed.decode import StaticDecoder
    from common.model.loading import load_for_inference
    from common.model.predict import predict_batch
    model, tok, samples = _model_and_samples(tiny_model_dir, encoded_demo, n=6)
    plain, host = _collators(tok, model, padding_side="left", with_labels=False)
    samples[3] = plain.without_image(samples[3])
    spec = encoded_demo.spec()
    reference = predict_batch(model, tok, plain(samples), spec=spec)
    assert predict_batch(model, tok, host(samples), spec=spec) == reference
    fast, _ = load_for_inference(str(tiny_model_dir), None, "hf")
    decoder = StaticDecoder(fast, graphs=False)
    assert predict_batch(fast, tok, host(samples), spec=spec, decoder=decoder) == reference


def test_an_image_run_that_does_not_fit_its_grid_is_refused():
    from common.speed.positions import sample_positions
    ids = torch.tensor([1, 2, 9, 9, 9, 3])
    with pytest.raises(ValueError, match="3 image tokens for a 1x4x4 grid"):
        sample_positions(ids, torch.tensor([[1, 4, 4]]), image_token_id=9, merge_size=2)
    with pytest.raises(ValueError, match="no image grid"):
        sample_positions(ids, None, image_token_id=9, merge_size=2)
    assert sample_positions(torch.tensor([1, 9, 9, 9, 9, 3]), torch.tensor([[1, 4, 4]]), 9, 2).tolist() == [
        [0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]

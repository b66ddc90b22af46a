"""The label mask: only the answer and the `<|im_end|>` that closes it are learned."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.model.collate import IGNORE, for_tokenizer
from common.data.encode import Encoder, ImageSpec
from common.data.encode import load_tokenizer
from common.prompt import build_messages
from common.demo.tiny import ensure_tiny_model
from conftest import REAL_PROCESSOR


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def encoded(tok, spec, price, text="Item Name: Test Coffee, 12 Ounce\nValue: 12.0\nUnit: Ounce\n"):
    enc = Encoder(tok, spec, max_length=512)
    s = enc.encode(build_messages(text, None, price))
    return {"input_ids": torch.from_numpy(s["input_ids"].astype("int64")), "pixel_values": None,
            "image_grid_thw": None, "answer_start": s["answer_start"], "answer_end": s["answer_end"]}


def check_mask(tok, spec):
    col = for_tokenizer(tok)
    a, b = encoded(tok, spec, 12.99), encoded(tok, spec, 3.5, text="Item Name: X\nValue: nan\nUnit: None\n")
    batch = col([a, b])
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    for row, s in enumerate([a, b]):
        labels = batch["labels"][row]
        learned = (labels != IGNORE).nonzero().flatten().tolist()
        assert learned == list(range(s["answer_start"], s["answer_end"]))  # exactly the answer span
        assert tok.decode(labels[learned[:-1]]) == ("12.99" if row == 0 else "3.50")
        assert int(labels[learned[-1]]) == end_id  # the closing <|im_end|> is learned although >= vocab_size
        n = len(s["input_ids"])
        assert (batch["attention_mask"][row, :n] == 1).all() and (batch["attention_mask"][row, n:] == 0).all()
        assert (labels[n:] == IGNORE).all()  # right padding is masked
    # every other special token (ids >= vocab_size) in the prompt is masked
    prompt_specials = (batch["input_ids"][0, :a["answer_start"]] >= tok.vocab_size).sum()
    assert prompt_specials >= 4 and (batch["labels"][0, :a["answer_start"]] == IGNORE).all()


def test_label_mask_tiny_tokenizer(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    check_mask(tok, ImageSpec.from_model(str(tiny_dir)))


@pytest.mark.skipif(not REAL_PROCESSOR.exists(), reason="no copy of the real Qwen2.5-VL processor (QWEN_PROCESSOR_DIR)")
def test_label_mask_real_qwen_tokenizer():
    tok = load_tokenizer(str(REAL_PROCESSOR))
    assert tok.vocab_size == 151643 and tok.convert_tokens_to_ids("<|im_end|>") == 151645
    check_mask(tok, ImageSpec.from_model(str(REAL_PROCESSOR)))


def test_mixed_batch_images_and_text_only(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    spec = ImageSpec.from_model(str(tiny_dir))
    img_id = tok.convert_tokens_to_ids("<|image_pad|>")
    text_only = encoded(tok, spec, 5.0)
    # an image sample: 2x2 merged tokens for a 56x56 image -> 16 patches, 4 image tokens
    ids = text_only["input_ids"].tolist()
    k = ids.index(tok.convert_tokens_to_ids("<|im_start|>"), 1) + 3
    vs, ve = tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")
    with_image = {"input_ids": torch.tensor(ids[:k] + [vs] + [img_id] * 4 + [ve] + ids[k:]),
                  "pixel_values": torch.zeros(16, 1176), "image_grid_thw": torch.tensor([[1, 4, 4]]),
                  "answer_start": text_only["answer_start"] + 6, "answer_end": text_only["answer_end"] + 6}
    batch = for_tokenizer(tok)([text_only, with_image])
    assert batch["pixel_values"].shape == (16, 1176)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert batch["mm_token_type_ids"][0].sum() == 0 and batch["mm_token_type_ids"][1].sum() == 4
    assert (batch["labels"][1][batch["mm_token_type_ids"][1].bool()] == IGNORE).all()
    # the text-only ablation cuts the vision span and shifts the answer with it
    ablated = for_tokenizer(tok, drop_images=True)([with_image])
    assert "pixel_values" not in ablated
    assert ablated["input_ids"][0].tolist() == text_only["input_ids"].tolist()
    assert ablated["labels"][0].tolist() == for_tokenizer(tok)([text_only])["labels"][0].tolist()


def test_generation_collator_left_pads_and_cuts_the_answer(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    spec = ImageSpec.from_model(str(tiny_dir))
    a, b = encoded(tok, spec, 12.99), encoded(tok, spec, 3.5, text="Item Name: a much longer name " * 3)
    batch = for_tokenizer(tok, "left", with_labels=False)([a, b])
    assert "labels" not in batch
    assert batch["input_ids"].shape[1] == max(a["answer_start"], b["answer_start"])
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # both end at the opened assistant turn
    assert tok.decode(batch["input_ids"][0, -10:]).endswith("<|im_start|>assistant\n")

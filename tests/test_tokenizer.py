"""Tokenizers: stable ids, round trips, EOS handling, padding."""

import pathlib

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from rl_jax.tokenizer import CHAR_ALPHABET, CharTokenizer, HFTokenizer

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
TINY_QWEN2 = SHARED / "models" / "tiny-qwen2" / "tokenizer.json"


def test_char_tokenizer_ids_are_stable():
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len(CHAR_ALPHABET)
    # Pinned: cached warm-start checkpoints depend on these ids.
    assert tok.encode("09+=#") == [3, 12, 13, 17, 18]
    assert tok.encode("a", add_bos=True, add_eos=True) == [1, 31, 2]


def test_char_tokenizer_round_trip_and_eos():
    tok = CharTokenizer()
    text = "3+5=8+2=10#10 so um, let me see?"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("12", add_bos=True, add_eos=True) + tok.encode("junk")
    assert tok.decode(ids) == "12"
    assert tok.decode(ids, skip_special=False) == "<bos>12"


def test_char_tokenizer_rejects_unknown():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_char_tokenizer_batches():
    tok = CharTokenizer()
    ids, mask = tok.encode_batch(["1+2=", "3="], add_bos=True)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, [[1, 4, 13, 5, 17], [0, 0, 1, 6, 17]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ids, mask = tok.encode_batch(["1", "23"], length=3, padding_side="right")
    np.testing.assert_array_equal(ids, [[4, 0, 0], [5, 6, 0]])
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match="length=1"):
        tok.encode_batch(["12"], length=1)
    responses = np.array([[7, 18, 2, 9], [4, 4, 4, 4]], dtype=np.int32)
    assert tok.decode_batch(responses) == ["4#", "1111"]


@pytest.fixture(scope="module")
def offline_tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained offline on a few lines of arithmetic text."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [f"What is {a}+{b}? The answer is {a + b}." for a in range(20) for b in range(20)]
    tok.train_from_iterator(lines, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip(offline_tokenizer_json):
    tok = HFTokenizer(offline_tokenizer_json, eos_token="<|endoftext|>", bos_token="<s>")
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 0, 1)
    for text in ["What is 12+7? The answer is 19.", "  odd  spacing\nand café ünïcode"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode("What is 3+4?", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 0
    assert tok.decode(ids + tok.encode(" tail")) == "What is 3+4?"
    batch, mask = tok.encode_batch(["What is 1+1?", "7"], padding_side="right")
    assert tok.decode_batch(batch) == ["What is 1+1?", "7"]
    assert mask.sum(axis=1).tolist() == [len(tok.encode("What is 1+1?")), len(tok.encode("7"))]


def test_hf_tokenizer_requires_known_eos(offline_tokenizer_json):
    with pytest.raises(ValueError, match="no eos_token"):
        HFTokenizer(offline_tokenizer_json)
    with pytest.raises(ValueError, match="'<nope>'"):
        HFTokenizer(offline_tokenizer_json, eos_token="<nope>")


@pytest.mark.skipif(not TINY_QWEN2.exists(), reason=f"{TINY_QWEN2} not present")
def test_hf_tokenizer_tiny_qwen2():
    tok = HFTokenizer(TINY_QWEN2.parent)  # specials from tokenizer_config.json
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (512, 0, 0, None)
    prompt = "What is 23+58? Answer:"
    assert tok.encode(prompt) == [272, 260, 466, 13, 23, 26, 33, 273, 28]  # tiny_model_info.json
    assert tok.encode(prompt, add_bos=True) == tok.encode(prompt)
    assert tok.decode(tok.encode(prompt + " 81")) == prompt + " 81"
    ids, mask = tok.encode_batch([prompt, "Hi"])
    hi_len = len(tok.encode("Hi"))
    assert ids.shape == (2, 9)
    assert mask[1].tolist() == [0] * (9 - hi_len) + [1] * hi_len

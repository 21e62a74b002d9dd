"""GSM8K: the TFDS builder over JSONL (no TensorFlow), the prompt, the task (reward: test_gsm8k_reward)."""

import decimal
import json
import pathlib
import re
import shutil
import sys

import numpy as np
import pytest

from rl_jax.tasks import gsm8k

REPO = pathlib.Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
TINY_DIR = REPO / "tests" / "fixtures" / "gsm8k_tiny"
TOKENIZER_DIR = REPO.parent / "shared" / "models" / "tiny-qwen2"
# sha256 of the files, from ../shared/data/gsm8k/README.md
SOURCE_SHA256 = {
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}

needs_gsm8k = pytest.mark.skipif(
    not GSM8K_DIR.is_dir(), reason=f"GSM8K data directory {GSM8K_DIR} is absent"
)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def builder_module():
    return pytest.importorskip(
        "rl_jax.tasks.gsm8k_builder", reason="needs the 'data' extra (tensorflow-datasets)"
    )


@pytest.fixture(scope="module")
def real_splits(builder_module, tmp_path_factory):
    """Both real splits prepared once into a fresh cache and read back through TFDS."""
    if not GSM8K_DIR.is_dir():
        pytest.skip(f"GSM8K data directory {GSM8K_DIR} is absent")
    cache = tmp_path_factory.mktemp("tfds")
    splits = {s: builder_module.load_split(GSM8K_DIR, s, cache) for s in ("train", "test")}
    return cache, splits


# --- builder -------------------------------------------------------------------------------


@needs_gsm8k
def test_builder_prepares_real_files_and_reads_them_back_without_tensorflow(
    builder_module, real_splits
):
    import tensorflow_datasets as tfds

    cache, splits = real_splits
    assert len(splits["train"]) == 7473 and len(splits["test"]) == 1319
    for split, examples in splits.items():
        rows = _rows(GSM8K_DIR / f"{split}.jsonl")
        assert [e.index for e in examples] == list(range(len(rows)))
        assert [(e.question, e.answer) for e in examples] == [
            (r["question"], r["answer"]) for r in rows
        ]
    assert splits["test"][0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert splits["test"][0].gold == 18

    builder = builder_module.prepare(GSM8K_DIR, cache)
    assert builder.info.metadata["source_sha256"] == SOURCE_SHA256
    assert builder.info.splits["train"].num_examples == 7473
    source = tfds.data_source("gsm8k_jsonl", split="test", data_dir=str(cache))
    assert len(source) == 1319
    assert sorted(int(source[i]["index"]) for i in range(len(source))) == list(range(1319))
    assert list((cache / "gsm8k_jsonl" / "1.0.0").glob("*.array_record*"))
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question": "q", "answer": "a #### 1"', "invalid JSON"),
        ('["question", "answer"]', "expected a JSON object, got list"),
        ('{"question": "q"}', "field 'answer' must be a string"),
        ('{"question": 7, "answer": "#### 7"}', "field 'question' must be a string"),
        ('{"question": "q", "answer": "it is seven"}', "gold answer must end in"),
        ('{"question": "q", "answer": "#### seven"}', "gold answer must end in"),
    ],
)
def test_malformed_line_names_file_and_line(builder_module, tmp_path, bad_line, message):
    good = (TINY_DIR / "test.jsonl").read_text().splitlines()
    path = tmp_path / "test.jsonl"
    # Line 3 is blank (skipped but counted), so the bad line is line 4.
    path.write_text("\n".join([good[0], good[1], "", bad_line, good[0]]) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:4: .*{re.escape(message)}"):
        builder_module.read_jsonl(path)


def test_malformed_line_fails_preparation_with_its_location(builder_module, tmp_path):
    source = tmp_path / "jsonl"
    shutil.copytree(TINY_DIR, source)
    with (source / "train.jsonl").open("a") as f:
        f.write("{not json}\n")
    with pytest.raises(ValueError, match=re.escape(f"{source / 'train.jsonl'}:5: ")):
        builder_module.load_split(source, "train", tmp_path / "tfds")
    with pytest.raises(ValueError, match="split must be one of"):
        builder_module.load_split(TINY_DIR, "validation", tmp_path / "tfds")


def test_changed_source_is_prepared_again(builder_module, tmp_path):
    source, cache = tmp_path / "jsonl", tmp_path / "tfds"
    shutil.copytree(TINY_DIR, source)
    first = builder_module.load_split(source, "test", cache)
    assert [e.gold for e in first] == [42, decimal.Decimal("4.5")]
    extra = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
    with (source / "test.jsonl").open("a") as f:
        f.write(json.dumps(extra) + "\n")
    second = builder_module.load_split(source, "test", cache)
    assert second[:2] == first and (second[2].index, second[2].question) == (2, extra["question"])


# --- prompt and task -----------------------------------------------------------------------


def test_prompt_follows_the_r1_layout():
    prompt = gsm8k.format_prompt("What is 2 + 2?")
    assert prompt == (
        f"<|im_start|>system\n{gsm8k.SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<think> reasoning process here </think>" in gsm8k.SYSTEM_PROMPT
    assert "<answer> answer here </answer>" in gsm8k.SYSTEM_PROMPT
    plain = gsm8k.format_prompt("Q?", template="plain")
    assert plain.startswith(gsm8k.SYSTEM_PROMPT) and plain.endswith("User: Q?\nAssistant:")
    assert [m["role"] for m in gsm8k.chat_messages("Q?")] == ["system", "user"]
    with pytest.raises(ValueError, match="template must be one of"):
        gsm8k.format_prompt("Q?", template="alpaca")


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"tokenizer {TOKENIZER_DIR} is absent")
    from rl_jax.tokenizer import HFTokenizer

    return HFTokenizer(TOKENIZER_DIR)


def test_model_chat_template_renders_as_transformers_does(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    messages = gsm8k.chat_messages("Natalia sold 48 clips. How many?")
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected
    assert gsm8k.format_prompt("Q?", "model", tokenizer=tokenizer) == gsm8k.format_prompt("Q?")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", bare)
    shutil.copy(TOKENIZER_DIR / "tokenizer_config.json", bare)
    from rl_jax.tokenizer import HFTokenizer

    with pytest.raises(ValueError, match=f"{re.escape(str(bare))} has no chat template"):
        HFTokenizer(bare).apply_chat_template(messages)


def test_task_serves_train_prompts_held_out_test_and_rewards(builder_module, tokenizer, tmp_path):
    options = {"data_dir": str(TINY_DIR), "tfds_data_dir": str(tmp_path)}
    task = gsm8k.GSM8KTask(tokenizer=tokenizer, **options)
    train_questions = [r["question"] for r in _rows(TINY_DIR / "train.jsonl")]
    assert [e.prompt for e in task.train_examples()] == [
        gsm8k.format_prompt(q) for q in train_questions
    ]
    eval_examples = task.eval_examples()
    assert [e.answer.rsplit("####")[-1].strip() for e in eval_examples] == ["42", "4.5"]
    assert task.eval_examples(1) == eval_examples[:1]

    batch = task.sample_prompts(np.random.default_rng(0), 3)
    assert batch == task.sample_prompts(0, 3)
    assert len({e.prompt for e in batch}) == 3 and set(batch) <= set(task.train_examples())

    longest = max(
        len(tokenizer.encode(e.prompt, add_bos=True))
        for e in task.train_examples() + task.eval_examples()
    )
    assert task.max_prompt_len == longest and task.max_response_len == 1024
    example = eval_examples[1]
    assert task.reward("<think>9/2</think> <answer>4.5</answer>", example) == pytest.approx(1.1)
    assert task.reward("4.5", example) == pytest.approx(-0.1)
    # correct: the accuracy term alone (what rl_jax.evaluate counts), format aside
    assert task.correct("<think>9/2</think> <answer>4.5</answer>", example)
    assert task.correct("<answer>4.5</answer>", example)  # ill-formed, still the right answer
    assert not task.correct("4.5", example) and not task.correct("<answer>4</answer>", example)

    small = gsm8k.GSM8KTask(tokenizer=tokenizer, num_eval=1, format_weight=0.0, **options)
    assert len(small.eval_examples()) == 1 and small.reward("<answer>42</answer>", example) == 0
    with pytest.raises(ValueError, match=f"max_prompt_len must be at least {longest}"):
        gsm8k.GSM8KTask(tokenizer=tokenizer, max_prompt_len=longest - 1, **options)
    with pytest.raises(ValueError, match="num_eval must be at most 2"):
        gsm8k.GSM8KTask(tokenizer=tokenizer, num_eval=3, **options)
    with pytest.raises(ValueError, match="template must be one of"):
        gsm8k.GSM8KConfig(template="alpaca")
    with pytest.raises(ValueError, match="tokenizer must be given"):
        gsm8k.GSM8KTask(**options)


# --- bad input: a ValueError naming the field or the file ----------------------------------


def test_missing_data_dir_or_split_file_names_the_field(builder_module, tokenizer, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"task_options.data_dir=.*nowhere' is not a directory"):
        gsm8k.GSM8KTask(tokenizer=tokenizer, data_dir=str(missing), tfds_data_dir=str(tmp_path))
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(TINY_DIR / "train.jsonl", half)
    with pytest.raises(ValueError, match=r"has no test.jsonl \(found \['train.jsonl'\]\)"):
        builder_module.load_split(half, "train", tmp_path / "tfds")


def test_non_utf8_or_empty_file_is_named(builder_module, tmp_path):
    source = tmp_path / "jsonl"
    shutil.copytree(TINY_DIR, source)
    test_file = source / "test.jsonl"
    lines = test_file.read_bytes().splitlines()
    test_file.write_bytes(lines[0] + b"\n" + lines[1].replace(b"4.5", b"4\xff5") + b"\n")
    message = rf"^{re.escape(str(test_file))}:2: not UTF-8 \(byte 0xff at column \d+\)"
    with pytest.raises(ValueError, match=message):
        builder_module.load_split(source, "test", tmp_path / "tfds")
    test_file.write_bytes(b"\n\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(test_file))} holds no GSM8K problems"):
        builder_module.load_split(source, "test", tmp_path / "tfds")


def test_max_prompt_tokens_drops_long_prompts_and_says_how_many(
    builder_module, tokenizer, tmp_path, capsys
):
    options = {"data_dir": str(TINY_DIR), "tfds_data_dir": str(tmp_path)}
    full = gsm8k.GSM8KTask(tokenizer=tokenizer, **options)
    examples = full.train_examples() + full.eval_examples()
    lengths = sorted({len(tokenizer.encode(e.prompt, add_bos=True)) for e in examples})
    assert len(lengths) > 1, "the fixture's prompts should differ in length"
    limit = lengths[-2]  # drops the longest prompt(s) only
    short = gsm8k.GSM8KTask(tokenizer=tokenizer, max_prompt_tokens=limit, **options)
    kept = short.train_examples() + short.eval_examples()
    assert all(len(tokenizer.encode(e.prompt, add_bos=True)) <= limit for e in kept)
    assert 0 < len(kept) < len(examples) and short.max_prompt_len <= limit
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("gsm8k: dropped ") and f"max_prompt_tokens={limit}" in line
    with pytest.raises(ValueError, match="max_prompt_tokens=1 drops every train problem"):
        gsm8k.GSM8KTask(tokenizer=tokenizer, max_prompt_tokens=1, **options)
    with pytest.raises(ValueError, match="max_prompt_tokens must be a positive integer"):
        gsm8k.GSM8KConfig(max_prompt_tokens=0)


def test_preparation_is_quiet_unless_verbose(builder_module, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(builder_module.VERBOSE_ENV, raising=False)
    assert len(builder_module.load_split(TINY_DIR, "test", tmp_path / "quiet")) == 2
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err and "\r" not in out + err, out + err
    monkeypatch.setenv(builder_module.VERBOSE_ENV, "1")
    assert len(builder_module.load_split(TINY_DIR, "test", tmp_path / "verbose")) == 2
    assert "Downloading and preparing" in "".join(capfd.readouterr())

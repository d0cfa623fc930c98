"""Helpers for the evaluation tests: a real byte-level tokenizer, tiny models sized for it, hand-made records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from nora.evaluation import CommonsenseItem, parse_item
from nora.prompts import format_prompt

BYTE_VOCAB = 259  # 256 byte tokens + <pad>, <eos>, <bos>


def byte_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: one token per byte, so any text encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab.update({"<pad>": 256, "<eos>": 257, "<bos>": 258})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side=padding_side
    )


def byte_llama(seed: int = 0):
    return tiny_llama(seed, vocab_size=BYTE_VOCAB, max_position_embeddings=1024, pad_token_id=256, eos_token_id=257)


def byte_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=BYTE_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=1024, bos_token_id=258, eos_token_id=257
    )
    return GPT2LMHeadModel(config).eval()


# Hand-made records in the LLM-Adapters format, one per answer family.
RECORDS = {
    "boolq": {
        "instruction": "Please answer the following question with true or false, question: is ice cold?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
    "piqa": {
        "instruction": "Please choose the correct solution to the question: dry wet hands\n\n"
        "Solution1: use a towel\n\nSolution2: use a bucket of water\n\nAnswer format: solution1/solution2",
        "input": "",
        "output": "the correct answer is solution1",
        "answer": "solution1",
    },
    "social_i_qa": {
        "instruction": "Please choose the correct answer to the question: Sam gave Kim a gift. How does Kim "
        "feel?\n\nAnswer1: grateful Answer2: angry Answer3: bored\n\nAnswer format: answer1/answer2/answer3",
        "input": "",
        "output": "the correct answer is answer1",
        "answer": "answer1",
    },
    "hellaswag": {
        "instruction": "Please choose the correct ending to complete the given sentence: Cooking: A man "
        "cracks eggs into a pan. he\n\nEnding1: fries them. Ending2: paints the wall. Ending3: swims away. "
        "Ending4: sings to the moon.\n\nAnswer format: ending1/ending2/ending3/ending4",
        "input": "",
        "output": "the correct answer is ending1",
        "answer": "ending1",
    },
    "winogrande": {
        "instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
        "The cup fell off the table because _ was wobbly.\n\nOption1: the table Option2: the cup "
        "Answer format: option1/option2",
        "input": "",
        "output": "the correct answer is option1",
        "answer": "option1",
    },
    "ARC-Easy": {
        "instruction": "Please choose the correct answer to the question: What gives plants energy?\n\n"
        "Answer1: sunlight Answer2: rocks Answer3: sand Answer4: noise Answer5: wind\n\n"
        "Answer format: answer1/answer2/answer3/answer4/answer5",
        "input": "",
        "output": "the correct answer is answer1",
        "answer": "answer1",
    },
}


def items() -> list[CommonsenseItem]:
    return [parse_item(record, name) for name, record in RECORDS.items()]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of RECORDS and the prompt template: short sequences, fast training."""
    words = set()
    for record in RECORDS.values():
        for text in (format_prompt(record["instruction"]), record["output"], record["instruction"]):
            words |= set(re.findall(r"\w+|[^\w\s]", text))
    vocab = {word: i for i, word in enumerate(["<pad>", "<eos>", "<unk>", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def memorised_model(tokenizer, pairs: list[tuple[str, str]], steps: int = 60, lr: float = 1e-2):
    """A tiny Llama trained to answer each prompt with its response (loss on the response only)."""
    model = tiny_llama(0, vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
    enc = tokenizer([p + r + tokenizer.eos_token for p, r in pairs], padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    for row, (prompt, _) in enumerate(pairs):
        labels[row, : len(tokenizer(prompt).input_ids)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def label_model():
    """Trained to respond `the correct answer is <gold label>` to each of RECORDS' prompts."""
    tokenizer = word_tokenizer()
    return memorised_model(tokenizer, [(i.prompt, i.label_targets[i.gold]) for i in items()]), tokenizer


@pytest.fixture(scope="session")
def text_model():
    """Trained to respond with the gold choice's text to each of RECORDS' prompts."""
    tokenizer = word_tokenizer()
    return memorised_model(tokenizer, [(i.prompt, i.choices[i.gold]) for i in items()]), tokenizer


def write_task(directory: Path, name: str, records: list[dict]) -> Path:
    path = directory / "commonsense" / name / "test.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "### Response:\nthe correct answer is answer3 — ünïcode"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tokenizer.decode(ids) == text

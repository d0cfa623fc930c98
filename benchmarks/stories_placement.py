"""NoRA's old and new defaults on the 260K TinyStories Llama (real weights, ../shared/models/stories260K), in the
budget of tests/test_training.py (its instruction records, batch 8, 40 steps, lr 2e-3): held-out loss before →
after for placement "sqrt" and "none" at a small explicit shape and at the defaults' shape (r = min(d, k)).

    python benchmarks/stories_placement.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the training test's records, so the budget is exactly the test's

SHAPES = [
    ("r 8, r' 4, sqrt", {"r": 8, "inner_r": 4, "placement": "sqrt"}),
    ("r 8, r' 4, none", {"r": 8, "inner_r": 4, "placement": "none"}),
    ("r min(d, k), r' 8, sqrt (old defaults)", {"r": 1.0, "inner_r": 8, "placement": "sqrt"}),
    ("r min(d, k), r' 32, none (new defaults)", {"r": 1.0, "inner_r": 32, "placement": "none"}),
]


def main() -> None:
    from test_training import RECORDS

    from nora.convert import convert_llama2c
    from nora.training import TrainConfig, train

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    source = ROOT.parent / "shared" / "models" / "stories260K"
    work = Path(tempfile.mkdtemp(prefix="nora-stories-"))
    data = work / "train.json"
    data.write_text(json.dumps(RECORDS))
    model = convert_llama2c(source / "stories260K.bin", source / "tok512.bin", work / "model")
    for i, (name, adapter) in enumerate(SHAPES):
        config = TrainConfig(model=str(model), data=str(data), eval_data=str(data), output_dir=str(work / str(i)),
                             batch_size=8, max_steps=40, logging_steps=5, progress=False, plot=False,
                             method="nora", adapter=adapter, learning_rate=2e-3)  # fmt: skip
        s = train(config).summary
        ratio = s["eval_loss"] / s["initial_eval_loss"]
        print(f"{name:42s} eval loss {s['initial_eval_loss']:.2f} → {s['eval_loss']:.2f} ({ratio:.2f}×)", flush=True)


if __name__ == "__main__":
    main()

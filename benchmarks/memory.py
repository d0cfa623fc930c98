"""Memory at real shapes, counted exactly: PEFT LoRA vs every nora method, with and without nora's options.

    python benchmarks/memory.py --quick                                   # seconds: tiny shapes (the suite's test)
    python benchmarks/memory.py --shape llama-3-8b --dtype bf16 fp32      # the real Llama-3-8B decoder layer
    python benchmarks/memory.py --project-only                            # the longest-context table from the JSON

Per shape and dtype: L decoder layers (random weights, LlamaForCausalLM built from a config, SDPA) and the real
vocabulary head. The input embedding is built with few rows (its output, tokens × hidden, does not depend on the
vocabulary); the head has every row of the real vocabulary. Each row is one method with a set of options:

- saved: autograd's saved tensors, each storage once, the model's weights (parameters and buffers) left out,
  charged to the decoder layer (or the head and loss) whose forward created them;
- held: the storages that ops created and that are still alive when the forward ends (LiveBytes): what backward
  keeps, checkpoint caches included — the activation figure for rows with checkpointing;
- peak: the largest live total of storages created during a whole step (forward, backward, AdamW step), on top of
  the weights and the optimizer state that exist before it; whole step = weights + AdamW state + peak;
- FLOPs of forward + backward (torch's FlopCounterMode; checkpointing's recompute included);
- speed: step time of PEFT LoRA r32 stock ÷ the row's, from steps alternating in one process (a ratio only).

Counts are exact and deterministic; the projection to 32 layers and other token counts is stated where printed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from counting import LiveBytes, SavedBytes
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora import accel
from nora.accel import flop_counter

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152
    ),
    "quick": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}
EMBED_ROWS = 256
# tokens per chunk of the chunked loss: below the measured T, so each step's largest chunk is the same at T and 2T
# and one chunk's logits land in the fixed part (nora's own default, auto_chunk_tokens, is 523 at vocabulary 128k)
LOSS_CHUNK = {"quick": 8, "full": 64}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTION_SETS = {"stock": (), "ckpt": ("ckpt",), "lean": ("lean",), "lean+chunked": ("lean", "chunked")}
OPTION_SETS["lean+chunked+ckpt"] = ("lean", "chunked", "ckpt")


@dataclass
class Row:
    method: str
    options: tuple[str, ...]
    wrap: Callable[[nn.Module], nn.Module]

    @property
    def name(self) -> str:
        return f"{self.method} {'+'.join(self.options) or 'stock'}"


def peft_lora(r: int) -> Callable:
    def wrap(m: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))

    return wrap


def nora_method(config: nora.AdapterConfig) -> Callable:
    return lambda m: nora.get_peft_model(m, config)


def rows(quick: bool) -> list[Row]:
    k = 8 if quick else 1  # quick: every rank ÷ 8, to fit hidden 64
    lora = peft_lora(32 // k)
    methods = {
        f"nora-lora-r{32 // k}": nora.LoraConfig(r=32 // k, alpha=64 // k),
        f"nora-nora-r{128 // k}-i{32 // k}": nora.NoraConfig(r=128 // k, inner_r=32 // k, svd="randomized"),
        f"nora-lora-xs-r{64 // k}": nora.LoraXSConfig(r=64 // k, svd="randomized"),
        f"nora-svfit-r{64 // k}": nora.SVFitConfig(r=64 // k, svd="randomized"),
        f"nora-pissa-r{32 // k}": nora.PissaConfig(r=32 // k, svd="randomized"),
        f"nora-dora-r{32 // k}": nora.DoraConfig(r=32 // k, alpha=64 // k),
    }
    peft = f"peft-lora-r{32 // k}"
    # PEFT with every generic option: checkpointing too (nora.accel's, which keeps nothing of a PEFT layer)
    out = [Row(peft, options, lora) for options in [(), ("lean", "chunked"), ("lean", "chunked", "ckpt")]]
    for name, config in methods.items():
        out += [Row(name, options, nora_method(config)) for options in OPTION_SETS.values()]
    return out


def missing_options() -> dict[str, str]:
    """{option: why it cannot run} for the options whose code is not importable here."""
    missing = {}
    wanted = [("lean", "nora.lean", "lean_activations"), ("chunked", "nora.loss", "chunked_causal_lm_loss")]
    for option, module, attr in wanted:
        try:
            getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            missing[option] = f"{module}.{attr} is not importable ({e})"
    if not hasattr(accel, "enable_adapter_checkpointing"):
        missing["ckpt"] = "nora.accel.enable_adapter_checkpointing is missing"
    return missing


def build_head(shape: str, dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(1)
    cfg = SHAPES[shape]
    head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False, dtype=dtype)
    nn.init.normal_(head.weight, std=0.02)
    return head.requires_grad_(False)


def build_model(shape: str, layers: int, dtype: torch.dtype, head: nn.Linear) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        **{**SHAPES[shape], "vocab_size": EMBED_ROWS},
        num_hidden_layers=layers,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.lm_head = head  # shared by every model of a run: frozen, never adapted, the real vocabulary
    model.config.vocab_size = head.out_features
    return model


def causal_lm(model: nn.Module) -> LlamaForCausalLM:
    return next(m for m in model.modules() if isinstance(m, LlamaForCausalLM))


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


class Trainee:
    """One row's model, its optimizer and how its loss is computed."""

    def __init__(self, row: Row, shape: str, layers: int, dtype: torch.dtype, head: nn.Linear) -> None:
        base = build_model(shape, layers, dtype, head)
        self.base_weight_bytes = storage_bytes(weight_tensors(base))
        self.model = row.wrap(base)
        self.lm = causal_lm(self.model)
        self.notes: dict[str, object] = {}
        if "lean" in row.options:
            from nora.lean import lean_activations

            self.notes["lean"] = lean_activations(self.model, enable=True)
        if "ckpt" in row.options:
            accel.enable_adapter_checkpointing(self.model)
            self.notes["ckpt"] = f"adapter policy, keeps matmul outputs ≤ {accel.max_adapter_rank(self.model)} wide"
        self.chunk = LOSS_CHUNK["quick" if shape == "quick" else "full"] if "chunked" in row.options else 0
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.layers = list(self.lm.model.layers)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.chunk:
            from nora.loss import chunked_causal_lm_loss

            hidden = self.lm.model(input_ids=ids).last_hidden_state
            return chunked_causal_lm_loss(hidden, self.lm.lm_head, ids, chunk_tokens=self.chunk)
        return self.lm(input_ids=ids, labels=ids).loss

    def step(self, ids: torch.Tensor) -> float:
        loss = self.loss(ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def bucket_hooks(self, counters: list) -> list:
        """Charge new storages to the decoder layer whose forward runs, and to "head" after the last one."""

        def enter(name: str) -> Callable:
            def hook(*_: object) -> None:
                for c in counters:
                    c.bucket = name

            return hook

        handles = [layer.register_forward_pre_hook(enter(f"layer{i}")) for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(enter("head")))
        for c in counters:
            c.bucket = "embed"
        return handles

    def count(self, ids: torch.Tensor) -> tuple[dict[str, int], dict[str, int], int]:
        """One step's saved and held bytes by bucket, and its peak of live bytes beyond weights and AdamW state."""
        weights = weight_tensors(self.model)
        saved, live = SavedBytes(exclude=weights), LiveBytes(exclude=weights)
        handles = self.bucket_hooks([saved, live])
        try:
            with live:
                with saved.hooks():
                    loss = self.loss(ids)
                held = live.alive_by_bucket()
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
        return dict(saved.by_bucket), held, live.peak

    def measure(self, ids: torch.Tensor) -> dict:
        """Bytes at T and 2T tokens: per token is their difference ÷ T, the fixed part what is left at T."""
        loss = self.step(ids)  # the first step creates AdamW's state, which the measured steps then find
        tokens, layers = ids.numel(), len(self.layers)
        saved, held, peak = self.count(ids)
        saved2, held2, peak2 = self.count(ids.repeat(1, 2))
        with flop_counter() as flops:
            self.loss(ids).backward()
        self.opt.zero_grad(set_to_none=True)
        weights = weight_tensors(self.model)
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        # a middle layer is the steady state: its input needs a gradient (layer 0's does not, the embedding is
        # frozen) and its output is the next layer's input (which a checkpoint keeps)
        mid = f"layer{min(1, layers - 1)}"
        per_layer = (held2.get(mid, 0) - held.get(mid, 0)) / tokens
        step_per_token = (peak2 - peak) / tokens
        trainable_bytes = sum(p.numel() * p.element_size() for p in self.params)
        weight_bytes, optimizer_bytes = storage_bytes(weights), storage_bytes(state)
        return {
            "trainable_params": sum(p.numel() for p in self.params),
            "trainable_bytes": trainable_bytes,
            "weight_bytes": weight_bytes,
            "adapter_frozen_bytes": weight_bytes - self.base_weight_bytes - trainable_bytes,
            "optimizer_bytes": optimizer_bytes,
            "saved_by_bucket": saved,
            "held_by_bucket": held,
            "saved_by_bucket_2x": saved2,
            "held_by_bucket_2x": held2,
            "saved_per_token_per_layer": (saved2.get(mid, 0) - saved.get(mid, 0)) / tokens,
            "held_per_token_per_layer": per_layer,
            # held per layer whatever the tokens (DoRA's weight norms): not activations, state of the step
            "held_fixed_per_layer": held.get(mid, 0) - tokens * per_layer,
            "step_peak_bytes": peak,
            "step_peak_bytes_2x": peak2,
            "step_per_token": step_per_token,
            "step_fixed_bytes": peak - tokens * step_per_token,
            "rest_per_token": step_per_token - layers * per_layer,
            "whole_step_bytes": weight_bytes + optimizer_bytes + peak,
            "flops": flops.get_total_flops(),
            "loss": loss,
            "notes": self.notes,
        }


def run_config(shape: str, dtype_name: str, layers: int, tokens: int, pairs: int, args) -> dict:
    path = args.out / f"memory-{shape}-{dtype_name}.json"
    record = {"shape": shape, "dtype": dtype_name, "layers": layers, "tokens": tokens, "rows": {}, "skipped": {}}
    record["loss_chunk_tokens"] = LOSS_CHUNK["quick" if shape == "quick" else "full"]
    if args.resume and path.exists():
        previous = json.loads(path.read_text())
        if (previous["layers"], previous["tokens"]) == (layers, tokens):
            record = previous
    dtype = DTYPES[dtype_name]
    head = build_head(shape, dtype)
    ids = torch.randint(0, EMBED_ROWS, (1, tokens), generator=torch.Generator().manual_seed(0))
    missing = missing_options()
    table = rows(args.quick)
    reference = Trainee(table[0], shape, layers, dtype, head) if pairs else None
    if reference:
        reference.step(ids)
    for row in table:
        if args.only and not any(o == row.name if " " in o else o in row.name for o in args.only):
            continue
        lacking = [missing[o] for o in row.options if o in missing]
        if lacking:
            record["skipped"][row.name] = "; ".join(lacking)
            print(f"skipped {row.name}: {record['skipped'][row.name]}", flush=True)
            continue
        if row.name in record["rows"]:
            continue
        record["skipped"].pop(row.name, None)
        trainee = Trainee(row, shape, layers, dtype, head)
        if "ckpt" in row.options and tokens <= accel.max_adapter_rank(trainee.model):
            # the policy keeps matmul outputs ≤ r wide: at T ≤ r that takes in token-wide products too
            record["skipped"][row.name] = f"--tokens {tokens} ≤ the adapter rank: give more tokens to checkpoint"
            print(f"skipped {row.name}: {record['skipped'][row.name]}", flush=True)
            continue
        result = trainee.measure(ids)
        if reference:
            mine, theirs = [], []
            for _ in range(pairs):
                for who, times in ((reference, theirs), (trainee, mine)):
                    start = time.perf_counter()
                    who.step(ids)
                    times.append(time.perf_counter() - start)
            result["speed_vs_reference"] = statistics.median(theirs) / statistics.median(mine)
        record["rows"][row.name] = result
        path.write_text(json.dumps(record, indent=1))
        print(f"{shape} {dtype_name} {row.name}: {summary_line(result)}", flush=True)
        del trainee
        gc.collect()
    path.write_text(json.dumps(record, indent=1))
    return record


def summary_line(r: dict) -> str:
    return (
        f"held/token/layer {r['held_per_token_per_layer']:,.0f} B, saved {r['saved_per_token_per_layer']:,.0f} B, "
        f"whole step {r['whole_step_bytes'] / 2**20:,.1f} MiB, {r['flops'] / 1e9:,.2f} GFLOP, "
        f"speed × ref {r.get('speed_vs_reference', float('nan')):.2f}"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", choices=[s for s in SHAPES if s != "quick"], default=["llama-3-8b"])
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--tokens", type=int, help="tokens per step, measured again at 2× (default 144; 32 with --quick)")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers: the middle one is the per-layer figure")
    ap.add_argument("--time-pairs", type=int, default=3, help="alternating reference/row steps timed per row")
    ap.add_argument(
        "--untimed",
        nargs="*",
        default=["llama-3-8b:fp32"],
        help="shape:dtype run without the reference model kept for timing (the 8B layers in fp32 would pass 6 GB)",
    )
    ap.add_argument("--only", nargs="*", help="rows named so, or (a word without spaces) whose name contains it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the JSON of the same config")
    ap.add_argument("--project-only", action="store_true", help="only the tables and the longest-context projection")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # step-time ratios on one core, as the figures
    try:
        return run_all(args)
    finally:
        torch.set_num_threads(threads)


def run_all(args: argparse.Namespace) -> dict:
    from memory_report import longest_context, print_tables

    args.out.mkdir(parents=True, exist_ok=True)
    shapes = ["quick"] if args.quick else args.shape
    records = []
    for shape in shapes:
        for dtype_name in args.dtype:
            path = args.out / f"memory-{shape}-{dtype_name}.json"
            if args.project_only:
                if path.exists():
                    records.append(json.loads(path.read_text()))
                continue
            tokens = args.tokens or (32 if args.quick else 144)
            pairs = 0 if f"{shape}:{dtype_name}" in args.untimed else args.time_pairs
            records.append(run_config(shape, dtype_name, args.layers, tokens, pairs, args))
    print_tables(records)
    projection = longest_context(records, args.out) if not args.quick else None
    return {"records": records, "projection": projection}


if __name__ == "__main__":
    main()

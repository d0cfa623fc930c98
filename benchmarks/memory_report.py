"""benchmarks/memory.py's tables, the issue-28 targets and the longest trainable context of Llama-3-8B.

Projection (stated in the output): a step of T tokens through the 32 layers of Llama-3-8B takes
    bytes(T) = W + 32·F + R + T·(32·a + h)
W: the frozen base's weights (bf16: 2 B/param; nf4: the decoder's linear weights at NF4_BYTES per parameter —
0.5 B plus QLoRA's double-quantised block constants: one uint8 absmax per 64 weights and one float32 per 256
blocks — embeddings, head and norms in bf16); F: one layer's adapter state (frozen factors, trainable parameters
and their gradients, AdamW's two moments, and what a layer holds whatever T, e.g. DoRA's weight norms); a: bytes
held per token per layer after the forward; h: the rest of the step's peak per token (embedding output, final
norm, head, loss and its gradient): (peak(2T) − peak(T)) / T − L·a on the L-layer model; R: the step's peak at T
less T × that, the gradients and L layers' fixed part. Every term is measured by memory.py on the L-layer model
at T and 2T tokens; activations and loss are linear in T (SDPA keeps no T × T).
The nf4 rows take the bf16 activations (compute dtype bf16). GPU sizes in GiB; the CUDA context is not included.
"""

from __future__ import annotations

import json
from pathlib import Path

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
GPU_GIB = (24, 48, 80)
LAYERS_8B = 32
TARGET_TOKENS = 4096
METHOD_ORDER = ["peft-lora", "nora-lora-r", "nora-nora", "nora-lora-xs", "nora-svfit", "nora-pissa", "nora-dora"]
OPTION_ORDER = ["stock", "ckpt", "lean", "lean+chunked", "lean+chunked+ckpt"]


def in_order(rows: dict) -> list[tuple[str, dict]]:
    """Rows by method, then options, whatever order the runs added them in."""

    def key(name: str) -> tuple[int, int]:
        method, options = name.split(" ")
        return next(i for i, m in enumerate(METHOD_ORDER) if method.startswith(m)), OPTION_ORDER.index(options)

    return sorted(rows.items(), key=lambda item: key(item[0]))


def reference(record: dict, options: str = "stock") -> dict:
    return next(r for n, r in record["rows"].items() if n.startswith("peft-lora") and n.endswith(" " + options))


def step_bytes(r: dict, layers: int, tokens: int) -> float:
    """Whole step of the measured configuration (its L layers and the head) at another token count."""
    return r["weight_bytes"] + r["optimizer_bytes"] + r["step_fixed_bytes"] + tokens * r["step_per_token"]


def print_tables(records: list[dict]) -> None:
    for rec in records:
        if not rec["rows"]:
            continue
        stock, generic = reference(rec), _maybe(rec, "lean+chunked")
        layers, t = rec["layers"], rec["tokens"]
        print(f"\n### {rec['shape']}, {rec['dtype']}, {layers} layer(s) + the real-vocabulary head, {t} tokens\n")
        print(
            "| row | trainable params | saved B/token/layer | held B/token/layer | held × PEFT stock "
            "| held × PEFT lean+chunked | whole step MiB | at 4,096 tokens MiB | × PEFT stock | GFLOP | FLOPs × PEFT "
            "| speed × PEFT stock |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in in_order(rec["rows"]):
            held = r["held_per_token_per_layer"]
            at_target = step_bytes(r, layers, TARGET_TOKENS)
            vs_generic = f"{held / generic['held_per_token_per_layer']:.3f}" if generic else "–"
            print(
                f"| {name} | {r['trainable_params']:,} | {r['saved_per_token_per_layer']:,.0f} | {held:,.0f} "
                f"| {held / stock['held_per_token_per_layer']:.3f} | {vs_generic} "
                f"| {r['whole_step_bytes'] / 2**20:,.1f} | {at_target / 2**20:,.0f} "
                f"| {at_target / step_bytes(stock, layers, TARGET_TOKENS):.3f} | {r['flops'] / 1e9:,.2f} "
                f"| {r['flops'] / stock['flops']:.3f} | {_speed(r)} |"
            )
        for name, why in rec["skipped"].items():
            print(f"| {name} | skipped: {why} |")
        if rec["shape"] == "llama-3-8b":
            print_targets(rec)


def _speed(r: dict) -> str:
    return f"{r['speed_vs_reference']:.2f}" if "speed_vs_reference" in r else "untimed"


def _maybe(rec: dict, options: str) -> dict | None:
    try:
        return reference(rec, options)
    except StopIteration:
        return None


def nora_row(rec: dict, options: str) -> dict | None:
    return next((r for n, r in rec["rows"].items() if n.startswith("nora-nora") and n.endswith(" " + options)), None)


def targets(rec: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(target, measured figure, bound, met) for issue 28 on one 8B record; None where a row is missing. The NoRA
    stock rows (no option) follow each target's own row, for reference."""
    stock, generic = reference(rec), _maybe(rec, "lean+chunked")
    plain, lean, chunked = (nora_row(rec, o) for o in ("stock", "lean", "lean+chunked"))
    layers = rec["layers"]

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b else None

    def whole(r: dict) -> float:
        return step_bytes(r, layers, TARGET_TOKENS) / step_bytes(stock, layers, TARGET_TOKENS)

    best = min((n for n in rec["rows"] if n.startswith("nora-nora")), key=lambda n: whole(rec["rows"][n]), default=None)
    held, speed = "held_per_token_per_layer", "speed_vs_reference"
    rows = [
        ("activations/token/layer: NoRA lean ÷ PEFT LoRA r32 stock", ratio(lean, stock, held), "≤ 0.45"),
        ("… NoRA stock (no option) ÷ PEFT LoRA r32 stock", ratio(plain, stock, held), "≤ 0.45"),
        ("activations/token/layer: NoRA lean ÷ PEFT LoRA r32 lean+chunked", ratio(lean, generic, held), "≤ 0.75"),
        ("FLOPs: NoRA lean ÷ PEFT LoRA r32 stock", ratio(lean, stock, "flops"), "≤ 1.05"),
        ("… NoRA lean+chunked (each chunk's logits recomputed)", ratio(chunked, stock, "flops"), "≤ 1.05"),
        (
            f"whole step at 4,096 tokens: NoRA {best and best.split(' ')[1]} ÷ PEFT LoRA r32 stock",
            best and whole(rec["rows"][best]),
            "≤ 0.40",
        ),
        ("CPU speed: NoRA lean ÷ PEFT LoRA r32 stock", lean and lean.get(speed), "≥ 1.0"),
        ("… NoRA lean+chunked ÷ PEFT LoRA r32 stock", chunked and chunked.get(speed), "≥ 1.0"),
    ]
    out = []
    for what, value, bound in rows:
        limit = float(bound.split()[1])
        met = None if value is None else (value <= limit if bound.startswith("≤") else value >= limit)
        out.append((what, value, bound, met))
    return out


def print_targets(rec: dict) -> None:
    print(f"\nIssue-28 targets, llama-3-8b {rec['dtype']}:\n")
    print("| target | measured | bound | met |\n|---|---|---|---|")
    for what, value, bound, met in targets(rec):
        shown = "row missing" if value is None else f"{value:.3f}"
        print(f"| {what} | {shown} | {bound} | {'—' if met is None else ('yes' if met else 'no')} |")


def base_params(shape: dict) -> tuple[int, int]:
    """(decoder linear weights, everything else) of Llama-3-8B's 32 layers, embeddings and head."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    linear = LAYERS_8B * (2 * h * h + 2 * h * kv + 3 * h * i)
    return linear, 2 * shape["vocab_size"] * h + (2 * LAYERS_8B + 1) * h


def longest_context(records: list[dict], out: Path) -> dict | None:
    from memory import SHAPES

    rec = next((r for r in records if r["shape"] == "llama-3-8b" and r["dtype"] == "bf16" and r["rows"]), None)
    if rec is None:
        return None
    linear, other = base_params(SHAPES["llama-3-8b"])
    bases = {"bf16": 2 * (linear + other), "nf4": NF4_BYTES * linear + 2 * other}
    layers = rec["layers"]
    result = {"formula": __doc__.split("Projection (stated in the output): ")[1], "bases": bases, "rows": {}}
    print("\n### Longest trainable context, Llama-3-8B (32 layers), one sequence, projected from the bf16 rows\n")
    print(result["formula"])
    heads = " | ".join(f"{b} {g} GiB" for b in bases for g in GPU_GIB)
    print(f"| row | bytes/token (32 layers) | fixed GiB bf16 / nf4 | {heads} |")
    print("|---|---|---|" + "---|" * len(bases) * len(GPU_GIB))
    for name, r in in_order(rec["rows"]):
        state = r["adapter_frozen_bytes"] + 2 * r["trainable_bytes"] + r["optimizer_bytes"]
        per_layer = state / layers + r["held_fixed_per_layer"]
        rest = r["step_fixed_bytes"] - r["trainable_bytes"] - layers * r["held_fixed_per_layer"]
        per_token = LAYERS_8B * r["held_per_token_per_layer"] + r["rest_per_token"]
        fixed = {b: w + LAYERS_8B * per_layer + rest for b, w in bases.items()}
        tokens = {b: {g: max(0, int((g * 2**30 - fixed[b]) // per_token)) for g in GPU_GIB} for b in bases}
        result["rows"][name] = {"per_token": per_token, "fixed": fixed, "max_tokens": tokens}
        cells = " | ".join(f"{tokens[b][g]:,}" for b in bases for g in GPU_GIB)
        print(f"| {name} | {per_token:,.0f} | {fixed['bf16'] / 2**30:.1f} / {fixed['nf4'] / 2**30:.1f} | {cells} |")
    (out / "memory-longest-context.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "memory-longest-context.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    sizes = [g for g in range(16, 81, 2)]
    for ax, base in zip(axes, ("bf16", "nf4"), strict=True):
        for name, r in result["rows"].items():
            if not (name.startswith("peft") or name.startswith("nora-nora")):
                continue
            ys = [max(0.0, (g * 2**30 - r["fixed"][base]) / r["per_token"]) / 1000 for g in sizes]
            ax.plot(sizes, ys, label=name, linestyle="--" if name.startswith("peft") else "-")
        ax.set_title(f"Llama-3-8B, {base} base, one sequence")
        ax.set_xlabel("GPU memory (GiB)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("longest trainable context (thousand tokens)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

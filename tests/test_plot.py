"""`nora plot`: learning curves from a run's log.jsonl, the singular-value spectrum of an adapter's layers, and the
errors of both."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings

import pytest
import torch
from conftest import tiny_llama
from typer.testing import CliRunner

import nora
from nora import AdapterError
from nora.cli import app
from nora.plots import layer_spectra, plot_curves, plot_spectrum, read_log, smooth

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(300, 400)):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1], image.shape
    assert float(image[..., :3].std()) > 0.05  # something drawn, not a blank canvas
    return image


def write_log(run_dir, records, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "log.jsonl").write_text(text)


def training_records(steps: int = 60, eval_every: int = 20) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    records = []
    for step in range(1, steps + 1):
        lr = 3e-4 * min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = 3.0 * math.exp(-step / 25) + 0.8 + 0.15 * float(torch.randn(1, generator=g))
        records.append(
            {"step": step, "epoch": step / 30, "loss": loss, "lr": lr, "tokens_per_s": 1234.5, "grad_norm": 1.0}
        )
        if step % eval_every == 0:
            records.append({"step": step, "eval_loss": loss + 0.1, "eval_accuracy": step / 100, "eval_n": 50})
    return records


# ---- curves ------------------------------------------------------------------------------------------------------
@pytest.mark.bad_input("plot", "interrupted")
def test_curves_from_a_log_with_a_truncated_last_line(tmp_path):
    run = tmp_path / "run"
    write_log(run, training_records(), tail='{"step": 61, "epoch": 2.03, "lo')
    (run / "summary.json").write_text("{not even json")  # ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated last line is expected: no warning
        log = read_log(run / "log.jsonl")
        path = plot_curves(run)
    assert path == run / "curves.png"
    assert sorted(log.train) == list(range(1, 61)) and sorted(log.evals) == [20, 40, 60]
    assert log.eval_metrics == ["eval_loss", "eval_accuracy", "eval_n"]
    assert set(log.train[1]) == {"loss", "lr", "epoch", "tokens_per_s"}  # unknown keys ignored
    image = assert_png(path)
    # loss, lr and three eval panels: a 3 × 2 grid, wider than tall
    assert image.shape[1] > image.shape[0]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp file left


def test_eval_only_and_resumed_logs(tmp_path):
    run = tmp_path / "run"
    write_log(run, [{"step": 5, "eval_loss": 2.0}, {"step": 10, "eval_loss": 1.5, "eval_accuracy": 0.4}])
    assert_png(plot_curves(run), min_size=(200, 200))
    # A resumed run logs steps again from its checkpoint: the later line wins.
    records = training_records(30, eval_every=100)
    records += [dict(r, loss=r["loss"] - 5) for r in training_records(30, eval_every=100)[19:]]
    write_log(run, records)
    log = read_log(run / "log.jsonl")
    steps, loss = log.series("train", "loss")
    assert steps == list(range(1, 31)) and loss[25] == records[-5]["loss"]
    assert_png(plot_curves(run))


@pytest.mark.bad_input("plot", "malformed")
def test_a_damaged_middle_line_is_skipped_with_a_warning(tmp_path):
    run = tmp_path / "run"
    records = [json.dumps(r) for r in training_records(10)]
    (run).mkdir()
    (run / "log.jsonl").write_text("\n".join(records[:4] + ['{"step": 5, "loss"', "[1, 2]"] + records[4:]) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        log = read_log(run / "log.jsonl")
    assert len(log.train) == 10


def test_smoothing():
    assert smooth([2.0] * 50) == pytest.approx([2.0] * 50)
    s = smooth([1.0, math.nan, 3.0], weight=0.5)
    assert s[0] == 1.0 and s[1] == 1.0 and s[2] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / 0.75)
    noisy = [float(i % 2) for i in range(200)]
    assert max(smooth(noisy)[50:]) - min(smooth(noisy)[50:]) < 0.5


@pytest.mark.bad_input("plot", "missing")
@pytest.mark.bad_input("plot", "malformed")
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "log.jsonl does not exist"),
        ("", "no training or evaluation records"),
        ('{"step": 1, "lo', "no training or evaluation records"),
        ('{"note": "started"}\n{"step": 3, "tokens_per_s": 5}\n', "no training or evaluation records"),
    ],
)
def test_curve_errors(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "log.jsonl").write_text(content)
    with pytest.raises(AdapterError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_curves(run)
    assert not (run / "curves.png").exists()
    with pytest.raises(AdapterError, match="does not exist"):
        plot_curves(tmp_path / "nowhere")


# ---- spectrum ----------------------------------------------------------------------------------------------------
def tiny_base(tmp_path):
    """A tiny Llama saved to disk and loaded back from there, so adapters record where their base lives."""
    from transformers import LlamaForCausalLM

    tiny_llama(hidden_size=48, intermediate_size=64).save_pretrained(tmp_path / "base")
    return LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()


def train_adapter(model, config, steps: int = 5):
    adapted = nora.get_peft_model(model, config)
    adapted.train()
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return adapted.eval()


def test_spectrum_of_a_trained_nora_adapter(tmp_path):
    adapted = train_adapter(tiny_base(tmp_path), nora.NoraConfig(r=8, inner_r=2, target_modules=["q_proj", "v_proj"]))
    adapted.save_pretrained(tmp_path / "run" / "adapter")
    path = plot_spectrum(tmp_path / "run" / "adapter")
    assert path == tmp_path / "run" / "spectrum.png"
    assert_png(path)
    reloaded = nora.AdaptedModel.from_pretrained(tiny_base(tmp_path / "again"), tmp_path / "run" / "adapter")
    spectra = layer_spectra(reloaded)
    assert [s.name for s in spectra] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    for sp in spectra:
        assert sp.method == "nora" and sp.r == 8 and sp.shaded
        assert not torch.allclose(sp.sigma_adapted, sp.sigma, atol=1e-4)  # training moved the spectrum


@pytest.mark.parametrize(
    "config, confined",
    [
        (nora.NoraConfig(r=6, inner_r=2, svd="exact"), True),
        (nora.SVFitConfig(r=6, svd="exact"), True),
        (nora.LoraXSConfig(r=6, svd="exact"), True),
        (nora.PissaConfig(r=6, svd="exact"), False),
        (nora.LoraConfig(r=6), False),
        (nora.DoraConfig(r=6), False),
    ],
    ids=lambda v: getattr(v, "method", ""),
)
def test_layer_spectra_follow_each_method(config, confined):
    """ΔW from the methods' own merge: NoRA (serial), SVFit and LoRA-XS change W only inside its top-r singular
    subspace, so the tail σ_r, σ_r+1, ... stays as it was; the others may move any singular value."""
    adapted = nora.get_peft_model(tiny_llama(hidden_size=48, intermediate_size=64), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    spectra = layer_spectra(adapted, ["layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"])
    assert [s.name for s in spectra] == ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    for sp in spectra:
        assert sp.r == 6 and sp.shaded == (config.method not in ("lora", "dora"))
        assert not torch.allclose(sp.sigma_adapted[:6], sp.sigma[:6], atol=1e-3)
        assert keeps_tail(sp.sigma_adapted, sp.sigma[6:]) == confined


def keeps_tail(spectrum: torch.Tensor, tail: torch.Tensor, atol: float = 1e-6) -> bool:
    """Whether every value of `tail` appears in `spectrum` (as a multiset: a changed top singular value may sort
    below the tail)."""
    left = spectrum.tolist()
    for value in tail.tolist():
        nearest = min(range(len(left)), key=lambda i: abs(left[i] - value))
        if abs(left[nearest] - value) > atol:
            return False
        left.pop(nearest)
    return True


@pytest.mark.bad_input("plot", "missing")
def test_spectrum_errors(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        plot_spectrum(tmp_path / "missing")
    adapted = nora.get_peft_model(tiny_llama(), nora.LoraConfig(r=2, target_modules=["q_proj"]))
    adapted.save_pretrained(tmp_path / "adapter")  # built from a config: no base model recorded
    with pytest.raises(AdapterError, match="records no base model; pass it with --base"):
        plot_spectrum(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="cannot load the base model"):
        plot_spectrum(tmp_path / "adapter", base_model=str(tmp_path / "nobase"))
    tiny_llama().save_pretrained(tmp_path / "base")
    with pytest.raises(AdapterError, match="'k_proj' is not an adapted layer"):
        plot_spectrum(tmp_path / "adapter", ["k_proj"], base_model=str(tmp_path / "base"))
    with pytest.raises(AdapterError, match="matches several adapted layers"):
        plot_spectrum(tmp_path / "adapter", ["q_proj"], base_model=str(tmp_path / "base"))
    out = plot_spectrum(tmp_path / "adapter", ["layers.1.self_attn.q_proj"], str(tmp_path / "base"), tmp_path / "s.png")
    assert_png(out, min_size=(300, 300))


# ---- the command -------------------------------------------------------------------------------------------------
def test_cli_plots_curves_and_spectrum(tmp_path):
    run = tmp_path / "run"
    write_log(run, training_records(), tail='{"step": 6')
    adapted = train_adapter(tiny_base(tmp_path), nora.SVFitConfig(r=4, target_modules=["o_proj", "down_proj"]))
    adapted.save_pretrained(run / "adapter")
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(run / "curves.png")]
    shutil.move(tmp_path / "base", tmp_path / "moved")  # the recorded base is gone: --base overrides it
    assert "pass the right one with --base" in error_text(runner.invoke(app, ["plot", str(run), "--spectrum"]))
    args = ["plot", str(run), "--spectrum", "--base", str(tmp_path / "moved"), "--layer", "layers.0.mlp.down_proj"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(run / "curves.png"), str(run / "spectrum.png")]
    assert_png(run / "spectrum.png", min_size=(300, 300))


def error_text(result) -> str:
    """The message of a typer error box, its frame and line breaks removed."""
    assert result.exit_code == 2, result.output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


@pytest.mark.bad_input("plot", "missing")
@pytest.mark.bad_input("plot", "malformed")
def test_cli_errors(tmp_path):
    assert "does not exist: not a training run directory" in error_text(runner.invoke(app, ["plot", str(tmp_path)]))
    (tmp_path / "log.jsonl").write_text("")
    assert "no training or evaluation records" in error_text(runner.invoke(app, ["plot", str(tmp_path)]))
    write_log(tmp_path, training_records(10))
    message = error_text(runner.invoke(app, ["plot", str(tmp_path), "--spectrum"]))
    assert "does not exist: --spectrum needs the run's final adapter" in message
    assert "add --spectrum" in error_text(runner.invoke(app, ["plot", str(tmp_path), "--layer", "q_proj"]))

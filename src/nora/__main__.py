"""`python -m nora ...` is the `nora` command (handy under `torchrun` / `accelerate launch`)."""

from .cli import app

app()

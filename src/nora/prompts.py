"""The instruction prompt shared by training and evaluation: the Alpaca template that LLM-Adapters, DoRA and NoRA
use for the commonsense and math suites. Train and evaluate with the same function so the prompts match."""

from __future__ import annotations

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt for one record (`instruction`, `input`); the model's response follows it directly."""
    if input_text:
        return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_TEMPLATE.format(instruction=instruction)

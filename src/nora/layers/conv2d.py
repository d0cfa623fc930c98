"""nn.Conv2d with groups=1: the update lives on its out × (in·kh·kw) kernel matrix and is applied as a convolution.
A grouped or depthwise Conv2d's weight is `groups` separate blocks, not one matrix, so it takes no adapter."""

from __future__ import annotations

import torch
from torch import nn

from ..chain import Term, scaled, terms_apply, terms_apply_rows
from ..errors import AdapterError
from .kind import LayerKind


def has_own_forward(conv: nn.Conv2d) -> bool:
    """A Conv2d subclass whose forward is its own (e.g. EfficientNet's static "same" padding), not nn.Conv2d's."""
    return type(conv).forward is not nn.Conv2d.forward


def is_grouped_conv(module: nn.Module) -> bool:
    """A grouped or depthwise Conv2d: its weight is `groups` separate blocks, not one out × (in·kh·kw) matrix, so
    a low-rank update of "the" weight is not defined; nora leaves such layers alone."""
    return isinstance(module, nn.Conv2d) and module.groups > 1


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches a Conv2d multiplies its kernel matrix with: (N, L, in·kh·kw), in the kernel's order."""
    if has_own_forward(conv):
        raise AdapterError(
            f"{type(conv).__name__} has a forward of its own (e.g. its own padding), so the patches its kernel sees "
            "are not known here: AwSVD calibration is not available for it (use awsvd=False)."
        )
    if conv.padding_mode != "zeros":
        x = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    if isinstance(padding, str):
        raise AdapterError(f"a Conv2d with padding={padding!r}: calibrate with padding given as numbers.")
    cols = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2)


def _split_last(term: Term) -> tuple[torch.Tensor, Term | None]:
    """The chain's input-side factor (what a convolution applies to patches), and the term without it (None when
    nothing is left: the factor was ΔW itself)."""
    if term.right:
        rest = Term(term.coef, term.core, term.left, term.right[:-1])
        return term.right[-1], rest
    if len(term.chain) == 1:
        return term.core[-1], None
    return term.core[-1], Term(term.coef, term.core[:-1], term.left, [])


def _convolve(conv: nn.Conv2d, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x convolved as `conv` convolves it, with the kernel whose flattened rows are `rows` (q × in·kh·kw) and no
    bias: (N, q, H', W'). A Conv2d subclass with a forward of its own (e.g. static "same" padding, as EfficientNet's)
    runs that forward with the kernel swapped in."""
    kernel = rows.to(x.dtype).reshape(rows.shape[0], *conv.weight.shape[1:])
    if not has_own_forward(conv):
        return conv._conv_forward(x, kernel, None)
    swapped = {"weight": kernel}
    if conv.bias is not None:
        swapped["bias"] = kernel.new_zeros(rows.shape[0])
    return torch.func.functional_call(conv, swapped, (x,))


class Conv2dKind(LayerKind):
    name = "conv2d"
    mirrors = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def refusal(self, module: nn.Module) -> str | None:
        if not is_grouped_conv(module):
            return None
        return (
            f"a Conv2d with groups={module.groups} (grouped or depthwise) takes no adapter: its weight is separate "
            "blocks, not one matrix, so a low-rank update of it is not exact. Leave it out of target_modules (or add "
            "it to exclude_modules)."
        )

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.view(module.weight.shape[0], -1)

    def to_last(self, out: torch.Tensor) -> torch.Tensor:
        return out.movedim(1, -1)

    def from_last(self, out: torch.Tensor) -> torch.Tensor:
        return out.movedim(-1, 1)

    def apply(self, module: nn.Module, terms: list[Term], x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        """Each chain's input-side factor runs as a convolution with the layer's stride, padding and dilation (its
        rows a kernel of the layer's shape), the rest of the chain as a matrix chain over the channels: exact, as a
        convolution is its kernel matrix times the input patches. With `rows` the input-side factor, shared by every
        row, is one convolution."""
        total = None
        for term in terms:
            if rows and not term.right:
                raise AdapterError("a per-row adapter on a Conv2d needs a frozen input factor.")
            first, rest = _split_last(term)
            h = _convolve(module, x, first).movedim(1, -1)
            if rest is None:  # the factor was ΔW itself
                coef = term.coef
                y = h * coef.reshape(-1, 1, 1, 1).to(h.dtype) if isinstance(coef, torch.Tensor) else scaled(h, coef)
            else:
                y = terms_apply_rows([rest], h) if rows else terms_apply([rest], h)
            total = y if total is None else total + y
        assert total is not None
        return total

    def calibration_input(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return conv_patches(module, x)

    def peft_refusal(self, module: nn.Module) -> str | None:
        differs = has_own_forward(module) or module.padding_mode != "zeros" or any(d != 1 for d in module.dilation)
        if not differs:
            return None
        return (
            "Conv2d layers with dilation, a padding mode other than zeros or a forward of their own: PEFT's Conv2d "
            "LoRA builds its convolution from kernel size, stride and padding alone, so an export would not "
            "reproduce them"
        )

    def peft_pair(self, module: nn.Module, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # PEFT's Conv2d LoRA: A a kernel of the layer's shape, B a 1×1 convolution
        return B.reshape(*B.shape, 1, 1), A.reshape(A.shape[0], *module.weight.shape[1:])

    def peft_vector(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, 1, 1)  # PEFT keeps a Conv2d's per-output-channel vectors (DoRA's m) as 1×d×1×1

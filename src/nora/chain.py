"""The factored-adapter core: every method's update is a sum of scaled matrix chains.

    ΔW = Σ_t  c_t · L_t · C_t · R_t        L, R: frozen outer factors; C: the adapter's own core tensors
                                           (each factor a matrix, or a 1-D tensor meaning a diagonal)

From that one description every path gets what it needs: the forward on activations (evaluated in the cheapest
association order for the number of rows, found by the classic matrix-chain dynamic programme), the mixed batch
(`terms_apply_rows`: each row's core and coefficient gathered from a slot store, the frozen factors applied to all
rows at once), the dense update for merging, and an exact low-rank (B, A) split for exporting a standard LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

Chain = list[torch.Tensor]


@dataclass(frozen=True)
class Term:
    """c · left · core · right. `coef` is a float, or one value per row (a vector) in a mixed batch."""

    coef: float | torch.Tensor
    core: Chain
    left: Chain = field(default_factory=list)
    right: Chain = field(default_factory=list)

    @property
    def chain(self) -> Chain:
        return [*self.left, *self.core, *self.right]


def _dims(chain: Chain) -> tuple[int, ...]:
    """(p0, p1, …, pn): M_i has shape p_{i-1} × p_i; a diagonal of length p is p × p."""
    dims = [chain[0].shape[0]]
    for m in chain:
        dims.append(m.shape[-1])
    return tuple(dims)


@lru_cache(maxsize=4096)
def _order(dims: tuple[int, ...], diag: tuple[bool, ...], rows: int) -> tuple:
    """Cheapest parenthesisation of M_1 … M_n X with X (p_n × rows); returns a nested tuple of indices."""
    n = len(diag) + 1  # the activations are element n-1
    shape = [(dims[i], dims[i + 1]) for i in range(n - 1)] + [(dims[-1], rows)]
    is_diag = list(diag) + [False]
    cost = [[0.0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            cost[i][j] = float("inf")
            for s in range(i, j):
                left_diag = s == i and is_diag[i]
                right_diag = s + 1 == j and is_diag[j]
                m, q = shape[i][0], shape[j][1]
                step = m * q if (left_diag or right_diag) else m * shape[s][1] * q
                c = cost[i][s] + cost[s + 1][j] + step
                if c < cost[i][j]:
                    cost[i][j], split[i][j] = c, s

    def build(i: int, j: int) -> tuple | int:
        return i if i == j else (build(i, split[i][j]), build(split[i][j] + 1, j))

    return build(0, n - 1)


def _mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product of two chain elements, either possibly a 1-D diagonal."""
    if a.dim() == 1 and b.dim() == 1:
        return a * b
    if a.dim() == 1:
        return a.unsqueeze(-1) * b
    if b.dim() == 1:
        return a * b
    return a @ b


def _eval(tree: tuple | int, elems: list[torch.Tensor]) -> torch.Tensor:
    if isinstance(tree, int):
        return elems[tree]
    return _mul(_eval(tree[0], elems), _eval(tree[1], elems))


def chain_apply(chain: Chain, x: torch.Tensor) -> torch.Tensor:
    """(M_1 … M_n) x for activations x of shape (..., p_n), returning (..., p_0)."""
    if len(chain) > 1 and chain[-1].dim() == 2 and not isinstance(chain[-1], nn.Parameter):
        # A frozen input factor (a basis buffer) always projects x first: in training, backward then keeps only
        # that narrow projection (a trainable product folded onto x would make autograd keep x itself), and
        # the order, hence every float, is the same whether or not the adapter is trainable.
        return _ordered_apply(chain[:-1], x @ chain[-1].to(x.dtype).T)
    return _ordered_apply(chain, x)


def _ordered_apply(chain: Chain, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    xt = x.reshape(-1, x.shape[-1]).T
    elems = [m.to(x.dtype) for m in chain]
    tree = _order(_dims(chain), tuple(m.dim() == 1 for m in chain), xt.shape[1])
    y = _eval(tree, [*elems, xt])
    return y.T.reshape(*lead, y.shape[0])


def scaled(y: torch.Tensor, coef: float | torch.Tensor) -> torch.Tensor:
    return y if isinstance(coef, float | int) and coef == 1.0 else y * coef


def terms_apply(terms: list[Term], x: torch.Tensor) -> torch.Tensor:
    out = None
    for term in terms:
        y = scaled(chain_apply(term.chain, x), term.coef)
        out = y if out is None else out + y
    assert out is not None
    return out


def terms_add(out: torch.Tensor, terms: list[Term], x: torch.Tensor) -> torch.Tensor:
    """out + ΔW x, with each chain's last product fused into one addmm that also applies its scale: no
    (rows × d) temporary besides the result, and autograd saves only the narrow intermediates (a frozen
    outer projection keeps nothing of the input's size for backward)."""
    lead, d = out.shape[:-1], out.shape[-1]
    acc = out.reshape(-1, d)
    for term in terms:
        chain = term.chain
        if len(chain) < 2 or chain[0].dim() != 2 or not isinstance(term.coef, float | int):
            acc = acc + scaled(chain_apply(chain, x), term.coef).reshape(-1, d).to(acc.dtype)
            continue
        h = chain_apply(chain[1:], x).reshape(-1, chain[0].shape[1]).to(acc.dtype)
        acc = torch.addmm(acc, h, chain[0].to(acc.dtype).T, alpha=term.coef)
    return acc.reshape(*lead, d)


def _shared(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A frozen factor on every row: h (rows × tokens × p_n) → rows × tokens × p_0."""
    m = m.to(h.dtype)
    return h * m if m.dim() == 1 else h @ m.T


def _per_row(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each row's own factor (m with a leading rows axis) on that row."""
    m = m.to(h.dtype)
    return h * m.unsqueeze(1) if m.dim() == 2 else torch.bmm(h, m.transpose(1, 2))


def terms_apply_rows(terms: list[Term], x: torch.Tensor) -> torch.Tensor:
    """ΔW_i x_i for every row i of a mixed batch: `terms` as a method gives them for a core whose tensors
    and coefficient carry a leading rows axis (each row's own adapter). Evaluated from the input side: the frozen
    right factors as one matmul over all rows, each row's core by a batched product, the coefficient, then the
    frozen left factors over all rows again."""
    rows, out = x.shape[0], None
    for term in terms:
        h = x.reshape(rows, -1, x.shape[-1])
        for m in reversed(term.right):
            h = _shared(m, h)
        for m in reversed(term.core):
            h = _per_row(m, h)
        coef = term.coef
        if isinstance(coef, torch.Tensor):
            h = h * coef.to(h.dtype).reshape(rows, 1, 1)
        elif coef != 1.0:
            h = h * coef
        for m in reversed(term.left):
            h = _shared(m, h)
        out = h if out is None else out + h
    assert out is not None
    return out.reshape(*x.shape[:-1], out.shape[-1])


def chain_product(chain: Chain) -> torch.Tensor:
    out = chain[0] if chain[0].dim() == 2 else torch.diag(chain[0])
    for m in chain[1:]:
        out = _mul(out, m)
    return out


def terms_product(terms: list[Term]) -> torch.Tensor:
    return sum(term.coef * chain_product(term.chain) for term in terms)  # type: ignore[return-value]


def _densify(prod: torch.Tensor) -> torch.Tensor:
    return torch.diag(prod) if prod.dim() == 1 else prod


def terms_lora_pair(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact (B, A) with B @ A = ΔW, split each chain at its narrowest inner dimension; terms stack."""
    Bs, As = [], []
    for term in terms:
        chain, coef = term.chain, term.coef
        dims = _dims(chain)
        cut = min(range(1, len(chain)), key=lambda i: dims[i]) if len(chain) > 1 else 1
        left = _densify(chain_product(chain[:cut]))
        right = _densify(chain_product(chain[cut:])) if cut < len(chain) else None
        if right is None:  # a one-element chain: ΔW itself
            left, right = coef * left, torch.eye(left.shape[1], dtype=left.dtype, device=left.device)
        else:
            left = coef * left
        Bs.append(left)
        As.append(right)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def detached(terms: list[Term], dtype: torch.dtype | None = None) -> list[Term]:
    """The terms with every factor detached (and cast), e.g. for an exact float64 export."""

    def conv(ms: Chain) -> Chain:
        return [m.detach() if dtype is None else m.detach().to(dtype) for m in ms]

    return [Term(t.coef, conv(t.core), conv(t.left), conv(t.right)) for t in terms]

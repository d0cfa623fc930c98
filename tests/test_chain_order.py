"""chain._order (the matrix-chain dynamic programme) against brute force.

For a chain M_1 … M_n X (X: the activations, p_n × rows), every full parenthesisation is enumerated and costed
with the same model as `_order`: a product of p × s by s × q costs p·s·q, except that when either operand is a
lone diagonal element (a 1-D leaf, p × p) it is a scaling and costs p·q. `_order`'s tree must be one of the
cheapest, and evaluating the chain in that tree (`_eval`) must give the left-to-right float64 product.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nora.chain import _dims, _eval, _order

PROPS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def trees(i: int, j: int):
    """Every full parenthesisation of elements i..j, as nested (left, right) tuples of indices."""
    if i == j:
        yield i
        return
    for s in range(i, j):
        for left in trees(i, s):
            for right in trees(s + 1, j):
                yield (left, right)


def cost(tree, shapes: list[tuple[int, int]], diag: list[bool]) -> tuple[int, tuple[int, int]]:
    """(multiply-adds, shape) of evaluating `tree`; only a leaf can be a diagonal, a product never is."""
    if isinstance(tree, int):
        return 0, shapes[tree]
    (cl, (p, s)), (cr, (s2, q)) = cost(tree[0], shapes, diag), cost(tree[1], shapes, diag)
    assert s == s2, "the enumerated tree multiplies mismatched shapes"
    lone_diag = (isinstance(tree[0], int) and diag[tree[0]]) or (isinstance(tree[1], int) and diag[tree[1]])
    return cl + cr + (p * q if lone_diag else p * s * q), (p, q)


def leaves(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else leaves(tree[0]) + leaves(tree[1])


def is_full_binary(tree) -> bool:
    if isinstance(tree, int):
        return True
    return isinstance(tree, tuple) and len(tree) == 2 and all(is_full_binary(t) for t in tree)


@st.composite
def chain_specs(draw):
    """(dims, diag, rows): n = 1..6 matrices, dims 1..64, a diagonal element square (its in and out dims equal)."""
    n = draw(st.integers(1, 6))
    dims = [draw(st.integers(1, 64))]
    diag = []
    for _ in range(n):
        flag = draw(st.booleans())
        diag.append(flag)
        dims.append(dims[-1] if flag else draw(st.integers(1, 64)))
    rows = draw(st.integers(1, 512))
    return tuple(dims), tuple(diag), rows


def brute_force(dims: tuple[int, ...], diag: tuple[bool, ...], rows: int):
    """(the chain's leaf shapes, its leaf diagonal flags, the cheapest cost over every parenthesisation)."""
    n = len(diag)
    shapes = [(dims[i], dims[i + 1]) for i in range(n)] + [(dims[-1], rows)]
    flags = [*diag, False]  # the activations X are never a diagonal
    all_trees = list(trees(0, n))
    assert len(all_trees) == math.comb(2 * n, n) // (n + 1)  # Catalan(n): the enumeration is complete
    return shapes, flags, min(cost(t, shapes, flags)[0] for t in all_trees)


@PROPS
@given(spec=chain_specs())
def test_order_is_the_cheapest_parenthesisation(spec):
    dims, diag, rows = spec
    n = len(diag)
    tree = _order(dims, diag, rows)
    assert is_full_binary(tree)
    assert leaves(tree) == list(range(n + 1))  # every element once, in order (a product does not commute)
    shapes, flags, best = brute_force(dims, diag, rows)
    got, shape = cost(tree, shapes, flags)
    assert shape == (dims[0], rows)
    assert got == best, f"_order chose {tree} costing {got}; the cheapest costs {best}"


def _element(p: int, q: int, is_diag: bool, gen: torch.Generator) -> torch.Tensor:
    if is_diag:
        return torch.randn(p, generator=gen, dtype=torch.float64)
    return torch.randn(p, q, generator=gen, dtype=torch.float64) / math.sqrt(q)  # keeps products near unit scale


@PROPS
@given(spec=chain_specs(), seed=st.integers(0, 2**16))
def test_eval_in_the_chosen_order_equals_the_left_to_right_product(spec, seed):
    dims, diag, rows = spec
    n = len(diag)
    gen = torch.Generator().manual_seed(seed)
    chain = [_element(dims[i], dims[i + 1], diag[i], gen) for i in range(n)]
    assert _dims(chain) == dims
    x = torch.randn(dims[-1], rows, generator=gen, dtype=torch.float64)
    want = torch.eye(dims[0], dtype=torch.float64)
    for m in [*chain, x]:  # left to right, every element dense
        want = want @ (torch.diag(m) if m.dim() == 1 else m)
    got = _eval(_order(dims, diag, rows), [*chain, x])
    assert got.shape == want.shape == (dims[0], rows)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("dims", "diag", "rows", "want"),
    [
        # a 1 × 64 row vector first: (M1 M2) X costs 64·64 + 64·512, M1 (M2 X) costs 64·64·512 + 64·512
        ((1, 64, 64), (False, False), 512, ((0, 1), 2)),
        # a rank-1 outer product: M2 X first (64·512 + 64·512); M1 M2 first would make a 64 × 64 (4096 + 2097152)
        ((64, 1, 64), (False, False), 512, (0, (1, 2))),
        # one row: apply from the input side, whatever the dims
        ((8, 64, 8, 64), (False, False, False), 1, (0, (1, (2, 3)))),
    ],
)
def test_order_worked_examples(dims, diag, rows, want):
    """Hand-checked cases, one of which needs a left product first (a right-to-left order fails it)."""
    assert _order(dims, diag, rows) == want
    shapes, flags, best = brute_force(dims, diag, rows)
    assert cost(want, shapes, flags)[0] == best

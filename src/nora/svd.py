"""Deterministic truncated SVD of pretrained weights, its fingerprint, and the basis cache.

Every SVD method derives its frozen outer factors from here, so one weight always gives one basis: computed in
float32 (or float64) whatever the weight dtype, with a seeded randomized solver whose Gaussian sketch is drawn on
the CPU (identical on every device) and signs canonicalised so the largest-magnitude entry of each left singular
vector is positive.

On the CPU every solve runs one matrix at a time on one thread (`one_thread`): the factors then cannot depend on
torch's thread count or on which matrices share a batch, and many small LAPACK calls no longer stall on
oversubscribed OpenMP barriers when the machine is busy (SmolLM2-135M's all-linear NoRA init ran about 10x
faster so with two spinning processes per core, and no slower idle; BENCHMARKS.md). `solver="auto"` (the default)
picks exact or randomized per matrix from its shape and the settings alone (`choose_solver`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_save_safetensors
from .errors import AdapterError

PLACEMENTS = ("sqrt", "out", "in", "none")
_DIGEST_SAMPLES = 16384
SOLVERS = ("auto", "exact", "randomized")
# Cost model of `choose_solver`, in multiply-adds of a large matrix product: one thin SVD (LAPACK gesdd) of an
# l×k matrix (l ≥ k) costs about _EXACT_WEIGHT·(l·k² + k³) and a QR (geqrf + orgqr) of an l×q one about
# _QR_WEIGHT·l·q². Fitted on single-thread CPU timings (random matrices from 64×256 to 4096×1024, and
# SmolLM2-135M's weights at r = 32 and 128) and fixed here: the choice must depend on the shape and settings
# only, never on the machine. Exact is taken only where the model makes it _EXACT_MARGIN times cheaper: near the
# crossover both take about as long on a CPU, and a GPU's SVD is slower next to its GEMM and QR than a CPU's.
_EXACT_WEIGHT = 4.5
_QR_WEIGHT = 1.3
_EXACT_MARGIN = 2.0


@dataclass(frozen=True)
class SVDSettings:
    # "auto": per matrix, whichever of "exact" and "randomized" the cost model says is cheaper (choose_solver)
    # "randomized": seeded range finder (exact when r + oversample covers the matrix) | "exact": full thin SVD
    solver: str = "auto"
    niter: int = 8  # power iterations of the randomized solver
    oversample: int = 16
    seed: int = 0
    dtype: str = "float32"  # compute dtype: "float32" | "float64"

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise AdapterError(f"svd={self.solver!r} is not a solver; use 'auto', 'exact' or 'randomized'.")
        if self.dtype not in ("float32", "float64"):
            raise AdapterError(f"svd_dtype={self.dtype!r} is not supported; use 'float32' or 'float64'.")
        if not 0 <= self.niter <= 64 or not 0 <= self.oversample <= 4096:
            raise AdapterError(
                f"niter={self.niter}, oversample={self.oversample}: the randomized solver takes 0..64 power "
                "iterations and 0..4096 extra columns (defaults 8 and 16)."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def weight_digest(weight: torch.Tensor) -> str:
    """A device-independent digest of a weight: shape plus a fixed strided sample of its values rounded to
    bfloat16, so the same checkpoint in float32, bfloat16 or float16 gives the same digest and another one
    does not. Cheap enough to run on every layer of an 8B model (on one thread: 16k samples gain nothing from
    more, and on a busy 2-core machine a 2-thread gather took 5 ms against 0.2 ms)."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    step = max(1, n // _DIGEST_SAMPLES)
    with one_thread():
        idx = torch.arange(0, n, step, device=flat.device)[:_DIGEST_SAMPLES]
        sample = flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    h = hashlib.sha256(sample)
    h.update(str(tuple(weight.shape)).encode())
    return h.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprint(**fields: object) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def check_finite(weight: torch.Tensor, where: str) -> None:
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise AdapterError(
            f"{where}: the pretrained weight holds {bad} NaN/Inf values, so it has no SVD. "
            "Check the checkpoint (a failed download or a bad conversion), or leave this module out of "
            "target_modules."
        )


def canonicalise_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (u_i, v_i) so that the largest-magnitude entry of u_i is positive (batched over leading dims)."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(U, -2, pivot))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.transpose(-1, -2)


_pin_lock = threading.Lock()
_pin_depth = 0
_pin_saved = 1


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread for the duration (the thread count restored after, also on error;
    nested and concurrent uses restore it once, when the last one leaves). Results then do not depend on the
    thread count (MKL's QR and SVD differ in the last bits between 1 and 2 threads), and a loaded machine does
    not stall the many short parallel regions of small LAPACK calls."""
    global _pin_depth, _pin_saved
    with _pin_lock:
        if _pin_depth == 0:
            _pin_saved = torch.get_num_threads()
            if _pin_saved != 1:
                torch.set_num_threads(1)
        _pin_depth += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pin_depth -= 1
            if _pin_depth == 0 and _pin_saved != 1:
                torch.set_num_threads(_pin_saved)


def solve_costs(m: int, n: int, r: int, s: SVDSettings) -> tuple[float, float]:
    """Estimated (exact, randomized) cost of the top-r SVD of one m×n matrix, in large-GEMM multiply-adds."""
    big, k = max(m, n), min(m, n)
    q = min(r + s.oversample, k)
    exact = _EXACT_WEIGHT * (big * k * k + k**3)
    products = (2 * s.niter + 2) * m * n * q  # the sketch, 2 per power iteration, and Qᵀ W
    qrs = _QR_WEIGHT * q * q * ((s.niter + 1) * m + s.niter * n)
    small = _EXACT_WEIGHT * (n * q * q + q**3) + m * q * q  # SVD of the q×n projection, then Q @ U_b
    return exact, products + qrs + small


def choose_solver(shape: tuple[int, ...] | torch.Size, r: int, s: SVDSettings) -> str:
    """The solver truncated_svd uses for a (batch of) matrix of this shape: a function of the shape and the
    settings only, so every device, thread count and batch gets the same one."""
    m, n = shape[-2:]
    if s.solver == "exact" or r + s.oversample >= min(m, n):
        return "exact"
    if s.solver == "randomized":
        return "randomized"
    exact, randomized = solve_costs(m, n, r, s)
    return "exact" if _EXACT_MARGIN * exact <= randomized else "randomized"


def _sketch(n: int, q: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, q, generator=gen, dtype=torch.float64)


def _randomized(W: torch.Tensor, r: int, s: SVDSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp range finder with power iterations, batched over leading dims."""
    m, n = W.shape[-2:]
    q = min(r + s.oversample, m, n)
    # One sketch per (n, q, seed), drawn on the CPU and shared by a batch: a matrix gets the same basis whether
    # it is factored alone or stacked with others, on any device.
    sketch = _sketch(n, q, s.seed).to(W.device, W.dtype)
    Q, _ = torch.linalg.qr(W @ sketch)
    Wt = W.transpose(-1, -2)
    for _ in range(s.niter):
        Z, _ = torch.linalg.qr(Wt @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.transpose(-1, -2) @ W, full_matrices=False)
    return (Q @ Ub)[..., :r], S[..., :r], Vh[..., :r, :]


def _solve(W: torch.Tensor, r: int, solver: str, s: SVDSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
    else:
        U, S, Vh = _randomized(W, r, s)
    U, Vh = canonicalise_signs(U, Vh)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def truncated_svd(W: torch.Tensor, r: int, settings: SVDSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of W (or a batch of equal-shape W) in the compute dtype, signs canonicalised. On the CPU one
    matrix at a time on one thread (one_thread); on other devices the whole batch in one call."""
    Wc = W.detach().to(settings.torch_dtype)
    solver = choose_solver(Wc.shape, r, settings)
    if Wc.device.type != "cpu":
        return _solve(Wc, r, solver, settings)
    if Wc.dim() == 2:
        with one_thread():
            return _solve(Wc, r, solver, settings)
    lead, (m, n) = Wc.shape[:-2], Wc.shape[-2:]
    with one_thread():
        parts = [_solve(w, r, solver, settings) for w in Wc.reshape(-1, m, n)]
    return tuple(torch.stack([p[i] for p in parts]).reshape(*lead, *parts[0][i].shape) for i in range(3))


def energy_rank(W: torch.Tensor, energy: float, measure: str = "squared") -> int:
    """Smallest r whose top singular values keep at least `energy` of the spectrum's energy."""
    if not 0.0 < energy <= 1.0:
        raise AdapterError(f"energy={energy} must lie in (0, 1]; 0.99 keeps 99 % of the spectrum.")
    with one_thread():  # the rank must not depend on the thread count either (CPU threads only: free on a GPU)
        S = torch.linalg.svdvals(W.detach().to(torch.float64))
    mass = S**2 if measure == "squared" else S
    kept = torch.cumsum(mass, 0) / mass.sum().clamp_min(1e-300)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def place(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, placement: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the singular values between the outer factors: returns (B_o (d×r), A_o (r×k))."""
    if placement == "sqrt":
        root = S.sqrt()
        return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh
    if placement == "out":
        return U * S.unsqueeze(-2), Vh
    if placement == "in":
        return U, S.unsqueeze(-1) * Vh
    if placement == "none":
        return U, Vh
    raise AdapterError(f"placement={placement!r} is not one of {PLACEMENTS}.")


def cache_directory(directory: str | os.PathLike | None) -> str | os.PathLike | None:
    """The basis cache folder: the config's `basis_cache_dir`, else $NORA_BASIS_CACHE where set, else none."""
    return directory if directory is not None else os.environ.get("NORA_BASIS_CACHE") or None


class BasisCache:
    """SVD factors keyed by fingerprint: a bounded in-memory LRU (CPU tensors) and an optional directory of
    safetensors files, so N adapters on one base, or repeated runs, compute each SVD once."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _size(self) -> int:
        return sum(t.numel() * t.element_size() for f in self._mem.values() for t in f.values())

    def get(
        self, key: str, directory: str | os.PathLike | None, expect: tuple[dict, torch.dtype] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The factors under `key`, or None (a miss). A file in `directory` is used only if nora wrote it for this
        key and (given `expect`: shapes by name, dtype) it holds exactly those finite tensors; else it is recomputed
        (and rewritten)."""
        directory = cache_directory(directory)
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if directory is not None:
            path = Path(directory) / f"{key}.safetensors"
            if path.exists() and not path.is_file():
                raise AdapterError(f"basis cache entry {path} is not a file; remove it (the basis is then recomputed).")
            factors = _read_cached(path, key, expect) if path.exists() else None
            if factors is not None:
                self.hits += 1
                self._remember(key, factors)
                return factors
        self.misses += 1
        return None

    def put(self, key: str, factors: dict[str, torch.Tensor], directory: str | os.PathLike | None) -> None:
        directory = cache_directory(directory)
        nbytes = sum(v.numel() * v.element_size() for v in factors.values())
        if nbytes > self.max_bytes and directory is None:
            return  # larger than the whole budget: do not pay for a device→host copy only to evict it
        cpu = {k: v.detach().cpu().contiguous() for k, v in factors.items()}
        self._remember(key, cpu)
        if directory is not None:
            meta = {_KEY_FIELD: key, _DIGEST_FIELD: _data_digest(cpu)}
            atomic_save_safetensors(cpu, Path(directory) / f"{key}.safetensors", metadata=meta)

    def _remember(self, key: str, factors: dict[str, torch.Tensor]) -> None:
        self._mem[key] = factors
        while self._mem and self._size() > self.max_bytes:
            self._mem.popitem(last=False)

    def clear(self) -> None:
        self._mem.clear()
        self.hits = self.misses = 0


_KEY_FIELD = "nora_basis_key"
_DIGEST_FIELD = "nora_basis_sha256"  # of the tensors' bytes: a damaged file is recomputed, never used


def _data_digest(factors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(factors):
        h.update(name.encode())
        h.update(factors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_cached(path: Path, key: str, expect: tuple[dict, torch.dtype] | None) -> dict[str, torch.Tensor] | None:
    """A basis cache file's factors, or None (with a warning) where it is damaged or not this key's."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            written_for = meta.get(_KEY_FIELD)
            factors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = f"it cannot be read ({e})"
    else:
        shapes, dtype = expect if expect is not None else ({k: tuple(t.shape) for k, t in factors.items()}, None)
        if written_for != key:
            why = "it was not written for this key (copied or renamed from another)"
        elif {k: tuple(t.shape) for k, t in factors.items()} != shapes:
            why = f"its tensors are {[(k, list(t.shape)) for k, t in factors.items()]}, not {shapes}"
        elif any((dtype is not None and t.dtype != dtype) or not torch.isfinite(t).all() for t in factors.values()):
            why = "its tensors are not finite values of the compute dtype"
        elif meta.get(_DIGEST_FIELD) != _data_digest(factors):
            why = "its data does not match the checksum written with it (damaged, or written by an older nora)"
        else:
            return factors
    warnings.warn(f"basis cache file {path} is not usable: {why}; recomputing that basis.", stacklevel=4)
    return None


BASIS_CACHE = BasisCache(int(os.environ.get("NORA_SVD_CACHE_MB", "1024")) << 20)

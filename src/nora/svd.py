"""Deterministic truncated SVD of pretrained weights, its fingerprint, and the basis cache.

Every SVD method derives its frozen outer factors from here, so one weight always gives one basis: computed in
float32 (or float64) whatever the weight dtype, with a seeded randomized solver whose Gaussian sketch is drawn on
the CPU (identical on every device) and signs canonicalised so the largest-magnitude entry of each left singular
vector is positive.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .atomic import atomic_save_safetensors
from .errors import AdapterError

PLACEMENTS = ("sqrt", "out", "in", "none")
_DIGEST_SAMPLES = 16384


@dataclass(frozen=True)
class SVDSettings:
    solver: str = "randomized"  # "randomized" (seeded; exact when r + oversample covers the matrix) | "exact"
    niter: int = 8  # power iterations of the randomized solver
    oversample: int = 16
    seed: int = 0
    dtype: str = "float32"  # compute dtype: "float32" | "float64"

    def __post_init__(self) -> None:
        if self.solver not in ("exact", "randomized"):
            raise AdapterError(f"svd={self.solver!r} is not a solver; use 'exact' or 'randomized'.")
        if self.dtype not in ("float32", "float64"):
            raise AdapterError(f"svd_dtype={self.dtype!r} is not supported; use 'float32' or 'float64'.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def weight_digest(weight: torch.Tensor) -> str:
    """A device-independent digest of a weight: shape plus a fixed strided sample of its values rounded to
    bfloat16, so the same checkpoint in float32, bfloat16 or float16 gives the same digest and another one
    does not. Cheap enough to run on every layer of an 8B model."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    step = max(1, n // _DIGEST_SAMPLES)
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


def _randomized(W: torch.Tensor, r: int, s: SVDSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp range finder with power iterations, batched over leading dims."""
    m, n = W.shape[-2:]
    q = min(r + s.oversample, m, n)
    # One sketch per (n, q, seed), drawn on the CPU and shared by a batch: a matrix gets the same basis whether
    # it is factored alone or stacked with others, on any device.
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    sketch = torch.randn(n, q, generator=gen, dtype=torch.float64).to(W.device, W.dtype)
    Q, _ = torch.linalg.qr(W @ sketch)
    Wt = W.transpose(-1, -2)
    for _ in range(s.niter):
        Z, _ = torch.linalg.qr(Wt @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.transpose(-1, -2) @ W, full_matrices=False)
    return (Q @ Ub)[..., :r], S[..., :r], Vh[..., :r, :]


def truncated_svd(W: torch.Tensor, r: int, settings: SVDSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD of W (or a batch of equal-shape W) in the compute dtype, signs canonicalised."""
    Wc = W.detach().to(settings.torch_dtype)
    if settings.solver == "exact" or r + settings.oversample >= min(W.shape[-2:]):
        U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
    else:
        U, S, Vh = _randomized(Wc, r, settings)
    U, Vh = canonicalise_signs(U, Vh)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def energy_rank(W: torch.Tensor, energy: float, measure: str = "squared") -> int:
    """Smallest r whose top singular values keep at least `energy` of the spectrum's energy."""
    if not 0.0 < energy <= 1.0:
        raise AdapterError(f"energy={energy} must lie in (0, 1]; 0.99 keeps 99 % of the spectrum.")
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

    def get(self, key: str, directory: str | os.PathLike | None) -> dict[str, torch.Tensor] | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key]
        if directory is not None:
            path = Path(directory) / f"{key}.safetensors"
            if path.exists():
                self.hits += 1
                factors = load_file(path)
                self._remember(key, factors)
                return factors
        self.misses += 1
        return None

    def put(self, key: str, factors: dict[str, torch.Tensor], directory: str | os.PathLike | None) -> None:
        nbytes = sum(v.numel() * v.element_size() for v in factors.values())
        if nbytes > self.max_bytes and directory is None:
            return  # larger than the whole budget: do not pay for a device→host copy only to evict it
        cpu = {k: v.detach().cpu().contiguous() for k, v in factors.items()}
        self._remember(key, cpu)
        if directory is not None:
            atomic_save_safetensors(cpu, Path(directory) / f"{key}.safetensors")

    def _remember(self, key: str, factors: dict[str, torch.Tensor]) -> None:
        self._mem[key] = factors
        while self._mem and self._size() > self.max_bytes:
            self._mem.popitem(last=False)

    def clear(self) -> None:
        self._mem.clear()
        self.hits = self.misses = 0


BASIS_CACHE = BasisCache(int(os.environ.get("NORA_SVD_CACHE_MB", "1024")) << 20)


def settings_dict(s: SVDSettings) -> dict:
    return asdict(s)

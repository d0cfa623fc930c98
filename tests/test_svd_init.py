"""SVD initialisation: the "auto" solver's choice, determinism (batch, thread count), accuracy against float64
exact SVD, the one-thread pin and its restoration, and the progress bar of a slow initialisation."""

from __future__ import annotations

import io
import time

import pytest
import torch

import nora
import nora.basis
import nora.svd
from nora.basis import SVDRequest, compute_factors, svd_key
from nora.svd import BASIS_CACHE, SVDSettings, canonicalise_signs, choose_solver, energy_rank, truncated_svd


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    BASIS_CACHE.clear()
    yield
    torch.set_num_threads(before)
    BASIS_CACHE.clear()


def _real_like(m: int, n: int, seed: int = 0, decay: float = 0.5) -> torch.Tensor:
    """A float64 m×n matrix with a pretrained weight's slowly decaying spectrum: σ_i ∝ (1 + i)^-decay, times
    ±10 % noise, between random orthonormal bases (no spectral gap to help any solver)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = (1.0 + torch.arange(k, dtype=torch.float64)) ** -decay * (1 + 0.1 * torch.rand(k, generator=g))
    s, _ = torch.sort(s, descending=True)
    return (U * s) @ V.T


def _old_truncated_svd(W: torch.Tensor, r: int, s: SVDSettings):
    """truncated_svd as it was before "auto" and the thread pin (batched, torch's thread count): what adapter
    files saved with svd="randomized" or "exact" were initialised with."""
    Wc = W.detach().to(s.torch_dtype)
    if s.solver == "exact" or r + s.oversample >= min(W.shape[-2:]):
        U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
        U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
    else:
        m, n = Wc.shape[-2:]
        q = min(r + s.oversample, m, n)
        gen = torch.Generator(device="cpu").manual_seed(s.seed)
        sketch = torch.randn(n, q, generator=gen, dtype=torch.float64).to(Wc.device, Wc.dtype)
        Q, _ = torch.linalg.qr(Wc @ sketch)
        for _ in range(s.niter):
            Z, _ = torch.linalg.qr(Wc.transpose(-1, -2) @ Q)
            Q, _ = torch.linalg.qr(Wc @ Z)
        Ub, S, Vh = torch.linalg.svd(Q.transpose(-1, -2) @ Wc, full_matrices=False)
        U, S, Vh = (Q @ Ub)[..., :r], S[..., :r], Vh[..., :r, :]
    U, Vh = canonicalise_signs(U, Vh)
    return U, S, Vh


# --- the solver choice -------------------------------------------------------------------------------------------


def test_auto_is_the_default_and_picks_by_shape():
    auto = SVDSettings()
    assert auto.solver == "auto" and nora.NoraConfig().svd == "auto" and nora.NoraConfig().svd_settings == auto
    # SmolLM2-135M at r=128: the 192×576 k/v projections are cheaper exact, the 576-wide ones randomized.
    assert choose_solver((192, 576), 128, auto) == "exact"
    assert choose_solver((576, 576), 128, auto) == "randomized"
    assert choose_solver((1536, 576), 128, auto) == "randomized"
    assert choose_solver((576, 1536), 32, auto) == "randomized"
    # Llama-8B shapes at r=256 stay randomized (an exact SVD there costs minutes on a CPU, seconds on a GPU).
    for shape in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        assert choose_solver(shape, 256, auto) == "randomized", shape
    # r + oversample covering the matrix is exact for every solver, as before.
    for solver in ("auto", "randomized", "exact"):
        assert choose_solver((100, 700), 90, SVDSettings(solver)) == "exact"
    # The fixed solvers never switch; the batch dims and the tensor type do not matter.
    assert choose_solver((192, 576), 128, SVDSettings("randomized")) == "randomized"
    assert choose_solver((4096, 4096), 8, SVDSettings("exact")) == "exact"
    assert choose_solver(torch.Size([7, 192, 576]), 128, auto) == choose_solver((192, 576), 128, auto)
    # More power iterations make the randomized solve dearer: far enough, exact wins.
    assert choose_solver((576, 576), 128, SVDSettings(niter=2)) == "randomized"
    assert choose_solver((576, 576), 128, SVDSettings(niter=64)) == "exact"


def test_auto_has_its_own_fingerprint_and_old_settings_keep_theirs():
    # Bases are recomputed on load and checked by a fingerprint of the settings: "randomized" and "exact" must
    # fingerprint as they did (their repr is part of it), and "auto" differently.
    assert str(SVDSettings("randomized")) == (
        "SVDSettings(solver='randomized', niter=8, oversample=16, seed=0, dtype='float32')"
    )
    assert str(SVDSettings("exact")) == "SVDSettings(solver='exact', niter=8, oversample=16, seed=0, dtype='float32')"
    keys = {s: svd_key(8, SVDSettings(s), (64, 48), "d", None) for s in ("auto", "randomized", "exact")}
    assert len(set(keys.values())) == 3
    assert nora.NoraConfig(svd="randomized").svd_settings == SVDSettings("randomized")
    with pytest.raises(nora.AdapterError, match="'auto', 'exact' or 'randomized'"):
        SVDSettings("fast")


@pytest.mark.parametrize("solver", ["randomized", "exact"])
def test_old_solvers_compute_what_they_did(solver):
    """The same sketch, iterations and sign rule as before, to rounding (float64 so rounding is ~1e-13)."""
    W = _real_like(120, 90, seed=3).unsqueeze(0).repeat(2, 1, 1)
    s = SVDSettings(solver, niter=4, oversample=8, dtype="float64")
    new, old = truncated_svd(W, 12, s), _old_truncated_svd(W, 12, s)
    for a, b in zip(new, old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --- determinism ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["auto", "randomized", "exact"])
def test_batched_equals_lone_bitwise(solver):
    s = SVDSettings(solver, niter=3)
    Ws = [_real_like(96, 160, seed=i).float() for i in range(4)]
    batched = truncated_svd(torch.stack(Ws), 40, s)
    requests = [SVDRequest(f"k{i}", W, 40, None, f"w{i}") for i, W in enumerate(Ws)]
    factors = compute_factors(requests, s)
    for i, W in enumerate(Ws):
        lone = truncated_svd(W, 40, s)
        for j, name in enumerate(("U", "S", "Vh")):
            assert torch.equal(batched[j][i], lone[j]), (solver, i, name)
            assert torch.equal(factors[f"k{i}"][name], lone[j]), (solver, i, name)


@pytest.mark.parametrize("solver", ["randomized", "exact"])
def test_factors_do_not_depend_on_the_thread_count(solver):
    # Unpinned, MKL's QR and SVD of this matrix differ in the last bits between 1 and 2 threads (checked).
    W = _real_like(300, 200, seed=1).float()
    s = SVDSettings(solver, niter=2)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(truncated_svd(W, 40, s))
        assert torch.get_num_threads() == threads
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_solves_run_on_one_thread_and_restore_the_count(monkeypatch):
    W = _real_like(200, 150, seed=2).float()
    seen = []
    real_qr, real_svd = torch.linalg.qr, torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: seen.append(torch.get_num_threads()) or real_qr(*a, **k))
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: seen.append(torch.get_num_threads()) or real_svd(*a, **k))
    torch.set_num_threads(2)
    truncated_svd(W, 20, SVDSettings("randomized", niter=2))
    truncated_svd(W, 20, SVDSettings("exact"))
    compute_factors([SVDRequest("a", W, 20, None, "a")], SVDSettings(niter=2))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    energy_rank(W, 0.9)
    nora.svd.weight_digest(W)
    nora.basis.make_basis(W, {"U": W[:, :3], "S": torch.ones(3), "Vh": W[:3]}, "sqrt", "k", None)
    assert torch.get_num_threads() == 2
    # Restored after a failure inside the solve too (a NaN weight is refused mid-loop).
    bad = W.clone()
    bad[3, 4] = float("nan")
    requests = [SVDRequest("b", W * 2, 20, None, "ok"), SVDRequest("c", bad, 20, None, "layers.1.bad")]
    with pytest.raises(nora.AdapterError, match="layers.1.bad"):
        compute_factors(requests, SVDSettings(niter=2))
    assert torch.get_num_threads() == 2


def test_nested_pins_restore_once():
    torch.set_num_threads(2)
    with nora.svd.one_thread():
        assert torch.get_num_threads() == 1
        with nora.svd.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


# --- accuracy against float64 exact SVD -----------------------------------------------------------------------


def _sines(U: torch.Tensor, Uref: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between span(U) and span(Uref) (orthonormal, float64), from the part of U
    outside span(Uref): sqrt(1 - cos²) would floor at ~1e-3 on float32 vectors."""
    U = U.double()
    return torch.linalg.svdvals(U - Uref @ (Uref.T @ U))


@pytest.mark.parametrize(("shape", "expect"), [((192, 576), "exact"), ((576, 576), "randomized")])
def test_auto_agrees_with_float64_exact_svd(shape, expect):
    """Against the float64 SVD of the same float32 weight, real-like spectrum (no gap), r=128, default settings.
    Tolerances ~10x the values measured (seed 5): the exact branch captures the optimal rank-r energy to 1e-7,
    σ to 1e-6 relative, the subspace at the widest gap among k = 32..64 to 5e-6; the randomized one (niter 8)
    misses 2.8e-4 of that energy, σ_1..64 to 1e-6, that subspace to 6e-5. The last direction of a randomized
    basis is not checked: where σ_r ≈ σ_r+1 it is arbitrary (sine 0.6 here)."""
    r, s = 128, SVDSettings()
    assert choose_solver(shape, r, s) == expect
    W = _real_like(*shape, seed=5).float()
    Ue, Se, _ = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, Vh = truncated_svd(W, r, s)
    deficit = float(1 - (U.double().T @ W.double()).square().sum() / Se[:r].square().sum())
    gaps = Se[:-1] - Se[1:]
    k = int(torch.argmax(gaps[31:64])) + 32
    sine_k = float(_sines(U[:, :k], Ue[:, :k]).max())
    if expect == "exact":
        assert deficit < 1e-6
        torch.testing.assert_close(S.double(), Se[:r], rtol=1e-5, atol=0)
        assert sine_k < 5e-5
        assert float(_sines(U, Ue[:, :r]).max()) < 5e-3
    else:
        assert 0 < deficit < 3e-3
        torch.testing.assert_close(S[:64].double(), Se[:64], rtol=1e-5, atol=0)
        assert sine_k < 1e-3
    # The factors reconstruct W's projection: U diag(S) Vh = U Uᵀ W, to float32 rounding.
    torch.testing.assert_close((U * S) @ Vh, U @ (U.T @ W), rtol=0, atol=1e-5)


# --- the progress bar ------------------------------------------------------------------------------------------


def _capture_bar(monkeypatch, terminal: bool) -> io.StringIO:
    """Route compute_factors' bar to a buffer; `terminal` makes tqdm draw as on a terminal (disable=None would
    otherwise turn it off on the non-TTY buffer, as it does in CI logs)."""
    buf = io.StringIO()
    real = nora.basis.tqdm

    def bar(*args, **kwargs):
        kwargs["file"] = buf
        if terminal and kwargs.get("disable") is None:
            kwargs["disable"] = False
        return real(*args, **kwargs)

    monkeypatch.setattr(nora.basis, "tqdm", bar)
    return buf


def _slow_solves(monkeypatch, seconds: float) -> None:
    real = nora.basis.truncated_svd

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(nora.basis, "truncated_svd", slow)


def _requests(n: int) -> list[SVDRequest]:
    g = torch.Generator().manual_seed(0)
    return [SVDRequest(f"p{i}", torch.randn(24, 20, generator=g), 4, None, f"w{i}") for i in range(n)]


def test_a_slow_init_shows_a_progress_bar_that_moves_per_matrix(monkeypatch):
    assert nora.basis._PROGRESS_DELAY <= 2.0  # the real delay: a bar from about a second on
    monkeypatch.setattr(nora.basis, "_PROGRESS_DELAY", 0.05)
    buf = _capture_bar(monkeypatch, terminal=True)
    _slow_solves(monkeypatch, 0.06)
    compute_factors(_requests(6), SVDSettings(), desc="NoRA SVD")  # 6 layers: no minimum count any more
    frames = [f for f in buf.getvalue().split("\r") if "NoRA SVD" in f and "/6" in f]
    assert len({f.split("/6")[0][-1] for f in frames}) >= 3, frames  # several counts drawn, not one per shape


def test_a_fast_init_stays_quiet(monkeypatch):
    buf = _capture_bar(monkeypatch, terminal=True)
    compute_factors(_requests(40), SVDSettings())  # well under the 1 s delay
    assert buf.getvalue() == ""


def test_a_slow_init_stays_quiet_off_a_terminal(monkeypatch):
    monkeypatch.setattr(nora.basis, "_PROGRESS_DELAY", 0.05)
    buf = _capture_bar(monkeypatch, terminal=False)
    _slow_solves(monkeypatch, 0.03)
    compute_factors(_requests(5), SVDSettings())
    assert buf.getvalue() == ""  # not a TTY: tqdm's disable=None keeps logs clean


def test_a_basis_cache_file_with_one_flipped_bit_is_recomputed_not_used(tmp_path):
    """The header, shapes and finiteness all still check out: only the checksum written with the data can tell."""
    import warnings
    from pathlib import Path

    from conftest import tiny_llama

    config = nora.NoraConfig(r=8, inner_r=2, basis_cache_dir=str(tmp_path))
    first = nora.get_peft_model(tiny_llama(), config)
    bases = {n: next(iter(layer.bases.values())) for n, layer in first.layers().items()}
    BASIS_CACHE.clear()
    files = sorted(Path(tmp_path).glob("*.safetensors"))
    raw = bytearray(files[3].read_bytes())
    raw[-3] ^= 0x01  # a low mantissa bit of the last tensor's last value: still a finite float
    files[3].write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = nora.get_peft_model(tiny_llama(), config)
    assert any("does not match the checksum" in str(w.message) for w in caught)
    for name, layer in again.layers().items():
        basis = next(iter(layer.bases.values()))
        assert torch.equal(basis.A, bases[name].A) and torch.equal(basis.B, bases[name].B)


def test_nora_basis_cache_names_the_cache_folder_where_the_config_names_none(tmp_path, monkeypatch):
    from pathlib import Path

    from conftest import tiny_llama

    monkeypatch.setenv("NORA_BASIS_CACHE", str(tmp_path / "env"))
    first = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=8, inner_r=2))
    files = sorted(Path(tmp_path / "env").glob("*.safetensors"))
    assert len(files) == len(first.layers())  # one basis file per adapted matrix
    BASIS_CACHE.clear()
    own = tmp_path / "own"
    nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=8, inner_r=2, basis_cache_dir=str(own)))
    assert len(list(own.glob("*.safetensors"))) == len(files)  # the config's folder wins over the variable
    BASIS_CACHE.clear()
    again = nora.get_peft_model(tiny_llama(), nora.NoraConfig(r=8, inner_r=2))
    assert BASIS_CACHE.hits == len(files) and BASIS_CACHE.misses == 0  # every basis read back from the folder
    for name, layer in again.layers().items():
        basis, before = next(iter(layer.bases.values())), next(iter(first.layers()[name].bases.values()))
        assert torch.equal(basis.A, before.A) and torch.equal(basis.B, before.B)

"""CUDA-target regressions for causes the differential fuzzer (and issue 9) found outside
issue 8: a `where` with constant or float branches, a logit with no q or k (or nothing
query-side), a projection of a param-only vector, and in-kernel lookups whose dq outputs the
launcher allocated in another order than the kernel reads them. Each compares out, lse and every
gradient with the NumPy reference (param-only vectors with finite differences too) on odd
shapes with GQA, under the simulator with tiles that split every length.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import numba_cuda
from attndsl.codegen.cuda_printer import CudaPrinter
from attndsl.codegen.numba_cuda import emit_source
from attndsl.runtime.cuda_kernel import compile_kernel
from attndsl.symbolic import POSITIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fuzzer's modules
import fuzz_tiers
import spec_gen

TILES = (4, 8, 4, 8)  # forward BQ, BK; backward BQ, BK: 7 and 9 leave partial tiles each way
B, HEADS, KV_HEADS, N_Q, N_K, D, DV, R = 2, 4, 2, 7, 9, 5, 3, 3
PARAM_SHAPES = {"pos": (N_K,), "qpos": (N_Q,), "u": (N_K,), "wd": (D,), "W": (D, R),
                "T": (N_Q, N_K), "c": (HEADS,), "sb": (HEADS,), "tau": (), "table": (HEADS, 7),
                "kr": (N_K,), "P": (HEADS, D), "sink": (HEADS,)}


def _inputs(text: str, seed: int = 0):  # type: ignore[no-untyped-def]
    spec = attndsl.parse(f"attention t {{\n    {text}\n}}")
    rng = np.random.default_rng(seed)
    qkvg = (rng.standard_normal((B, HEADS, N_Q, D)), rng.standard_normal((B, KV_HEADS, N_K, D)),
            rng.standard_normal((B, KV_HEADS, N_K, DV)), rng.standard_normal((B, HEADS, N_Q, DV)))
    params = {p.name: rng.standard_normal(PARAM_SHAPES[p.name]) for p in spec.params}
    return spec, qkvg, params


def _rel(got, want) -> float:  # type: ignore[no-untyped-def]
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def assert_cuda_agrees(text: str, moved: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """out, lse and every gradient of the cuda target within 1e-10 of numpy's; the gradients
    named in `moved` are not all zero (so the comparison can fail)."""
    spec, (q, k, v, G), params = _inputs(text)
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    out, lse = cuda.forward(q, k, v, return_lse=True, **params)
    want_out, want_lse = ref.forward(q, k, v, return_lse=True, **params)
    errors = {"out": _rel(out, want_out)}
    if want_lse is not None:
        errors["lse"] = _rel(lse, want_lse)
    got, want = cuda.backward(q, k, v, G, **params), ref.backward(q, k, v, G, **params)
    assert sorted(got) == sorted(want) == sorted(["q", "k", "v", *params])
    errors.update({n: _rel(got[n], want[n]) for n in want})
    assert max(errors.values()) <= 1e-10, errors
    for name in moved:
        assert np.max(np.abs(want[name])) > 1e-3, name
    return want


# ---- issue 9: a where with constant branches -----------------------------------------------


def test_cuda_constant_where_printer():
    """Piecewise((-1.5, j > i), (0.25, True)): the last pair collapses to 0.25, a Float, which
    _piecewise unpacked as a Piecewise (ValueError: not enough values to unpack)."""
    i, j = POSITIONS["i"], POSITIONS["j"]
    e = sp.Piecewise((sp.Float(-1.5), j > i), (sp.Float(0.25), True))
    consts: dict[str, str] = {}
    text = CudaPrinter({i: "i", j: "j"}, consts).num(e)
    assert text in ("(C0 if (j > i) else C1)", "(C0 if (i < j) else C1)"), text
    assert consts == {"C0": "-1.5", "C1": "0.25"}


@pytest.mark.parametrize("text", [
    "score q . k\n    bias where(j > i, -1.5, 0.25)",
    "score q . k\n    bias where(j > i, -1.5, 0.25)\n    mask j <= i + 2\n    normalize none",
    "score q . k\n    scale where(i % 2 == 0, 0.5, 2.0)",
    "score where(j > i, -1.5, 0.25)",
], ids=["bias", "masked_none", "scale", "score"])
def test_cuda_constant_where_branches(text):
    assert_cuda_agrees(text, moved=("v",))


BRANCHES = re.compile(r"bias where\(.*, (-?[\d.e]+), (-?[\d.e]+)\)$", re.MULTILINE)


def test_cuda_constant_where_generated_by_the_fuzzer():
    """spec_gen draws constant-branch where biases (CI's avoid set), and the cuda tier (vs the
    IR evaluator and numpy) passes on the first one of a fixed seed."""
    drawn = spec_gen.draw_cases(5, 600)  # the first (of 21) is case 278
    case = next((c for c in drawn if BRANCHES.search(c.gen.text)), None)
    assert case is not None, "no constant-branch where in 600 generated specs"
    fuzz_tiers.tier_cuda(case)


# ---- float_where: a float where --------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "score where(i > j, q . k, sum(q))",
    "score where(q . k > 0, q . k, 0.1 * sum(k))",
    "param sb[heads]\n    score q . k\n    bias where(sum(q) > 0, sb[h], -1.5) * (j - i) / n_k",
], ids=["positions", "on_logit", "param_branch"])
def test_cuda_float_where(text):
    moved = ("q", "k") + (("sb",) if "sb" in text else ())
    assert_cuda_agrees(text, moved=moved)


def test_cuda_where_compared_is_an_ite():
    """`where(c, a, b) > 0` reaches the printer as SymPy's ITE(c, a > 0, b > 0), which had no
    CUDA rule (NotImplementedError; found by the cuda fuzz tier, seed 1000)."""
    text = ("score where(where(j >= i, j - i, tanh(q . k)) > 0, q . k, 0.5 * (q . k))\n"
            "    normalize none")
    assert_cuda_agrees(text, moved=("q", "k"))


# ---- qk_free_score: nothing query-side (or nothing at all) in the logit --------------------


@pytest.mark.parametrize(("text", "moved"), [
    ("param pos[n_k]\n    score pos[j]", ("pos",)),
    ("score (j - i)", ("v",)),
    ("score 0.5 * (j - i)\n    mask j <= i + 1", ("v",)),
    ("param u[n_k]\n    score sum(k * k * u[j])", ("k", "u")),
    ("param T[n_q, n_k]\n    param pos[n_k]\n    score T[i, j] + pos[j]", ("T", "pos")),
], ids=["pos", "positions", "positions_masked", "key_side_only", "pair_lookup_only"])
def test_cuda_qk_free_score(text, moved):
    """attn_bwd_dq had no row adjoint to write and emitted an empty `if row_ok:` block
    (IndentationError; with only a pair lookup's per-block partials too); the launcher skips
    the kernel when it has no output at all, and dq is zero."""
    source = emit_source(attndsl.parse(f"attention t {{\n    {text}\n}}"))
    compile(source, "<cuda kernels>", "exec")
    want = assert_cuda_agrees(text, moved=moved)
    assert np.max(np.abs(want["q"])) == 0


# ---- sign: abs's derivative is an integer to SymPy ------------------------------------------


@pytest.mark.parametrize("text", [
    "param pos[n_k]\n    score q . k\n    scale (abs(pos[j]) + 0.5)",
    "param pos[n_k]\n    score heads\n    scale (abs(pos[j]) + 0.5)\n    normalize sum",
], ids=["softmax", "sum"])
def test_cuda_abs_gradient_sign(text):
    """d abs(pos[j]) = sign(pos[j]), integer-valued, so the float printer sent it to the
    integer one, which had no rule for it (NotImplementedError, found by the fuzzer)."""
    assert_cuda_agrees(text, moved=("pos",))


def test_cuda_sign_of_a_float_of_positions():
    """sign(log(max(kr[..] / max(j - i, 0.5), 0.5))): a float of integer positions under a sign
    SymPy calls an integer (fuzz seed 11300 broke the cpu target on it)."""
    assert_cuda_agrees("param kr[n_k]\n    param pos[n_k]\n    softcap (d + 1)\n"
                       "    normalize sum\n    scale (1 + sigmoid(abs(pos[j])))\n"
                       "    score (abs(log(max((kr[n_k - 1 - j] / max((j - i), 0.5)), 0.5)))"
                       " + 0.5)", moved=("kr", "pos"))


# ---- param_only_vectors: a projection of a vector of params alone ---------------------------


def _directional_fd(text: str, name: str) -> tuple[float, float]:
    """(d loss along a random direction of param `name` by central differences, by numpy's
    gradient), loss = sum(out * G)."""
    spec, (q, k, v, G), params = _inputs(text)
    ref = attndsl.compile(spec, target="numpy")
    direction = np.random.default_rng(7).standard_normal(params[name].shape)

    def loss(step: float) -> float:
        moved = dict(params, **{name: params[name] + step * direction})
        return float(np.sum(ref.forward(q, k, v, **moved) * G))

    fd = (loss(1e-6) - loss(-1e-6)) / 2e-6
    return fd, float(np.sum(ref.backward(q, k, v, G, **params)[name] * direction))


@pytest.mark.parametrize("text", [
    ("param wd[d]\n    param W[d, r]\n    score (k @ W) . ((wd * 2) @ W)\n    scale 0.1\n"
     "    mask j <= i + 1"),
    "param wd[d]\n    score k . (wd * 2)",
    "param wd[d]\n    param W[d, r]\n    score q . k + sum(k @ W) * norm((wd * 2) @ W)",
], ids=["projection", "dot", "with_query"])
def test_cuda_param_only_vectors_projection(text):
    """`(wd * 2) @ W` is a constant-side input; with nothing query-side the dq kernel emitted
    an empty block (IndentationError). The param gradients also match finite differences
    (numpy's param-only-vector gradients had their own bug)."""
    assert_cuda_agrees(text, moved=("k",))
    for name in ("wd", "W") if "W" in text else ("wd",):
        fd, analytic = _directional_fd(text, name)
        assert abs(analytic) > 1e-5, (name, analytic)
        assert abs(fd - analytic) <= 1e-8 * max(1.0, abs(fd)), (name, fd, analytic)


# ---- lookup order: the launcher and attn_bwd_dq agree on the order of dq's outputs ---------


@pytest.mark.parametrize("text", [
    "param T[n_q, n_k]\n    param c[heads]\n    score q . k + T[i, j] + c[h] * sum(k)",
    "param c[heads]\n    param T[n_q, n_k]\n    score q . k + c[h] * (j - i) + T[i, j]",
    ("param T[n_q, n_k]\n    param c[heads]\n    param qpos[n_q]\n    param pos[n_k]\n"
     "    score q . k + T[i, j] + c[h] + qpos[i] * pos[j]\n    normalize none"),
], ids=["pair_then_const", "const_then_pair", "every_side"])
def test_cuda_lookup_order_pair_and_row_partials(text):
    """The kernel took dq's lookup adjoints in grad_lookups order while the launcher allocated
    the per-row ones first (IndexError, or a partial read as another lookup's)."""
    assert_cuda_agrees(text, moved=tuple(n for n in ("T", "c", "qpos", "pos") if n in text))


# ---- a lookup's subscript reading a param: the host's subscripts() for its gradient ---------


@pytest.mark.parametrize("text", [
    ("param tau\n    param table[heads, 7]\n    score table[h, floor((0.5 + tau)) % 7]\n"
     "    normalize elu"),
    ("param tau\n    param table[heads, 7]\n    param kr[n_k]\n"
     "    score q . k + table[h, floor((kr[n_k - 1 - j] + tau)) % 7]"),
], ids=["scalar_param", "param_lookup"])
def test_cuda_lookup_subscript_reads_param(text):
    """host_source's subscripts() skipped param lookups, so table's gradient subscript read an
    undefined tau_0 (NameError, found by the cuda fuzz tier)."""
    assert_cuda_agrees(text, moved=("table",))


# ---- dkdv's per-head shared rows: a constant-side vector (P[h]) in a GQA group -------------


@pytest.mark.parametrize("text", [
    "param P[heads, d]\n    score tanh(q . (P[h] + (q * k)))\n    normalize none",
    "param P[heads, d]\n    score q . k + sum(k * P[h])",
], ids=["fuzzer", "key_times_param"])
def test_cuda_dkdv_constant_vector_per_head(text):
    """attn_bwd_dkdv loops over the query heads of its group and reloaded P[h]'s shared row for
    the next head while other threads still read the previous one (no barrier before the
    load): dk off by up to 7% in the simulator (cuda fuzz tier, seed 13)."""
    for _ in range(3):  # a race: a few runs, each must agree
        assert_cuda_agrees(text, moved=("k", "P"))


# ---- float max/min keep a NaN from either argument, as numpy's --------------------------------


@pytest.mark.parametrize("who", ["q", "k"])
@pytest.mark.parametrize("text", [
    "score sum(max(q, k))",
    "score norm(min(min(k, q), k))\n    normalize elu\n    softcap 5",
    "score min(sum(q), sum(k))",
], ids=["max_vectors", "nested_min", "min_scalars"])
def test_cuda_minmax_nan_propagates(text, who):
    """Python's max/min (the device's too) drop a NaN that is not the first argument, so a NaN
    in q gave a finite out where numpy's is NaN (cuda fuzz tier, seed 16)."""
    spec, (q, k, v, G), _ = _inputs(text)
    (q if who == "q" else k)[1, 0, 2, 1] = np.nan
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    got = {"out": cuda.forward(q, k, v), **cuda.backward(q, k, v, G)}
    want = {"out": ref.forward(q, k, v), **ref.backward(q, k, v, G)}
    assert np.isnan(want["out"]).any()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-10, equal_nan=True,
                                   err_msg=name)


# ---- a product SymPy proves is 0 (fuzz seed 2000) --------------------------------------------


def test_cuda_integer_product_proved_zero():
    """clamp(max(i, h), 0, 0) / 50 is 0 and SymPy knows it (is_zero), so its product with 1/50
    counts as an integer; the integer printer had no rule for the 1/50 (NotImplementedError)."""
    text = ("param pos[n_k]\n    score pos[j]\n    bias 0.1 * clamp(max(i, h), 0, 0)\n"
            "    softcap 5\n    normalize none")
    assert_cuda_agrees(text, moved=("pos",))


# ---- issue 9: softmax(sink = e) --------------------------------------------------------------


@pytest.mark.parametrize("text", [
    ("param sink[heads]\n    score q . k\n    mask j <= i - 2 and i - j < 5\n"
    "    normalize softmax(sink = sink[h])"),
    ("param u[n_k]\n    param qpos[n_q]\n    score q . k + u[j]\n"
    "    normalize softmax(sink = qpos[i] - log(n_k))"),
], ids=["window_head_sink", "row_sink_and_size"])
def test_cuda_softmax_sink(text):
    """The forward's finish folds the sink into (m, l); its adjoint -exp(sink - lse) D reaches
    the params in the host epilogue. Rows 0 and 1 of the window see no key: out 0, lse = sink."""
    name = "sink" if "sink[" in text else "qpos"
    assert_cuda_agrees(text, moved=(name, "q"))


# ---- fuzz seed 2000: relu, sign and heaviside keep a NaN, as NumPy's ------------------------


@pytest.mark.parametrize("text", [
    "score relu(q . k)\n    normalize none",
    "score abs(q . k)\n    normalize none",  # the backward's sign
    "score max(q . k, 0.5)\n    normalize none",  # the backward's heaviside
    "score q . k\n    normalize relu",
], ids=["relu", "abs_sign", "max_tie", "relu_norm"])
def test_cuda_nan_through_relu_sign_heaviside(text):
    spec, (q, k, v, G), _ = _inputs(text)
    q[1, 2, 4, 1] = np.nan  # row 4 of batch 1, head 2: NaN at every key
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    got = {"out": cuda(q, k, v), **cuda.backward(q, k, v, G)}
    want = {"out": ref(q, k, v), **ref.backward(q, k, v, G)}
    assert np.isnan(want["out"][1, 2, 4]).all()
    for name, value in want.items():
        assert np.array_equal(np.isnan(np.asarray(got[name])), np.isnan(value)), name
        finite = ~np.isnan(value)
        assert _rel(np.asarray(got[name])[finite], value[finite]) <= 1e-10, name


# ---- issue 9: input tensors with a batch axis ------------------------------------------------


@pytest.mark.parametrize("text", [
    "input c[heads, n]\n    score q . k\n    bias c[h, i] - c[h, j]\n    mask j <= i",
    "input rq[n_q, r]\n    input rk[n_k, r]\n    score q . k + rq[i] . rk[j]",
], ids=["forgetting", "latent_rope"])
@pytest.mark.parametrize("registers", [numba_cuda.ACC_REGISTERS, 0], ids=["local", "shared"])
def test_cuda_batched_inputs(text, registers, monkeypatch):
    """Inputs are params with a batch axis read at b: per-batch values and gradients. With no
    register budget, attn_bwd_dkdv keeps rk's adjoint in a shared row per thread (production
    sizes do so: d = r = dv = 64 spilled at 255 registers)."""
    monkeypatch.setattr(numba_cuda, "ACC_REGISTERS", registers)
    spec = attndsl.parse(f"attention t {{\n    {text}\n}}")
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((B, HEADS, N_Q, D)), rng.standard_normal((B, KV_HEADS, N_Q, D))
    v, G = rng.standard_normal((B, KV_HEADS, N_Q, DV)), rng.standard_normal((B, HEADS, N_Q, DV))
    sizes = {"B": B, "heads": HEADS, "n": N_Q, "n_q": N_Q, "n_k": N_Q, "r": R}
    extra = {p.name: rng.standard_normal(tuple(sizes[x] for x in p.dims)) for p in spec.params}
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    got = {"out": cuda(q, k, v, **extra), **cuda.backward(q, k, v, G, **extra)}
    config = numba_cuda.Config("float64", *TILES, sizes=(("d", D), ("dv", DV), ("r", R)))
    source = emit_source(spec, config=config)  # the configuration this launch compiled
    assert ("sa_" in source) == (registers == 0 and "rk" in text)
    want = {"out": ref(q, k, v, **extra), **ref.backward(q, k, v, G, **extra)}
    assert sorted(got) == sorted(want) == sorted(["out", "q", "k", "v", *extra])
    for name, value in want.items():
        assert _rel(np.asarray(got[name]), value) <= 1e-10, name
    for name in extra:  # per batch: the two batches' gradients differ
        assert not np.allclose(want[name][0], want[name][1]), name

# ---- fuzz seed 4000: a batch-free row value's adjoint counted once per batch ----------------


def test_cuda_batch_free_row_value_adjoint_summed_once():
    """`P[h] @ W` has no batch axis; the host's rows_backward added the kernels' per-batch
    adjoint of it to the other branch's summed one by broadcasting (dP counted B times)."""
    text = ("param P[heads, d]\n    param W[d, r]\n"
            "    score tanh(where(j <= i, (P[h] - k) @ W, P[h] @ W) . (q @ W))")
    assert_cuda_agrees(text, moved=("P", "W"))


@pytest.mark.parametrize("text", [
    "param wd[d]\n    score tanh(dot(((k - k) + wd), q)) + q . k",
    "param W[d, r]\n    param wd[d]\n    score tanh(norm(wd @ W - ((k - k) @ W))) + q . k",
    "score (abs(sqrt((softplus(0.5) + 0.25))) + 0.5) * (q . k)",
], ids=["folded_dot", "folded_projection", "abs_constant"])
def test_cuda_vectors_sympy_folds(text):
    """(k - k) + wd is wd (a constant vector, not a key-side one), (k - k) @ W is 0, and abs of
    a constant SymPy cannot call real stays abs (fuzz seed 4000: numpy and cuda crashed)."""
    assert_cuda_agrees(text, moved=("q",))


# ---- issue 9: one tile rule for every backend (plan.MaskAtom) --------------------------------


@pytest.mark.parametrize("mask", ["doc[i] == doc[j] and j <= i", "doc[i] == doc[j] or j > i + 9",
                                  "not (doc[i] != doc[j])"], ids=["and", "or", "not"])
def test_cuda_scanned_mask_atoms_decide_whole_tiles(mask):
    """A document mask is no linear atom: the cuda kernels scan such a tile (every thread some
    pairs, a barrier vote) when the linear atoms leave it open, as the cpu kernel does. Tiles of
    4 x 8 over three documents of 8, 8 and 3 positions are all three cases: every pair in one
    document (status 2, the per-pair mask skipped), none (0, the tile skipped) and mixed."""
    spec = attndsl.parse(f"attention t {{\n    index doc[n]\n    score q . k\n    mask {mask}\n}}")
    n = 19
    rng = np.random.default_rng(11)
    q, k = rng.standard_normal((B, HEADS, n, D)), rng.standard_normal((B, KV_HEADS, n, D))
    v, G = rng.standard_normal((B, KV_HEADS, n, DV)), rng.standard_normal((B, HEADS, n, DV))
    doc = np.array([[0] * 8 + [1] * 8 + [2] * 3, [0] * 3 + [1] * 13 + [2] * 3])
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    got_out, got_lse = cuda.forward(q, k, v, return_lse=True, doc=doc)
    want_out, want_lse = ref.forward(q, k, v, return_lse=True, doc=doc)
    assert _rel(got_out, want_out) <= 1e-10 and _rel(got_lse, want_lse) <= 1e-10
    got, want = cuda.backward(q, k, v, G, doc=doc), ref.backward(q, k, v, G, doc=doc)
    for name in ("q", "k", "v"):
        assert _rel(got[name], want[name]) <= 1e-10, name
    source = emit_source(spec)
    assert source.count("cuda.syncthreads_or(ts_t0)") == 3  # fwd, dkdv and dq scan


@pytest.mark.parametrize("text", ["score clamp(q . k, tau, 1)\n    normalize none",
                                  "score clamp(q . k, -1, tau)",
                                  "score q . k\n    bias clamp(j - i, tau, 0)"],
                         ids=["lo", "hi", "bias"])
def test_cuda_clamp_keeps_a_nan_bound(text):
    """clamp printed as min(max(x, lo), hi) dropped a NaN lo or hi (the builtins keep a NaN
    only in first place): a diverged param bound looked healthy."""
    spec, (q, k, v, G), _ = _inputs(f"param tau\n    {text}")
    tau = {"tau": np.array(np.nan)}
    ref = attndsl.compile(spec, target="numpy")
    cuda = compile_kernel(spec, tiles=TILES)
    want = {"out": ref(q, k, v, **tau), **ref.backward(q, k, v, G, **tau)}
    got = {"out": cuda(q, k, v, **tau), **cuda.backward(q, k, v, G, **tau)}
    assert np.isnan(want["out"]).all()
    for name, value in want.items():
        g = np.asarray(got[name])
        assert np.array_equal(np.isnan(g), np.isnan(value)), name
        assert np.allclose(g[~np.isnan(value)], value[~np.isnan(value)], atol=1e-10), name


# ---- a derivative SymPy folds to 1/0 on a branch `where` never takes -------------------------


def test_cuda_complex_infinity_on_an_untaken_branch():
    """d/d sb of log(where(sb > 0.5, log(sb), 0)) is 1/0 (zoo) where the inner branch is 0; the
    outer `where` never takes it. The CUDA printer had no rule for zoo (NotImplementedError);
    numpy and cpu print NaN there. Found by the fuzzer (seed 7)."""
    inner = "where(sb[h] > 0.5, log(sb[h]), 0)"
    text = (f"param sb[heads]\n    score q . k + where({inner} > 0.5, log({inner}), 0)\n"
            "    normalize softmax(sink = sb[h])")
    assert "np.nan" in emit_source(attndsl.parse(f"attention t {{\n    {text}\n}}"))
    assert_cuda_agrees(text, moved=("sb", "q"))

"""The numpy target against hand-written independent references (tests/independent_refs.py).

float64, max abs error <= 1e-10 for out, lse and every gradient (q, k, v, params), on odd
sizes, several head layouts, rows with every key masked, and logits around +-1e4. The
references' own gradients are cross-checked here by central finite differences (only as a
check: the references' backward passes are derived by hand).
"""

from __future__ import annotations

import functools
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import attndsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import independent_refs as R

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOL = 1e-10
B, NQ, NK, D, DV, RR = 2, 5, 7, 3, 5, 4


# ---- spec texts and kernels ----------------------------------------------------------------


def example_text(name: str) -> str:
    return (EXAMPLES / f"{name}.attn").read_text()


def with_keep_masks(text: str) -> str:
    """The spec plus `index keepq[n_q]`, `index keepk[n_k]`, its mask and-ed with both."""
    lines = text.rstrip().splitlines()
    assert lines[-1].strip() == "}"
    body = lines[:-1]
    extra = "keepq[i] == 1 and keepk[j] == 1"
    found = False
    for n, line in enumerate(body):
        m = re.match(r"^(\s*)mask\s+(.*?)\s*(#.*)?$", line)
        if m:
            body[n] = f"{m.group(1)}mask ({m.group(2)}) and {extra}"
            found = True
    if not found:
        body.append(f"    mask {extra}")
    body += ["    index keepq[n_q]", "    index keepk[n_k]", "}"]
    return "\n".join(body) + "\n"


@functools.cache
def kernel_of(text: str):
    return attndsl.compile(text, target="numpy")


# ---- inputs --------------------------------------------------------------------------------

FIXED_HEADS = {"alibi": (8, 2), "multi_head_gqa": (8, 2)}
LAYOUTS = [(3, 3), (6, 2), (4, 1)]  # multi-head, grouped-query, multi-query
SIZES = {  # (n_q, n_k) where 5 x 7 would not exercise the spec
    "document": (7, 7),
    "spatial_window": (21, 39),  # several image rows of width 16
    "sliding_window": (140, 11),  # i - j < 128 bites; rows 138, 139 have no key
    "sliding_window_sink": (140, 11),  # the same, so rows 138, 139 have only the sink
    "relative_bias": (5, 140),  # offsets beyond 128 are clipped
}


def layouts(name):
    return [FIXED_HEADS[name]] if name in FIXED_HEADS else LAYOUTS


def make_inputs(name, rng, H, KH, sizes=None):
    n_q, n_k = sizes or SIZES.get(name, (NQ, NK))
    q = rng.standard_normal((B, H, n_q, D))
    k = rng.standard_normal((B, KH, n_k, D))
    v = rng.standard_normal((B, KH, n_k, DV))
    dout = rng.standard_normal((B, H, n_q, DV))
    extra = {}
    if name == "luong_general":
        extra["Wa"] = rng.standard_normal((D, D))
    elif name == "bahdanau":
        extra.update(
            Wq=rng.standard_normal((D, RR)),
            Wk=rng.standard_normal((D, RR)),
            w=rng.standard_normal(RR),
        )
    elif name == "alibi":
        extra["slope"] = 2.0 ** -np.arange(1, H + 1) * rng.uniform(0.5, 4.0, H)
    elif name == "sliding_window_sink":
        extra["sink"] = rng.standard_normal(H)
    elif name == "relative_bias":
        extra["table"] = rng.standard_normal((H, 257))
    elif name == "cosine":
        extra["tau"] = 0.37
    elif name == "decomposable":
        extra["F"] = rng.standard_normal((D, RR))
    elif name == "prefix_lm":
        extra["prefix"] = np.array([[2], [0]], dtype=np.int32)
    elif name == "document":
        extra["doc"] = np.array([[0, 0, 1, 1, 1, 2, 2], [3, 5, 5, 3, 5, 5, 9]], dtype=np.int64)
    return q, k, v, dout, extra


# ---- comparison ----------------------------------------------------------------------------

MAX_ERR: dict[tuple[str, str], float] = {}  # (variant, quantity) -> max abs error seen


def check_close(what, got, want, dtype=np.float64):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}"
    assert np.all(np.isfinite(want) | np.isneginf(want)), f"{what}: reference not finite"
    bad_inf = np.isneginf(want) != np.isneginf(got)
    assert not bad_inf.any(), (
        f"{what}: -inf mismatch at {np.argwhere(bad_inf)[:5].tolist()}: "
        f"got {got[bad_inf][:5]}, expected {want[bad_inf][:5]}"
    )
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin])), (
        f"{what}: non-finite values at {np.argwhere(fin & ~np.isfinite(got))[:5].tolist()}"
    )
    err = float(np.max(np.abs(got[fin] - want[fin]), initial=0.0))
    key = (what.split(":")[0].split("+")[0].split(" ")[0], what.split(":")[-1])
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    assert err <= TOL, f"{what}: max abs error {err:.3e} > {TOL:g}"


def run_and_compare(label, text, ref_fn, q, k, v, dout, extra, allowed=None, call_extra=None):
    """Forward (out, lse), kernel(...), backward with and without out/lse, against ref."""
    kern = kernel_of(text)
    call = dict(extra, **(call_extra or {}))
    ref = ref_fn(q, k, v, dout, allowed=allowed, **extra)
    out, lse = kern.forward(q, k, v, return_lse=True, **call)
    check_close(f"{label}:out", out, ref["out"])
    if ref["lse"] is None:
        assert lse is None, f"{label}: lse should be None for this normalizer"
    else:
        check_close(f"{label}:lse", lse, ref["lse"])
    check_close(f"{label}:out", kern(q, k, v, **call), ref["out"])
    for passed in ({}, {"out": out, "lse": lse}):
        grads = kern.backward(q, k, v, dout, **passed, **call)
        assert set(grads) == set(ref["grads"]), f"{label}: gradient keys {sorted(grads)}"
        for g, want in ref["grads"].items():
            check_close(f"{label}:d{g}", grads[g], want)
    return ref, out, lse, grads


# ---- the tests -----------------------------------------------------------------------------

NAMES = list(R.REFERENCES)
CASES = [pytest.param(n, H, KH, id=f"{n}-H{H}-KH{KH}") for n in NAMES for H, KH in layouts(n)]


@pytest.mark.parametrize("name,H,KH", CASES)
def test_matches_reference(name, H, KH):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{H}-{KH}".encode()))
    q, k, v, dout, extra = make_inputs(name, rng, H, KH)
    ref_fn = R.REFERENCES[name][0]
    _ref, out, lse, _ = run_and_compare(name, example_text(name), ref_fn, q, k, v, dout, extra)
    if name == "sliding_window":  # rows 138 and 139 see no key: out 0, lse -inf
        assert np.all(out[:, :, 138:] == 0) and np.all(np.isneginf(lse[:, :, 138:]))
        assert np.all(np.isfinite(lse[:, :, :138]))
    if name == "sliding_window_sink":  # rows 138 and 139 see only the sink: out 0, lse = sink
        assert np.all(out[:, :, 138:] == 0)
        np.testing.assert_allclose(lse[:, :, 138:], np.broadcast_to(
            extra["sink"][None, :, None], lse[:, :, 138:].shape), rtol=1e-14)


def keep_arrays(n_q, n_k):
    keepk = np.zeros((B, n_k), dtype=np.int8)
    keepk[1, ::2] = 1  # batch 0: every row empty
    keepq = np.ones((B, n_q), dtype=np.int16)
    keepq[1, 1::3] = 0  # batch 1: some rows empty
    return keepq, keepk


@pytest.mark.parametrize("name", NAMES)
def test_empty_rows(name):
    """Rows with no allowed key: out = 0, lse = -inf, and no gradient from them."""
    H, KH = layouts(name)[-1]
    rng = np.random.default_rng(7)
    q, k, v, dout, extra = make_inputs(name, rng, H, KH)
    n_q, n_k = q.shape[2], k.shape[2]
    keepq, keepk = keep_arrays(n_q, n_k)
    allowed = (keepq[:, None, :, None] == 1) & (keepk[:, None, None, :] == 1)
    ref_fn = R.REFERENCES[name][0]
    _ref, out, lse, grads = run_and_compare(
        f"{name}+keep",
        with_keep_masks(example_text(name)),
        ref_fn,
        q,
        k,
        v,
        dout,
        extra,
        allowed=allowed,
        call_extra={"keepq": keepq, "keepk": keepk},
    )
    empty = ~allowed.any(-1)  # [B, 1, n_q]
    empty = np.broadcast_to(empty, out.shape[:3])
    assert empty[0].all() and empty[1].any() and not empty[1].all()
    assert np.all(out[empty] == 0)
    assert np.all(grads["q"][empty] == 0)
    assert np.all(grads["k"][0] == 0) and np.all(grads["v"][0] == 0)
    if name == "sliding_window_sink":  # only the sink's term: lse = sink[h]
        sink = np.broadcast_to(extra["sink"][None, :, None], lse.shape)
        np.testing.assert_allclose(lse[empty], sink[empty], rtol=1e-14)
    elif lse is not None:
        assert np.all(np.isneginf(lse[empty]))  # other rows: checked against the reference


def huge_inputs(name, rng):
    """Inputs whose logits reach about +-1e4 (cosine: its maximum, 100, at tau = 0.01)."""
    H, KH = layouts(name)[-1] if name in FIXED_HEADS else (6, 2)
    q, k, v, dout, extra = make_inputs(name, rng, H, KH)
    target = 1e4
    if name == "luong_general":
        S = np.abs((q @ extra["Wa"]) @ np.swapaxes(R.expand_kv(k, H), -1, -2)).max()
        extra["Wa"] = extra["Wa"] * (target / S)
    elif name == "bahdanau":
        extra["w"] = extra["w"] * (target / np.abs(extra["w"]).sum())
    elif name == "decomposable":
        fq = np.maximum(q @ extra["F"], 0)
        fk = np.maximum(R.expand_kv(k, H) @ extra["F"], 0)
        extra["F"] = extra["F"] * (target / np.abs(fq @ np.swapaxes(fk, -1, -2)).max()) ** 0.5
    elif name == "cosine":
        extra["tau"] = 0.01
    elif name in ("linear", "causal_linear"):
        q, k = q * 60.0, k * 60.0
    else:
        scale = 1.0 if name == "luong_dot" else 1.0 / np.sqrt(D)
        S = np.abs(q @ np.swapaxes(R.expand_kv(k, H), -1, -2)).max() * scale
        a = (target / S) ** 0.5
        q, k = q * a, k * a
    return q, k, v, dout, extra


@pytest.mark.parametrize("name", NAMES)
def test_huge_logits(name):
    rng = np.random.default_rng(11)
    q, k, v, dout, extra = huge_inputs(name, rng)
    ref_fn = R.REFERENCES[name][0]
    _ref, out, _lse, grads = run_and_compare(
        f"{name}+huge", example_text(name), ref_fn, q, k, v, dout, extra
    )
    assert np.all(np.isfinite(out))
    for g in grads.values():
        assert np.all(np.isfinite(g))


def test_huge_logits_with_ties_and_empty_rows():
    """Logits of +-1e4 where two keys tie exactly for the max: the weight splits 1/2-1/2."""
    name = "scaled_dot_product"
    rng = np.random.default_rng(3)
    q, k, v, dout, extra = make_inputs(name, rng, 4, 2)
    k[:, :, 4] = k[:, :, 1]  # an exact duplicate key
    q = q * 80.0
    k = k * 80.0
    keepq, keepk = keep_arrays(q.shape[2], k.shape[2])
    keepk[1, 1] = keepk[1, 4] = 1
    allowed = (keepq[:, None, :, None] == 1) & (keepk[:, None, None, :] == 1)
    run_and_compare(
        "sdpa+ties",
        with_keep_masks(example_text(name)),
        R.scaled_dot_product,
        q,
        k,
        v,
        dout,
        extra,
        allowed=allowed,
        call_extra={"keepq": keepq, "keepk": keepk},
    )


def test_cosine_tau_at_and_below_the_floor():
    """max(tau, 0.01): the gradient splits 1/2-1/2 at tau = 0.01 and is 0 below it."""
    rng = np.random.default_rng(5)
    q, k, v, dout, extra = make_inputs("cosine", rng, 6, 3)
    for tau in (0.01, 0.004, np.float64(0.02), np.array(0.5)):
        extra["tau"] = tau
        *_, grads = run_and_compare(
            f"cosine tau={float(tau)}", example_text("cosine"), R.cosine, q, k, v, dout, extra
        )
        assert grads["tau"].shape == ()
    full = R.cosine(q, k, v, dout, tau=0.0100001)["grads"]["tau"]
    half = R.cosine(q, k, v, dout, tau=0.01)["grads"]["tau"]
    assert abs(half - 0.5 * full) < 1e-3 * abs(full)


def test_alibi_paper_slopes():
    """The paper's geometric slopes 1/2, 1/4, ..., 1/256 for 8 heads."""
    rng = np.random.default_rng(13)
    q, k, v, dout, extra = make_inputs("alibi", rng, 8, 2)
    extra["slope"] = 2.0 ** -np.arange(1, 9)
    run_and_compare("alibi paper", example_text("alibi"), R.alibi, q, k, v, dout, extra)


def test_bahdanau_other_hidden_size():
    rng = np.random.default_rng(17)
    q, k, v, dout, extra = make_inputs("bahdanau", rng, 3, 1, sizes=(3, 9))
    extra.update(
        Wq=rng.standard_normal((D, 1)), Wk=rng.standard_normal((D, 1)), w=rng.standard_normal(1)
    )
    run_and_compare("bahdanau r=1", example_text("bahdanau"), R.bahdanau, q, k, v, dout, extra)


def test_mask_only_specs_inline():
    """Small specs written here: a keep mask with a bias param, and with normalize sum."""
    rng = np.random.default_rng(19)
    H, KH = 6, 3
    q, k, v, dout, _ = make_inputs("x", rng, H, KH)
    keepq, keepk = keep_arrays(NQ, NK)
    allowed = (keepq[:, None, :, None] == 1) & (keepk[:, None, None, :] == 1)
    slope = rng.standard_normal(H)
    text = (
        "attention t {\n    index keepq[n_q]\n    index keepk[n_k]\n    param slope[heads]\n"
        "    score q . k\n    scale 1 / sqrt(d)\n    bias slope[h] * (j - i)\n"
        "    mask keepk[j] == 1 and keepq[i] == 1\n}\n"
    )
    run_and_compare(
        "inline keep alibi",
        text,
        lambda *a, **kw: R.alibi(*a, causal_mask_on=False, **kw),
        q,
        k,
        v,
        dout,
        {"slope": slope},
        allowed=allowed,
        call_extra={"keepq": keepq, "keepk": keepk},
    )
    text = (
        "attention t {\n    index keep[n_k]\n    score (elu(q) + 1) . (elu(k) + 1)\n"
        "    normalize sum\n    mask keep[j] == 1\n}\n"
    )
    run_and_compare(
        "inline keep linear",
        text,
        R.linear,
        q,
        k,
        v,
        dout,
        {},
        allowed=(keepk[:, None, None, :] == 1),
        call_extra={"keep": keepk},
    )


# ---- the references themselves: finite differences and the recurrent form ------------------


def directional_fd(fn, args, name, direction, h=1e-6):
    plus = dict(args)
    minus = dict(args)
    plus[name] = np.asarray(args[name], dtype=np.float64) + h * direction
    minus[name] = np.asarray(args[name], dtype=np.float64) - h * direction
    return (fn(**plus) - fn(**minus)) / (2 * h)


@pytest.mark.parametrize("name", NAMES)
def test_reference_gradients_by_finite_differences(name):
    H, KH = layouts(name)[-1] if name in FIXED_HEADS else (6, 2)
    rng = np.random.default_rng(23)
    q, k, v, dout, extra = make_inputs(name, rng, H, KH)
    ref_fn = R.REFERENCES[name][0]
    ref = ref_fn(q, k, v, dout, **extra)
    args = dict(q=q, k=k, v=v, **extra)

    def loss(**a):
        a = dict(a)
        qq, kk, vv = a.pop("q"), a.pop("k"), a.pop("v")
        return float((ref_fn(qq, kk, vv, **a)["out"] * dout).sum())

    for g, grad in ref["grads"].items():
        for _ in range(3):
            direction = rng.standard_normal(np.shape(args[g]))
            fd = directional_fd(loss, args, g, direction)
            an = float((grad * direction).sum())
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), f"{name} d{g}: fd {fd} vs {an}"


def test_causal_linear_recurrent_form():
    rng = np.random.default_rng(29)
    for H, KH in LAYOUTS:
        q, k, v, _, _ = make_inputs("causal_linear", rng, H, KH, sizes=(7, 7))
        np.testing.assert_allclose(
            R.causal_linear(q, k, v)["out"], R.causal_linear_recurrent(q, k, v), rtol=0, atol=1e-12
        )


def test_softmax_reference_against_direct_formula():
    """The stable masked softmax against the naive exp / sum on moderate logits."""
    rng = np.random.default_rng(31)
    q, k, v, _, _ = make_inputs("x", rng, 2, 2)
    L = q @ np.swapaxes(k, -1, -2) / np.sqrt(D)
    E = np.exp(L)
    want = (E / E.sum(-1, keepdims=True)) @ v
    got = R.scaled_dot_product(q, k, v)
    np.testing.assert_allclose(got["out"], want, rtol=0, atol=1e-13)
    np.testing.assert_allclose(got["lse"], np.log(E.sum(-1)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["relu", "decomposable"])
def test_relu_kinks(name):
    """relu'(0) = 0 (PyTorch): a zero query row puts every logit (relu) or every q @ F
    component (decomposable) exactly on the kink."""
    rng = np.random.default_rng(37)
    q, k, v, dout, extra = make_inputs(name, rng, 6, 2)
    q[:, :, 1] = 0.0
    q[0, 2, 3] = 0.0
    run_and_compare(f"{name} kink", example_text(name), R.REFERENCES[name][0], q, k, v, dout, extra)

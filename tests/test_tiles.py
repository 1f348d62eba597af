"""The cpu kernels' tile, chosen per machine (attndsl/runtime/tiles.py, issue 12 item 1).

The tile is a runtime value of the generated kernels, so any tile must give the reference's
results: odd tiles (5 x 7) against shapes that are multiples of none of them, GQA, rows that
every key masks (causal with k_offset > 0), logits around 1e4. The measurement is tested with
a tiny problem and two candidates: it runs once per key, is kept in tiles.json, and a later
process (here: a cleared table) reads the choice instead of measuring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cpu_helpers as H
import nan_cases
import numpy as np
import pytest

import attndsl
from attndsl.runtime import tiles

pytestmark = pytest.mark.slow

TILES = ["5x7", "32x256", "128x64", "128x128", "256x256"]
F64_TOL = 1e-10


@pytest.fixture(scope="module")
def kernels() -> dict[str, tuple[Any, Any]]:
    """(cpu, numpy) kernels of the specs below, compiled once for the module."""
    return {name: (attndsl.compile(H.load_spec(name), "cpu"),
                   attndsl.compile(H.load_spec(name), "numpy"))
            for name in ("alibi", "causal", "document")}


def both(kernels: dict[str, tuple[Any, Any]], name: str, d: int = 5, dv: int = 3, **call: Any
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    cpu, ref = kernels[name]
    spec = H.load_spec(name)
    call = dict(call)  # the parameters' dict is shared by every tile
    qk_scale = call.pop("qk_scale", 1.0)
    q, k, v, extra = H.make_inputs(spec, np.float64, B=2, heads=4, kv_heads=2, n_q=67, n_k=131,
                                   d=d, dv=dv, qk_scale=qk_scale, seed=3)
    G = np.random.default_rng(4).standard_normal((2, q.shape[1], 67, dv))
    extra = {**extra, **call}
    return H.run(ref, q, k, v, extra, G), H.run(cpu, q, k, v, extra, G)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize(("name", "call"), [
    ("alibi", {}),  # heads 8, kv_heads 2 (the spec's own)
    ("causal", {"k_offset": 20}),  # rows 0..19 have no allowed key: out 0, lse -inf
    ("causal", {"qk_scale": 100.0}),  # logits around 1e4: the online max's rescaling
    ("document", {}),  # a per-tile mask scan over index arrays
])
def test_every_tile_matches_the_reference(kernels: dict[str, tuple[Any, Any]], tile: str,
                                          name: str, call: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiles.VARIABLE, tile)
    want, got = both(kernels, name, **call)
    if "k_offset" in call:
        assert np.isneginf(want["lse"][:, :, :20]).all() and not want["out"][:, :, :20].any()
    errors = H.errors(want, got)
    assert max(errors.values()) < F64_TOL, (tile, errors)


@pytest.fixture(scope="module")
def stored_kernels() -> dict[str, tuple[Any, Any]]:
    return {name: (attndsl.compile(H.load_spec(name), "cpu"),
                   attndsl.compile(H.load_spec(name), "numpy"))
            for name in ("latent_rope", "sliding_window")}


@pytest.mark.parametrize(("layout", "tile", "d", "dv"), [
    ("stored", "5x7", 5, 3), ("stored", "64x128", 5, 3), ("stored", "128x256,33x17", 5, 3),
    ("packed", "64x128", 32, 16), ("packed", "128x256,35x16", 16, 32),
    ("packed", "16x32", 5, 3)])
@pytest.mark.parametrize(("name", "call"), [
    ("alibi", {}), ("causal", {"k_offset": 20}), ("causal", {"qk_scale": 100.0}),
    ("document", {}), ("latent_rope", {}), ("sliding_window", {})])
def test_key_layouts_match_the_reference(
        kernels: dict[str, tuple[Any, Any]], stored_kernels: dict[str, tuple[Any, Any]],
        layout: str, tile: str, d: int, dv: int, name: str, call: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ATTNDSL_CPU_KEYS=stored: every GEMM reads its key operand as stored (NT); packed: in
    panels, by micro_gemm, with the other products whose columns fill whole panels (P @ v, dV
    for dv = 16, 32; dQ, dK for d = 16, 32; BLAS's for d = 5, dv = 3). The raw k
    under GQA (alibi: 8 query heads on 2), a key-side input of its own width (latent_rope's
    rk[j], r = 4); rows no key reaches, huge logits, a band; the forward and the backward; 67
    query rows and 131 keys: partial tiles, row blocks and panels."""
    monkeypatch.setenv(tiles.VARIABLE, tile)
    monkeypatch.setenv(tiles.KEYS_VARIABLE, layout)
    want, got = both({**kernels, **stored_kernels}, name, d=d, dv=dv, **call)
    errors = H.errors(want, got)
    assert max(errors.values()) < F64_TOL, (tile, errors)
    cpu = {**kernels, **stored_kernels}[name][0]
    q, k, v, extra = H.make_inputs(H.load_spec(name), n_q=9, n_k=9)
    call_ = cpu.validate(q, k, v, extra, 0, 0)
    index = tiles.LAYOUTS.index(layout)
    assert cpu.key_layout(call_, "forward") == cpu.key_layout(call_, "backward") == index


@pytest.mark.parametrize("layout", ["stored", "packed"])
@pytest.mark.parametrize("case", nan_cases.CAUSAL_CASES, ids=lambda c: c.__name__)
def test_key_layouts_keep_the_nan_policy(case: Any, layout: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Read as stored, the keys are checked for NaN and inf with the other operands (packed,
    while packed, as the transposition checks them, and v with them in the backward): NaN
    exactly where the reference has it, masked poison harmless (200 x 200 causal, GQA, 64 x 128
    tiles), also in a backward given out and lse (which recomputes no forward: its operands
    are checked by the backward's own prologue)."""
    monkeypatch.setenv(tiles.VARIABLE, "64x128")
    monkeypatch.setenv(tiles.KEYS_VARIABLE, layout)
    cpu, ref = (attndsl.compile(nan_cases.CAUSAL, target) for target in ("cpu", "numpy"))
    clean = nan_cases.make(nan_cases.CAUSAL, 200, 200, d=16, dv=16)  # whole panels
    poisoned = clean.copy()
    expect = case(poisoned)
    got, want = nan_cases.run(cpu, poisoned), nan_cases.run(ref, poisoned)
    if getattr(case, "forward_only", False):
        got, want = ({n: r[n] for n in ("out", "lse")} for r in (got, want))
    nan_cases.assert_same(got, want, rtol=F64_TOL, atol=F64_TOL)
    expect(got, nan_cases.run(cpu, clean))
    if not getattr(case, "forward_only", False):
        x = poisoned
        with np.errstate(all="ignore"):
            given = [k.backward(x.q, x.k, x.v, x.dout, out=r["out"], lse=r["lse"])
                     for k, r in ((cpu, got), (ref, want))]
        nan_cases.assert_same(*({f"d{n}": g for n, g in grads.items()} for grads in given),
                              rtol=F64_TOL, atol=F64_TOL)


@pytest.mark.parametrize(("value", "want"), [
    ("auto", None), ("", None), ("stored", tiles.STORED), (" Transposed ", tiles.TRANSPOSED),
    ("PACKED", tiles.PACKED)])
def test_key_layout_settings(value: str, want: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiles.KEYS_VARIABLE, value)
    assert tiles.configured_keys() == want


def test_packed_keys_need_tiles_of_whole_panels(kernels: dict[str, tuple[Any, Any]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A key tile that does not start on a panel (BK = 17, the backward's) is refused, both
    variables named, before anything runs."""
    monkeypatch.setenv(tiles.VARIABLE, "64x128,64x17")
    monkeypatch.setenv(tiles.KEYS_VARIABLE, "packed")
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=9, n_k=9)
    with pytest.raises(ValueError, match=r"ATTNDSL_CPU_KEYS=packed reads the keys 16 at a "
                                         r"time: it needs key tiles \(BK\) that are multiples "
                                         r"of 16, not ATTNDSL_CPU_TILES='64x128,64x17'"):
        kernels["causal"][0].forward(q, k, v)


def test_a_bad_key_layout_is_named(kernels: dict[str, tuple[Any, Any]],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiles.VARIABLE, "64x128")
    monkeypatch.setenv(tiles.KEYS_VARIABLE, "nt")
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=9, n_k=9)
    with pytest.raises(ValueError, match="ATTNDSL_CPU_KEYS='nt': expected 'auto', "
                                         "'transposed', 'stored' or 'packed'"):
        kernels["causal"][0].forward(q, k, v)


BAND_SPECS = ("sliding_window", "sliding_window_sink", "spatial_window", "prefix_lm")


@pytest.fixture(scope="module")
def band_kernels() -> dict[str, tuple[Any, Any]]:
    return {name: (attndsl.compile(H.load_spec(name), "cpu"),
                   attndsl.compile(H.load_spec(name), "numpy")) for name in BAND_SPECS}


@pytest.mark.parametrize("tile", ["5x7", "17x48", "64x128", "40x200"])
@pytest.mark.parametrize("name", BAND_SPECS)
def test_tiles_fitted_to_a_band_match_the_reference(band_kernels: dict[str, tuple[Any, Any]],
                                                   name: str, tile: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows over sequences long enough that most tiles are partly allowed, so the forward
    fits key ranges and the backward query ranges to the band (`_fit_keys`, `_fit_queries`)
    at strips that no tile size is a multiple of."""
    monkeypatch.setenv(tiles.VARIABLE, tile)
    cpu, ref = band_kernels[name]
    q, k, v, extra = H.make_inputs(H.load_spec(name), np.float64, B=1, heads=4, kv_heads=2,
                                   n_q=333, n_k=301, d=5, dv=3, seed=7)
    G = np.random.default_rng(8).standard_normal((1, q.shape[1], q.shape[2], 3))
    want, got = H.run(ref, q, k, v, extra, G), H.run(cpu, q, k, v, extra, G)
    errors = H.errors(want, got)
    assert max(errors.values()) < F64_TOL, (tile, errors)


def test_a_partly_allowed_tile_is_fitted_to_the_window(
        band_kernels: dict[str, tuple[Any, Any]]) -> None:
    """sliding_window.attn (window 128, causal) at n = 2048: where the fitted ranges start
    and stop, checked by hand against `j <= i and i - j < 128`."""
    module = band_kernels["sliding_window"][0].module(np.float32)
    sz = np.array([1, 1, 1, 2048, 2048, 64, 64, 1, 0, 64, 128], np.int64)
    # queries 1024..1087 see keys up to 1087: the diagonal tile [1024, 1152) ends at 1088
    assert module._fit_keys(sz, 0, 0, 0, 0, 1024, 1088, 1024, 1152, 128) == (1024, 1088, 1)
    # queries 1100..1115 see keys from 973: the tile [896, 1024) starts at the strip of 960
    # and runs 128 keys on, to 1088 (every strip of it holds an allowed pair)
    assert module._fit_keys(sz, 0, 0, 0, 0, 1100, 1116, 896, 1024, 128) == (960, 1088, 1)
    # keys 1024..1151 are seen by queries up to 1278: [1216, 1344) ends at the strip of 1264
    assert module._fit_queries(sz, 0, 0, 0, 0, 1216, 1344, 1024, 1152, 128) == (1216, 1280, 1)
    # with positions shifted by the offsets, the same tile: qo = ko = 1000
    assert module._fit_keys(sz, 1000, 1000, 0, 0, 1024, 1088, 1024, 1152, 128) == \
        (1024, 1088, 1)


def test_the_forward_and_the_backward_take_their_own_tiles(
        kernels: dict[str, tuple[Any, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiles.VARIABLE, "5x7,128x64")
    want, got = both(kernels, "alibi")
    assert max(H.errors(want, got).values()) < F64_TOL
    cpu = kernels["alibi"][0]
    q, k, v, extra = H.make_inputs(H.load_spec("alibi"), n_q=9, n_k=9)
    call = cpu.validate(q, k, v, extra, 0, 0)
    assert cpu.tile(call, "forward") == (5, 7) and cpu.tile(call, "backward") == (128, 64)


@pytest.mark.parametrize(("value", "why"), [
    ("64", "expected 'auto', 'off', BQxBK"), ("0x128", "expected 'auto', 'off', BQxBK"),
    ("64x128x2", "expected 'auto', 'off', BQxBK"), ("big", "expected 'auto', 'off', BQxBK"),
    ("64x128,1x1,2x2", "expected 'auto', 'off', BQxBK"),
    ("64x128,64x512", "a key tile \\(BK\\) is at most 256")])
def test_a_bad_setting_is_named(kernels: dict[str, tuple[Any, Any]], value: str, why: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiles.VARIABLE, value)
    cpu = kernels["causal"][0]
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=9, n_k=9)
    with pytest.raises(ValueError, match=f"ATTNDSL_CPU_TILES='{value}': {why}"):
        cpu.forward(q, k, v)


@pytest.mark.parametrize(("value", "want"), [
    ("auto", None), ("", None), ("off", (tiles.DEFAULT, tiles.DEFAULT)),
    ("128x128", ((128, 128), (128, 128))), (" 64x128 , 128X64 ", ((64, 128), (128, 64)))])
def test_settings(value: str, want: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiles.VARIABLE, value)
    assert tiles.configured() == want


@pytest.fixture
def tiny_tuning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Auto tiles on every call, measured on a 40-long problem over two candidates, kept in
    a tiles.json of this test; `measured` lists each measurement's (key, choice)."""
    monkeypatch.setenv(tiles.VARIABLE, "auto")
    monkeypatch.setenv(tiles.KEYS_VARIABLE, "transposed")  # the layout's tests set auto
    monkeypatch.setattr(tiles, "TUNE_PAIRS", 1)
    monkeypatch.setattr(tiles, "TUNE_N", 40)
    monkeypatch.setattr(tiles, "CANDIDATES", ((5, 7), (16, 32)))
    monkeypatch.setattr(tiles, "_path", lambda: tmp_path / "tiles.json")
    measured: list[tuple[str, tuple[int, int]]] = []
    measure = tiles.measure

    def counted(kernel: Any, call: Any, kind: str) -> tuple[int, int]:
        choice = measure(kernel, call, kind)
        measured.append((tiles.tune_key(kernel, call, kind), choice))
        return choice

    monkeypatch.setattr(tiles, "measure", counted)
    tiles.forget()
    yield {"measured": measured, "file": tmp_path / "tiles.json"}
    tiles.forget()


def test_auto_measures_once_and_a_later_process_reads_the_choice(
        kernels: dict[str, tuple[Any, Any]], tiny_tuning: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = kernels["alibi"][0]
    spec = H.load_spec("alibi")
    q, k, v, extra = H.make_inputs(spec, np.float32, n_q=50, n_k=70, seed=5)
    out, lse = cpu.forward(q, k, v, return_lse=True, **extra)
    grads = cpu.backward(q, k, v, out, out=out, lse=lse, **extra)
    measured = tiny_tuning["measured"]
    assert [key.split(" | ")[2] for key, _ in measured] == ["float32 forward", "float32 backward"]
    assert all(choice in tiles.CANDIDATES for _, choice in measured)
    stored = json.loads(tiny_tuning["file"].read_text())
    assert {key: tuple(tile) for key, tile in stored.items()} == dict(measured)
    assert all(key.startswith(tiles.machine()) for key in stored)

    cpu.forward(q, k, v, **extra)  # the same key: no second measurement
    assert len(measured) == 2

    tiles.forget()  # as a new process: the choice comes from tiles.json

    def refuse(*args: Any) -> None:
        raise AssertionError("measured again although tiles.json holds the choice")

    monkeypatch.setattr(tiles, "measure", refuse)
    again, lse_again = cpu.forward(q, k, v, return_lse=True, **extra)
    grads_again = cpu.backward(q, k, v, out, out=out, lse=lse, **extra)
    assert np.array_equal(again, out) and np.array_equal(lse_again, lse)  # the same tile
    assert all(np.array_equal(grads_again[n], grads[n]) for n in grads)

    (_, forward_tile), (_, backward_tile) = measured
    monkeypatch.setenv(tiles.VARIABLE, "x".join(map(str, forward_tile)) + ","
                       + "x".join(map(str, backward_tile)))
    fixed, _ = cpu.forward(q, k, v, return_lse=True, **extra)
    assert np.array_equal(fixed, out)  # bit for bit: the chosen tile is the one that ran


def recorded_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[int, int], int]]:
    """Every run of the measurements from here on, in order: (length, tile, key layout)."""
    ran: list[tuple[int, tuple[int, int], int]] = []
    runner = tiles._runner

    def recorded(kernel: Any, call: Any, kind: str, n: int) -> Any:
        run = runner(kernel, call, kind, n)

        def timed(tile: tuple[int, int], keys: int) -> None:
            ran.append((n, tile, keys))
            run(tile, keys)
        return timed

    monkeypatch.setattr(tiles, "_runner", recorded)
    return ran


def test_the_finalists_run_again_at_the_calls_length(
        kernels: dict[str, tuple[Any, Any]], tiny_tuning: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate runs at TUNE_N; the FINALISTS fastest run again at TUNE_N_LONG when the
    call has that many pairs per head (its key says the length), and the choice is one of them,
    the fastest there; a shorter call keeps TUNE_N throughout."""
    candidates = ((5, 7), (16, 32), (8, 16), (24, 40))
    monkeypatch.setattr(tiles, "CANDIDATES", candidates)
    monkeypatch.setattr(tiles, "FINALISTS", 2)
    monkeypatch.setattr(tiles, "TUNE_N_LONG", 48)  # 50 x 70 pairs: long; 40 x 40: not
    ran = recorded_runs(monkeypatch)
    cpu = kernels["causal"][0]
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=50, n_k=70)
    cpu.forward(q, k, v)
    (key, choice), = tiny_tuning["measured"]
    assert key.endswith(" | n 48")
    first = [tile for n, tile, _ in ran if n == 40]
    assert first == list(candidates) * (1 + tiles.TRIALS)  # an untimed round, then TRIALS
    finalists = {tile for n, tile, _ in ran if n == 48}
    assert len(finalists) == 2 and choice in finalists
    assert len(ran) == len(first) + 2 * (1 + tiles.FINAL_TRIALS)

    ran.clear()
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=40, n_k=40)
    cpu.forward(q, k, v)
    assert tiny_tuning["measured"][1][0].endswith(" | n 40")
    assert {n for n, *_ in ran} == {40}
    assert len(ran) == len(candidates) * (1 + tiles.TRIALS) + 2 * tiles.FINAL_TRIALS


def test_trials_rank_by_their_median_share_of_each_round() -> None:
    """A slow spell hits a round, not a trial: the trial a few percent behind in most rounds
    ranks behind, even if one lucky run of it was the fastest of all (which ranking by the
    fastest run picked), and rounds that did not run every trial are left out."""
    a, b, c = ((16, 32), 2), ((32, 16), 2), ((8, 8), 2)
    rounds = [{a: 1.00, b: 1.05, c: 1.30}, {a: 2.00, b: 2.10, c: 2.40},
              {a: 1.10, b: 0.50, c: 1.20}, {a: 0.90, b: 0.95, c: 1.00}, {b: 0.01}]
    assert tiles._ranked((a, b, c), rounds) == (a, b, c)
    assert tiles._ranked((b, c), rounds) == (b, c)
    assert min((a, b, c), key=lambda t: min(r.get(t, 9.0) for r in rounds[:4])) == b


def test_small_calls_and_the_linear_path_measure_nothing(
        kernels: dict[str, tuple[Any, Any]], tiny_tuning: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiles, "TUNE_PAIRS", 50 * 70 + 1)
    cpu = kernels["causal"][0]
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=50, n_k=70)
    cpu.forward(q, k, v)
    linear = attndsl.compile(H.load_spec("linear"), "cpu")
    monkeypatch.setattr(tiles, "TUNE_PAIRS", 1)
    q, k, v, _ = H.make_inputs(H.load_spec("linear"), n_q=9, n_k=9)
    linear.forward(q, k, v)
    assert tiny_tuning["measured"] == [] and not tiny_tuning["file"].exists()


def test_an_unreadable_tiles_json_is_measured_again(
        kernels: dict[str, tuple[Any, Any]], tiny_tuning: dict[str, Any]) -> None:
    tiny_tuning["file"].write_text("{not json")
    cpu = kernels["causal"][0]
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=50, n_k=70)
    cpu.forward(q, k, v)
    assert len(tiny_tuning["measured"]) == 1
    assert len(json.loads(tiny_tuning["file"].read_text())) == 1


def test_the_tile_set_is_the_tile_that_runs(kernels: dict[str, tuple[Any, Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Key tiles of 7 or of 128 keys sum a row's weights in another order: float32 results
    differ in their last bits (so the setting reaches the kernels), both close to float64."""
    cpu = kernels["alibi"][0]
    q, k, v, extra = H.make_inputs(H.load_spec("alibi"), np.float32, n_q=67, n_k=131, seed=6)
    results = {}
    for tile in ("5x7", "off"):
        monkeypatch.setenv(tiles.VARIABLE, tile)
        out = cpu.forward(q, k, v, **extra)
        results[tile] = (out, cpu.backward(q, k, v, out, **extra)["k"])
    want = kernels["alibi"][1].forward(*(a.astype(np.float64) for a in (q, k, v)),
                                       **H.as64(extra))
    for out, _ in results.values():
        assert H.rel_error(want, out) < 1e-5
    assert not np.array_equal(results["5x7"][0], results["off"][0])
    assert not np.array_equal(results["5x7"][1], results["off"][1])


def test_a_failed_measurement_warns_and_runs_the_default(
        kernels: dict[str, tuple[Any, Any]], tiny_tuning: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement runs on demo arrays: if it fails, the caller's call still runs."""
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no demo arrays")

    monkeypatch.setattr("attndsl.demo.demo_inputs", broken)
    cpu, ref = kernels["causal"]
    q, k, v, _ = H.make_inputs(H.load_spec("causal"), n_q=50, n_k=70)
    with pytest.warns(UserWarning, match="could not measure the cpu tile of 'causal' "
                                         r"\(RuntimeError: no demo arrays\); it runs 64x128"):
        out = cpu.forward(q, k, v)
    assert H.rel_error(ref.forward(q, k, v), out) < F64_TOL
    assert not tiny_tuning["file"].exists()  # nothing stored: the next process tries again


@pytest.mark.parametrize(("candidates", "layouts"), [
    (((5, 7), (16, 32)), (tiles.TRANSPOSED, tiles.STORED)),  # BK = 7: no panels
    (((16, 32), (32, 16)), (tiles.TRANSPOSED, tiles.STORED, tiles.PACKED))])
def test_auto_measures_the_key_layout_once_with_the_chosen_tile(
        kernels: dict[str, tuple[Any, Any]], tiny_tuning: dict[str, Any],
        candidates: tuple[tuple[int, int], ...], layouts: tuple[int, ...],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After the tile, every layout runs with it (packed only if every candidate tile fits
    panels), FINAL_TRIALS rounds at the call's length class; the fastest is kept in
    tiles.json beside the tile ("| keys"), read by a later process, and is the layout the call
    runs (bit for bit)."""
    monkeypatch.setattr(tiles, "CANDIDATES", candidates)
    monkeypatch.setenv(tiles.KEYS_VARIABLE, "auto")
    ran = recorded_runs(monkeypatch)
    cpu = kernels["alibi"][0]
    q, k, v, extra = H.make_inputs(H.load_spec("alibi"), np.float32, n_q=50, n_k=70, dv=16,
                                   seed=5)
    out = cpu.forward(q, k, v, **extra)
    (key, tile), = tiny_tuning["measured"]
    runs = ran[-len(layouts) * (1 + tiles.FINAL_TRIALS):]  # an untimed run of each, rounds
    assert runs == [(tiles.TUNE_N, tile, layout) for layout in layouts] * (
        1 + tiles.FINAL_TRIALS)
    # the tiles' runs: with the keys packed where every candidate fits panels
    ranked = tiles.PACKED if tiles.PACKED in layouts else tiles.TRANSPOSED
    assert all(keys == ranked for *_, keys in ran[:-len(runs)])
    stored = json.loads(tiny_tuning["file"].read_text())
    assert stored[key] == list(tile) and stored[key + " | keys"] in tiles.LAYOUTS
    call = cpu.validate(q, k, v, extra, 0, 0)
    chosen = cpu.key_layout(call, "forward")
    assert tiles.LAYOUTS[chosen] == stored[key + " | keys"]

    ran.clear()
    tiles.forget()  # as a new process: both choices come from tiles.json
    again = cpu.forward(q, k, v, **extra)
    assert ran == [] and np.array_equal(again, out)
    monkeypatch.setenv(tiles.VARIABLE, "x".join(map(str, tile)))
    monkeypatch.setenv(tiles.KEYS_VARIABLE, tiles.LAYOUTS[chosen])
    assert np.array_equal(cpu.forward(q, k, v, **extra), out)  # the layout that ran

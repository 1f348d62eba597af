"""`attndsl show --mask` and `attndsl plot` (attndsl/viz.py, attndsl/plot.py).

The tile pictures are checked against an independent reading of each mask: the pairs written
out with NumPy here, and a tile's status counted with plain loops."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import attndsl
from attndsl import viz
from attndsl.cli import main
from attndsl.codegen.numba_cpu import BK, BQ

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> attndsl.ir.Spec:
    return attndsl.load(EXAMPLES / f"{name}.attn")


def tiles_by_loops(allowed: np.ndarray) -> list[str]:
    """One character per BQ x BK tile, counted pair by pair."""
    rows = []
    for i0 in range(0, allowed.shape[0], BQ):
        row = ""
        for j0 in range(0, allowed.shape[1], BK):
            tile = allowed[i0:i0 + BQ, j0:j0 + BK]
            row += "." if not tile.any() else ("#" if tile.all() else "+")
        rows.append(row)
    return rows


def shown_tiles(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and set(line) <= set("#+.")]


I, J = np.ogrid[:700, :700]
MASKS = {  # the mask of each example, written out independently, at n = 700
    "causal": J <= I,
    "sliding_window": (J <= I) & (I - J < 128),
    "document": (viz.documents(700, 4)[I] == viz.documents(700, 4)[J]) & (J <= I),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_show_mask_matches_the_pairs(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(EXAMPLES / f"{name}.attn"), "--mask", "700"]) == 0
    out = capsys.readouterr().out
    want = tiles_by_loops(MASKS[name])
    assert shown_tiles(out) == want
    skipped = sum(row.count(".") for row in want) / sum(len(row) for row in want)
    assert f"{100 * skipped:.1f}% skipped" in out
    assert f"tiles of {BQ} queries x {BK} keys" in out


def test_show_mask_draws_the_tile_calls_of_that_size_run(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """From TUNE_PAIRS pairs on, the cpu kernels run a tile measured per machine and shapes
    (runtime/tiles.py): ATTNDSL_CPU_TILES fixes it, and then the picture shows that tile; left
    on auto, the picture says it shows the default, which such a call may not run."""
    causal = str(EXAMPLES / "causal.attn")
    monkeypatch.delenv("ATTNDSL_CPU_TILES", raising=False)
    assert main(["show", causal, "--mask", "700"]) == 0
    assert "may differ" not in capsys.readouterr().out  # under TUNE_PAIRS: the default runs
    assert main(["show", causal, "--mask", "1024"]) == 0
    assert "the tile measured for the machine" in capsys.readouterr().out
    monkeypatch.setenv("ATTNDSL_CPU_TILES", "128x128,64x128")  # the forward's is drawn
    assert main(["show", causal, "--mask", "1024"]) == 0
    out = capsys.readouterr().out
    assert "tiles of 128 queries x 128 keys (cpu kernel) (set by ATTNDSL_CPU_TILES)" in out
    assert shown_tiles(out) == ["+" + "." * 7] + ["#" * r + "+" + "." * (7 - r)
                                                  for r in range(1, 8)]


def test_show_mask_document_with_given_ids(capsys: pytest.CaptureFixture[str]) -> None:
    doc = "0," * 200 + "1," * 312
    assert main(["show", str(EXAMPLES / "document.attn"), "--mask", "512",
                 "--index", f"doc={doc[:-1]}"]) == 0
    ids = np.array([0] * 200 + [1] * 312)
    i, j = np.ogrid[:512, :512]
    assert shown_tiles(capsys.readouterr().out) == tiles_by_loops((ids[i] == ids[j]) & (j <= i))


def test_show_mask_without_mask_is_all_full(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(EXAMPLES / "scaled_dot_product.attn"), "--mask", "200x300"]) == 0
    out = capsys.readouterr().out
    assert shown_tiles(out) == ["###"] * 4
    assert "0.0% skipped" in out


@pytest.mark.parametrize("value", ["0", "-3", "abc", "10x", "1x2x3", "64x0"])
def test_show_mask_bad_value(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(EXAMPLES / "causal.attn"), f"--mask={value}"]) == 2
    assert f"--mask {value}: expected a positive length N or NQxNK" in capsys.readouterr().err


def test_show_mask_bad_index(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(EXAMPLES / "document.attn")
    assert main(["show", path, "--mask", "8", "--index", "doc=1,2"]) == 2
    assert "got 2 values, the array has shape [8]" in capsys.readouterr().err
    assert main(["show", path, "--mask", "8", "--index", "docs=docs:2"]) == 2
    assert "no index array of that name (it has: doc)" in capsys.readouterr().err
    assert main(["show", path, "--mask", "8", "--index", "doc"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["prefix_lm", "spatial_window", "sliding_window_sink"])
def test_kernel_status_never_contradicts_the_pairs(name: str) -> None:
    """And -> min, Or -> max may leave a tile open (1) that its pairs decide; never the reverse."""
    spec = load(name)
    mask = viz.pair_mask(spec, viz.demo_inputs(spec, 640, 640, d=1, dv=1))
    exact = viz.pair_status(mask.allowed, BQ, BK)
    kernel = viz.kernel_status(mask, BQ, BK)
    assert np.all((kernel == exact) | (kernel == viz.PARTIAL))
    assert (kernel == viz.SKIPPED).any()


def test_parse_index() -> None:
    assert viz.parse_index("docs:2", (6,), "doc").tolist() == [0, 0, 0, 1, 1, 1]
    assert viz.parse_index("5", (1,), "prefix").tolist() == [5]
    assert viz.parse_index("1,2,3,4", (2, 2), "x").tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="docs:K"):
        viz.parse_index("docs:0", (4,), "doc")


# ---- weights ------------------------------------------------------------------------------------


def direct_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    x = np.where(allowed, logits, -np.inf)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_weights_equal_a_direct_softmax() -> None:
    spec = load("causal")
    inputs = viz.demo_inputs(spec, 9, 9, d=4, dv=4, batch=2)
    P = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)
    logits = inputs.q @ np.swapaxes(inputs.k, -1, -2) / 2.0
    i, j = np.ogrid[:9, :9]
    np.testing.assert_allclose(P, direct_softmax(logits, j <= i), rtol=1e-12, atol=1e-15)
    assert np.all(P[..., j > i] == 0)


def test_weights_with_gqa_sink_and_elementwise_normalizers() -> None:
    # sliding_window_sink: kv_heads from the spec's heads; the sink takes weight, no value
    spec = load("sigmoid")
    inputs = viz.demo_inputs(spec, 7, 11, d=4, dv=4)
    P = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)
    logits = inputs.q @ np.swapaxes(inputs.k, -1, -2) / 2.0
    np.testing.assert_allclose(P, 1 / (1 + np.exp(-(logits - np.log(11)))), rtol=1e-12)

    spec = load("multi_head_gqa")
    inputs = viz.demo_inputs(spec, 6, 6, d=4, dv=4)
    P = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)
    k = np.repeat(inputs.k, 4, axis=1)  # query heads 0-3 read kv head 0, 4-7 kv head 1
    logits = inputs.q @ np.swapaxes(k, -1, -2) / 2.0
    np.testing.assert_allclose(P, direct_softmax(logits, np.ones((6, 6), bool)), rtol=1e-12)


def test_weights_of_linear_attention_with_a_causal_mask() -> None:
    spec = load("causal_linear")
    inputs = viz.demo_inputs(spec, 6, 6, d=3, dv=3)
    P = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)
    phi = lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))) + 1  # elu + 1
    i, j = np.ogrid[:6, :6]
    x = np.where(j <= i, phi(inputs.q) @ np.swapaxes(phi(inputs.k), -1, -2), 0)
    np.testing.assert_allclose(P, x / x.sum(axis=-1, keepdims=True), rtol=1e-12)


def test_weights_of_a_sink_row_sum_below_one() -> None:
    spec = load("sliding_window_sink")
    inputs = viz.demo_inputs(spec, 5, 5, d=4, dv=4)
    P = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)
    sink = inputs.extra["sink"]
    logits = inputs.q @ np.swapaxes(inputs.k, -1, -2) / 2.0
    i, j = np.ogrid[:5, :5]
    e = np.where(j <= i, np.exp(logits), 0)
    want = e / (e.sum(axis=-1, keepdims=True) + np.exp(sink)[None, :, None, None])
    np.testing.assert_allclose(P, want, rtol=1e-12)


# ---- PNGs ---------------------------------------------------------------------------------------


def read_png(path: Path) -> np.ndarray:
    image = pytest.importorskip("matplotlib.image")
    return image.imread(path)


def test_plot_mask_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attndsl.plot import figure_pixels

    out = tmp_path / "mask.png"
    assert main(["plot", str(EXAMPLES / "prefix_lm.attn"), "--nq", "96", "--nk", "192",
                 "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    width, height = figure_pixels(96, 192)
    assert read_png(out).shape[:2] == (height, width)


def test_plot_weights_png_with_labels(tmp_path: Path) -> None:
    from attndsl.plot import figure_pixels

    out = tmp_path / "w.png"
    assert main(["plot", str(EXAMPLES / "causal.attn"), "--weights", "--labels",
                 "I love you", "-o", str(out)]) == 0
    width, height = figure_pixels(3, 3, labelled=True)
    image = read_png(out)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # a picture, not a blank page


def test_plot_weights_from_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    arrays = {"q": rng.standard_normal((1, 1, 3, 4)), "k": rng.standard_normal((1, 1, 5, 4)),
              "v": rng.standard_normal((1, 1, 5, 4))}
    np.savez(tmp_path / "in.npz", **arrays)
    out = tmp_path / "w.png"
    assert main(["plot", str(EXAMPLES / "luong_dot.attn"), "--weights", "--npz",
                 str(tmp_path / "in.npz"), "--qlabels", "je t'aime",
                 "--klabels", "I love you", "-o", str(out)]) == 2
    assert "2 labels for 3 queries" in capsys.readouterr().err
    assert main(["plot", str(EXAMPLES / "luong_dot.attn"), "--weights", "--npz",
                 str(tmp_path / "in.npz"), "--qlabels", "je t' aime",
                 "--klabels", "I really do love you", "-o", str(out)]) == 0
    assert read_png(out).shape[0] > 100


def test_plot_weights_from_npz_with_params(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "alibi.npz", q=rng.standard_normal((2, 8, 4, 3)),
             k=rng.standard_normal((2, 2, 4, 3)), v=rng.standard_normal((2, 2, 4, 3)),
             slope=np.linspace(0.1, 0.8, 8))
    out = tmp_path / "w.png"
    assert main(["plot", str(EXAMPLES / "alibi.attn"), "--weights", "--npz",
                 str(tmp_path / "alibi.npz"), "--batch", "1", "--head", "7", "-o", str(out)]) == 0
    assert main(["plot", str(EXAMPLES / "alibi.attn"), "--weights", "--npz",
                 str(tmp_path / "alibi.npz"), "--head", "8", "-o", str(out)]) == 2


def test_any_head_of_random_arrays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With random arrays there are as many heads as --head needs (the spec fixes none), in
    whole groups of a spec's fixed kv_heads; a spec that fixes its heads bounds --head."""
    out = tmp_path / "w.png"
    for spec, head in (("causal", 3), ("multi_head_gqa", 5)):
        assert main(["plot", str(EXAMPLES / f"{spec}.attn"), "--weights", "--n", "6",
                     "--head", str(head), "-o", str(out)]) == 0
        assert main(["show", str(EXAMPLES / f"{spec}.attn"), "--mask", "300", "--head",
                     str(head)]) == 0
    assert "head 5" in capsys.readouterr().out
    groups = attndsl.parse("attention groups {\n kv_heads 2\n score q . k\n}")
    assert viz.heads_of(groups, 5) == (6, 2)  # whole groups of the fixed kv_heads
    fixed = attndsl.parse("attention fixed {\n heads 2\n score q . k\n}")
    assert viz.heads_of(fixed, 5) == (2, 2)
    assert main(["plot", str(EXAMPLES / "multi_head_gqa.attn"), "--head", "8", "-o",
                 str(out)]) == 2


def test_plot_weights_size_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(EXAMPLES / "causal.attn"), "--weights", "--n", "1025"]) == 2
    assert "--weights draws at most 1,048,576 pairs" in capsys.readouterr().err


def test_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["plot", str(EXAMPLES / "causal.attn"), "-o", str(tmp_path / "x.png")]) == 2
    assert "pip install 'attndsl[plot]'" in capsys.readouterr().err


def test_channel_attention_is_danets_module() -> None:
    """softmax(rowmax(E) - E) with E = A A^T over the channels, as DANet's code computes it."""
    rng = np.random.default_rng(2)
    A = rng.standard_normal((1, 1, 6, 20))  # 6 channels of a 4 x 5 feature map
    P = viz.attention_weights(load("channel_attention"), A, A, {})
    energy = A[0, 0] @ A[0, 0].T
    shifted = energy.max(axis=-1, keepdims=True) - energy
    want = np.exp(shifted - shifted.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(P[0, 0], want / want.sum(axis=-1, keepdims=True), rtol=1e-12)


def test_gallery_lists_every_example_and_its_picture() -> None:
    docs = EXAMPLES.parent / "docs"
    gallery = (docs / "gallery.md").read_text(encoding="utf-8")
    for path in EXAMPLES.glob("*.attn"):
        assert f"## {path.stem}\n" in gallery, f"{path.name}: run python docs/make_gallery.py"
    pictures = re.findall(r"!\[[^\]]*\]\((gallery/[^)]+\.png)\)", gallery)
    assert len(pictures) == len(list(EXAMPLES.glob("*.attn")))
    assert all((docs / p).is_file() for p in pictures)

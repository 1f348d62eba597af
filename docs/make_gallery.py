"""Writes docs/gallery.md and the pictures under docs/gallery/ from examples/*.attn.

    python docs/make_gallery.py            (needs matplotlib: pip install 'attndsl[plot]')

Every example gets its spec text, its derived formulas (attndsl.derive(spec).latex()) and one
picture: the mask at 256 x 256 with the cpu kernel's tiles when the spec has a mask, else the
attention weights of random q, k at 16 x 16. Two examples get a purpose-built picture: the
translation weights from q, k built to follow a word alignment (through `attndsl plot --npz`,
the command a user would run), and channel attention on a feature map with correlated channel
groups. Everything is seeded: running the script again rewrites the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import attndsl
from attndsl import plot, viz
from attndsl.cli import main as attndsl_main
from attndsl.codegen.numba_cpu import BK, BQ

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "gallery"
MASK_N, WEIGHTS_N, TILES_N = 256, 16, 1024

# Bahdanau et al. 2015, figure 3(a): English -> French, with the reordered noun phrase
SOURCE = "the agreement on the European Economic Area was signed in August 1992"
TARGET = "l' accord sur la zone économique européenne a été signé en août 1992"
ALIGNMENT = [0, 1, 2, 3, 6, 5, 4, 7, 7, 8, 9, 10, 11]  # target word -> its source word


def formulas(spec: attndsl.ir.Spec) -> str:
    """The derivation as a GitHub math block (aligned: GitHub renders it, align* it may not)."""
    latex = attndsl.derive(spec).latex()
    return latex.replace(r"\begin{align*}", r"\begin{aligned}").replace(
        r"\end{align*}", r"\end{aligned}")


def mask_picture(spec: attndsl.ir.Spec) -> tuple[Path, str]:
    inputs = viz.demo_inputs(spec, MASK_N, MASK_N, d=1, dv=1)
    mask = viz.pair_mask(spec, inputs)
    title = f"{spec.name}: mask at {MASK_N} x {MASK_N}; dark: allowed, lines: {BQ} x {BK} tiles"
    path = plot.save_mask(mask.allowed, OUT / f"{spec.name}_mask.png", title, tile=(BQ, BK))
    return path, f"attndsl plot examples/{spec.name}.attn --n {MASK_N} -o {path.name}"


def weights_picture(spec: attndsl.ir.Spec) -> tuple[Path, str]:
    inputs = viz.demo_inputs(spec, WEIGHTS_N, WEIGHTS_N)
    weights = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)[0, 0]
    allowed = viz.pair_mask(spec, inputs).allowed
    title = f"{spec.name}: weights of random q, k at {WEIGHTS_N} x {WEIGHTS_N} (head 0)"
    path = plot.save_weights(weights, OUT / f"{spec.name}_weights.png", title, allowed=allowed)
    return path, (f"attndsl plot examples/{spec.name}.attn --weights --n {WEIGHTS_N} "
                  f"-o {path.name}")


def translation_picture(spec: attndsl.ir.Spec) -> tuple[Path, str]:
    """q_i leans towards the key of its aligned source word: the weights show the alignment."""
    rng = np.random.default_rng(3)
    d = 32
    k = rng.standard_normal((1, 1, len(SOURCE.split()), d))
    aligned = k[:, :, ALIGNMENT]
    q = 0.7 * aligned + 0.6 * rng.standard_normal(aligned.shape)
    v = rng.standard_normal(k.shape)
    arrays = OUT / "translation.npz"
    np.savez(arrays, q=q, k=k, v=v)
    path = OUT / "translation_weights.png"
    args = ["plot", str(ROOT / "examples" / "translation.attn"), "--weights", "--npz",
            str(arrays), "--qlabels", TARGET, "--klabels", SOURCE, "-o", str(path)]
    assert attndsl_main(args) == 0
    return path, (f'attndsl plot examples/translation.attn --weights --npz {arrays.name} '
                  f'--qlabels "{TARGET}" --klabels "{SOURCE}" -o {path.name}')


def channel_picture(spec: attndsl.ir.Spec) -> tuple[Path, str]:
    """16 channels of an 8 x 8 feature map in 4 groups of correlated channels: with DANet's
    minus sign a channel attends to the groups least like its own."""
    rng = np.random.default_rng(4)
    channels, pixels, groups = 16, 64, 4
    base = rng.standard_normal((groups, pixels))
    A = 0.3 * base[np.arange(channels) // (channels // groups)] + \
        0.1 * rng.standard_normal((channels, pixels))
    A = A[None, None]
    weights = viz.attention_weights(spec, A, A, {})[0, 0]
    labels = [f"c{c}" for c in range(channels)]
    title = "channel_attention: weights over 16 channels (4 correlated groups of 4)"
    path = plot.save_weights(weights, OUT / "channel_attention_weights.png", title,
                             qlabels=labels, klabels=labels)
    return path, "(q = k = v = the feature map [1, 1, channels, pixels]; see the script)"


SPECIAL = {"translation": translation_picture, "channel_attention": channel_picture}


def tile_text(spec: attndsl.ir.Spec) -> str:
    inputs = viz.demo_inputs(spec, TILES_N, TILES_N, d=1, dv=1)
    status = viz.kernel_status(viz.pair_mask(spec, inputs), BQ, BK)
    return f"{viz.tile_picture(status)}\n{viz.tile_summary(status)}"


def section(path: Path) -> str:
    spec = attndsl.load(path)
    name = path.stem
    print(f"gallery: {name}", file=sys.stderr)
    if name in SPECIAL:
        picture, command = SPECIAL[name](spec)
    elif spec.mask is not None:
        picture, command = mask_picture(spec)
    else:
        picture, command = weights_picture(spec)
    parts = [f"## {name}", "", f"`examples/{path.name}`", "", "```", path.read_text().rstrip(),
             "```", "", "Derived (`attndsl show --latex`):", "", "```math", formulas(spec),
             "```", "", f"![{name}](gallery/{picture.name})", "", f"`{command}`", ""]
    if spec.mask is not None:
        how = (f"Tiles at n = {TILES_N} (`attndsl show examples/{path.name} --mask {TILES_N}`; "
               f"rows: {BQ} queries, columns: {BK} keys):")
        parts += [how, "", "```", tile_text(spec), "```", ""]
    return "\n".join(parts)


HEADER = """# Gallery

Every example in `examples/`: its spec, the formulas attndsl derives from it, and a picture.
Masked specs show their mask at 256 x 256 with the cpu kernel's 64 x 128 tiles outlined and,
in text, which tiles the kernels compute in full (`#`), pair by pair (`+`) or skip (`.`) at
n = 1024; the others show the attention weights of random q and k (rows: queries, top to
bottom; columns: keys, left to right). Index arrays use the built-in demo: 4 documents of equal
length for `document`, a prefix of n / 4 for `prefix_lm`. Under each picture, the `attndsl plot`
command that draws it (the command's title names the head as well).

Generated by `python docs/make_gallery.py`; do not edit by hand.
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    examples = sorted((ROOT / "examples").glob("*.attn"))
    index = ", ".join(f"[{p.stem}](#{p.stem})" for p in examples)
    body = [HEADER, index, "", *(section(p) for p in examples)]
    (ROOT / "docs" / "gallery.md").write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    print(f"wrote docs/gallery.md and {len(list(OUT.glob('*.png')))} pictures", file=sys.stderr)


if __name__ == "__main__":
    main()

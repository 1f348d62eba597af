"""The command line: `attndsl VERB ...`. Each verb is one entry of VERBS.

A verb adds its arguments to its own subparser and returns an exit status:
0 all went well, 1 a spec is wrong (or a check failed), 2 a usage or I/O error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__, ir
from .errors import SpecError
from .progress import progress, progress_done, quiet

OK, SPEC_ERROR, USAGE_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Verb:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A file that cannot be read, an argument that makes no sense: exit status 2."""


def load_spec(path: str) -> ir.Spec:
    """attndsl.load, with unreadable files raised as UsageError (never a traceback)."""
    from . import parse

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a spec file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse(text, filename=path)


def summary(spec: ir.Spec) -> str:
    """`score ..., normalize ..., heads ...`: what `attndsl check` prints for a good spec, with
    the clauses as written (let names, not the inlined lets of the checked spec)."""
    spec = as_written(spec)
    norm = spec.normalize
    normalize = ir.to_text(norm.expr) if norm.expr is not None else norm.kind.value
    if norm.sink is not None:
        normalize += f"(sink = {ir.to_text(norm.sink)})"
    heads = "from tensors" if spec.heads is None else str(spec.heads)
    if spec.kv_heads is not None:
        heads += f", kv_heads {spec.kv_heads}"
    return f"score {ir.to_text(spec.score)}, normalize {normalize}, heads {heads}"


def as_written(spec: ir.Spec) -> ir.Spec:
    """The unchecked IR of the spec's source: its clauses as the user wrote them."""
    if not spec.source:
        return spec
    from .lower import to_ir
    from .syntax import parse_tree

    return to_ir(parse_tree(spec.source))


# ---- verbs ----------------------------------------------------------------------------------


def _configure_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="spec files (.attn)")


def _run_check(args: argparse.Namespace) -> int:
    from .symbolic import derive as derive_forward

    status = OK
    for path in args.files:
        try:
            spec = load_spec(path)
            derive_forward(spec)  # the refusals only the derivation sees (LANGUAGE.md x3)
        except UsageError as exc:
            print(f"attndsl check: {exc}", file=sys.stderr)
            status = USAGE_ERROR
        except SpecError as err:
            print(err, file=sys.stderr)
            status = max(status, SPEC_ERROR)
        else:
            print(f"{path}: ok — {summary(spec)}")
    return status


def _configure_show(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a spec file (.attn)")
    parser.add_argument("--latex", action="store_true", help="print LaTeX instead of text")
    parser.add_argument("--mask", metavar="N|NQxNK",
                        help="print the tile-level mask the cpu kernel computes at n_q x n_k "
                        "instead of the formulas: '#' full, '+' partial, '.' skipped tiles")
    _add_index_option(parser)
    parser.add_argument("--head", type=int, default=0, help="the query head of the mask (0)")


def _add_index_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", action="append", default=[], metavar="NAME=VALUE",
                        help="an index array's values: a comma list (one integer fills it) or "
                        "docs:K for K documents of equal length; default: 4 documents along "
                        "a sequence axis, n_k // 4 elsewhere")


def index_values(items: list[str]) -> dict[str, str]:
    """--index NAME=VALUE options as a dict."""
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"--index {item}: expected NAME=VALUE, e.g. doc=docs:4")
        values[name.strip()] = value.strip()
    return values


def sequence_sizes(text: str, option: str = "--mask") -> tuple[int, int]:
    """`N` or `NQxNK` -> (n_q, n_k), each a positive integer."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise UsageError(f"{option} {text}: expected a positive length N or NQxNK, e.g. 1024 or "
                     "256x4096")


def cpu_tile(n_q: int, n_k: int) -> tuple[int, int, str]:
    """The forward tile `show --mask` and `plot` draw, and a note when a call of that size may
    run another: ATTNDSL_CPU_TILES's tile when set, else the default, which calls under
    TUNE_PAIRS pairs run; larger calls run the tile measured for the machine and the shapes
    (runtime/tiles.py), which these commands cannot know (they take no d, dtype or heads)."""
    from .runtime import tiles

    try:
        fixed = tiles.configured()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if fixed is not None:
        return fixed[0][0], fixed[0][1], f" (set by {tiles.VARIABLE})"
    bq, bk = tiles.DEFAULT
    if n_q * n_k < tiles.TUNE_PAIRS:
        return bq, bk, ""
    return bq, bk, (f"; a call this size runs the tile measured for the machine and its shapes, "
                    f"which may differ: set {tiles.VARIABLE}=BQxBK to fix it and draw it")


def _show_mask(spec: ir.Spec, args: argparse.Namespace) -> int:
    from . import viz
    from .plan import describe_path

    n_q, n_k = sequence_sizes(args.mask)
    heads = viz.heads_of(spec, args.head + 1)  # the spec's, else enough for --head
    if not 0 <= args.head < heads[0]:
        raise UsageError(f"--head {args.head}: the mask is drawn for {heads[0]} head(s)")
    try:
        inputs = viz.demo_inputs(spec, n_q, n_k, d=1, dv=1, indices=index_values(args.index),
                                 heads=heads)
        mask = viz.pair_mask(spec, inputs, head=args.head)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    path = describe_path(spec)
    BQ, BK, note = cpu_tile(n_q, n_k)
    if "linear attention" in path:
        note = ""  # prefix sums: no tiles to tune
    status = viz.kernel_status(mask, BQ, BK)
    print(f"attention {spec.name}: mask at n_q = {n_q}, n_k = {n_k}, head {args.head}; "
          f"tiles of {BQ} queries x {BK} keys (cpu kernel){note}")
    print(path)
    if "linear attention" in path:
        print("(the linear path runs prefix sums, no tiles: below, the mask at tile granularity)")
    print(viz.tile_picture(status))
    print(viz.tile_summary(status))
    return OK


def _run_show(args: argparse.Namespace) -> int:
    from . import derive

    try:
        spec = load_spec(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return SPEC_ERROR
    if args.mask is not None:
        return _show_mask(spec, args)
    from .plan import describe_path

    grads = derive(spec)
    comment = "% " if args.latex else ""  # the LaTeX output stays valid LaTeX throughout
    print(f"{comment}attention {spec.name}")
    print(grads.pretty(latex=args.latex))
    print(f"{comment}{describe_path(spec)}")
    return OK


def _configure_emit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a spec file (.attn)")
    parser.add_argument("--target", default="numpy", choices=("numpy", "cpu", "cuda", "ptx"),
                        help="which generated source to print (default: numpy)")
    parser.add_argument("--cc", default="80", help="compute capability for --target ptx, e.g. 90")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="element type of the kernels (cpu, cuda, ptx)")


def _run_emit(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return SPEC_ERROR
    if args.target == "numpy":
        from .codegen import numpy_ref
        from .symbolic import derive

        print(numpy_ref.emit(derive(spec)), end="")
        return OK
    if args.target == "cpu":
        from .codegen import numba_cpu

        print(numba_cpu.emit_source(spec), end="")
        return OK
    from .codegen import numba_cuda

    if args.target == "cuda":
        print(numba_cuda.emit_source(spec), end="")
        return OK
    if not args.cc.isdigit() or len(args.cc) < 2:
        raise UsageError(f"--cc {args.cc}: expected a compute capability such as 80 or 90")
    cc = (int(args.cc[:-1]), int(args.cc[-1]))
    from .runtime.cuda_kernel import compile_kernel

    for name, ptx in compile_kernel(spec).ptx(cc=cc, dtype=args.dtype).items():
        print(f"// ---- {name} ----")
        print(ptx)
    return OK


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="spec files (.attn)")
    parser.add_argument("--target", default="numpy",
                        help="comma-separated targets to check against the reference "
                        "(numpy, cpu, cuda); default numpy")
    parser.add_argument("--no-proof", action="store_true", help="skip the symbolic proof")


def _run_verify(args: argparse.Namespace) -> int:
    import time

    from .symbolic import derive as derive_forward
    from .verification import target_names, verify

    try:
        targets = target_names(args.target)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    status = OK
    for number, path in enumerate(args.files, 1):
        say = _verify_progress(path, number, len(args.files))
        try:
            spec = load_spec(path)
            derive_forward(spec)  # the refusals only the derivation sees (LANGUAGE.md x3)
        except UsageError as exc:
            print(f"attndsl verify: {exc}", file=sys.stderr)
            status = USAGE_ERROR
            continue
        except SpecError as err:
            print(err, file=sys.stderr)
            status = max(status, SPEC_ERROR)
            continue
        start = time.perf_counter()
        report = verify(spec, targets=targets, proof=not args.no_proof, progress=say)
        progress_done()
        print(report, flush=True)
        print(f"  derived + verified in {time.perf_counter() - start:.1f} s")
        if not report.ok:
            status = max(status, SPEC_ERROR)
    return status


def _verify_progress(path: str, number: int, total: int) -> Callable[[str], None]:
    """What `verify` shows while it works: on a terminal the running check, rewritten in
    place; in a log one line per file when there are several; else nothing."""
    where = f"[{number}/{total}] {path}" if total > 1 else path
    if sys.stderr.isatty():
        return lambda step: progress(f"{where}: {step}")
    if total > 1:
        progress(where)
    return quiet


def _configure_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a spec file (.attn)")
    parser.add_argument("-o", "--output", metavar="PNG",
                        help="the picture to write (default: NAME_mask.png or NAME_weights.png)")
    parser.add_argument("--n", type=int, help="n_q = n_k (default 64, or the number of labels)")
    parser.add_argument("--nq", type=int, help="the number of queries")
    parser.add_argument("--nk", type=int, help="the number of keys")
    _add_index_option(parser)
    parser.add_argument("--weights", action="store_true",
                        help="draw the attention weights (from random or --npz arrays) instead "
                        "of the mask")
    parser.add_argument("--npz", metavar="FILE",
                        help="q, k, v and the params and index arrays by name (.npz)")
    parser.add_argument("--batch", type=int, default=0, help="which batch entry to draw (0)")
    parser.add_argument("--head", type=int, default=0, help="which query head to draw (0)")
    parser.add_argument("--d", type=int, default=16, help="feature size of random q, k, v (16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random q, k, v (0)")
    parser.add_argument("--labels", help="token labels of queries and keys, e.g. \"I love you\"")
    parser.add_argument("--qlabels", help="token labels of the queries (rows)")
    parser.add_argument("--klabels", help="token labels of the keys (columns)")


def _plot_sizes(args: argparse.Namespace, qlabels: list[str] | None,
                klabels: list[str] | None) -> tuple[int, int]:
    """n_q, n_k from --nq/--nk, --n, the labels, else 64; labels must match them."""
    n_q = args.nq or args.n or (len(qlabels) if qlabels else 64)
    n_k = args.nk or args.n or (len(klabels) if klabels else n_q)
    for what, n, labels in (("queries", n_q, qlabels), ("keys", n_k, klabels)):
        if n < 1:
            raise UsageError(f"the number of {what} must be positive, got {n}")
        if labels is not None and len(labels) != n:
            raise UsageError(f"{len(labels)} labels for {n} {what}")
    return n_q, n_k


def _npz_inputs(path: str, spec: ir.Spec, indices: dict[str, str]):  # type: ignore[no-untyped-def]
    """q, k, v and the spec's params and index arrays from an .npz file (index arrays given
    by --index take precedence)."""
    import numpy as np

    from . import viz

    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--npz {path}: cannot be read ({exc})") from None
    missing = [name for name in ("q", "k", "v") if name not in arrays]
    if missing:
        raise UsageError(f"--npz {path}: no array named {missing[0]} (it needs q, k and v)")
    q, k, v = (arrays.pop(name) for name in ("q", "k", "v"))
    n_k = k.shape[2] if k.ndim == 4 else 0
    for x in spec.indices:
        if x.name in indices:
            sizes = {"n": q.shape[2], "n_q": q.shape[2], "n_k": n_k}
            shape = tuple(d if isinstance(d, int) else sizes.get(d, 1) for d in x.dims)
            arrays[x.name] = viz.parse_index(indices[x.name], shape, x.name)
    return viz.Inputs(q, k, v, arrays)


WEIGHTS_PAIRS = 1024 * 1024  # a heatmap has no use for more, and the reference holds n x n


def _plot_inputs(spec: ir.Spec, args: argparse.Namespace, qlabels: list[str] | None,
                 klabels: list[str] | None):  # type: ignore[no-untyped-def]
    """q, k, v, params and indices from --npz, else random at --n or --nq/--nk."""
    from . import viz

    indices = index_values(args.index)
    if args.npz:
        inputs = _npz_inputs(args.npz, spec, indices)
        n_q, n_k = inputs.q.shape[2], inputs.k.shape[2]
        _plot_sizes(argparse.Namespace(nq=n_q, nk=n_k, n=None), qlabels, klabels)
        return inputs
    n_q, n_k = _plot_sizes(args, qlabels, klabels)
    return viz.demo_inputs(spec, n_q, n_k, d=args.d, dv=args.d, batch=args.batch + 1,
                           indices=indices, seed=args.seed,
                           heads=viz.heads_of(spec, args.head + 1))  # enough for --head


def _draw(spec: ir.Spec, inputs, args: argparse.Namespace,  # type: ignore[no-untyped-def]
          qlabels: list[str] | None, klabels: list[str] | None) -> Path:
    """The mask, or with --weights the weights, of one (batch, head) as a PNG."""
    from . import plot, viz

    B, heads, n_q = inputs.q.shape[:3]
    n_k = inputs.k.shape[2]
    if not (0 <= args.batch < B and 0 <= args.head < heads):
        raise UsageError(f"--batch {args.batch} --head {args.head}: q has {B} batch entries "
                         f"and {heads} heads")
    if args.weights and n_q * n_k > WEIGHTS_PAIRS:
        raise UsageError(f"--weights draws at most {WEIGHTS_PAIRS:,} pairs (1024 x 1024), "
                         f"got {n_q} x {n_k}; pass a smaller --n or --nq/--nk")
    mask = viz.pair_mask(spec, inputs, batch=args.batch, head=args.head)
    where = f"head {args.head}" + (f", batch {args.batch}" if B > 1 else "")
    if args.weights:
        weights = viz.attention_weights(spec, inputs.q, inputs.k, inputs.extra)
        return plot.save_weights(weights[args.batch, args.head],
                                 args.output or f"{spec.name}_weights.png",
                                 f"{spec.name}: attention weights ({where})",
                                 allowed=mask.allowed, qlabels=qlabels, klabels=klabels)
    BQ, BK, note = cpu_tile(n_q, n_k)
    if note and not note.startswith(" ("):
        print(f"note: lines at {BQ} x {BK} tiles, the default{note}", file=sys.stderr)
    # two lines: one was cut at the picture's edge for long names
    title = (f"{spec.name}: mask at {n_q} x {n_k} ({where})\ndark: allowed, "
             f"lines: {BQ} x {BK} cpu tiles")
    return plot.save_mask(mask.allowed, args.output or f"{spec.name}_mask.png", title,
                          tile=(BQ, BK))


def _run_plot(args: argparse.Namespace) -> int:
    from . import plot

    try:
        spec = load_spec(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return SPEC_ERROR
    qlabels = plot.words(args.qlabels or args.labels)
    klabels = plot.words(args.klabels or args.labels)
    try:
        path = _draw(spec, _plot_inputs(spec, args, qlabels, klabels), args, qlabels, klabels)
    except (ValueError, TypeError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {path}")
    return OK


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a spec file (.attn)")
    parser.add_argument("--n", default="1024,4096", help="sequence lengths (default 1024,4096)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "cuda", "numpy"),
                        help="the attndsl target to time (default cpu)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--heads", type=int, help="query heads, unless the spec fixes them (8)")
    parser.add_argument("--d", type=int, default=64, help="feature size of q, k and v (64)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--no-torch", action="store_true", help="time attndsl alone")
    parser.add_argument("--no-flex", dest="flex", action="store_false",
                        help="leave out torch.compile(flex_attention), timed by default where a "
                        "score_mod expresses the spec (forward only; compiling takes seconds "
                        "to a minute per length)")
    parser.add_argument("--flex", dest="flex", action="store_true",
                        help=argparse.SUPPRESS)  # the default since flex became one
    _add_index_option(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench
    from . import compile as compile_spec

    try:
        spec = load_spec(args.file)
    except SpecError as err:
        print(err, file=sys.stderr)
        return SPEC_ERROR
    sizes = [sequence_sizes(x, "--n")[0] for x in args.n.split(",")]
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: at least 1")
    heads, kv_heads = bench.bench_heads(spec, args.heads)
    setup = bench.Setup(args.batch, heads, kv_heads, args.d, args.d, args.dtype)
    use_torch = not args.no_torch and bench.torch_available()
    progress(f"compiling {spec.name} for {args.target}")
    kernel = compile_spec(spec, target=args.target)
    rows, notes = [], []
    try:
        for n in sizes:
            case = bench.make_case(spec, n, setup, index_values(args.index))
            if args.flex and use_torch and not args.backward and bench.flex_source(spec):
                progress(f"n = {n}: compiling flex_attention")
            found = bench.contenders(spec, kernel, case, args.backward, use_torch, args.flex,
                                     notes)
            if use_torch and not bench.eager_fits(case):
                notes.append(f"(no torch eager row at n = {n}: more than "
                             f"{bench.EAGER_PAIRS:,} pairs to materialize)")
            rows += bench.time_case(n, found, args.repeats, case.flops * (
                bench.BACKWARD_FLOPS if args.backward else 1.0))
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    progress_done()
    what = "forward + backward" if args.backward else "forward"
    print(f"attention {spec.name}: {what}, B {setup.batch}, heads {heads}, kv_heads {kv_heads}, "
          f"d = dv = {setup.d}, {setup.dtype}; median of {args.repeats} interleaved rounds")
    print(f"machine: {bench.machine()}")
    if not use_torch:
        print("(torch not installed or --no-torch: attndsl alone)")
    elif bench.sdpa_scale(spec) is None:
        print("(no SDPA row: the spec is not plain softmax attention with a full or causal mask)")
    if use_torch and args.flex and (args.backward or bench.flex_source(spec) is None):
        print("(no flex row: " + ("flex_attention has no CPU backward)" if args.backward else
                                  "the spec is not softmax over q . k plus position terms)"))
    for note in notes:
        print(note)
    print(bench.table(rows))
    return OK


VERBS: dict[str, Verb] = {
    "check": Verb("parse and check spec files; print a summary or the error", _configure_check,
                  _run_check),
    "show": Verb("print the derived forward and backward formulas", _configure_show, _run_show),
    "emit": Verb("print the generated source of a target", _configure_emit, _run_emit),
    "verify": Verb("prove the gradients symbolically and check every target numerically",
                   _configure_verify, _run_verify),
    "bench": Verb("time the spec's kernels against PyTorch (SDPA, eager)", _configure_bench,
                  _run_bench),
    "plot": Verb("write a PNG of the mask or of the attention weights", _configure_plot,
                 _run_plot),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attndsl",
        description="attndsl: a compiler for attention mechanisms (spec -> checked IR -> kernels)",
    )
    parser.add_argument("--version", action="version", version=f"attndsl {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for name, verb in VERBS.items():
        sub = verbs.add_parser(name, help=verb.help, description=verb.help)
        verb.configure(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status (argparse's own exits are returned, not raised)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    if args.verb is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return VERBS[args.verb].run(args)
    except UsageError as exc:
        print(f"attndsl {args.verb}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # the reader stopped reading (`| head`): not an error here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The checker: types on every node, lets inlined, and every rule it enforces."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import attndsl
from attndsl import ir
from attndsl.check import Checker, check, uses_n
from attndsl.ir import Kind, Side, Type
from attndsl.lower import to_ir
from attndsl.syntax import parse_tree

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.attn"))


def spec_of(*lines: str) -> str:
    """A spec whose body line k (0-based) is on line k + 2, indented by four spaces."""
    return "attention t {\n" + "\n".join("    " + line for line in lines) + "\n}\n"


def parse(*lines: str) -> ir.Spec:
    return attndsl.parse(spec_of(*lines))


# ---- bad specs: the exact message, line, column and hint ------------------------------------

BAD = [
    pytest.param(['score q * k'],
                 "q * k is a vector over d; reduce it with '.', sum() or norm()", 2, 11,
                 None, id='vector score'),
    pytest.param(['param slope[heads]', 'score q . k', 'bias slop[h] * (j - i)'],
                 "unknown name 'slop'", 4, 10,
                 "did you mean 'slope'?", id='unknown name'),
    pytest.param(['param w[r]', 'score q . w'],
                 'size mismatch: q is a vector over d but w is a vector over r', 3, 11,
                 None, id='size mismatch dot'),
    pytest.param(['param w[r]', 'score sum(q + w)'],
                 'size mismatch: q is a vector over d but w is a vector over r', 3, 15,
                 None, id='size mismatch add'),
    pytest.param(['param slope[heads]', 'score q . k', 'bias slope[h, i]'],
                 "param 'slope' has 1 dimension [heads] but is used with 2 subscripts", 4, 10,
                 'write 1 subscript (or one fewer for a vector)', id='param too many subs'),
    pytest.param(['param table[heads, 257]', 'score q . k', 'bias sum(table)'],
                 "'table' is a matrix [heads, 257]", 4, 14,
                 "use it as the right operand of '@' (q @ table) or index it", id='param too few subs'),
    pytest.param(['param tau', 'score q . k', 'scale tau[0]'],
                 "param 'tau' is a scalar and takes no subscripts", 4, 11,
                 'write tau', id='scalar param subscripted'),
    pytest.param(['score q . k', 'mask q . k > 0'],
                 'a mask may not use q (a vector)', 3, 10,
                 'masks use positions, indices and params only', id='q in mask'),
    pytest.param(['score q . k', 'mask norm(k) > 1'],
                 'a mask may not use k (a vector)', 3, 15,
                 'masks use positions, indices and params only', id='k in mask'),
    pytest.param(['score q . k', 'bias (j <= i) * 2'],
                 "'*' needs a number, but j <= i is a boolean", 3, 11,
                 'use where(c, x, y) to pick a number from a condition', id='bool in arithmetic'),
    pytest.param(['score q . k', 'mask j - i'],
                 "'mask' needs a boolean, but j - i is an integer", 3, 10,
                 "write a comparison such as 'j <= i'", id='number as mask'),
    pytest.param(['score q . k', 'mask 0 <= i - j < 4'],
                 'comparisons do not chain', 3, 21,
                 "write 'a < b and b < c'", id='chained comparison'),
    pytest.param(['score q . k', 'scale 2', 'scale 3'],
                 "duplicate 'scale' clause", 4, 5,
                 "'scale' was already given on line 3", id='duplicate clause'),
    pytest.param(['scale 2'],
                 "attention 't' has no 'score' clause", 1, 1,
                 "add a line such as 'score q . k'", id='missing score'),
    pytest.param(['heads 8', 'kv_heads 3', 'score q . k'],
                 'kv_heads 3 does not divide heads 8', 3, 5,
                 'grouped-query attention shares each key/value head among heads / kv_heads query heads', id='kv_heads divide'),
    pytest.param(['heads 0', 'score q . k'],
                 "'heads' must be at least 1, got 0", 2, 5,
                 None, id='heads zero'),
    pytest.param(['param i', 'score q . k'],
                 "'i' is reserved and cannot name a param", 2, 11,
                 'choose another name', id='reserved param'),
    pytest.param(['let exp = 2', 'score q . k'],
                 "'exp' is reserved and cannot name a let", 2, 9,
                 'choose another name', id='reserved let'),
    pytest.param(['param lambda', 'score q . k'],
                 "'lambda' cannot name a param", 2, 11,
                 "names with '__' and Python keywords are reserved; a spec is not Python",
                 id='python keyword param'),
    pytest.param(['let __builtins__ = 1', 'score q . k'],
                 "'__builtins__' cannot name a let", 2, 9,
                 "names with '__' and Python keywords are reserved; a spec is not Python",
                 id='dunder let'),
    pytest.param(['param w[d]', 'index w', 'score q . k'],
                 "'w' is declared twice", 3, 11,
                 'first declared on line 2', id='declared twice'),
    pytest.param(['let r = 2', 'param w[r]', 'score q . w'],
                 "size name 'r' of 'w' clashes with the let 'r'", 3, 11,
                 "a size is a name such as 'd', 'heads' or a fresh name like 'r'", id='dims clash let'),
    pytest.param(['param w[i]', 'score q . k'],
                 "'i' is not a size (in the dimensions of 'w')", 2, 11,
                 "a size is one of heads, kv_heads, d, dv, n_q, n_k, n, an integer, or a fresh name such as 'r'", id='dims not a size'),
    pytest.param(['param w[0]', 'score q . k'],
                 "size 0 of 'w' must be at least 1", 2, 11,
                 None, id='dims zero'),
    pytest.param(['index doc[n]', 'score q . k', 'mask sum(doc) > 0'],
                 "index 'doc' is an integer array [n] and needs 1 subscript", 4, 14,
                 'write, e.g., doc[i]; index arrays are never vectors', id='index as vector'),
    pytest.param(['index doc[n]', 'score q . k', 'mask doc == 1'],
                 "index 'doc' is an integer array [n] and needs 1 subscript", 4, 10,
                 'write, e.g., doc[i]; index arrays are never vectors', id='index bare'),
    pytest.param(['index pos[n, 2]', 'score q . k', 'mask pos[i] == 1'],
                 "index 'pos' has 2 dimensions [n, 2] but is used with 1 subscript", 4, 10,
                 'write 2 subscripts; index arrays are never vectors', id='index too few'),
    pytest.param(['score q . k', 'mask i // 2.0 == j'],
                 "'//' takes integers, but 2.0 is a float", 3, 15,
                 "use '/' for float division", id='floordiv float'),
    pytest.param(['score q . k', 'bias sum(q % 2)'],
                 "'%' takes integers, but q is a vector over d", 3, 14,
                 "use '/' for float division", id='mod vector'),
    pytest.param(['param slope[heads]', 'score q . k', 'bias slope[h / 2]'],
                 "subscript h / 2 of 'slope' is a float; subscripts must be integers", 4, 16,
                 None, id='float subscript'),
    pytest.param(['score where(i, 1, 2)'],
                 'where() needs a boolean, but i is an integer', 2, 17,
                 "compare it, e.g. 'x > 0'", id='where cond number'),
    pytest.param(['score sum(where(j <= i, q, 1))'],
                 'where() needs two branches of the same kind, but q is a vector over d and 1 is an integer', 2, 15,
                 'both scalars, or vectors of the same size', id='where branch kinds'),
    pytest.param(['param w[r]', 'score sum(where(j <= i, q, w))'],
                 'where() needs two branches of the same kind, but q is a vector over d and w is a vector over r', 3, 15,
                 'both scalars, or vectors of the same size', id='where branch sizes'),
    pytest.param(['score q . k', 'mask where(j <= i, i < 2, j < 2)'],
                 'where() needs a number, but i < 2 is a boolean', 3, 24,
                 'use where(c, x, y) to pick a number from a condition', id='where bool branch'),
    pytest.param(['score q . k', 'softcap norm(q)'],
                 "'softcap' may not use q (a vector)", 3, 18,
                 'the cap is a constant: a number, a size or a scalar param', id='softcap q'),
    pytest.param(['score q . k', 'softcap i + 1'],
                 "'softcap' must not depend on i or j, but i + 1 does", 3, 13,
                 'the cap is a constant: a number, a size or a scalar param', id='softcap ij'),
    pytest.param(['score q . k', 'softcap -30'],
                 "'softcap' must be positive, got -30", 3, 13,
                 None, id='softcap negative'),
    pytest.param(['let a = a + 1', 'score q . k'],
                 "the let 'a' cannot use itself", 2, 13,
                 None, id='let self'),
    pytest.param(['let a = s + 1', 'score q . k'],
                 "'s' (the logit) may only be used in the normalize clause", 2, 13,
                 None, id='let s'),
    pytest.param(['score s'],
                 "'s' (the logit) may only be used in the normalize clause", 2, 11,
                 None, id='s in score'),
    pytest.param(['score sigmod(q . k)'],
                 "unknown function 'sigmod'", 2, 11,
                 "did you mean 'sigmoid'?", id='unknown function'),
    pytest.param(['score __import__(os)'],
                 "unknown function '__import__'", 2, 11,
                 'a spec is not Python', id='unknown function dunder'),
    pytest.param(['score q.__class__'],
                 "unknown name '__class__'", 2, 13,
                 'a spec is not Python', id='dunder attr'),
    pytest.param(['score q . k', 'normalize softmx'],
                 "unknown normalization 'softmx'", 3, 15,
                 "did you mean 'softmax'?", id='unknown normalization'),
    pytest.param(['score q . k', 'normalize 2'],
                 "'normalize 2' does not use the logit 's'", 3, 15,
                 'write softmax, sum, none, or an expression in s', id='normalize without s'),
    pytest.param(['score q . k', 'normalize s * q'],
                 "s * q is a vector over d; reduce it with '.', sum() or norm()", 3, 15,
                 None, id='normalize vector'),
    pytest.param(['score exp'],
                 "'exp' is a function", 2, 11,
                 'call it as exp(...)', id='function bare'),
    pytest.param(['score v . k'],
                 "'v' cannot be used in an expression", 2, 11,
                 'values enter only through the weights: out = sum_j weights * v', id='v used'),
    pytest.param(['score out'],
                 "'out' cannot be used in an expression", 2, 11,
                 'a spec computes out and lse; it cannot read them', id='out used'),
    pytest.param(['score q[0]'],
                 "'q' cannot be subscripted", 2, 11,
                 'only params and indices take [...]', id='q subscripted'),
    pytest.param(['param slope[heads]', 'score slope(h)'],
                 "'slope' is not a function", 3, 11,
                 'index it with [...]: slope[...]', id='param called'),
    pytest.param(['score clamp(q . k, 0)'],
                 'clamp() takes 3 arguments, got 2', 2, 11,
                 None, id='arity'),
    pytest.param(['param W[d, d]', 'score W . q'],
                 "'W' is a matrix [d, d]", 3, 11,
                 "use it as the right operand of '@' (q @ W) or index it", id='matrix bare'),
    pytest.param(['param W[dv, r]', 'score sum(q @ W)'],
                 "size mismatch: q is a vector over d but 'W' has dv rows", 3, 15,
                 "declare it as 'param W[d, r]'", id='matmul rows'),
    pytest.param(['param w[d]', 'score sum(q @ w)'],
                 "the right operand of '@' must be a param matrix, not w", 3, 19,
                 "declare it as 'param W[d, r]' and write q @ W", id='matmul right'),
    pytest.param(['param W[d, r]', 'score sum(i @ W)'],
                 "the left operand of '@' must be a vector, but i is an integer", 3, 15,
                 None, id='matmul left scalar'),
    pytest.param(['score i . j'],
                 "'.' takes two vectors, but i is an integer", 2, 11,
                 "use '*' to multiply scalars", id='dot scalar'),
    pytest.param(['score sum(i)'],
                 'sum() reduces a vector, but i is an integer', 2, 15,
                 None, id='sum scalar'),
    pytest.param(['score q . k', 'mask not i'],
                 "'not' needs a boolean, but i is an integer", 3, 14,
                 "compare it, e.g. 'x > 0'", id='not number'),
    pytest.param(['score q . k', 'mask -(j <= i)'],
                 "'-' needs a number, but j <= i is a boolean", 3, 12,
                 'use where(c, x, y) to pick a number from a condition', id='neg bool'),
    pytest.param(['score q . k', 'mask q < k'],
                 "q is a vector over d; reduce it with '.', sum() or norm()", 3, 10,
                 None, id='compare vectors'),
    pytest.param(['scor q . k'],
                 "unknown clause 'scor'", 2, 5,
                 "did you mean 'score'?", id='unknown clause'),
    pytest.param(['score q . k', 'masks j <= i'],
                 "unknown clause 'masks'", 3, 5,
                 "did you mean 'mask'?", id='split keyword'),
    pytest.param(['score'],
                 "expected an expression after 'score'", 2, 10,
                 None, id='no expr'),
    pytest.param(['score q . k +'],
                 "expected an expression after '+'", 2, 18,
                 None, id='dangling op'),
    pytest.param(['score __import__("os")'],
                 'unexpected character \'"\'', 2, 22,
                 'a spec has no strings; names and numbers only', id='string'),
    pytest.param(['score `q`'],
                 "unexpected character '`'", 2, 11,
                 'a spec has no strings; names and numbers only', id='backtick'),
    pytest.param(['score lambda x: x'],
                 "unexpected 'x' after 'lambda'", 2, 18,
                 'expected an operator or the end of the line', id='lambda'),
    pytest.param(['score q . k;'],
                 "unexpected character ';'", 2, 16,
                 "a clause ends at the end of its line; there is no ';'", id='semicolon'),
    pytest.param(['score q . k scale 2'],
                 "unexpected 'scale'", 2, 17,
                 "each clause starts on its own line; 'scale' is a clause", id='two clauses a line'),
    pytest.param(['score (q . k'],
                 "'(' at line 2, column 11 is never closed", 3, 1,
                 "expected ')'", id='unclosed paren'),
    pytest.param(['score q . k ** 2'],
                 "expected an expression after '*'", 2, 18,
                 "the power operator is '^'", id='power **'),
    pytest.param(['heads 8.5', 'score q . k'],
                 "'heads' takes a whole number", 2, 12,
                 "write, e.g., 'heads 8'", id='heads float'),
    pytest.param(['score q . k', 'mask j = i'],
                 "unexpected '=' after 'j'", 3, 12,
                 "compare with '=='; define names with 'let NAME = EXPR'", id='assign'),
    pytest.param(['let x 2', 'score q . k'],
                 "expected '=' after 'x'", 2, 11,
                 None, id='let no eq'),
    pytest.param(['score q · k'],
                 "unexpected character '·'", 2, 13,
                 None, id='unicode'),
    pytest.param(['let a = c + 1', 'let c = 2', 'score q . k * a'],
                 "'c' is defined by a later let (line 3)", 2, 13,
                 'a let may use only the lets above it', id='later let'),
]


@pytest.mark.parametrize(("body", "message", "line", "column", "hint"), BAD)
def test_bad_spec(body: list[str], message: str, line: int, column: int,
                  hint: str | None) -> None:
    with pytest.raises(attndsl.SpecError) as caught:
        parse(*body)
    err = caught.value
    assert (err.message, err.line, err.column, err.hint) == (message, line, column, hint)


def test_there_are_at_least_thirty_bad_specs() -> None:
    assert len(BAD) >= 30


# ---- good specs and their types --------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_checks(path: Path) -> None:
    spec = attndsl.load(path)
    assert spec.checked and spec.filename == str(path) and spec.source


def test_the_examples_are_the_contracts_twenty_and_five_more() -> None:
    """LANGUAGE.md section 5's twenty (sliding_window_sink since issue 9), t5_bucket (issue 8),
    issue 9's inputs: forgetting and latent_rope, and issue 10's seed uses: channel_attention
    and translation."""
    assert len(EXAMPLES) == 25, [p.name for p in EXAMPLES]
    assert {"sliding_window_sink.attn", "t5_bucket.attn", "forgetting.attn",
            "latent_rope.attn", "channel_attention.attn", "translation.attn"} <= {
                p.name for p in EXAMPLES}


def _all_typed(spec: ir.Spec) -> None:
    for expr in (spec.score, spec.scale, spec.bias, spec.softcap, spec.mask, spec.normalize.expr):
        for node in ir.walk(expr) if expr is not None else ():
            assert node.type is not None, node


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_node_of_every_example_is_typed(path: Path) -> None:
    _all_typed(attndsl.load(path))


def type_of(text: str, *decls: str) -> Type:
    """The type the checker gives `text`, declared by `decls`, as the body of a let."""
    raw = to_ir(parse_tree(spec_of(*decls, f"let probe = {text}", "score q . k")))
    checker = Checker(raw)
    checker.declarations()
    for let in raw.lets:
        checker.let(let)
    typed = checker.lets["probe"]
    assert typed.type is not None
    return typed.type


VEC_D_Q = Type(Kind.VECTOR, "d", Side.QUERY)


@pytest.mark.parametrize(
    ("text", "decls", "expected"),
    [
        ("q", (), VEC_D_Q),
        ("k", (), Type(Kind.VECTOR, "d", Side.KEY)),
        ("q . k", (), Type(Kind.FLOAT, None, Side.PAIR)),
        ("dot(q, k)", (), Type(Kind.FLOAT, None, Side.PAIR)),
        ("norm(q)", (), Type(Kind.FLOAT, None, Side.QUERY)),
        ("sum(k)", (), Type(Kind.FLOAT, None, Side.KEY)),
        ("2 * q", (), VEC_D_Q),
        ("elu(q) + 1", (), VEC_D_Q),
        ("q @ W", ("param W[d, r]",), Type(Kind.VECTOR, "r", Side.QUERY)),
        ("k @ W", ("param W[d, 16]",), Type(Kind.VECTOR, "16", Side.KEY)),
        ("w", ("param w[r]",), Type(Kind.VECTOR, "r", Side.CONST)),
        ("P[h]", ("param P[heads, d]",), Type(Kind.VECTOR, "d", Side.CONST)),
        ("P[i]", ("param P[n, d]",), Type(Kind.VECTOR, "d", Side.QUERY)),
        ("slope[h]", ("param slope[heads]",), Type(Kind.FLOAT)),
        ("tau", ("param tau",), Type(Kind.FLOAT)),
        ("doc[j]", ("index doc[n]",), Type(Kind.INT, None, Side.KEY)),
        ("len", ("index len",), Type(Kind.INT)),
        ("pos[i, 1]", ("index pos[n, 2]",), Type(Kind.INT, None, Side.QUERY)),
        ("i", (), Type(Kind.INT, None, Side.QUERY)),
        ("j - i", (), Type(Kind.INT, None, Side.PAIR)),
        ("-j", (), Type(Kind.INT, None, Side.KEY)),
        ("i // 4 % 3", (), Type(Kind.INT, None, Side.QUERY)),
        ("i / 4", (), Type(Kind.FLOAT, None, Side.QUERY)),
        ("2 ^ 3", (), Type(Kind.FLOAT)),
        ("x ^ -2", ("let x = 3",), Type(Kind.FLOAT)),
        ("abs(i - j)", (), Type(Kind.INT, None, Side.PAIR)),
        ("clamp(j - i, -128, 128) + 128", (), Type(Kind.INT, None, Side.PAIR)),
        ("min(i, 2)", (), Type(Kind.INT, None, Side.QUERY)),
        ("max(i, 2.0)", (), Type(Kind.FLOAT, None, Side.QUERY)),
        ("where(j <= i, 1, 2)", (), Type(Kind.INT, None, Side.PAIR)),
        ("where(h > 0, q, 2 * q)", (), VEC_D_Q),
        ("exp(i)", (), Type(Kind.FLOAT, None, Side.QUERY)),
        ("sqrt(d)", (), Type(Kind.FLOAT)),
        ("d + dv + n + n_q + n_k + heads + kv_heads + h + b", (), Type(Kind.INT)),
        ("j <= i", (), Type(Kind.BOOL, None, Side.PAIR)),
        ("not (i < 3) or j == 0 and h != 1", (), Type(Kind.BOOL, None, Side.PAIR)),
        ("1e3", (), Type(Kind.FLOAT)),
        ("3", (), Type(Kind.INT)),
    ],
)
def test_types(text: str, decls: tuple[str, ...], expected: Type) -> None:
    assert type_of(text, *decls) == expected


def test_projection_names_the_matrix_as_a_vector_over_its_columns() -> None:
    spec = parse("param W[d, r]", "param w[r]", "score w . (q @ W)")
    dot = spec.score
    assert isinstance(dot, ir.Binary) and isinstance(dot.right, ir.Binary)
    assert dot.right == ir.Binary("@", ir.Name("q"), ir.Name("W"))
    assert dot.right.right.type == Type(Kind.VECTOR, "r")


def test_lets_are_inlined_with_their_types() -> None:
    spec = parse("let window = 128", "let phi_k = elu(k) + 1", "let near = i - j < window",
                 "score (elu(q) + 1) . phi_k", "mask j <= i and near")
    assert spec.mask == ir.Binary("and", ir.Binary("<=", ir.Name("j"), ir.Name("i")),
                                  ir.Binary("<", ir.Binary("-", ir.Name("i"), ir.Name("j")),
                                            ir.Num("128", True)))
    assert not any(isinstance(n, ir.Name) and n.name in ("window", "phi_k", "near")
                   for e in (spec.score, spec.mask) for n in ir.walk(e))
    _all_typed(spec)


def test_normalize_s_is_a_pair_float() -> None:
    spec = parse("score q . k", "normalize relu(s) / n_k")
    expr = spec.normalize.expr
    assert expr is not None and expr.type == Type(Kind.FLOAT, None, Side.PAIR)
    assert spec.normalize.kind is ir.NormKind.ELEMENTWISE


def test_check_is_idempotent() -> None:
    spec = parse("score q . k", "mask j <= i")
    assert check(spec) is spec


# ---- decisions of docs/language.md, one test each ----------------------------------------------


def test_decision_index_arrays_may_have_several_dims() -> None:
    parse("index pos[n, 2]", "score q . k", "mask pos[i, 0] == pos[j, 0]")


def test_decision_a_let_may_be_unused_and_of_any_kind() -> None:
    parse("let unused = q", "let flag = j <= i", "let c = 2", "score q . k")


def test_decision_normalize_may_use_positions_sizes_params_and_lets() -> None:
    parse("param t", "let c = 2", "score q . k",
          "normalize sigmoid(s * t - log(n_k)) * c + where(j <= i, 0, 1)")


def test_decision_softcap_may_be_a_scalar_param_size_or_let() -> None:
    for cap in ("50", "2.5e1", "c", "sqrt(d)", "tau", "slope[h]"):
        parse("param tau", "param slope[heads]", "let c = 30", "score q . k", f"softcap {cap}")


def test_decision_kv_heads_alone_and_heads_alone() -> None:
    assert parse("kv_heads 2", "score q . k").heads is None
    assert parse("heads 4", "score q . k").kv_heads is None
    parse("heads 8", "kv_heads 8", "score q . k")
    parse("heads 8", "kv_heads 1", "score q . k")


def test_decision_integer_score() -> None:
    assert parse("score j - i").score.type == Type(Kind.INT, None, Side.PAIR)


def test_decision_a_dims_name_may_repeat_and_be_shared() -> None:
    parse("param Wq[d, r]", "param Wk[d, r]", "param w[r]", "param B[r, r]",
          "score sum(w * tanh(q @ Wq + k @ Wk))")


def test_uses_n() -> None:
    assert uses_n(parse("index doc[n]", "score q . k", "mask doc[i] == doc[j]"))
    assert uses_n(parse("score q . k", "bias i / n"))
    assert uses_n(parse("let m = n", "score q . k", "bias m"))
    assert not uses_n(parse("score q . k", "bias i / n_q"))


# ---- item 11: long let chains ------------------------------------------------------------------


def _let_chain(n: int, body: str = "a{p} + 1") -> str:
    lets = ["let a0 = 1"] + [f"let a{i} = " + body.format(p=i - 1) for i in range(1, n)]
    return spec_of(*lets, f"score q . k * a{n - 1}")


def test_item11_five_hundred_chained_lets_check_derive_and_run() -> None:
    import numpy as np

    spec = attndsl.parse(_let_chain(500))
    grads = attndsl.derive(spec)
    r = next(iter(grads.dlogit))
    assert grads.dlogit[r] == 500  # a499 = 500
    deep = attndsl.parse(_let_chain(1500))  # deeper than Python's default recursion limit
    kernel = attndsl.compile(deep, target="numpy")
    q = np.random.default_rng(0).standard_normal((1, 1, 3, 2)) * 1e-3
    out = kernel(q, q, q)
    weights = np.exp(1500 * q[0, 0] @ q[0, 0].T)
    want = (weights / weights.sum(-1, keepdims=True)) @ q[0, 0]
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-12)


def test_item11_too_deep_or_too_large_lets_are_spec_errors() -> None:
    from attndsl.check import MAX_DEPTH

    with pytest.raises(attndsl.SpecError, match=f"levels deep .*at most {MAX_DEPTH}") as err:
        attndsl.parse(_let_chain(MAX_DEPTH + 10))
    assert err.value.line == MAX_DEPTH + 2 and err.value.column == 9
    # doubling lets would inline into 2^40 nodes: refused at once, not after hours
    start = time.perf_counter()
    with pytest.raises(attndsl.SpecError, match="too large once the lets it uses are inlined"):
        attndsl.parse(_let_chain(40, "a{p} + a{p}"))
    assert time.perf_counter() - start < 2

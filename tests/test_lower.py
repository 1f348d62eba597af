"""Golden IR: every clause, the precedence corner cases, and positions."""

from __future__ import annotations

import pytest

from attndsl import ir
from attndsl.lower import to_ir
from attndsl.syntax import parse_tree

N, B, U, C, S, Num = ir.Name, ir.Binary, ir.Unary, ir.Call, ir.Subscript, ir.Num


def num(text: str) -> ir.Num:
    return Num(text, text.isdigit())


def lower(*lines: str) -> ir.Spec:
    return to_ir(parse_tree("attention t {\n" + "\n".join(lines) + "\n}\n"))


def expr(text: str) -> ir.Expr:
    return lower(f"score {text}").score


QK = B(".", N("q"), N("k"))


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("-x^2", U("-", B("^", N("x"), num("2")))),
        ("q . k / sqrt(d)", B("/", QK, C("sqrt", (N("d"),)))),
        ("a and b or not c", B("or", B("and", N("a"), N("b")), U("not", N("c")))),
        ("a or b and c", B("or", N("a"), B("and", N("b"), N("c")))),
        ("x ^ -2", B("^", N("x"), U("-", num("2")))),
        ("2 ^ 3 ^ 2", B("^", num("2"), B("^", num("3"), num("2")))),
        ("-2 ^ -3 ^ 2", U("-", B("^", num("2"), U("-", B("^", num("3"), num("2")))))),
        ("i // 4 % 3", B("%", B("//", N("i"), num("4")), num("3"))),
        ("i - j // w * 2", B("-", N("i"), B("*", B("//", N("j"), N("w")), num("2")))),
        ("a - b - c", B("-", B("-", N("a"), N("b")), N("c"))),
        ("a / b * c", B("*", B("/", N("a"), N("b")), N("c"))),
        ("(q @ W) . k", B(".", B("@", N("q"), N("W")), N("k"))),
        ("q @ W . k", B(".", B("@", N("q"), N("W")), N("k"))),
        ("elu(q) + 1 . k", B("+", C("elu", (N("q"),)), B(".", num("1"), N("k")))),
        ("not j <= i", U("not", B("<=", N("j"), N("i")))),
        ("not not a", U("not", U("not", N("a")))),
        ("- - x", U("-", U("-", N("x")))),
        ("j <= i + 1", B("<=", N("j"), B("+", N("i"), num("1")))),
        ("i - j < w and j <= i", B("and", B("<", B("-", N("i"), N("j")), N("w")),
                                   B("<=", N("j"), N("i")))),
        ("a == b != c", None),  # comparisons do not chain (a SpecError, tested in test_check)
        ("f()", C("f", ())),
        ("clamp(j - i, -128, 128)", C("clamp", (B("-", N("j"), N("i")), U("-", num("128")),
                                                num("128")))),
        ("table[h, j - i + 128]", S("table", (N("h"), B("+", B("-", N("j"), N("i")),
                                                          num("128"))))),
        ("slope[h] * (j - i)", B("*", S("slope", (N("h"),)), B("-", N("j"), N("i")))),
        ("-x[0]^2", U("-", B("^", S("x", (num("0"),)), num("2")))),
        ("x ^ f(y)[0]", None),  # a call cannot be subscripted: a syntax error
    ],
)
def test_expression_trees(text: str, tree: ir.Expr | None) -> None:
    if tree is None:
        from attndsl import SpecError

        with pytest.raises(SpecError):
            expr(text)
    else:
        assert expr(text) == tree


@pytest.mark.parametrize(
    ("text", "value", "is_int"),
    [("2", "2", True), ("0.5", "0.5", False), ("1e-6", "1e-6", False),
     ("2.5E+3", "2.5E+3", False), ("007", "007", True), ("1e5", "1e5", False)],
)
def test_number_literals(text: str, value: str, is_int: bool) -> None:
    assert expr(text) == Num(value, is_int)


def test_every_clause() -> None:
    spec = lower(
        "heads 8",
        "kv_heads 2",
        "param slope[heads]",
        "param W[d, r]",
        "param tau",
        "index doc[n]",
        "index prefix[1]",
        "index len",
        "let window = 128",
        "score q . k",
        "scale 1 / sqrt(d)",
        "bias slope[h] * (j - i)",
        "softcap 50",
        "mask j <= i and i - j < window",
        "normalize sigmoid(s - log(n_k))",
    )
    assert spec == ir.Spec(
        name="t",
        score=QK,
        scale=B("/", num("1"), C("sqrt", (N("d"),))),
        bias=B("*", S("slope", (N("h"),)), B("-", N("j"), N("i"))),
        softcap=num("50"),
        mask=B("and", B("<=", N("j"), N("i")), B("<", B("-", N("i"), N("j")), N("window"))),
        normalize=ir.Normalize(ir.NormKind.ELEMENTWISE,
                               C("sigmoid", (B("-", N("s"), C("log", (N("n_k"),))),))),
        heads=8,
        kv_heads=2,
        params=(ir.Param("slope", ("heads",)), ir.Param("W", ("d", "r")), ir.Param("tau", ())),
        indices=(ir.Index("doc", ("n",)), ir.Index("prefix", (1,)), ir.Index("len", ())),
        lets=(ir.Let("window", num("128")),),
    )


def test_defaults() -> None:
    spec = lower("score q . k")
    assert (spec.scale, spec.bias, spec.softcap, spec.mask) == (None, None, None, None)
    assert spec.normalize == ir.Normalize(ir.NormKind.SOFTMAX)
    assert (spec.heads, spec.kv_heads, spec.params, spec.indices, spec.lets) == (
        None, None, (), (), ())


@pytest.mark.parametrize(
    ("written", "norm"),
    [
        ("softmax", ir.Normalize(ir.NormKind.SOFTMAX)),
        ("sum", ir.Normalize(ir.NormKind.SUM)),
        ("none", ir.Normalize(ir.NormKind.NONE)),
        ("relu", ir.Normalize(ir.NormKind.ELEMENTWISE, C("relu", (N("s"),)))),
        ("sigmoid", ir.Normalize(ir.NormKind.ELEMENTWISE, C("sigmoid", (N("s"),)))),
        ("relu(s)^2", ir.Normalize(ir.NormKind.ELEMENTWISE,
                                   B("^", C("relu", (N("s"),)), num("2")))),
        ("relu(s) / n_k", ir.Normalize(ir.NormKind.ELEMENTWISE,
                                       B("/", C("relu", (N("s"),)), N("n_k")))),
    ],
)
def test_normalize(written: str, norm: ir.Normalize) -> None:
    assert lower("score q . k", f"normalize {written}").normalize == norm


def test_clause_order_comments_and_blank_lines_do_not_matter() -> None:
    a = lower("score q . k", "mask j <= i", "scale 2")
    b = to_ir(parse_tree(
        "# header\n\nattention t {   # the block\n\n  scale 2   # first\n\n"
        "  mask j <= i\n  score q . k\n\n}\n# trailer\n"
    ))
    assert a == b


def test_one_line_block_and_continuation_inside_brackets() -> None:
    assert to_ir(parse_tree("attention t { score q . k }")).score == QK
    spec = lower("score sum(w *", "      tanh(q @ Wq +", "   k @ Wk))", "bias table[h,", " 0]")
    assert spec.score == C("sum", (B("*", N("w"), C("tanh", (
        B("+", B("@", N("q"), N("Wq")), B("@", N("k"), N("Wk"))),))),))
    assert spec.bias == S("table", (N("h"), num("0")))


def test_positions() -> None:
    spec = lower("param slope[heads]", "score q . k", "  bias   slope[h] * (j - i)")
    assert spec.params[0].pos == ir.Pos(2, 7)
    bias = spec.bias
    assert isinstance(bias, ir.Binary)
    assert bias.pos == ir.Pos(4, 10)
    assert bias.left.pos == ir.Pos(4, 10)
    assert bias.right.pos == ir.Pos(4, 22)  # a parenthesized group starts at its first operand
    assert isinstance(bias.right, ir.Binary) and bias.right.right.pos == ir.Pos(4, 26)
    assert spec.clause_pos == (("param", ir.Pos(2, 1)), ("score", ir.Pos(3, 1)),
                               ("bias", ir.Pos(4, 3)))
    assert spec.clause_at("bias") == ir.Pos(4, 3)
    assert spec.clause_at("mask") == ir.NOPOS


def test_positions_are_not_part_of_equality() -> None:
    assert lower("score q . k") == lower("", "", "score    q.k")


def test_block_name_may_be_a_keyword() -> None:
    for name in ("relu", "sigmoid", "softcap", "score", "attention", "and"):
        assert to_ir(parse_tree(f"attention {name} {{\n score q . k\n}}")).name == name

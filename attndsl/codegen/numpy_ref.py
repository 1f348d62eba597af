"""Derivation -> the NumPy reference: readable, vectorized, materializing every n_q x n_k value.

The generated module defines `graph` (every forward value), `forward` (out, lse) and
`backward` (a dict of gradients), each taking the array namespace `xp` first:
runtime/numpy_ops.py for numbers, verify.SymbolicOps for the proof.
"""

from __future__ import annotations

import hashlib

import sympy as sp

from .. import normalizers
from ..grad import Gradients
from ..ir import NormKind, Side
from ..plan import KernelPlan, make_plan
from ..symbolic import (
    OFFSETS,
    POSITIONS,
    SIZES,
    Derivation,
    Lookup,
    Reduction,
    S,
    Vec,
    local_subscripts,
)
from .printer import KernelPrinter
from .source import SourceWriter

SIZE_ORDER = ("B", "heads", "kv_heads", "n_q", "n_k", "d", "dv")


def variable(node: Vec | Reduction | Lookup) -> str:
    if isinstance(node, Vec) and node.kind == "input":
        return f"{node.name}_rows"
    return node.name


def array(name: str) -> str:
    """A param or index array in generated code. Spec names never hold '__' (check.py), and no
    name the emitters invent ends with it: a spec name cannot shadow a generated local."""
    return f"{name}__"


def param_grad(name: str) -> str:
    """The adjoint of a param: ends in '__grad', unlike every other generated name."""
    return f"{name}__grad"


def spec_hash(deriv: Derivation) -> str:
    return hashlib.sha256(deriv.spec.source.encode() or repr(deriv.spec).encode()).hexdigest()[:16]


def call_args(deriv: Derivation) -> list[str]:
    spec = deriv.spec
    return ["q", "k", "v", *(array(p.name) for p in spec.params),
            *(array(x.name) for x in spec.indices)]


class Emitter:
    def __init__(self, source: Derivation | KernelPlan, exact: bool = False) -> None:
        # a compile passes its plan down: the gradients are derived once per compile
        self.plan = source if isinstance(source, KernelPlan) else make_plan(source)
        self.deriv = deriv = self.plan.deriv
        self.grads: Gradients = self.plan.grads
        names = {n.symbol: variable(n) for n in deriv.nodes}
        names.update({s: name for name, s in POSITIONS.items()})
        names.update({s: name for name, s in SIZES.items()})
        names.update({OFFSETS["q"]: "q_off", OFFSETS["k"]: "k_off"})
        names[S] = "x"
        self.p = KernelPrinter("xp", names, exact=exact)
        self.exact = exact
        self.w = SourceWriter()
        self.adjoints: set[str] = set()

    def expr(self, e: sp.Basic) -> str:
        return self.p.doprint(e)

    # ---- the module ----
    def module(self) -> str:
        w, d = self.w, self.deriv
        w(f'"""attndsl NumPy reference for \'{d.spec.name}\' (generated; do not edit).')
        w()
        w(f"spec hash {spec_hash(d)}")
        w(f"x       = {sp.sstr(d.logit)}")
        w(f"allowed = {sp.sstr(d.mask) if d.mask is not None else 'every key'}")
        w(f"weights = {d.norm.value if d.norm_expr is None else sp.sstr(d.norm_expr)}")
        w('"""')
        w()
        self.graph()
        self.normalize()
        self.forward()
        self.backward()
        w()
        w()
        self.rows()
        self.rows_backward()
        return w.text()

    def signature(self, name: str, extra: str = "", optional: str = "") -> str:
        args = call_args(self.deriv)
        if extra:
            args.insert(3, extra)
        if optional:
            args.append(optional)
        args.append("q_offset=0, k_offset=0")  # ints or int arrays [B]
        return f"def {name}(xp, {', '.join(args)}):"

    def prologue(self) -> None:
        w = self.w
        w("B, heads, n_q, d = q.shape")
        w("kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]")
        w("b, h, i, j, q_off, k_off = xp.positions(B, heads, n_q, n_k, q_offset, k_offset)")
        w("g = xp.kv_head_of(heads, kv_heads)  # the key/value head of each query head")

    def graph(self) -> None:
        w, d = self.w, self.deriv
        with w.block(self.signature("graph")):
            w('"""Every forward value, materialized: [B, heads, n_q, n_k, features]."""')
            self.prologue()
            for node in d.nodes:
                self.forward_node(node)
            shape = "(B, heads, n_q, n_k, 1)"
            w(f"x = xp.full({self.expr(d.logit)}, {shape})  # the logits")
            mask = self.expr(d.mask) if d.mask is not None else "True"
            w(f"allowed = xp.full({mask}, {shape})")
            w("return locals()")
        w()
        w()

    def forward_node(self, node: Vec | Reduction | Lookup) -> None:
        w, name = self.w, variable(node)
        if isinstance(node, Vec):
            if node.kind == "input":
                how = "xp.query_rows(q)" if node.name == "q" else "xp.key_rows(k, g)"
            elif node.kind == "param":
                subs = self.subscripts(node.param, node.subscripts)
                how = f'xp.lookup({array(node.param)}, "{node.param}", ' \
                      f'({subs}{"," if subs else ""}), ' \
                      f"vector=True{self.batched(node.param)})"
            elif node.kind == "proj":
                how = f"xp.project({self.expr(node.expr)}, {array(node.param)})"
            else:
                how = self.expr(node.expr)
            w(f"{name} = {how}  # {node.side.value} vector over {node.size}")
        elif isinstance(node, Reduction):
            if node.gemm:
                a, b = node.gemm
                w(f"{name} = xp.gemm({variable(a)}, {variable(b)})  # GEMM: sum_f "
                  f"{sp.sstr(node.body)}")
            else:
                w(f"{name} = xp.reduce({self.expr(node.body)})  # {node.side.value}: sum_f "
                  f"{sp.sstr(node.body)}")
        else:
            lead = "b, " if not node.is_param and node.subscripts else \
                "b" if not node.is_param else ""
            subs = lead + self.subscripts(node.array, node.subscripts)
            w(f'{name} = xp.lookup({array(node.array)}, "{node.array}", '
              f'({subs}{"," if subs else ""}){self.batched(node.array)})')

    def subscripts(self, array: str, subscripts: tuple[sp.Expr, ...]) -> str:
        """The subscripts into `array` as stored (symbolic.local_subscripts), comma-separated."""
        local = local_subscripts(self.deriv.spec, array, subscripts)
        return ", ".join(self.expr(s) for s in local)

    def batched(self, name: str) -> str:
        """`, batched=True` for an array with a batch axis first (an index array or an
        input), so an out-of-range error counts the spec's subscripts, not the batch axis."""
        spec = self.deriv.spec
        batched = any(x.name == name for x in spec.indices) or \
            any(p.name == name and p.batched for p in spec.params)
        return ", batched=True" if batched else ""

    def unpack(self, names: list[str]) -> None:
        for name in names:
            self.w(f"{name} = t[{name!r}]")

    def normalize(self) -> None:
        w, d = self.w, self.deriv
        with w.block("def normalize(xp, t):"):
            w('"""The weights P [B, heads, n_q, n_k] (0 where not allowed) and the row state."""')
            read = d.norm_expr if d.norm_expr is not None else d.sink
            used = [variable(n) for n in d.nodes if read is not None
                    and n.symbol in read.free_symbols]
            self.unpack(list(SIZE_ORDER) + ["b", "h", "i", "j", "x", "allowed"] + used)
            norm = normalizers.of(d)
            if d.norm is NormKind.SOFTMAX:
                w("# softmax over allowed keys: the running state m, l, then the finish")
                w("xm = xp.where(allowed, x, -xp.inf)")
                w("m = xp.keymax(xm)")
                w("e = xp.where(allowed, xp.exp(xm - m), 0)")
                w("l = xp.keysum(e)")
                running = {normalizers.M: "m", normalizers.L: "l"}
                if d.sink is not None:
                    w(f"sink = {self.expr(d.sink)}  # one more key, with no value")
                    running[normalizers.SINK] = "sink"
                self.finish(norm, running)
                w("# where: a NaN row (l NaN) keeps weight 0 at its masked keys")
                w("p = xp.where(allowed, e * inv, 0)")
                w("return p[..., 0], lse[..., 0, 0]")
            elif d.norm is NormKind.SUM:
                w("# x / sum_j x over allowed keys: the running state z, then the finish")
                w("xz = xp.where(allowed, x, 0)")
                w("z = xp.keysum(xz)")
                self.finish(norm, {normalizers.Z: "z"})
                w("# where: a NaN row (z NaN) keeps weight 0 at its masked keys")
                w("return xp.where(allowed, xz * inv, 0)[..., 0], z")
            elif d.norm is NormKind.NONE:
                w("return xp.where(allowed, x, 0)[..., 0], None")
            else:
                assert d.norm_expr is not None
                w(f"# element-wise: f(s) = {sp.sstr(d.norm_expr)}")
                w("x = xp.where(allowed, x, 0)")
                w(f"return xp.where(allowed, {self.expr(d.norm_expr)}, 0)[..., 0], None")
        w()
        w()

    def finish(self, norm: normalizers.Normalizer, running: dict[sp.Symbol, str]) -> None:
        """inv (out = inv * sum_j w_j v_j) and the saved state from the normalizer's finish."""
        named = {s: sp.Symbol(n) for s, n in running.items()}
        targets = {normalizers.SCALE: "inv", normalizers.SAVED: "lse" if norm.saved == "lse"
                   else "z"}
        for target, expr in norm.finish:
            if self.exact:  # the proof shifts by nothing (keymax is 0): exact arithmetic
                expr = dict(norm.shifts).get(target, expr)
            text = self.expr(expr.xreplace(named))
            name = targets.get(target, normalizers.local(target))
            named[target] = sp.Symbol(name)
            if name != text:
                self.w(f"{name} = {text}")

    def forward(self) -> None:
        w = self.w
        with w.block(self.signature("forward")):
            w('"""out [B, heads, n_q, dv] and lse [B, heads, n_q] (None unless softmax)."""')
            w(f"t = graph(xp, {', '.join(call_args(self.deriv))}, q_offset=q_offset, "
              "k_offset=k_offset)")
            w("p, state = normalize(xp, t)")
            w('out = xp.pair_matmul(p, v[:, t["g"]])  # a masked key\'s NaN v stays there')
            lse = "state" if self.deriv.norm is NormKind.SOFTMAX else "None"
            w(f"return out, {lse}")
        w()
        w()

    # ---- backward ----
    def accumulate(self, name: str, value: str) -> None:
        if name in self.adjoints:
            self.w(f"{name} = {name} + {value}")
        else:
            self.adjoints.add(name)
            self.w(f"{name} = {value}")

    def backward(self) -> None:
        w, d, grads = self.w, self.deriv, self.grads
        softmax = d.norm is NormKind.SOFTMAX
        optional = "out=None, lse=None" + (", dlse=None" if softmax else "")
        with w.block(self.signature("backward", "dout", optional)):
            if softmax:
                w('"""Gradients of sum(out * dout) + sum(lse * dlse): q, k, v and every param; a')
                w('given out (and lse) is trusted as forward\'s result, as on every target."""')
            else:
                w('"""Gradients of sum(out * dout): q, k, v and every param; a given out (and lse,')
                w('softmax) is trusted as forward\'s result, as on every target."""')
            w(f"t = graph(xp, {', '.join(call_args(d))}, q_offset=q_offset, k_offset=k_offset)")
            names = list(SIZE_ORDER) + ["b", "h", "i", "j", "g", "q_off", "k_off", "allowed"] + [
                variable(n) for n in d.nodes]
            self.unpack(names)
            w("p, state = normalize(xp, t)")
            w('x = t["x"]')
            w("v_rows = v[:, g]")
            with w.block("if out is None:"):
                w("out = xp.pair_matmul(p, v_rows)")
            if d.norm is NormKind.SOFTMAX:
                with w.block("if lse is not None:  # P from the given lse, as the kernels do"):
                    w("p = xp.weights_from_lse(x, allowed, lse)")
            w("dP = xp.matmul(dout, xp.transpose(v_rows))[..., None]")
            norm = normalizers.of(d)
            w(f"# {norm.rule}")
            if norm.uses_delta:
                w("D = xp.rowsum(dout * out)[..., None]")
            if softmax:
                # lse's adjoint: d lse / dx_j = P_j, so dS = P (dP - D) + P dlse
                with w.block("if dlse is not None:  # dS = P * (dP - (D - dlse))"):
                    w("D = D - dlse[..., None, None]")
            if norm.kind is NormKind.ELEMENTWISE:
                w("x = xp.where(allowed, x, 0)")
            names = {normalizers.WEIGHT: "p[..., None]", normalizers.X: "x",
                     normalizers.SAVED: "state", normalizers.DP: "dP", normalizers.DELTA: "D"}
            dscore = self.expr(norm.dscore.xreplace({s: sp.Symbol(n) for s, n in names.items()}))
            w(f"dS = xp.where(allowed, {dscore}, 0)")
            # grad_v, not dv: the size dv may appear in subscripts below
            w("grad_v = xp.group_heads(xp.pair_matmul(xp.transpose(p), dout), kv_heads)")
            w("dx = dS")
            w("# the chain rule through the logit, then node by node in reverse")
            # sympy.cse: sub-expressions shared by the logit's partial derivatives
            temporaries, partials = sp.cse(list(grads.dlogit.values()),
                                           symbols=sp.numbered_symbols("shared"))
            for temporary, value in temporaries:
                w(f"{temporary} = {self.expr(value)}")
            for symbol, partial in zip(grads.dlogit, partials):
                node = d.node(symbol)
                assert node is not None
                name = variable(node)
                self.accumulate(f"d_{name}", f"xp.sum_to(xp.where(allowed, dx * "
                                             f"({self.expr(partial)}), 0), {name})")
            if d.sink is not None:
                self.sink_backward()
            for param in d.spec.params:
                w(f"{param_grad(param.name)} = 0")
            for node in reversed(d.nodes):
                self.backward_node(node)
            w(f"grads = {{'q': {self.input_grad('q')}, 'k': {self.input_grad('k')}, 'v': grad_v}}")
            for param in d.spec.params:
                w(f"grads[{param.name!r}] = xp.as_grad({param_grad(param.name)}, "
                  f"{array(param.name)})")
            w("return grads")

    def sink_backward(self) -> None:
        """The sink's adjoint per row, then the chain rule into the nodes the sink reads."""
        w, d = self.w, self.deriv
        assert d.sink is not None
        dsink = normalizers.DSINK.xreplace({normalizers.SINK: sp.Symbol("sink"),
                                            normalizers.SAVED: sp.Symbol("row_lse"),
                                            normalizers.DELTA: sp.Symbol("D")})
        w("# the sink, one more key with no value: d sink = -exp(sink - lse) * D per row")
        w(f"sink = {self.expr(d.sink)}")
        w("row_lse = (state if lse is None else lse)[..., None, None]")
        w(f"d_sink = {self.expr(dsink)}")
        for symbol, partial in self.grads.dsink.items():
            node = d.node(symbol)
            assert node is not None
            name = variable(node)
            self.accumulate(f"d_{name}", f"xp.sum_to(xp.chain(d_sink, {self.expr(partial)}), "
                                         f"{name})")

    def input_grad(self, name: str) -> str:
        adjoint = f"d_{name}_rows"
        if adjoint not in self.adjoints:
            return f"xp.zeros_like({name})"
        if name == "q":
            return f"xp.sum_to({adjoint}, q_rows)[:, :, :, 0, :]"
        return f"xp.group_heads(xp.sum_to({adjoint}, k_rows)[:, :, 0], kv_heads)"

    def backward_node(self, node: Vec | Reduction | Lookup) -> None:
        name = variable(node)
        adjoint = f"d_{name}"
        if adjoint not in self.adjoints:
            return
        w = self.w
        if isinstance(node, Reduction) and node.gemm:
            a, b = node.gemm
            w(f"# GEMM bwd: d{variable(a)} = d{name} @ {variable(b)}, "
              f"d{variable(b)} = d{name}^T @ {variable(a)}")
            self.accumulate(f"d_{variable(a)}", f"xp.gemm_da({adjoint}, {variable(b)})")
            self.accumulate(f"d_{variable(b)}", f"xp.gemm_db({adjoint}, {variable(a)})")
        elif isinstance(node, Reduction) or (isinstance(node, Vec) and node.kind == "map"):
            guard = node.side is Side.PAIR
            for symbol, partial in self.grads.partials[node.name]:
                source = self.deriv.node(symbol)
                assert source is not None
                contrib = f"xp.chain({adjoint}, {self.expr(partial)})"
                if guard:
                    contrib = f"xp.at_allowed(allowed, {contrib}, {name})"
                self.accumulate(f"d_{variable(source)}",
                                f"xp.sum_to({contrib}, {variable(source)})")
        elif isinstance(node, Vec) and node.kind == "proj":
            source = self.deriv.node(node.expr)  # type: ignore[arg-type]
            assert source is not None
            w(f"# projection bwd: dX = dP @ {node.param}^T, d{node.param} = X^T dP")
            self.accumulate(f"d_{variable(source)}",
                            f"xp.project_dx({adjoint}, {array(node.param)})")
            grad = param_grad(node.param)
            w(f"{grad} = {grad} + xp.project_dw({variable(source)}, {adjoint})")
        elif isinstance(node, Vec) and node.kind == "param":
            subs = self.subscripts(node.param, node.subscripts)
            grad = param_grad(node.param)
            w(f"{grad} = {grad} + xp.scatter({array(node.param)}.shape, "
              f"({subs}{',' if subs else ''}), {adjoint}, vector=True)")
        elif isinstance(node, Lookup) and node.is_param:
            subs = self.subscripts(node.array, node.subscripts)
            w(f"# lookup bwd: scatter-add into {node.array}")
            grad = param_grad(node.array)
            w(f"{grad} = {grad} + xp.scatter({array(node.array)}.shape, "
              f"({subs}{',' if subs else ''}), {adjoint})")


def emit(source: Derivation | KernelPlan, exact: bool = False) -> str:
    """The NumPy reference module's source."""
    return Emitter(source, exact=exact).module()


def _row_level(node: Vec | Reduction | Lookup) -> bool:
    return node.side is not Side.PAIR or isinstance(node, Vec)


def _rows(self: Emitter) -> None:
    """`rows`: the row-level nodes a fused kernel reads (hoisted: computed once per call)."""
    w = self.w
    with w.block(self.signature("rows")):
        w('"""Row-level values (per query row, per key row, constant), 5-D layout."""')
        self.prologue()
        for node in self.deriv.nodes:
            if _row_level(node):
                self.forward_node(node)
        if self.deriv.sink is not None:  # softmax(sink = e): the kernels' finish reads it
            w(f"sink = {self.expr(self.deriv.sink)}")
        w("return locals()")
    w()
    w()


def _rows_backward(self: Emitter) -> None:
    """`rows_backward`: the kernel's adjoints of its row-level inputs -> q, k and params."""
    w, d, plan = self.w, self.deriv, self.plan
    params = [p.name for p in d.spec.params]
    args = ", ".join(["q", "k", *map(array, params)])
    with w.block(f"def rows_backward(xp, t, adjoints, {args}):"):
        w('"""Chains the adjoints of the pair kernel\'s row-level inputs to q, k and params."""')
        nodes = [n for n in d.nodes if _row_level(n)]
        sizes = [n for n in _sizes_used(self, nodes) if n != "kv_heads"]
        self.unpack(["kv_heads", *sizes, "b", "h", "i", "j", "g", "q_off", "k_off"] +
                    [variable(n) for n in nodes])
        self.adjoints = set()
        for item in plan.inputs:  # the kernels' adjoints have a batch and head axis even where
            name = variable(item.node)  # the value has none (P[h] @ W): summed to its shape
            self.accumulate(f"d_{name}", f"xp.sum_to(adjoints[{name!r}], {name})")
        for symbol, partial in self.grads.dsink.items():  # the host computes d sink per row
            name = variable(d.node(symbol))  # type: ignore[arg-type]
            self.accumulate(f"d_{name}", f"xp.sum_to(xp.chain(adjoints['sink'], "
                                         f"{self.expr(partial)}), {name})")
        for param in params:
            w(f"{param_grad(param)} = 0")
        for node in reversed(nodes):
            self.backward_node(node)
        w(f"grads = {{'q': {self.input_grad('q')}, 'k': {self.input_grad('k')}}}")
        for param in params:
            w(f"grads[{param!r}] = xp.as_grad({param_grad(param)}, {array(param)})")
        w("return grads")


def _sizes_used(self: Emitter, nodes: list[Vec | Reduction | Lookup]) -> list[str]:
    """The size names (n_k, d, ...) in the subscripts and partials rows_backward prints."""
    exprs: list[sp.Basic] = []
    for node in nodes:
        exprs += [sp.sympify(s) for s in getattr(node, "subscripts", ())]
        exprs += [e for _, e in self.grads.partials.get(node.name, [])]
    exprs += list(self.grads.dsink.values())
    used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
    return [name for name, symbol in SIZES.items() if symbol in used]


Emitter.rows = _rows  # type: ignore[attr-defined]
Emitter.rows_backward = _rows_backward  # type: ignore[attr-defined]

"""attndsl NumPy reference for 'alibi' (generated; do not edit).

spec hash 187293766ce3a676
x       = slope_3*(-i + j) + r2/sqrt(d)
allowed = j <= i
weights = softmax
"""

def graph(xp, q, k, v, slope__, q_offset=0, k_offset=0):
    """Every forward value, materialized: [B, heads, n_q, n_k, features]."""
    B, heads, n_q, d = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    b, h, i, j, q_off, k_off = xp.positions(B, heads, n_q, n_k, q_offset, k_offset)
    g = xp.kv_head_of(heads, kv_heads)  # the key/value head of each query head
    q_rows = xp.query_rows(q)  # query vector over d
    k_rows = xp.key_rows(k, g)  # key vector over d
    r2 = xp.gemm(q_rows, k_rows)  # GEMM: sum_f k_f*q_f
    slope_3 = xp.lookup(slope__, "slope", (h,))
    x = xp.full(slope_3*(-i + j) + r2/xp.sqrt(d), (B, heads, n_q, n_k, 1))  # the logits
    allowed = xp.full(xp.less_equal(j, i), (B, heads, n_q, n_k, 1))
    return locals()


def normalize(xp, t):
    """The weights P [B, heads, n_q, n_k] (0 where not allowed) and the row state."""
    B = t['B']
    heads = t['heads']
    kv_heads = t['kv_heads']
    n_q = t['n_q']
    n_k = t['n_k']
    d = t['d']
    dv = t['dv']
    b = t['b']
    h = t['h']
    i = t['i']
    j = t['j']
    x = t['x']
    allowed = t['allowed']
    # softmax over allowed keys: the running state m, l, then the finish
    xm = xp.where(allowed, x, -xp.inf)
    m = xp.keymax(xm)
    e = xp.where(allowed, xp.exp(xm - m), 0)
    l = xp.keysum(e)
    inv = xp.safe_div(1, l)
    lse = xp.where(xp.not_equal(l, 0), m + xp.log(l), (-xp.inf))
    # where: a NaN row (l NaN) keeps weight 0 at its masked keys
    p = xp.where(allowed, e * inv, 0)
    return p[..., 0], lse[..., 0, 0]


def forward(xp, q, k, v, slope__, q_offset=0, k_offset=0):
    """out [B, heads, n_q, dv] and lse [B, heads, n_q] (None unless softmax)."""
    t = graph(xp, q, k, v, slope__, q_offset=q_offset, k_offset=k_offset)
    p, state = normalize(xp, t)
    out = xp.pair_matmul(p, v[:, t["g"]])  # a masked key's NaN v stays there
    return out, state


def backward(xp, q, k, v, dout, slope__, out=None, lse=None, dlse=None, q_offset=0, k_offset=0):
    """Gradients of sum(out * dout) + sum(lse * dlse): q, k, v and every param; a
    given out (and lse) is trusted as forward's result, as on every target."""
    t = graph(xp, q, k, v, slope__, q_offset=q_offset, k_offset=k_offset)
    B = t['B']
    heads = t['heads']
    kv_heads = t['kv_heads']
    n_q = t['n_q']
    n_k = t['n_k']
    d = t['d']
    dv = t['dv']
    b = t['b']
    h = t['h']
    i = t['i']
    j = t['j']
    g = t['g']
    q_off = t['q_off']
    k_off = t['k_off']
    allowed = t['allowed']
    q_rows = t['q_rows']
    k_rows = t['k_rows']
    r2 = t['r2']
    slope_3 = t['slope_3']
    p, state = normalize(xp, t)
    x = t["x"]
    v_rows = v[:, g]
    if out is None:
        out = xp.pair_matmul(p, v_rows)
    if lse is not None:  # P from the given lse, as the kernels do
        p = xp.weights_from_lse(x, allowed, lse)
    dP = xp.matmul(dout, xp.transpose(v_rows))[..., None]
    # dS = P * (dP - D), D = rowsum(dO * O)
    D = xp.rowsum(dout * out)[..., None]
    if dlse is not None:  # dS = P * (dP - (D - dlse))
        D = D - dlse[..., None, None]
    dS = xp.where(allowed, p[..., None]*(-D + dP), 0)
    grad_v = xp.group_heads(xp.pair_matmul(xp.transpose(p), dout), kv_heads)
    dx = dS
    # the chain rule through the logit, then node by node in reverse
    d_r2 = xp.sum_to(xp.where(allowed, dx * ((1 / xp.sqrt(d))), 0), r2)
    d_slope_3 = xp.sum_to(xp.where(allowed, dx * (-i + j), 0), slope_3)
    slope__grad = 0
    # lookup bwd: scatter-add into slope
    slope__grad = slope__grad + xp.scatter(slope__.shape, (h,), d_slope_3)
    # GEMM bwd: dq_rows = dr2 @ k_rows, dk_rows = dr2^T @ q_rows
    d_q_rows = xp.gemm_da(d_r2, k_rows)
    d_k_rows = xp.gemm_db(d_r2, q_rows)
    grads = {'q': xp.sum_to(d_q_rows, q_rows)[:, :, :, 0, :], 'k': xp.group_heads(xp.sum_to(d_k_rows, k_rows)[:, :, 0], kv_heads), 'v': grad_v}
    grads['slope'] = xp.as_grad(slope__grad, slope__)
    return grads


def rows(xp, q, k, v, slope__, q_offset=0, k_offset=0):
    """Row-level values (per query row, per key row, constant), 5-D layout."""
    B, heads, n_q, d = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    b, h, i, j, q_off, k_off = xp.positions(B, heads, n_q, n_k, q_offset, k_offset)
    g = xp.kv_head_of(heads, kv_heads)  # the key/value head of each query head
    q_rows = xp.query_rows(q)  # query vector over d
    k_rows = xp.key_rows(k, g)  # key vector over d
    slope_3 = xp.lookup(slope__, "slope", (h,))
    return locals()


def rows_backward(xp, t, adjoints, q, k, slope__):
    """Chains the adjoints of the pair kernel's row-level inputs to q, k and params."""
    kv_heads = t['kv_heads']
    b = t['b']
    h = t['h']
    i = t['i']
    j = t['j']
    g = t['g']
    q_off = t['q_off']
    k_off = t['k_off']
    q_rows = t['q_rows']
    k_rows = t['k_rows']
    slope_3 = t['slope_3']
    d_q_rows = xp.sum_to(adjoints['q_rows'], q_rows)
    d_k_rows = xp.sum_to(adjoints['k_rows'], k_rows)
    slope__grad = 0
    grads = {'q': xp.sum_to(d_q_rows, q_rows)[:, :, :, 0, :], 'k': xp.group_heads(xp.sum_to(d_k_rows, k_rows)[:, :, 0], kv_heads)}
    grads['slope'] = xp.as_grad(slope__grad, slope__)
    return grads

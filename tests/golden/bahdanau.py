"""attndsl NumPy reference for 'bahdanau' (generated; do not edit).

spec hash 01a42a26f59cb304
x       = r5
allowed = every key
weights = softmax
"""

def graph(xp, q, k, v, Wq__, Wk__, w__, q_offset=0, k_offset=0):
    """Every forward value, materialized: [B, heads, n_q, n_k, features]."""
    B, heads, n_q, d = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    b, h, i, j, q_off, k_off = xp.positions(B, heads, n_q, n_k, q_offset, k_offset)
    g = xp.kv_head_of(heads, kv_heads)  # the key/value head of each query head
    w_v0 = xp.lookup(w__, "w", (), vector=True)  # const vector over r
    q_rows = xp.query_rows(q)  # query vector over d
    proj2 = xp.project(q_rows, Wq__)  # query vector over r
    k_rows = xp.key_rows(k, g)  # key vector over d
    proj4 = xp.project(k_rows, Wk__)  # key vector over r
    r5 = xp.reduce(w_v0*xp.tanh(proj2 + proj4))  # pair: sum_f w_v0_f*tanh(proj2_f + proj4_f)
    x = xp.full(r5, (B, heads, n_q, n_k, 1))  # the logits
    allowed = xp.full(True, (B, heads, n_q, n_k, 1))
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


def forward(xp, q, k, v, Wq__, Wk__, w__, q_offset=0, k_offset=0):
    """out [B, heads, n_q, dv] and lse [B, heads, n_q] (None unless softmax)."""
    t = graph(xp, q, k, v, Wq__, Wk__, w__, q_offset=q_offset, k_offset=k_offset)
    p, state = normalize(xp, t)
    out = xp.pair_matmul(p, v[:, t["g"]])  # a masked key's NaN v stays there
    return out, state


def backward(xp, q, k, v, dout, Wq__, Wk__, w__, out=None, lse=None, dlse=None, q_offset=0, k_offset=0):
    """Gradients of sum(out * dout) + sum(lse * dlse): q, k, v and every param; a
    given out (and lse) is trusted as forward's result, as on every target."""
    t = graph(xp, q, k, v, Wq__, Wk__, w__, q_offset=q_offset, k_offset=k_offset)
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
    w_v0 = t['w_v0']
    q_rows = t['q_rows']
    proj2 = t['proj2']
    k_rows = t['k_rows']
    proj4 = t['proj4']
    r5 = t['r5']
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
    d_r5 = xp.sum_to(xp.where(allowed, dx * (1), 0), r5)
    Wq__grad = 0
    Wk__grad = 0
    w__grad = 0
    d_w_v0 = xp.sum_to(xp.at_allowed(allowed, xp.chain(d_r5, xp.tanh(proj2 + proj4)), r5), w_v0)
    d_proj2 = xp.sum_to(xp.at_allowed(allowed, xp.chain(d_r5, w_v0*(1 - xp.tanh(proj2 + proj4)**2)), r5), proj2)
    d_proj4 = xp.sum_to(xp.at_allowed(allowed, xp.chain(d_r5, w_v0*(1 - xp.tanh(proj2 + proj4)**2)), r5), proj4)
    # projection bwd: dX = dP @ Wk^T, dWk = X^T dP
    d_k_rows = xp.project_dx(d_proj4, Wk__)
    Wk__grad = Wk__grad + xp.project_dw(k_rows, d_proj4)
    # projection bwd: dX = dP @ Wq^T, dWq = X^T dP
    d_q_rows = xp.project_dx(d_proj2, Wq__)
    Wq__grad = Wq__grad + xp.project_dw(q_rows, d_proj2)
    w__grad = w__grad + xp.scatter(w__.shape, (), d_w_v0, vector=True)
    grads = {'q': xp.sum_to(d_q_rows, q_rows)[:, :, :, 0, :], 'k': xp.group_heads(xp.sum_to(d_k_rows, k_rows)[:, :, 0], kv_heads), 'v': grad_v}
    grads['Wq'] = xp.as_grad(Wq__grad, Wq__)
    grads['Wk'] = xp.as_grad(Wk__grad, Wk__)
    grads['w'] = xp.as_grad(w__grad, w__)
    return grads


def rows(xp, q, k, v, Wq__, Wk__, w__, q_offset=0, k_offset=0):
    """Row-level values (per query row, per key row, constant), 5-D layout."""
    B, heads, n_q, d = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    b, h, i, j, q_off, k_off = xp.positions(B, heads, n_q, n_k, q_offset, k_offset)
    g = xp.kv_head_of(heads, kv_heads)  # the key/value head of each query head
    w_v0 = xp.lookup(w__, "w", (), vector=True)  # const vector over r
    q_rows = xp.query_rows(q)  # query vector over d
    proj2 = xp.project(q_rows, Wq__)  # query vector over r
    k_rows = xp.key_rows(k, g)  # key vector over d
    proj4 = xp.project(k_rows, Wk__)  # key vector over r
    return locals()


def rows_backward(xp, t, adjoints, q, k, Wq__, Wk__, w__):
    """Chains the adjoints of the pair kernel's row-level inputs to q, k and params."""
    kv_heads = t['kv_heads']
    b = t['b']
    h = t['h']
    i = t['i']
    j = t['j']
    g = t['g']
    q_off = t['q_off']
    k_off = t['k_off']
    w_v0 = t['w_v0']
    q_rows = t['q_rows']
    proj2 = t['proj2']
    k_rows = t['k_rows']
    proj4 = t['proj4']
    d_w_v0 = xp.sum_to(adjoints['w_v0'], w_v0)
    d_proj2 = xp.sum_to(adjoints['proj2'], proj2)
    d_proj4 = xp.sum_to(adjoints['proj4'], proj4)
    Wq__grad = 0
    Wk__grad = 0
    w__grad = 0
    # projection bwd: dX = dP @ Wk^T, dWk = X^T dP
    d_k_rows = xp.project_dx(d_proj4, Wk__)
    Wk__grad = Wk__grad + xp.project_dw(k_rows, d_proj4)
    # projection bwd: dX = dP @ Wq^T, dWq = X^T dP
    d_q_rows = xp.project_dx(d_proj2, Wq__)
    Wq__grad = Wq__grad + xp.project_dw(q_rows, d_proj2)
    w__grad = w__grad + xp.scatter(w__.shape, (), d_w_v0, vector=True)
    grads = {'q': xp.sum_to(d_q_rows, q_rows)[:, :, :, 0, :], 'k': xp.group_heads(xp.sum_to(d_k_rows, k_rows)[:, :, 0], kv_heads)}
    grads['Wq'] = xp.as_grad(Wq__grad, Wq__)
    grads['Wk'] = xp.as_grad(Wk__grad, Wk__)
    grads['w'] = xp.as_grad(w__grad, w__)
    return grads

"""Hand-written NumPy references for the example attention variants, float64.

Written from the papers' formulas and from the contract in LANGUAGE.md (sections 1 and 4),
not from attndsl's generated code. Every forward is numerically stable (max-subtracted
softmax, overflow-free sigmoid / elu), and every backward is derived by hand, variant by
variant, with the chain rule:

    logits L[b,h,i,j]  ->  weights W[b,h,i,j] (normalize, over the allowed keys)
                       ->  out[b,h,i,:] = sum_j W[b,h,i,j] v[b,g(h),j,:]

    dW = dout @ v^T,  dv = W^T @ dout
    softmax:      dL = W * (dW - sum_j W dW)
    sum:          dL = allowed * (dW - sum_j W dW) / Z,        Z = sum_{allowed j} L
    element-wise: dL = allowed * f'(L) * dW

and then dL is pushed through the variant's own score/scale/bias/softcap by hand.

Shapes follow LANGUAGE.md: q [B, H, n_q, d], k [B, KH, n_k, d], v [B, KH, n_k, dv];
query head h reads key/value head h // (H // KH). Every reference returns a dict with
"out", "lse" (None for normalizers other than softmax) and "grads" (a dict with "q", "k",
"v" and one entry per param), the latter only when `dout` is given.

`allowed` is an optional extra boolean mask broadcastable to [B, H, n_q, n_k] that is
and-ed with the variant's own mask (tests use it to empty rows).
"""

from __future__ import annotations

import numpy as np

# ---- layout helpers ----------------------------------------------------------------------


def expand_kv(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, KH, n, e] -> [B, H, n, e], head h holding kv head h // (H // KH)."""
    kv_heads = x.shape[1]
    assert heads % kv_heads == 0
    return np.repeat(x, heads // kv_heads, axis=1)


def reduce_kv(dx: np.ndarray, kv_heads: int) -> np.ndarray:
    """Adjoint of expand_kv: sum the gradients of the query heads sharing a kv head."""
    B, H, n, e = dx.shape
    return dx.reshape(B, kv_heads, H // kv_heads, n, e).sum(axis=2)


def positions(n_q: int, n_k: int) -> tuple[np.ndarray, np.ndarray]:
    """i as [n_q, 1] and j as [1, n_k] (integers), positions starting at 0."""
    return np.arange(n_q)[:, None], np.arange(n_k)[None, :]


def full_mask(shape, allowed=None) -> np.ndarray:
    """The boolean mask of shape [B, H, n_q, n_k] (all True when allowed is None)."""
    m = np.ones(shape, dtype=bool)
    if allowed is not None:
        m = m & np.broadcast_to(np.asarray(allowed, dtype=bool), shape)
    return m


# ---- scalar functions (stable) ------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))  # in (0, 1]: never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def elu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def elu_grad(x: np.ndarray) -> np.ndarray:
    # PyTorch: x <= 0 -> exp(x) (alpha = 1), else 1; continuous at 0 anyway.
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


def relu_grad(x: np.ndarray) -> np.ndarray:
    return (x > 0).astype(x.dtype)  # relu'(0) = 0, as PyTorch


# ---- normalizers: forward and hand-derived backward ----------------------------------------


def softmax_forward(L, A, vx):
    """Masked softmax over the last axis. Returns out, lse, W.

    Masked keys get weight exactly 0; a row with no allowed key gives out = 0 and
    lse = -inf. Values of L at masked positions are never read (NaN there is harmless).
    """
    Lm = np.where(A, L, -np.inf)
    m = Lm.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    E = np.exp(np.where(A, L - m_safe, -np.inf))  # exactly 0 where masked
    Z = E.sum(axis=-1, keepdims=True)
    nonempty = Z > 0
    Zs = np.where(nonempty, Z, 1.0)
    W = E / Zs
    lse = np.where(nonempty, m_safe + np.log(Zs), -np.inf)[..., 0]
    out = W @ vx
    return out, lse, W


def softmax_backward(W, vx, dout):
    """d(sum out*dout)/dL for out = softmax(L) @ vx, and the gradient for vx."""
    dW = dout @ np.swapaxes(vx, -1, -2)
    delta = (W * dW).sum(axis=-1, keepdims=True)
    dL = W * (dW - delta)
    dvx = np.swapaxes(W, -1, -2) @ dout
    return dL, dvx


def sum_forward(L, A, vx):
    """W = L / sum_{allowed} L over allowed keys; 0 for masked keys and for empty rows."""
    X = np.where(A, L, 0.0)
    Z = X.sum(axis=-1, keepdims=True)
    nonempty = A.any(axis=-1, keepdims=True)
    Zs = np.where(nonempty, Z, 1.0)
    W = np.where(nonempty, X / Zs, 0.0)
    return W @ vx, W, Zs


def sum_backward(W, A, Zs, vx, dout):
    # W_j = X_j / Z, Z = sum_l X_l  =>  dX_j = (dW_j - sum_l W_l dW_l) / Z   (allowed j)
    dW = dout @ np.swapaxes(vx, -1, -2)
    delta = (W * dW).sum(axis=-1, keepdims=True)
    dL = np.where(A, (dW - delta) / Zs, 0.0)
    dvx = np.swapaxes(W, -1, -2) @ dout
    return dL, dvx


def elementwise_forward(L, A, vx, f):
    W = np.where(A, f(np.where(A, L, 0.0)), 0.0)
    return W @ vx, W


def _elementwise(L, A, vx, dout, f, fprime):
    out, W = elementwise_forward(L, A, vx, f)
    if dout is None:
        return out, None, None
    dW = dout @ np.swapaxes(vx, -1, -2)
    dL = np.where(A, fprime(np.where(A, L, 0.0)) * dW, 0.0)
    dvx = np.swapaxes(W, -1, -2) @ dout
    return out, dL, dvx


def _softmax(L, A, vx, dout):
    out, lse, W = softmax_forward(L, A, vx)
    if dout is None:
        return out, lse, None, None
    dL, dvx = softmax_backward(W, vx, dout)
    return out, lse, dL, dvx


def _sum(L, A, vx, dout):
    out, W, Zs = sum_forward(L, A, vx)
    if dout is None:
        return out, None, None
    dL, dvx = sum_backward(W, A, Zs, vx, dout)
    return out, dL, dvx


def _result(out, lse, grads):
    return {"out": out, "lse": lse, "grads": grads}


# ---- the dot-product family: L = (q . k) * c + bias, optional softcap ----------------------


def _dot_family(
    q,
    k,
    v,
    dout,
    *,
    scale,
    bias=None,
    mask=None,
    softcap=None,
    allowed=None,
    normalize="softmax",
    f=None,
    fprime=None,
):
    """Shared body of every variant whose score is q . k.

    bias: [H, n_q, n_k] (or broadcastable) additive logits; its gradient dL is returned
    in grads["_dL"] so each variant can route it to its own params by hand.
    """
    H, KH = q.shape[1], k.shape[1]
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    S = q @ np.swapaxes(kx, -1, -2)  # q_i . k_j
    X = S * scale + (0.0 if bias is None else bias)
    if softcap is not None:
        t = np.tanh(X / softcap)
        L = softcap * t
    else:
        L = X
    A = full_mask(L.shape, mask)
    A = full_mask(L.shape, A if allowed is None else (A & np.broadcast_to(allowed, L.shape)))
    lse = None
    if normalize == "softmax":
        out, lse, dL, dvx = _softmax(L, A, vx, dout)
    elif normalize == "sum":
        out, dL, dvx = _sum(L, A, vx, dout)
    else:
        out, dL, dvx = _elementwise(L, A, vx, dout, f, fprime)
    if dout is None:
        return _result(out, lse, None)
    dX = dL * (1.0 - t * t) if softcap is not None else dL  # d(c tanh(x/c))/dx = 1 - tanh^2
    dS = dX * scale
    dq = dS @ kx
    dkx = np.swapaxes(dS, -1, -2) @ q
    grads = {"q": dq, "k": reduce_kv(dkx, KH), "v": reduce_kv(dvx, KH), "_dL": dX}
    return _result(out, lse, grads)


def _strip(res):
    if res["grads"] is not None:
        res["grads"].pop("_dL", None)
    return res


def scaled_dot_product(q, k, v, dout=None, *, allowed=None):
    """Vaswani et al. 2017: softmax(q k^T / sqrt(d)) v."""
    return _strip(_dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), allowed=allowed))


def multi_head_gqa(q, k, v, dout=None, *, allowed=None):
    """Grouped-query attention: same formula, head h reads kv head h // (H // KH)."""
    assert q.shape[1] == 8 and k.shape[1] == 2
    return scaled_dot_product(q, k, v, dout, allowed=allowed)


def luong_dot(q, k, v, dout=None, *, allowed=None):
    """Luong 2015 dot: softmax(q k^T) v, unscaled."""
    return _strip(_dot_family(q, k, v, dout, scale=1.0, allowed=allowed))


def causal_mask(n_q, n_k):
    i, j = positions(n_q, n_k)
    return j <= i


def causal(q, k, v, dout=None, *, allowed=None):
    return _strip(
        _dot_family(
            q,
            k,
            v,
            dout,
            scale=1.0 / np.sqrt(q.shape[-1]),
            mask=causal_mask(q.shape[2], k.shape[2]),
            allowed=allowed,
        )
    )


def sliding_window(q, k, v, dout=None, *, allowed=None, window=128):
    i, j = positions(q.shape[2], k.shape[2])
    mask = (j <= i) & (i - j < window)
    return _strip(
        _dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), mask=mask, allowed=allowed)
    )


def sliding_window_sink(q, k, v, dout=None, *, sink, allowed=None, window=128):
    """The sliding window with a sink per head: softmax over the row's keys plus one more key
    whose logit is sink[h] and whose value is 0 (LANGUAGE.md section 4)."""
    i, j = positions(q.shape[2], k.shape[2])
    H, KH = q.shape[1], k.shape[1]
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    scale = 1.0 / np.sqrt(q.shape[-1])
    L = q @ np.swapaxes(kx, -1, -2) * scale
    A = full_mask(L.shape, (j <= i) & (i - j < window))
    A = full_mask(L.shape, A if allowed is None else (A & np.broadcast_to(allowed, L.shape)))
    column = L.shape[:3] + (1,)
    L_aug = np.concatenate([L, np.broadcast_to(np.asarray(sink)[None, :, None, None], column)], -1)
    A_aug = np.concatenate([A, np.ones(column, dtype=bool)], -1)
    v_aug = np.concatenate([vx, np.zeros(vx.shape[:2] + (1, vx.shape[3]))], axis=2)
    out, lse, dL_aug, dv_aug = _softmax(L_aug, A_aug, v_aug, dout)
    if dout is None:
        return _result(out, lse, None)
    dS = dL_aug[..., :-1] * scale
    grads = {"q": dS @ kx, "k": reduce_kv(np.swapaxes(dS, -1, -2) @ q, KH),
             "v": reduce_kv(dv_aug[:, :, :-1], KH), "sink": dL_aug[..., -1].sum(axis=(0, 2))}
    return _result(out, lse, grads)


def prefix_lm(q, k, v, dout=None, *, prefix, allowed=None):
    """allowed = j <= i or j < prefix[b]; prefix has shape [B, 1]."""
    i, j = positions(q.shape[2], k.shape[2])
    p = np.asarray(prefix).reshape(-1)[:, None, None, None]
    mask = (j <= i)[None, None] | (j[None, None] < p)
    return _strip(
        _dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), mask=mask, allowed=allowed)
    )


def document(q, k, v, dout=None, *, doc, allowed=None):
    """allowed = doc[b, i] == doc[b, j] and j <= i (self-attention, n_q = n_k)."""
    assert q.shape[2] == k.shape[2]
    doc = np.asarray(doc)
    same = doc[:, None, :, None] == doc[:, None, None, :]
    mask = same & causal_mask(q.shape[2], k.shape[2])[None, None]
    return _strip(
        _dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), mask=mask, allowed=allowed)
    )


def spatial_window(q, k, v, dout=None, *, allowed=None, width=16):
    i, j = positions(q.shape[2], k.shape[2])
    # Python floor division / modulo on non-negative positions.
    mask = (np.abs(i // width - j // width) <= 2) & (np.abs(i % width - j % width) <= 2)
    return _strip(
        _dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), mask=mask, allowed=allowed)
    )


def softcap(q, k, v, dout=None, *, allowed=None, cap=50.0):
    """Gemma 2: logits = cap * tanh((q . k / sqrt(d)) / cap)."""
    return _strip(
        _dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), softcap=cap, allowed=allowed)
    )


def alibi(q, k, v, dout=None, *, slope, allowed=None, causal_mask_on=True):
    """Press et al. 2022: logits = q . k / sqrt(d) + slope[h] * (j - i), j <= i.

    d/d slope[h] = sum_{b,i,j} dL[b,h,i,j] * (j - i).
    """
    n_q, n_k = q.shape[2], k.shape[2]
    i, j = positions(n_q, n_k)
    slope = np.asarray(slope, dtype=np.float64)
    rel = (j - i).astype(np.float64)  # [n_q, n_k]
    bias = slope[:, None, None] * rel[None]  # [H, n_q, n_k]
    mask = causal_mask(n_q, n_k) if causal_mask_on else None
    res = _dot_family(
        q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), bias=bias, mask=mask, allowed=allowed
    )
    if dout is not None:
        dL = res["grads"].pop("_dL")
        res["grads"]["slope"] = (dL * rel).sum(axis=(0, 2, 3))
    return res


def relative_bias(q, k, v, dout=None, *, table, allowed=None):
    """logits = q . k / sqrt(d) + table[h, clamp(j - i, -128, 128) + 128].

    d/d table[h, t] = sum of dL[b,h,i,j] over the (b, i, j) whose clipped offset is t.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    H = q.shape[1]
    table = np.asarray(table, dtype=np.float64)
    assert table.shape == (H, 257)
    i, j = positions(n_q, n_k)
    idx = np.clip(j - i, -128, 128) + 128  # [n_q, n_k]
    bias = table[:, idx]  # [H, n_q, n_k]
    res = _dot_family(q, k, v, dout, scale=1.0 / np.sqrt(q.shape[-1]), bias=bias, allowed=allowed)
    if dout is not None:
        dL = res["grads"].pop("_dL").sum(axis=0)  # [H, n_q, n_k]
        dtable = np.zeros_like(table)
        for t in np.unique(idx):
            dtable[:, t] = dL[:, idx == t].sum(axis=-1)
        res["grads"]["table"] = dtable
    return res


def sigmoid_attention(q, k, v, dout=None, *, allowed=None):
    """Ramapuram et al. 2024: W = sigmoid(q . k / sqrt(d) - log(n_k)); sigma' = s(1 - s)."""
    shift = np.log(k.shape[2])

    def f(L):
        return sigmoid(L - shift)

    def fprime(L):
        s = sigmoid(L - shift)
        return s * (1.0 - s)

    return _strip(
        _dot_family(
            q,
            k,
            v,
            dout,
            scale=1.0 / np.sqrt(q.shape[-1]),
            normalize="elementwise",
            f=f,
            fprime=fprime,
            allowed=allowed,
        )
    )


def relu_attention(q, k, v, dout=None, *, allowed=None):
    """Wortsman et al. 2023: W = relu(q . k / sqrt(d)) / n_k; relu'(0) = 0."""
    n_k = k.shape[2]
    return _strip(
        _dot_family(
            q,
            k,
            v,
            dout,
            scale=1.0 / np.sqrt(q.shape[-1]),
            normalize="elementwise",
            f=lambda L: np.maximum(L, 0.0) / n_k,
            fprime=lambda L: relu_grad(L) / n_k,
            allowed=allowed,
        )
    )


# ---- variants with their own score ---------------------------------------------------------


def _finish(L, A, vx, dout, normalize="softmax"):
    if normalize == "softmax":
        out, lse, dL, dvx = _softmax(L, A, vx, dout)
    else:
        out, dL, dvx = _sum(L, A, vx, dout)
        lse = None
    return out, lse, dL, dvx


def bahdanau(q, k, v, dout=None, *, Wq, Wk, w, allowed=None):
    """Bahdanau 2015: L_ij = sum_r w_r tanh((q_i Wq)_r + (k_j Wk)_r), softmax.

    With T = tanh(a_i + c_j) and P = dL * w * (1 - T^2) (per r):
      da_i = sum_j P_ij, dc_j = sum_i P_ij, dw = sum dL_ij T_ij,
      dq = da Wq^T, dWq = q^T da, dk = dc Wk^T, dWk = k^T dc.
    """
    H, KH = q.shape[1], k.shape[1]
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    a = q @ Wq  # [B, H, n_q, r]
    c = kx @ Wk  # [B, H, n_k, r]
    T = np.tanh(a[:, :, :, None, :] + c[:, :, None, :, :])  # [B, H, n_q, n_k, r]
    L = T @ w
    A = full_mask(L.shape, allowed)
    out, lse, dL, dvx = _finish(L, A, vx, dout)
    if dout is None:
        return _result(out, lse, None)
    P = dL[..., None] * w * (1.0 - T * T)
    da = P.sum(axis=3)
    dc = P.sum(axis=2)
    grads = {
        "q": da @ Wq.T,
        "k": reduce_kv(dc @ Wk.T, KH),
        "v": reduce_kv(dvx, KH),
        "Wq": np.einsum("bhid,bhir->dr", q, da),
        "Wk": np.einsum("bhjd,bhjr->dr", kx, dc),
        "w": np.einsum("bhij,bhijr->r", dL, T),
    }
    return _result(out, lse, grads)


def luong_general(q, k, v, dout=None, *, Wa, allowed=None):
    """Luong 2015 general: L_ij = (q_i Wa) . k_j, softmax.

    u = q Wa; du = dL k; dq = du Wa^T; dWa = q^T du; dk = dL^T u.
    """
    H, KH = q.shape[1], k.shape[1]
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    u = q @ Wa
    L = u @ np.swapaxes(kx, -1, -2)
    A = full_mask(L.shape, allowed)
    out, lse, dL, dvx = _finish(L, A, vx, dout)
    if dout is None:
        return _result(out, lse, None)
    du = dL @ kx
    grads = {
        "q": du @ Wa.T,
        "k": reduce_kv(np.swapaxes(dL, -1, -2) @ u, KH),
        "v": reduce_kv(dvx, KH),
        "Wa": np.einsum("bhid,bhie->de", q, du),
    }
    return _result(out, lse, grads)


def decomposable(q, k, v, dout=None, *, F, allowed=None):
    """Parikh et al. 2016 (one layer): L_ij = relu(q_i F) . relu(k_j F), softmax."""
    H, KH = q.shape[1], k.shape[1]
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    aq, ak = q @ F, kx @ F
    fq, fk = np.maximum(aq, 0.0), np.maximum(ak, 0.0)
    L = fq @ np.swapaxes(fk, -1, -2)
    A = full_mask(L.shape, allowed)
    out, lse, dL, dvx = _finish(L, A, vx, dout)
    if dout is None:
        return _result(out, lse, None)
    daq = (dL @ fk) * relu_grad(aq)
    dak = (np.swapaxes(dL, -1, -2) @ fq) * relu_grad(ak)
    grads = {
        "q": daq @ F.T,
        "k": reduce_kv(dak @ F.T, KH),
        "v": reduce_kv(dvx, KH),
        "F": np.einsum("bhid,bhir->dr", q, daq) + np.einsum("bhjd,bhjr->dr", kx, dak),
    }
    return _result(out, lse, grads)


def _linear(q, k, v, dout, mask, allowed):
    """Katharopoulos 2020: phi = elu + 1, L_ij = phi(q_i) . phi(k_j), W = L / sum_j L."""
    H, KH = q.shape[1], k.shape[1]
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    pq, pk = elu(q) + 1.0, elu(kx) + 1.0
    L = pq @ np.swapaxes(pk, -1, -2)
    A = full_mask(L.shape, mask)
    if allowed is not None:
        A = A & np.broadcast_to(allowed, L.shape)
    out, _lse, dL, dvx = _finish(L, A, vx, dout, normalize="sum")
    if dout is None:
        return _result(out, None, None)
    dq = (dL @ pk) * elu_grad(q)
    dkx = (np.swapaxes(dL, -1, -2) @ pq) * elu_grad(kx)
    return _result(out, None, {"q": dq, "k": reduce_kv(dkx, KH), "v": reduce_kv(dvx, KH)})


def linear(q, k, v, dout=None, *, allowed=None):
    return _linear(q, k, v, dout, None, allowed)


def causal_linear(q, k, v, dout=None, *, allowed=None):
    """The causal (recurrent) form: the same weights restricted to j <= i."""
    return _linear(q, k, v, dout, causal_mask(q.shape[2], k.shape[2]), allowed)


def causal_linear_recurrent(q, k, v):
    """Forward only, the RNN form of the paper: S_i = S_{i-1} + phi(k_i) v_i^T,
    z_i = z_{i-1} + phi(k_i), out_i = phi(q_i)^T S_i / (phi(q_i) . z_i). A cross-check."""
    B, H, n_q, d = q.shape
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    pq, pk = elu(q) + 1.0, elu(kx) + 1.0
    S = np.zeros((B, H, d, v.shape[-1]))
    z = np.zeros((B, H, d))
    out = np.zeros((B, H, n_q, v.shape[-1]))
    for t in range(n_q):
        if t < k.shape[2]:
            S = S + pk[:, :, t, :, None] * vx[:, :, t, None, :]
            z = z + pk[:, :, t]
        num = np.einsum("bhd,bhde->bhe", pq[:, :, t], S)
        den = np.einsum("bhd,bhd->bh", pq[:, :, t], z)
        out[:, :, t] = num / den[..., None]
    return out


def cosine(q, k, v, dout=None, *, tau, allowed=None):
    """Swin v2: L_ij = cos(q_i, k_j) / max(tau, 0.01), softmax.

    With qn = q/|q|, kn = k/|k|, C = qn kn^T and s = 1 / max(tau, 0.01):
      dC = s dL;  dq_i = ((dC kn)_i - (sum_j dC_ij C_ij) qn_i) / |q_i|  (and likewise k);
      ds = sum dL C;  dtau = ds * (-1 / max^2) * dmax/dtau, dmax/dtau = 1, 0, or 1/2 at a
      tie (PyTorch's convention for max).
    """
    H, KH = q.shape[1], k.shape[1]
    tau = float(tau)
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    nq = np.sqrt((q * q).sum(-1, keepdims=True))
    nk = np.sqrt((kx * kx).sum(-1, keepdims=True))
    qn, kn = q / nq, kx / nk
    C = qn @ np.swapaxes(kn, -1, -2)
    m = max(tau, 0.01)
    s = 1.0 / m
    L = C * s
    A = full_mask(L.shape, allowed)
    out, lse, dL, dvx = _finish(L, A, vx, dout)
    if dout is None:
        return _result(out, lse, None)
    dC = dL * s
    dq = (dC @ kn - (dC * C).sum(-1, keepdims=True) * qn) / nq
    dCt = np.swapaxes(dC, -1, -2)
    dkx = (dCt @ qn - (dCt * np.swapaxes(C, -1, -2)).sum(-1, keepdims=True) * kn) / nk
    dmax = 1.0 if tau > 0.01 else (0.0 if tau < 0.01 else 0.5)
    dtau = (dL * C).sum() * (-1.0 / (m * m)) * dmax
    grads = {"q": dq, "k": reduce_kv(dkx, KH), "v": reduce_kv(dvx, KH), "tau": np.asarray(dtau)}
    return _result(out, lse, grads)


# name of the example -> (reference, names of its params, names of its indices)
REFERENCES = {
    "scaled_dot_product": (scaled_dot_product, (), ()),
    "multi_head_gqa": (multi_head_gqa, (), ()),
    "causal": (causal, (), ()),
    "luong_dot": (luong_dot, (), ()),
    "luong_general": (luong_general, ("Wa",), ()),
    "bahdanau": (bahdanau, ("Wq", "Wk", "w"), ()),
    "alibi": (alibi, ("slope",), ()),
    "softcap": (softcap, (), ()),
    "sliding_window": (sliding_window, (), ()),
    "sliding_window_sink": (sliding_window_sink, ("sink",), ()),
    "prefix_lm": (prefix_lm, (), ("prefix",)),
    "document": (document, (), ("doc",)),
    "relative_bias": (relative_bias, ("table",), ()),
    "cosine": (cosine, ("tau",), ()),
    "sigmoid": (sigmoid_attention, (), ()),
    "linear": (linear, (), ()),
    "causal_linear": (causal_linear, (), ()),
    "relu": (relu_attention, (), ()),
    "decomposable": (decomposable, ("F",), ()),
    "spatial_window": (spatial_window, (), ()),
}

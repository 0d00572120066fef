"""Independent NumPy implementations (explicit Python loops over time) for tests.

Forward passes and hand-derived backpropagation through time, written from the
equations in float64 with no shared code with models/.
"""

from __future__ import annotations

import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


ACT = {
    "tanh": (np.tanh, lambda a, h: 1.0 - h**2),
    "relu": (lambda a: np.maximum(a, 0.0), lambda a, h: (a > 0).astype(a.dtype)),
    "identity": (lambda a: a, lambda a, h: np.ones_like(a)),
}


def rnn_forward(w_x, w_h, b, x_BxTxD, h0, mask_BxT, activation, residual=False):
    """Hidden states (B, T, H) and pre-activations of h_t = act(x_t W_x + h_{t-1} W_h + b)
    (plus h_{t-1} when residual)."""
    act = ACT[activation][0]
    steps = x_BxTxD.shape[1]
    h = h0.copy()
    hs, pre = [], []
    for t in range(steps):
        a = x_BxTxD[:, t] @ w_x + h @ w_h + b
        h_new = act(a) + (h if residual else 0.0)
        m = mask_BxT[:, t][:, None]
        h = np.where(m, h_new, h)
        hs.append(h)
        pre.append(a)
    return np.stack(hs, 1), np.stack(pre, 1)


def rnn_backward(w_x, w_h, b, x, h0, mask, activation, g_hs, residual=False):
    """Gradients of L = sum(g_hs * hs) w.r.t. (w_x, w_h, b, x, h0), by BPTT."""
    d_act = ACT[activation][1]
    hs, pre = rnn_forward(w_x, w_h, b, x, h0, mask, activation, residual)
    steps = x.shape[1]
    dw_x, dw_h, db = np.zeros_like(w_x), np.zeros_like(w_h), np.zeros_like(b)
    dx = np.zeros_like(x)
    dh_next = np.zeros_like(h0)
    for t in reversed(range(steps)):
        h_prev = h0 if t == 0 else hs[:, t - 1]
        dh = g_hs[:, t] + dh_next
        m = mask[:, t][:, None]
        h_new = ACT[activation][0](pre[:, t])
        da = np.where(m, dh * d_act(pre[:, t], h_new), 0.0)
        dw_x += x[:, t].T @ da
        dw_h += h_prev.T @ da
        db += da.sum(0)
        dx[:, t] = da @ w_x.T
        dh_next = da @ w_h.T + (dh if residual else np.where(m, 0.0, dh))
    return dw_x, dw_h, db, dx, dh_next


def lstm_forward(w_x, w_h, b, x, h0, c0, mask):
    """(hs, cs, caches) of the LSTM with gate order [f, i, o, g] in the fused weights."""
    hidden = h0.shape[1]
    h, c = h0.copy(), c0.copy()
    hs, cs, caches = [], [], []
    for t in range(x.shape[1]):
        z = x[:, t] @ w_x + h @ w_h + b
        f = sigmoid(z[:, :hidden])
        i = sigmoid(z[:, hidden : 2 * hidden])
        o = sigmoid(z[:, 2 * hidden : 3 * hidden])
        g = np.tanh(z[:, 3 * hidden :])
        c_new = f * c + i * g
        h_new = np.tanh(c_new) * o
        m = mask[:, t][:, None]
        caches.append((f, i, o, g, c, h, c_new))
        c = np.where(m, c_new, c)
        h = np.where(m, h_new, h)
        hs.append(h)
        cs.append(c)
    return np.stack(hs, 1), np.stack(cs, 1), caches


def lstm_backward(w_x, w_h, b, x, h0, c0, mask, g_hs, g_cs):
    """Gradients of L = sum(g_hs * hs) + sum(g_cs * cs) w.r.t. (w_x, w_h, b, x, h0, c0)."""
    _, _, caches = lstm_forward(w_x, w_h, b, x, h0, c0, mask)
    dw_x, dw_h, db = np.zeros_like(w_x), np.zeros_like(w_h), np.zeros_like(b)
    dx = np.zeros_like(x)
    dh_next, dc_next = np.zeros_like(h0), np.zeros_like(c0)
    for t in reversed(range(x.shape[1])):
        f, i, o, g, c_prev, h_prev, c_new = caches[t]
        m = mask[:, t][:, None]
        dh = g_hs[:, t] + dh_next
        dc_total = g_cs[:, t] + dc_next
        # through the (possibly held) state
        dh_new = np.where(m, dh, 0.0)
        dc_new = np.where(m, dc_total, 0.0)
        do = dh_new * np.tanh(c_new)
        dc = dc_new + dh_new * o * (1 - np.tanh(c_new) ** 2)
        df, di, dg = dc * c_prev, dc * g, dc * i
        dz = np.concatenate(
            [df * f * (1 - f), di * i * (1 - i), do * o * (1 - o), dg * (1 - g**2)], axis=1
        )
        dw_x += x[:, t].T @ dz
        dw_h += h_prev.T @ dz
        db += dz.sum(0)
        dx[:, t] = dz @ w_x.T
        dh_next = dz @ w_h.T + np.where(m, 0.0, dh)
        dc_next = dc * f + np.where(m, 0.0, dc_total)
    return dw_x, dw_h, db, dx, dh_next, dc_next


def gru_forward(w_x, w_h, b, b_hn, x, h0, mask):
    """GRU hidden states, PyTorch formulation, gate order [r, z, n]."""
    hidden = h0.shape[1]
    h = h0.copy()
    hs = []
    for t in range(x.shape[1]):
        xp = x[:, t] @ w_x + b
        hp = h @ w_h
        r = sigmoid(xp[:, :hidden] + hp[:, :hidden])
        z = sigmoid(xp[:, hidden : 2 * hidden] + hp[:, hidden : 2 * hidden])
        n = np.tanh(xp[:, 2 * hidden :] + r * (hp[:, 2 * hidden :] + b_hn))
        h_new = (1 - z) * n + z * h
        h = np.where(mask[:, t][:, None], h_new, h)
        hs.append(h)
    return np.stack(hs, 1)


def numerical_grad(f, x, eps=1e-6):
    """Central finite differences of scalar f at array x (float64)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + eps
        up = f(x)
        x[idx] = old - eps
        down = f(x)
        x[idx] = old
        grad[idx] = (up - down) / (2 * eps)
    return grad

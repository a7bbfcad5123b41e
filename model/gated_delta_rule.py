"""The gated delta rule scan of Gated DeltaNet, two ways that must agree.

Per value head, with state S (Dk x Dv), for each token t:

    S   <- exp(g_t) * S                              (gated decay, g_t <= 0, log space)
    d_t  = beta_t * (v_t - S^T k_t)                  (delta rule: correct what S predicts for k_t)
    S   <- S + k_t d_t^T
    o_t  = S^T (scale * q_t)

`recurrent_gated_delta_rule` runs exactly that loop (decode, and the oracle); `chunk_gated_delta_rule`
computes the same thing chunk by chunk in the WY form (prefill): inside a chunk the deltas solve a
unit lower-triangular system, so the sequential part is one state update per chunk.

Both take q, k already L2-normalised and expanded to the value heads, and compute in float32 whatever
the input dtype: the state is a long-lived accumulator (an FP16 state is known to wreck accuracy).

Shapes: q, k [B, T, H, Dk]; v [B, T, H, Dv]; g, beta [B, T, H]; state [B, H, Dk, Dv].
Returns (o [B, T, H, Dv] float32, final state [B, H, Dk, Dv] float32).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 64


def _prepare(q, k, v, g, beta, initial_state, scale):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if scale is None:
        scale = Dk**-0.5
    f32 = torch.float32
    q = q.to(f32) * scale
    k, v, g, beta = (x.to(f32) for x in (k, v, g, beta))
    if initial_state is None:
        state = torch.zeros(B, H, Dk, Dv, dtype=f32, device=q.device)
    else:
        state = initial_state.to(f32).clone()
    return q, k, v, g, beta, state


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None):
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, initial_state, scale)
    T = q.shape[1]
    out = torch.empty(*v.shape, dtype=torch.float32, device=v.device)
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        delta = (v[:, t] - predicted) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return out, S


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE):
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, initial_state, scale)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    # [B, T, H, D] -> [B, H, N, C, D]; padded tokens have k = v = beta = g = 0 and change nothing.
    def chunks(x):
        x = x.transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))

    G = g.cumsum(-1)  # log of the decay from the chunk start to token i (inclusive)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strictly_lower = causal.tril(-1)
    # decay[i, j] = exp(G_i - G_j) for j <= i: the decay a token j contribution sees by token i.
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    # Deltas of the chunk: (I + L) D = beta*V - beta*exp(G)*K S0, with
    # L[i, j] = beta_i exp(G_i - G_j) <k_i, k_j> for j < i.
    k_beta = k * beta[..., None]
    L = (k_beta @ k.transpose(-1, -2) * decay).masked_fill(~strictly_lower, 0.0)
    eye = torch.eye(C, dtype=torch.float32, device=q.device)
    system = L + eye
    U = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(system, k_beta * G.exp()[..., None], upper=False, unitriangular=True)

    intra = (q @ k.transpose(-1, -2)) * decay  # causal q.k with decay, diagonal included
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]  # decay from each token to the chunk end

    out = torch.empty(B, H, N, C, Dv, dtype=torch.float32, device=q.device)
    for n in range(N):
        delta = U[:, :, n] - W[:, :, n] @ S
        out[:, :, n] = q_decayed[:, :, n] @ S + intra[:, :, n] @ delta
        S = S * G[:, :, n, -1].exp()[..., None, None] + k_to_end[:, :, n].transpose(-1, -2) @ delta

    out = out.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2)
    return out, S


def gated_delta_rule(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE):
    """The reference's choice: the recurrent form for a single token, the chunked form otherwise."""
    if q.shape[1] == 1:
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, scale)
    return chunk_gated_delta_rule(q, k, v, g, beta, initial_state, scale, chunk_size)

"""How many bf16 parts the split prefill's state pass needs (plugins/linear_attention/split.cuh, bf16 path): the
chunk recurrence in float64 with the state (the B operand of K S, Q S) and the scaled deltas (the B operand of
K^T D) rounded to 1, 2 or 3 bf16 parts, and the products D = M R, P D with both operands in 2 bf16 parts,
against the same recurrence unrounded. Inputs drawn as in
bench/device/split_profile.py (decay bound varied), rounded to bf16. CPU only, ~1 min:

    .venv/bin/python bench/gdn_bf16_parts.py
"""
import torch
torch.manual_seed(0)
C, Dk, Dv = 64, 128, 128

def parts(x, n):
    if n is None: return x
    out = torch.zeros_like(x); rest = x.clone()
    for _ in range(n):
        p = rest.to(torch.bfloat16).to(torch.float64); out += p; rest -= p
    return out

def run(q, k, v, g, beta, s0, n, mp=None):
    """n: bf16 parts of the state and scaled deltas (None: exact); mp: bf16 parts of both operands of D = M R and
    P D (M, P, R, D; the cross term lo x lo dropped, as an mma split would), None: exact (the kernel's split-tf32
    is ~2^-22 there)."""
    T = q.shape[0]; S = s0.clone(); outs = []
    scale = Dk ** -0.5

    def lower(A, B):
        if mp is None: return A @ B
        a, b = parts(A, 1), parts(B, 1)
        out = a @ b
        if mp >= 2:
            out = out + (parts(A, 2) - a) @ b + a @ (parts(B, 2) - b)
        return out

    for c0 in range(0, T, C):
        K, Q, V = k[c0:c0+C], q[c0:c0+C], v[c0:c0+C]
        G = torch.cumsum(g[c0:c0+C], 0); b = beta[c0:c0+C]
        L = torch.tril(b[:, None] * torch.exp(G[:, None] - G[None, :]) * (K @ K.T), -1)
        M = torch.linalg.solve_triangular(torch.eye(C, dtype=L.dtype) + L, torch.diag(b), upper=False)
        P = torch.tril(scale * torch.exp(G[:, None] - G[None, :]) * (Q @ K.T))
        S2 = parts(S, n)
        R = V - torch.exp(G)[:, None] * (K @ S2)
        D = lower(M, R)
        O = scale * torch.exp(G)[:, None] * (Q @ S2) + lower(P, D)
        W = torch.exp(G[-1] - G)[:, None] * D
        S = torch.exp(G[-1]) * S + K.T @ parts(W, n)
        outs.append(O)
    return torch.cat(outs), S


for T, dec in ((4096, 0.5), (4096, 0.02), (16384, 0.02)):
    q = torch.nn.functional.normalize(torch.randn(T, Dk), dim=-1).to(torch.bfloat16).double()
    k = torch.nn.functional.normalize(torch.randn(T, Dk), dim=-1).to(torch.bfloat16).double()
    v = torch.randn(T, Dv).to(torch.bfloat16).double()
    g = (-torch.rand(T) * dec).to(torch.bfloat16).double()
    beta = torch.rand(T).to(torch.bfloat16).double()
    s0 = torch.randn(Dk, Dv, dtype=torch.float64) * 0.1
    o_ref, s_ref = run(q, k, v, g, beta, s0, None)
    for n, mp in ((1, None), (2, None), (3, None), (2, 2), (3, 2)):
        o, s = run(q, k, v, g, beta, s0, n, mp)
        es = ((s - s_ref).abs().max() / s_ref.abs().max()).item()
        eo = ((o - o_ref).abs().max() / o_ref.abs().max()).item()
        what = f"{n} bf16 part(s) of S, D" + (f"; M R, P D in {mp} bf16 parts" if mp else "")
        print(f"T={T} decay<= {dec}: {what}: state max rel {es:.2e}, output max rel {eo:.2e}", flush=True)

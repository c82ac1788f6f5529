"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024, arXiv:2412.06464).

Per value head, with a state S ∈ R^{D_k × D_v} (K-major) and, per token t, the L2-normalised key k̂_t, the
normalised and scaled query q̃_t = q̂_t · scale, the value v_t, the log-decay g_t ≤ 0 (α_t = e^{g_t}) and the
write strength β_t ∈ [0, 1]:

    S ← α_t S                       decay first ...
    u_t = β_t (v_t − Sᵀ k̂_t)        ... then the delta correction against the *decayed* state (pitfall B1, fla#885)
    S ← S + k̂_t u_tᵀ                update
    o_t = Sᵀ q̃_t                    read-out from the updated state (a token sees itself)

equivalently S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ.  Two forms compute it:

- `recurrent_gated_delta_rule`: the per-token loop above — the ground truth.
- `chunk_gated_delta_rule`: the WY / UT-transform chunked form (arXiv:2406.06484; derivation in
  docs/gated_deltanet.md),
  matrix products per chunk, sequential only across chunks.  Equal to the loop to ~1e-13 in float64.

The signature shared with the optimized twins — keyword-only after q, k, v so g and beta cannot be swapped:

    q, k:          [B, T, H_k, D_k]
    v:             [B, T, H_v, D_v]             H_v = r · H_k; value head h reads key head h // r
    g, beta:       [B, T, H_v]
    initial_state: [N, H_v, D_k, D_v] or None  (N = B, or the number of packed sequences with cu_seqlens)
    cu_seqlens:    [N+1] or None                (then B = 1 and the N sequences never see each other)
    returns o [B, T, H_v, D_v] and final_state [N, H_v, D_k, D_v] (None unless output_final_state)
"""
from __future__ import annotations

import numpy as np

from reference.norms import l2_norm
from reference.packing import check_cu_seqlens

__all__ = ["recurrent_gated_delta_rule", "chunk_gated_delta_rule"]


def _prepare(q, k, v, g, beta, *, scale, initial_state, use_qk_l2norm, cu_seqlens, dtype, who):
    """Validate the shared signature, normalise q/k, and list the sequences.

    Returns (q̃ [B, T, H_v, D_k], k̂ [B, T, H_v, D_k], v, g, beta, segments, state0 [N, H_v, D_k, D_v]), where q̃ and
    k̂ are already expanded to value heads and `segments` lists (row, start, end) per sequence.
    """
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    g, beta = np.asarray(g, dtype=dtype), np.asarray(beta, dtype=dtype)
    if q.ndim != 4:
        raise ValueError(f"{who}: q must be [B, T, H_k, D_k], got {q.shape}")
    B, T, H_k, D_k = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{who}: k must have the shape of q {q.shape} = [B, T, H_k, D_k], got {k.shape}")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"{who}: v must be [B={B}, T={T}, H_v, D_v], got {v.shape}")
    H_v, D_v = v.shape[2:]
    if H_k == 0 or H_v % H_k != 0:
        raise ValueError(f"{who}: value heads H_v={H_v} must be a multiple of key heads H_k={H_k}")
    for name, a in (("g", g), ("beta", beta)):
        if a.shape != (B, T, H_v):
            raise ValueError(f"{who}: {name} must be [B={B}, T={T}, H_v={H_v}], got {a.shape}")

    if cu_seqlens is None:
        segments = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"{who}: with cu_seqlens the batch must be 1 (packed sequences), got B={B}")
        cu = check_cu_seqlens(cu_seqlens, T, who)
        segments = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    N = len(segments)

    if initial_state is None:
        state0 = np.zeros((N, H_v, D_k, D_v), dtype=dtype)
    else:
        state0 = np.asarray(initial_state, dtype=dtype)
        if state0.shape != (N, H_v, D_k, D_v):
            raise ValueError(
                f"{who}: initial_state must be [N={N}, H_v={H_v}, D_k={D_k}, D_v={D_v}] (K-major), got {state0.shape}"
            )

    if use_qk_l2norm:  # HF `l2norm`: x · (Σx² + 1e-6)^(-1/2), eps inside the sqrt (pitfall B5)
        q, k = l2_norm(q, 1e-6, dtype=dtype), l2_norm(k, 1e-6, dtype=dtype)
    scale = D_k ** -0.5 if scale is None else scale
    q = q * np.dtype(dtype).type(scale)

    # Grouped value attention: value head h reads key head h // r (repeat_interleave on the head axis, as HF).
    kv_head = np.arange(H_v) // (H_v // H_k)  # [H_v]
    q, k = q[:, :, kv_head], k[:, :, kv_head]  # [B, T, H_v, D_k]
    return q, k, v, g, beta, segments, state0


def recurrent_gated_delta_rule(
    q,
    k,
    v,
    *,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=True,
    use_qk_l2norm=True,
    cu_seqlens=None,
    dtype=np.float64,
):
    """Gated delta rule, token by token (the ground truth; HF `torch_recurrent_gated_delta_rule`).

        S ← e^{g_t} S;   u_t = β_t (v_t − Sᵀ k̂_t);   S ← S + k̂_t u_tᵀ;   o_t = Sᵀ q̃_t

    with k̂ = l2_norm(k), q̃ = l2_norm(q) · scale when `use_qk_l2norm` (else k̂ = k, q̃ = q · scale).

    Args:
        q, k:          [B, T, H_k, D_k]
        v:             [B, T, H_v, D_v]
        g:             [B, T, H_v]   log-space decay (≤ 0 for a contraction; any real value is accepted)
        beta:          [B, T, H_v]
        scale:         multiplies q̃; default D_k^(-1/2)
        initial_state: [N, H_v, D_k, D_v] or None (zeros)
        cu_seqlens:    [N+1] or None (then N = B)
        dtype:         compute and output dtype (float64 default; np.float32 mirrors an fp32 kernel)
    Returns:
        o:           [B, T, H_v, D_v]
        final_state: [N, H_v, D_k, D_v]  (None unless output_final_state)
    """
    q, k, v, g, beta, segments, state0 = _prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens, dtype=dtype, who="recurrent_gated_delta_rule")
    o = np.zeros(v.shape, dtype=dtype)  # [B, T, H_v, D_v]
    final = np.empty_like(state0)  # [N, H_v, D_k, D_v]
    for n, (b, s, e) in enumerate(segments):
        S = state0[n].copy()  # [H_v, D_k, D_v]
        for t in range(s, e):
            q_t, k_t, v_t = q[b, t], k[b, t], v[b, t]  # [H_v, D_k], [H_v, D_k], [H_v, D_v]
            S = np.exp(g[b, t])[:, None, None] * S  # decay first (B1)
            kS = np.einsum("hk,hkv->hv", k_t, S)  # Sᵀ k̂  [H_v, D_v]
            u = beta[b, t][:, None] * (v_t - kS)  # delta correction  [H_v, D_v]
            S = S + k_t[:, :, None] * u[:, None, :]  # rank-1 update  [H_v, D_k, D_v]
            o[b, t] = np.einsum("hk,hkv->hv", q_t, S)  # read-out after the update  [H_v, D_v]
        final[n] = S
    return o, (final if output_final_state else None)


def _solve_unit_lower(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve (I + A) X = rhs by forward substitution, A strictly lower triangular (the UT transform).

    Shapes: A [H, C, C], rhs [H, C, D] -> X [H, C, D].  Row i:  X_i = rhs_i − Σ_{j<i} A_ij X_j.
    """
    X = np.empty_like(rhs)
    for i in range(rhs.shape[1]):
        X[:, i] = rhs[:, i] - np.einsum("hj,hjd->hd", A[:, i, :i], X[:, :i])
    return X


def chunk_gated_delta_rule(
    q,
    k,
    v,
    *,
    g,
    beta,
    scale=None,
    initial_state=None,
    output_final_state=True,
    use_qk_l2norm=True,
    cu_seqlens=None,
    chunk_size=64,
    dtype=np.float64,
):
    """Gated delta rule in the chunked WY / UT-transform form (derivation in docs/gated_deltanet.md).

    Per sequence, per chunk of C tokens (the last chunk may be shorter) with start state S0, all heads at once:

        G_i    = Σ_{j≤i} g_j                       (cumulative log-decay inside the chunk), γ_i = e^{G_i}
        A_ij   = β_i (k̂_i·k̂_j) e^{G_i−G_j}          for i > j, else 0
        W      = (I + A)^{-1} diag(β γ) K̂          [C, D_k]
        U      = (I + A)^{-1} diag(β) V            [C, D_v]
        V_new  = U − W S0                          (the true delta-corrected values u_i)
        O      = (Q̃ ⊙ γ) S0 + [(Q̃ K̂ᵀ) ⊙ e^{G_i−G_j} ⊙ 1(i ≥ j)] V_new      (diagonal included)
        S1     = γ_C S0 + (K̂ ⊙ e^{G_C−G})ᵀ V_new

    A tail chunk shorter than C is processed as it is, so no padding is needed and G_C is the last *real* token's
    cumulative decay (reading it from padding corrupted the final state in cuLA#38, pitfall B15).  Masks are applied
    to the exponent (−∞ above the diagonal) so e^{G_i−G_j} never overflows when g ≪ 0 (pitfall B6).

    Args: as `recurrent_gated_delta_rule`, plus
        chunk_size: C ≥ 1, any value (not only powers of two)
    Returns:
        o:           [B, T, H_v, D_v]
        final_state: [N, H_v, D_k, D_v]  (None unless output_final_state)
    """
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_gated_delta_rule: chunk_size must be a positive integer, got {chunk_size}")
    C = int(chunk_size)
    q, k, v, g, beta, segments, state0 = _prepare(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, use_qk_l2norm=use_qk_l2norm,
        cu_seqlens=cu_seqlens, dtype=dtype, who="chunk_gated_delta_rule")
    o = np.zeros(v.shape, dtype=dtype)  # [B, T, H_v, D_v]
    final = np.empty_like(state0)  # [N, H_v, D_k, D_v]
    neg_inf = np.dtype(dtype).type(-np.inf)
    for n, (b, s, e) in enumerate(segments):
        S = state0[n].copy()  # [H_v, D_k, D_v]
        for c0 in range(s, e, C):
            c1 = min(c0 + C, e)
            L = c1 - c0
            # Head-major views of the chunk.
            Qc = q[b, c0:c1].transpose(1, 0, 2)  # [H_v, L, D_k]
            Kc = k[b, c0:c1].transpose(1, 0, 2)  # [H_v, L, D_k]
            Vc = v[b, c0:c1].transpose(1, 0, 2)  # [H_v, L, D_v]
            bc = beta[b, c0:c1].T  # [H_v, L]
            G = np.cumsum(g[b, c0:c1].T, axis=1)  # [H_v, L]  cumulative log-decay inside the chunk

            # Pairwise decay e^{G_i − G_j} on and below the diagonal; −∞ exponent above it (no overflow).
            diff = G[:, :, None] - G[:, None, :]  # [H_v, L, L]
            lower_incl = np.tril(np.ones((L, L), dtype=bool))
            decay = np.exp(np.where(lower_incl, diff, neg_inf))  # [H_v, L, L]
            strict = np.tril(np.ones((L, L), dtype=bool), k=-1)

            KK = Kc @ Kc.transpose(0, 2, 1)  # [H_v, L, L]  k̂_i · k̂_j
            A = np.where(strict, bc[:, :, None] * KK * decay, 0.0)  # [H_v, L, L]  strictly lower
            gamma = np.exp(G)  # [H_v, L]

            # UT transform: W = (I + A)^{-1} diag(βγ) K̂,  U = (I + A)^{-1} diag(β) V.
            W = _solve_unit_lower(A, (bc * gamma)[:, :, None] * Kc)  # [H_v, L, D_k]
            U = _solve_unit_lower(A, bc[:, :, None] * Vc)  # [H_v, L, D_v]

            V_new = U - W @ S  # [H_v, L, D_v]  true delta-corrected values u_i
            QK = Qc @ Kc.transpose(0, 2, 1)  # [H_v, L, L]
            O = (Qc * gamma[:, :, None]) @ S + (QK * decay) @ V_new  # [H_v, L, D_v]  (decay is 0 above diag)
            o[b, c0:c1] = O.transpose(1, 0, 2)  # [L, H_v, D_v]

            G_last = G[:, -1]  # [H_v]  the last real token of this chunk
            K_to_end = Kc * np.exp(G_last[:, None] - G)[:, :, None]  # [H_v, L, D_k]  decay from j to chunk end
            S = np.exp(G_last)[:, None, None] * S + K_to_end.transpose(0, 2, 1) @ V_new  # [H_v, D_k, D_v]
        final[n] = S
    return o, (final if output_final_state else None)

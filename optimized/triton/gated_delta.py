"""Triton kernels for the gated delta rule (Gated DeltaNet, arXiv:2412.06464; docs/gated_deltanet.md).

Version log
-------------
v1 (this file)
  * chunked prefill in two kernels, both reading the raw q/k/v/g/β (L2 norm, scale, GVA fused in):
      1. `_gdn_chunk_prep_kernel`   grid (chunks, H_v), fully parallel.  Per chunk of C tokens: G = cumsum(g),
         A = strict_lower(β k̂k̂ᵀ ⊙ e^{Gi−Gj}), the UT inverse T = (I + A)⁻¹ by *blocked* forward substitution
         (right-looking elimination inside the 16×16 diagonal blocks, then the strictly block-lower part folded in
         by a Neumann series evaluated with Horner — C/16 matmuls in all, exact because that part is nilpotent),
         W = T·diag(β e^G)·K̂, U = T·diag(β)·V, and Aqk = tril_incl(q̃k̂ᵀ ⊙ e^{Gi−Gj}).  Scratch is fp32 and
         token-indexed ([T_total, H_v, ·]) so chunks of packed sequences need no padding.
      2. `_gdn_chunk_state_output_kernel`  grid (N, H_v, D_v/BV), sequential over the chunks of one sequence,
         fp32 state S[D_k, BV] in registers: V_new = U − W S;  O = (q̃ ⊙ e^G) S + Aqk V_new  (output fused here,
         so the per-chunk states are never written to memory);  S ← e^{G_C} S + (k̂ ⊙ e^{G_C−G})ᵀ V_new.
    The state columns (D_v) are independent, which is what lets kernel 2 split D_v across programs.
  * per-token recurrence `_gdn_recurrent_kernel` grid (N, H_v, D_v/BV), and the decode step
    `_gdn_decode_kernel` grid (B, H_v, D_v/BV) that reads and writes the fp32 state pool in place at
    `slot_ids[b]`; slot −1 is a padding row: output zeros, no load or store of any slot (pitfall B9).
  * varlen: chunk table (start, end) per chunk built on the host from cu_seqlens, so a chunk never crosses a
    sequence boundary (pitfall B13); the tail chunk's G_C is read at the last *valid* token and padded rows load
    k = q = v = g = β = 0 (pitfall B15).  e^{Gi−Gj} is only evaluated on the lower triangle (the argument is
    masked to 0 before exp, so the upper triangle can never make an inf that a mask turns into NaN; pitfall B6).
  The sequential kernel's D_v block is capped at 64 on a GPU (shared memory of the pipelined tiles, measured with
  ptxas for sm_90), with a launch-time fallback to fewer stages / narrower blocks on GPUs that refuse a variant.
  Head counts and widths are runtime arguments (only block sizes and flags are constexpr), so one compiled
  variant serves every shape with the same power-of-two block sizes (few recompiles on a GPU).
  Assumes: D_k ≤ 256 and D_v ≤ 256 (whole rows in registers; BK = next_pow2(D_k) ≥ 16), chunk_size ∈ {16, 32,
  64}, fp32 state and fp32 scratch whatever the input dtype, matmuls in IEEE fp32 for fp32 inputs and TF32 for
  bf16/fp16 inputs (the interpreter ignores input_precision).  Block sizes are fixed heuristics (no autotune: it
  needs a GPU driver under the interpreter).
  Ideas for v2 (need a GPU to judge): bf16 W/U/Aqk scratch and bf16 dot operands, a split prep kernel with the
  k̂k̂ᵀ blocks in tensor-core tiles, per-chunk state checkpoints so the output runs fully parallel.

Cost model (per value head; T tokens, C = chunk, K = D_k, V = D_v, n_c = ⌈T/C⌉)
  FLOPs, chunked:  n_c · [ 2C²K (k̂k̂ᵀ) + 2C²K (q̃k̂ᵀ) + ≈2C³·(C/16) (inverse) + 2C²K (W) + 2C²V (U)
                           + 2CKV (W S) + 2CKV (q̃ S) + 2C²V (Aqk V_new) + 2CKV (k̂ᵀ V_new) ]
                   ≈ T · (6CK + 4CV + 6KV) + the inverse; the per-token recurrence does ≈ 6KV + 2K + 2V per token.
  Bytes (compulsory): q, k: T·H_k·K·e each; v, o: T·H_v·V·e each; g, β: 2·T·H_v·4; states: 2·N·H_v·K·V·4
  (e = element size of the input dtype).  Scratch traffic on top (v1): W: T·H_v·K·4 written, read D_v/BV times;
  U: T·H_v·V·4 written once, read once; Aqk: T·H_v·C·4 written, read D_v/BV times; G: T·H_v·4.
  Decode step per (row, value head): FLOPs ≈ 6KV; bytes ≈ 2·K·V·4 (state read + write) + (2K + 2V)·e.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimized._checks import check_initial_state, cu_seqlens_list, gdn_shapes
from optimized.slots import check_slot_ids, check_slot_range
from optimized.triton._common import alloc, block, check_device, pow2

__all__ = [
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_update",
]

_L2_EPS = 1e-6  # HF `l2norm`: x · (Σx² + 1e-6)^(-1/2), eps inside the sqrt, on the sum (pitfall B5)


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _l2norm_rows(x, USE_L2: tl.constexpr):
    """x [R, BK] (fp32, padded columns 0) -> x · (Σx² + 1e-6)^(-1/2) per row when USE_L2."""
    if USE_L2:
        x = x / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]
    return x


@triton.jit
def _l2norm_vec(x, USE_L2: tl.constexpr):
    """x [BK] -> x · (Σx² + 1e-6)^(-1/2) when USE_L2."""
    if USE_L2:
        x = x / tl.sqrt(tl.sum(x * x, axis=0) + 1e-6)
    return x


@triton.jit
def _unit_lower_inverse(A, C: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """(I + A)⁻¹ for A [C, C] strictly lower triangular (fp32), by blocked forward substitution.

    1. Diagonal BS×BS blocks: right-looking elimination on the identity, all blocks at once.  Step s finalises
       local row s of every block and subtracts A[r, m]·X[m, :] from the rows r below it (m = block(r)·BS + s).
       X stays block-diagonal, so "row m restricted to its block" is a column-sum over rows with r % BS == s.
    2. Off-diagonal: with D = blockdiag(I + A)⁻¹ and L the strictly block-lower part of A,
       I + A = (I + A_diag)(I + D L)  ⇒  (I + A)⁻¹ = (I + N)⁻¹ D,  N = D L strictly block-lower, N^(C/BS) = 0,
       so (I + N)⁻¹ = I − N + N² − … evaluated by Horner:  Y = I − N;  Y ← I − N Y  (C/BS − 2 times).
    """
    r = tl.arange(0, C)
    ii = r[:, None]
    jj = r[None, :]
    same = (ii // BS) == (jj // BS)  # [C, C] inside one diagonal block
    eye = tl.where(ii == jj, 1.0, 0.0)  # [C, C] fp32
    Ad = tl.where(same, A, 0.0)
    X = eye
    for s in tl.static_range(BS - 1):
        v_s = tl.sum(tl.where((ii % BS) == s, X, 0.0), axis=0)  # [C]  X[block(c)·BS + s, c]
        col = tl.sum(tl.where(jj == (ii // BS) * BS + s, Ad, 0.0), axis=1)  # [C]  A[r, block(r)·BS + s]
        X = X - tl.where(same, col[:, None] * v_s[None, :], 0.0)
    if C > BS:
        Nm = tl.dot(X, tl.where(same, 0.0, A), input_precision=PREC)  # [C, C]  D·L
        Y = eye - Nm
        for _p in tl.static_range(C // BS - 2):
            Y = eye - tl.dot(Nm, Y, input_precision=PREC)
        X = tl.dot(Y, X, input_precision=PREC)
    return X


# ---------------------------------------------------------------------------------------------------------------
# Chunked prefill, kernel 1: per-chunk WY factors (parallel over chunks and value heads)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _gdn_chunk_prep_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr,  # [T, H_k, D_k] ×2, [T, H_v, D_v], [T, H_v] ×2
    chunk_ptr,  # [n_chunks, 2] int32: (first token, end token) of each chunk
    w_ptr, u_ptr, aqk_ptr, gcum_ptr,  # scratch fp32: [T, H_v, D_k], [T, H_v, D_v], [T, H_v, C], [T, H_v]
    scale,
    H_K, H_V, D_K, D_V,  # runtime: one compile serves every head count / width within a block size
    C: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BVA: tl.constexpr,
    USE_L2: tl.constexpr, PREC: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_hk = i_h // (H_V // H_K)  # grouped value attention: value head h reads key head h // r
    t0 = tl.load(chunk_ptr + 2 * i_c).to(tl.int64)
    t1 = tl.load(chunk_ptr + 2 * i_c + 1).to(tl.int64)

    r = tl.arange(0, C)
    rows = t0 + r  # [C] token index
    rmask = rows < t1
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BVA)
    m_k = rmask[:, None] & (dk < D_K)[None, :]
    m_v = rmask[:, None] & (dv < D_V)[None, :]

    qk_off = (rows[:, None] * H_K + i_hk) * D_K + dk[None, :]
    k = _l2norm_rows(tl.load(k_ptr + qk_off, mask=m_k, other=0.0).to(tl.float32), USE_L2)  # [C, BK] k̂
    q = _l2norm_rows(tl.load(q_ptr + qk_off, mask=m_k, other=0.0).to(tl.float32), USE_L2) * scale  # q̃
    g = tl.load(g_ptr + rows * H_V + i_h, mask=rmask, other=0.0).to(tl.float32)  # [C] padded: 0 (decay 1)
    beta = tl.load(beta_ptr + rows * H_V + i_h, mask=rmask, other=0.0).to(tl.float32)  # padded: 0 (no write)

    G = tl.cumsum(g, axis=0)  # [C] log decay from chunk start through token i
    tl.store(gcum_ptr + rows * H_V + i_h, G, mask=rmask)

    ii = r[:, None]
    jj = r[None, :]
    low = ii >= jj
    # e^{Gi−Gj} only on the lower triangle: the argument is masked before exp (pitfall B6)
    decay = tl.where(low, tl.exp(tl.where(low, G[:, None] - G[None, :], 0.0)), 0.0)  # [C, C]

    kk = tl.dot(k, tl.trans(k), input_precision=PREC)  # [C, C] k̂_i·k̂_j
    A = tl.where(ii > jj, kk * decay * beta[:, None], 0.0)  # strict lower, row i scaled by β_i
    aqk = tl.dot(q, tl.trans(k), input_precision=PREC) * decay  # [C, C] tril incl. diagonal
    tl.store(aqk_ptr + (rows[:, None] * H_V + i_h) * C + jj, aqk, mask=rmask[:, None])

    Tinv = _unit_lower_inverse(A, C, BS, PREC)  # [C, C] (I + A)⁻¹

    w = tl.dot(Tinv, k * (beta * tl.exp(G))[:, None], input_precision=PREC)  # [C, BK]  W = T diag(βγ) K̂
    tl.store(w_ptr + (rows[:, None] * H_V + i_h) * D_K + dk[None, :], w, mask=m_k)
    v = tl.load(v_ptr + (rows[:, None] * H_V + i_h) * D_V + dv[None, :], mask=m_v, other=0.0).to(tl.float32)
    u = tl.dot(Tinv, v * beta[:, None], input_precision=PREC)  # [C, BVA]  U = T diag(β) V
    tl.store(u_ptr + (rows[:, None] * H_V + i_h) * D_V + dv[None, :], u, mask=m_v)


# ---------------------------------------------------------------------------------------------------------------
# Chunked prefill, kernel 2: state recurrence over chunks with the output fused (sequential per sequence)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _gdn_chunk_state_output_kernel(
    q_ptr, k_ptr, w_ptr, u_ptr, aqk_ptr, gcum_ptr,
    cu_ptr,  # [N+1] int32
    h0_ptr, o_ptr, ht_ptr,  # [N, H_v, D_k, D_v], [T, H_v, D_v], [N, H_v, D_k, D_v]
    scale,
    H_K, H_V, D_K, D_V,  # runtime: one compile serves every head count / width within a block size
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    i_hk = i_h // (H_V // H_K)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    n_chunks = (eos - bos + C - 1) // C

    r = tl.arange(0, C)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    kmask = dk < D_K
    vmask = dv < D_V
    s_off = ((i_n * H_V + i_h) * D_K + dk[:, None]) * D_V + dv[None, :]  # [BK, BV]
    s_mask = kmask[:, None] & vmask[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)

    for i_c in range(0, n_chunks):
        t0 = bos + i_c * C
        rows = t0 + r
        rmask = rows < eos
        m_k = rmask[:, None] & kmask[None, :]
        m_v = rmask[:, None] & vmask[None, :]
        t_last = tl.minimum(t0 + C, eos) - 1  # last *valid* token of the chunk (pitfall B15)
        g_last = tl.load(gcum_ptr + t_last * H_V + i_h)
        G = tl.load(gcum_ptr + rows * H_V + i_h, mask=rmask, other=0.0)  # [C]

        qk_off = (rows[:, None] * H_K + i_hk) * D_K + dk[None, :]
        k = _l2norm_rows(tl.load(k_ptr + qk_off, mask=m_k, other=0.0).to(tl.float32), USE_L2)
        q = _l2norm_rows(tl.load(q_ptr + qk_off, mask=m_k, other=0.0).to(tl.float32), USE_L2) * scale
        w = tl.load(w_ptr + (rows[:, None] * H_V + i_h) * D_K + dk[None, :], mask=m_k, other=0.0)  # [C, BK]
        u = tl.load(u_ptr + (rows[:, None] * H_V + i_h) * D_V + dv[None, :], mask=m_v, other=0.0)  # [C, BV]
        aqk = tl.load(aqk_ptr + (rows[:, None] * H_V + i_h) * C + r[None, :], mask=rmask[:, None], other=0.0)

        v_new = u - tl.dot(w, S, input_precision=PREC)  # [C, BV]  corrected values U − W S0
        o = tl.dot(q * tl.exp(G)[:, None], S, input_precision=PREC)  # inter-chunk part (q̃ ⊙ γ) S0
        o += tl.dot(aqk, v_new, input_precision=PREC)  # intra-chunk part, diagonal included
        tl.store(o_ptr + (rows[:, None] * H_V + i_h) * D_V + dv[None, :], o.to(o_ptr.dtype.element_ty), mask=m_v)

        kd = k * tl.where(rmask, tl.exp(g_last - G), 0.0)[:, None]  # [C, BK]  k̂ ⊙ e^{G_C − G}
        S = S * tl.exp(g_last) + tl.dot(tl.trans(kd), v_new, input_precision=PREC)

    if STORE_HT:
        tl.store(ht_ptr + s_off, S, mask=s_mask)


# ---------------------------------------------------------------------------------------------------------------
# Per-token recurrence (reference-shaped, any T) and the slot-indexed decode step
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _gdn_token_step(S, q, k, v, g, beta, scale, USE_L2: tl.constexpr):
    """One token: S ← e^g S; u = β(v − Sᵀk̂); S ← S + k̂uᵀ; o = Sᵀq̃ (decay before the delta, fla#885)."""
    k = _l2norm_vec(k, USE_L2)
    q = _l2norm_vec(q, USE_L2) * scale
    S = S * tl.exp(g)
    u = beta * (v - tl.sum(S * k[:, None], axis=0))  # [BV]
    S = S + k[:, None] * u[None, :]
    o = tl.sum(S * q[:, None], axis=0)  # [BV]
    return S, o


@triton.jit
def _gdn_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, cu_ptr, h0_ptr, o_ptr, ht_ptr,
    scale,
    H_K, H_V, D_K, D_V,  # runtime: one compile serves every head count / width within a block size
    BK: tl.constexpr, BV: tl.constexpr,
    USE_L2: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    i_hk = i_h // (H_V // H_K)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    kmask = dk < D_K
    vmask = dv < D_V
    s_off = ((i_n * H_V + i_h) * D_K + dk[:, None]) * D_V + dv[None, :]
    s_mask = kmask[:, None] & vmask[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        q = tl.load(q_ptr + (t * H_K + i_hk) * D_K + dk, mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + (t * H_K + i_hk) * D_K + dk, mask=kmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (t * H_V + i_h) * D_V + dv, mask=vmask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + t * H_V + i_h).to(tl.float32)
        beta = tl.load(beta_ptr + t * H_V + i_h).to(tl.float32)
        S, o = _gdn_token_step(S, q, k, v, g, beta, scale, USE_L2)
        tl.store(o_ptr + (t * H_V + i_h) * D_V + dv, o.to(o_ptr.dtype.element_ty), mask=vmask)
    if STORE_HT:
        tl.store(ht_ptr + s_off, S, mask=s_mask)


@triton.jit
def _gdn_decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr,  # [B, H_k, D_k] ×2, [B, H_v, D_v], [B, H_v] ×2
    slot_ptr,  # [B] int: pool row of each batch row, −1 = padding
    pool_ptr,  # [S, H_v, D_k, D_v] updated in place
    o_ptr,  # [B, H_v, D_v]
    scale,
    H_K, H_V, D_K, D_V,  # runtime: one compile serves every head count / width within a block size
    BK: tl.constexpr, BV: tl.constexpr, USE_L2: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    i_hk = i_h // (H_V // H_K)
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    dk = tl.arange(0, BK)
    dv = i_v * BV + tl.arange(0, BV)
    kmask = dk < D_K
    vmask = dv < D_V
    valid = (dv * 0 + slot) >= 0  # [BV]; padding rows never touch the pool (pitfall B9, sglang#27202)
    slot = tl.maximum(slot, 0)
    s_off = ((slot * H_V + i_h) * D_K + dk[:, None]) * D_V + dv[None, :]
    s_mask = kmask[:, None] & (vmask & valid)[None, :]
    S = tl.load(pool_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + (i_b * H_K + i_hk) * D_K + dk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + (i_b * H_K + i_hk) * D_K + dk, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + (i_b * H_V + i_h) * D_V + dv, mask=vmask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i_b * H_V + i_h).to(tl.float32)
    beta = tl.load(beta_ptr + i_b * H_V + i_h).to(tl.float32)
    S, o = _gdn_token_step(S, q, k, v, g, beta, scale, USE_L2)
    tl.store(pool_ptr + s_off, S.to(pool_ptr.dtype.element_ty), mask=s_mask)
    o = tl.where(valid, o, 0.0)
    tl.store(o_ptr + (i_b * H_V + i_h) * D_V + dv, o.to(o_ptr.dtype.element_ty), mask=vmask)


# ---------------------------------------------------------------------------------------------------------------
# Python wrappers (same names and signatures as the torch twins in optimized/)
# ---------------------------------------------------------------------------------------------------------------
def _validate(who, q, k, v, g, beta, initial_state, cu_seqlens):
    """Shapes of the shared signature -> (B, T, H_k, H_v, D_k, D_v, cu list, N)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    B, T, H_k, D_k, H_v, D_v = gdn_shapes(who, q, k, v, g, beta)
    if D_k > 256 or D_v > 256:
        raise ValueError(f"{who}: the Triton kernels hold whole head rows in registers: D_k, D_v <= 256, "
                         f"got D_k={D_k}, D_v={D_v}")
    if cu_seqlens is None:
        cu = [b * T for b in range(B + 1)]  # B sequences of T tokens, viewed as one packed row
    else:
        if B != 1:
            raise ValueError(f"{who}: with cu_seqlens the batch must be 1 (packed sequences), got B={B}")
        cu = cu_seqlens_list(cu_seqlens, T, who)
    N = len(cu) - 1
    check_initial_state(who, initial_state, N, H_v, D_k, D_v)
    check_device(who, q, k, v, g, beta, initial_state)
    return B, T, H_k, H_v, D_k, D_v, cu, N


def _dot_precision(dtype) -> str:
    # fp32 inputs must stay fp32 end to end (the 1e-5 budget); TF32 keeps 10 mantissa bits, more than bf16's 7.
    return "ieee" if dtype == torch.float32 else "tf32"


def _value_block(D_v: int, programs_without_split: int, device) -> int:
    """D_v split of the sequential kernels: under the interpreter one block (fewer programs = faster); on a GPU
    split D_v until there are enough programs to fill the SMs (the state columns are independent)."""
    BV = pow2(D_v, 16)
    if device.type != "cuda":
        return block("gdn_bv", BV)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # every extra D_v block re-reads W, Aqk, q and k: stop at 32 columns (≤ 4 blocks at D_v = 128)
    while BV > 32 and programs_without_split * (pow2(D_v, 16) // BV) < 2 * sms:
        BV //= 2
    return BV


def _state_kernel_configs(BV: int, BK: int, device) -> list[tuple[int, int]]:
    """(BV, num_stages) to try, best first, for `_gdn_chunk_state_output_kernel`.

    Software pipelining keeps the next chunk's tiles in shared memory.  Measured with ptxas for sm_90
    (scripts/gpu_bench.py --aot-check): D_k = 128 needs 164 KB at BV = 32 and 2 stages, 197 KB at BV = 64, 262 KB at
    BV = 128 (over sm_90's 227 KB), 287 KB with 3 stages; D_k = 256 needs 295 KB with 2 stages, 123 KB with 1.
    So cap BV at 64 (32 for D_k = 256), and if a GPU with less shared memory (sm_80: 163 KB, sm_86/89: 99 KB) still
    refuses the launch, fall back to fewer stages, then to narrower BV."""
    if device.type != "cuda":
        return [(BV, 1)]
    bv = min(BV, 64 if BK <= 128 else 32)
    stages = (2, 1) if BK <= 128 else (1,)
    cfgs = []
    while True:
        cfgs += [(bv, st) for st in stages]
        if bv <= 16:
            return cfgs
        bv //= 2


def _launch_first_fitting(configs, launch):
    """Call launch(*config) for the first config the GPU accepts (Triton raises OutOfResources at launch time,
    before anything runs, when a compiled variant needs more shared memory or registers than the device has)."""
    from triton.runtime.errors import OutOfResources

    for i, cfg in enumerate(configs):
        try:
            return launch(*cfg)
        except OutOfResources:
            if i == len(configs) - 1:
                raise


def chunk_gated_delta_rule(
    q, k, v, *, g, beta, scale=None, initial_state=None, output_final_state=True, use_qk_l2norm=True,
    cu_seqlens=None, chunk_size=64,
):
    """Chunked (WY / UT transform) gated delta rule on the GPU (or the Triton interpreter).

    Args:
        q, k:          [B, T, H_k, D_k]   raw (L2-normalised inside when use_qk_l2norm)
        v:             [B, T, H_v, D_v]   H_v = r·H_k; value head h reads key head h // r
        g, beta:       [B, T, H_v]        log decay (≤ 0) and write strength
        scale:         multiplies q̃; default D_k^(-1/2)
        initial_state: [N, H_v, D_k, D_v] or None (zeros); any float dtype, used in fp32
        cu_seqlens:    [N+1] int or None; with it B must be 1 and the N packed sequences never see each other
        chunk_size:    16, 32 or 64
    Returns:
        o:           [B, T, H_v, D_v] in v's dtype
        final_state: [N, H_v, D_k, D_v] fp32, or None unless output_final_state
    """
    who = "chunk_gated_delta_rule"
    B, T, H_k, H_v, D_k, D_v, cu, N = _validate(who, q, k, v, g, beta, initial_state, cu_seqlens)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"{who}: the Triton kernel supports chunk_size 16, 32 or 64, got {chunk_size}")
    dev = q.device
    C = int(chunk_size)
    scale = D_k ** -0.5 if scale is None else float(scale)
    T_all = B * T
    q2, k2 = q.contiguous().view(T_all, H_k, D_k), k.contiguous().view(T_all, H_k, D_k)
    v2 = v.contiguous().view(T_all, H_v, D_v)
    g2, b2 = g.contiguous().view(T_all, H_v), beta.contiguous().view(T_all, H_v)
    h0 = initial_state.contiguous() if initial_state is not None else None

    o = alloc((B, T, H_v, D_v), v.dtype, dev)
    ht = alloc((N, H_v, D_k, D_v), torch.float32, dev) if output_final_state else None
    # chunk table on the host: chunks never cross a sequence boundary (pitfall B13)
    chunks = [(s, min(s + C, cu[n + 1])) for n in range(N) for s in range(cu[n], cu[n + 1], C)]
    BK, BVA = pow2(D_k, 16), pow2(D_v, 16)
    PREC = _dot_precision(v.dtype)
    on_gpu = dev.type == "cuda"
    if chunks:
        chunk_t = torch.tensor(chunks, dtype=torch.int32, device=dev)  # [n_chunks, 2]
        w = alloc((T_all, H_v, D_k), torch.float32, dev)
        u = alloc((T_all, H_v, D_v), torch.float32, dev)
        aqk = alloc((T_all, H_v, C), torch.float32, dev)
        gcum = alloc((T_all, H_v), torch.float32, dev)
        _gdn_chunk_prep_kernel[(len(chunks), H_v)](
            q2, k2, v2, g2, b2, chunk_t, w, u, aqk, gcum, scale,
            H_K=H_k, H_V=H_v, D_K=D_k, D_V=D_v, C=C, BS=16, BK=BK, BVA=BVA,
            USE_L2=bool(use_qk_l2norm), PREC=PREC, num_warps=8 if on_gpu else 4,
        )
    else:  # no tokens at all: kernel 2 still copies h0 to the final state
        w = u = aqk = gcum = torch.zeros(1, dtype=torch.float32, device=dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)

    def launch(BV, stages):
        _gdn_chunk_state_output_kernel[(N, H_v, triton.cdiv(D_v, BV))](
            q2, k2, w, u, aqk, gcum, cu_t, h0 if h0 is not None else w, o.view(T_all, H_v, D_v),
            ht if ht is not None else w, scale,
            H_K=H_k, H_V=H_v, D_K=D_k, D_V=D_v, C=C, BK=BK, BV=BV,
            USE_L2=bool(use_qk_l2norm), HAS_H0=h0 is not None, STORE_HT=ht is not None, PREC=PREC,
            num_warps=4, num_stages=stages,
        )

    _launch_first_fitting(_state_kernel_configs(_value_block(D_v, N * H_v, dev), BK, dev), launch)
    return o, ht


def recurrent_gated_delta_rule(
    q, k, v, *, g, beta, scale=None, initial_state=None, output_final_state=True, use_qk_l2norm=True,
    cu_seqlens=None,
):
    """Per-token gated delta rule (same signature and returns as `chunk_gated_delta_rule`, no chunk_size).

    One program per (sequence, value head, D_v block) walks the tokens with the fp32 state in registers; the
    fastest path for short multi-token steps (speculative verify, T ≲ 16), and the kernel-side twin of the oracle.
    """
    who = "recurrent_gated_delta_rule"
    B, T, H_k, H_v, D_k, D_v, cu, N = _validate(who, q, k, v, g, beta, initial_state, cu_seqlens)
    dev = q.device
    scale = D_k ** -0.5 if scale is None else float(scale)
    o = alloc((B, T, H_v, D_v), v.dtype, dev)
    ht = alloc((N, H_v, D_k, D_v), torch.float32, dev) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    BK = pow2(D_k, 16)
    BV = _value_block(D_v, N * H_v, dev)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
    dummy = o
    _gdn_recurrent_kernel[(N, H_v, triton.cdiv(D_v, BV))](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), cu_t,
        h0 if h0 is not None else dummy, o, ht if ht is not None else dummy, scale,
        H_K=H_k, H_V=H_v, D_K=D_k, D_V=D_v, BK=BK, BV=BV,
        USE_L2=bool(use_qk_l2norm), HAS_H0=h0 is not None, STORE_HT=ht is not None,
        num_warps=4,
    )
    return o, ht


def fused_recurrent_gated_delta_rule_update(
    q, k, v, *, g, beta, state_pool, slot_ids, scale=None, use_qk_l2norm=True,
):
    """One decode token per batch row, reading and writing the state pool in place.

    Args:
        q, k:       [B, 1, H_k, D_k]
        v:          [B, 1, H_v, D_v]
        g, beta:    [B, 1, H_v]
        state_pool: [S, H_v, D_k, D_v] (fp32 recommended; other float dtypes are read/written with casts),
                    row slot_ids[b] is updated in place.  Slots in one call must be distinct.
        slot_ids:   [B] int; −1 marks a padding row: its output is zeros and no slot is read or written.
    Returns:
        o: [B, 1, H_v, D_v] in v's dtype
    """
    who = "fused_recurrent_gated_delta_rule_update"
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("state_pool", state_pool),
                    ("slot_ids", slot_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"{who}: q must be [B, 1, H_k, D_k], got {tuple(q.shape)}")
    B, _, H_k, D_k = q.shape
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"{who}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:2]) != (B, 1):
        raise ValueError(f"{who}: v must be [B={B}, 1, H_v, D_v], got {tuple(v.shape)}")
    H_v, D_v = v.shape[2], v.shape[3]
    if H_k == 0 or H_v % H_k != 0:
        raise ValueError(f"{who}: value heads H_v={H_v} must be a multiple of key heads H_k={H_k}")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, 1, H_v):
            raise ValueError(f"{who}: {name} must be [B={B}, 1, H_v={H_v}], got {tuple(t.shape)}")
    if state_pool.dim() != 4 or tuple(state_pool.shape[1:]) != (H_v, D_k, D_v):
        raise ValueError(f"{who}: state_pool must be [S, H_v={H_v}, D_k={D_k}, D_v={D_v}], got "
                         f"{tuple(state_pool.shape)}")
    if not state_pool.is_contiguous():
        raise ValueError(f"{who}: state_pool must be contiguous (it is updated in place)")
    check_slot_ids(who, slot_ids, B)
    if D_k > 256 or D_v > 256:
        raise ValueError(f"{who}: D_k, D_v <= 256, got D_k={D_k}, D_v={D_v}")
    dev = check_device(who, q, k, v, g, beta, state_pool, slot_ids)
    if dev.type != "cuda":  # a host check is free here; on CUDA it would sync (and break graph capture)
        check_slot_range(who, slot_ids, state_pool.shape[0])
    scale = D_k ** -0.5 if scale is None else float(scale)
    o = alloc((B, 1, H_v, D_v), v.dtype, dev)
    if B == 0:
        return o
    BK = pow2(D_k, 16)
    BV = block("gdn_bv", min(pow2(D_v, 16), 32) if dev.type == "cuda" else pow2(D_v, 16))
    _gdn_decode_kernel[(B, H_v, triton.cdiv(D_v, BV))](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), slot_ids.contiguous(),
        state_pool, o, scale,
        H_K=H_k, H_V=H_v, D_K=D_k, D_V=D_v, BK=BK, BV=BV, USE_L2=bool(use_qk_l2norm),
        num_warps=4,
    )
    return o


if __name__ == "__main__":  # validate against the float64 oracle, then time (docs/triton_kernels.md)
    from optimized.triton._selfcheck import main

    main("gated_delta")

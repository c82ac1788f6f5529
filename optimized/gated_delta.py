"""The gated delta rule in PyTorch: chunked prefill, per-token recurrence, and the fused in-place decode update.

Same math and shared keyword-only signature as `reference.gated_delta` (docs/gated_deltanet.md):

    S ← e^{g_t} S;   u_t = β_t (v_t − Sᵀ k̂_t);   S ← S + k̂_t u_tᵀ;   o_t = Sᵀ q̃_t

Version log (llm.c style):
  v1  chunked WY form with every chunk's intra-chunk products (A, Aqk, the UT inverse, W, U) done in one batch over
      all chunks and heads.  Measured: the [n_chunks·H, 64, 256] batched matmuls run at ~36 GFLOP/s on one core
      (memory bound — each intermediate is 32–64 MB) against ~95 GFLOP/s for in-cache ones.
  v2  (this file) the chunks are processed in *groups* of a few chunks (all heads, all sequences of a step): each
      group's intra-chunk products are computed right before the group's sequential state steps, so every
      intermediate stays in cache.  The UT inverse T = (I + A)⁻¹ is a blocked inversion: 8×8 diagonal blocks by
      forward substitution (7 tiny batched steps), merged by the block formula T21 = −T22·A21·T11, then
      [U | W] = T·[diag(β)V | diag(βγ)K̂] is one matmul.  W and q̃⊙γ are stacked so one bmm per chunk gives both
      W·S and (q̃⊙γ)·S.  Varlen sequences are laid out "step-major" (all sequences' j-th chunks adjacent, sequences
      sorted by chunk count) so that each sequential step is a contiguous slice of the chunk list and of the state.
  v2.1 fused L2 reductions, no masking pass for A (only its strictly lower part is read), 8×8 base blocks; decode:
      one read pass + one read-modify-write pass over the state (`mul_(α).addcmul_(k̂, u)`).
  v2.2 q/k inverse norms from one streaming reduction over the token-major input (−4 %); every per-group
      temporary in a buffer reused across groups.
  v2.3 a differentiable path behind the same two functions (`chunk_gated_delta_rule`,
      `recurrent_gated_delta_rule`), taken only when autograd records (grad enabled and an input requires grad):
      the same chunked WY form with every chunk's intra-chunk products in one batch and the state carried from
      step to step as new tensors (no `out=`, no writes into buffers autograd saved), so torch autograd
      differentiates it; the inference path above is untouched.
  Assumptions: fp32 arithmetic and fp32 state for fp32/bf16/fp16 inputs (float64 inputs compute in float64);
  the output has v's dtype; the final state is always fp32 (float64 for float64 inputs) — pitfall B8.

The decode update `fused_recurrent_gated_delta_rule_update` works directly on a state pool `[S, H_v, D_k, D_v]` at
slot indices: consecutive slots are processed as one view of the pool (no gather/scatter copies); slot −1 rows
(padding) output zeros and touch no slot (pitfall B9).  The slot checks and runs are `optimized.slots`; q/k are
normalised with `optimized.norms.l2_norm` (its eps `L2_EPS` also in the fused reductions).  It updates the pool in
place, so it is inference-only: inputs that require grad are refused.
"""
from __future__ import annotations

import math
from itertools import pairwise

import torch

from optimized._checks import check_initial_state, cu_seqlens_list, gdn_shapes, records_grad
from optimized.norms import L2_EPS, l2_norm
from optimized.slots import check_slots, slot_runs

__all__ = [
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_update",
]

_BASE_BLOCK = 8  # diagonal block size of the blocked unit-lower-triangular inverse (8 and 16 time alike)


def _empty(*shape, dtype, device):
    """Uninitialised allocation.  Every scratch buffer goes through here so tests can NaN-poison it (B15)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Input checks and sequence bookkeeping
# ----------------------------------------------------------------------------------------------------------------


def _check(q, k, v, g, beta, who):
    """(B, T, H_k, D_k, H_v, D_v) of the shared signature (optimized._checks, the Triton twins' checks too)."""
    return gdn_shapes(who, q, k, v, g, beta)


def _lengths(B, T, cu_seqlens, who) -> list[int]:
    """Per-sequence lengths: B rows of T, or the packed sequences of `cu_seqlens` (then B must be 1)."""
    if cu_seqlens is None:
        return [T] * B
    if B != 1:
        raise ValueError(f"{who}: with cu_seqlens the batch must be 1 (packed sequences), got B={B}")
    cu = cu_seqlens_list(cu_seqlens, T, who)
    return [b - a for a, b in pairwise(cu)]


def _initial_state(initial_state, N, H_v, D_k, D_v, cdtype, device, who):
    if initial_state is None:
        return torch.zeros(N, H_v, D_k, D_v, dtype=cdtype, device=device)
    check_initial_state(who, initial_state, N, H_v, D_k, D_v)
    return initial_state.to(device=device, dtype=cdtype, copy=True)


class _StepMajorLayout:
    """Where each token of N packed sequences lives when the sequences are cut into steps of `step` tokens.

    Sequences are ranked by their number of steps (descending, stable); step j of rank r is block
    `offset[j] + r`.  So at step j the active sequences are ranks 0..active[j]-1: a contiguous slice of the blocks
    and of the rank-ordered state.  `row` maps each packed token to its row in the flattened [n_blocks·step] list.
    """

    def __init__(self, lengths: list[int], step: int, device):
        self.N = len(lengths)
        self.step = step
        n_steps = [(L + step - 1) // step for L in lengths]
        self.order = sorted(range(self.N), key=lambda i: -n_steps[i])  # rank -> sequence
        self.rank_of = [0] * self.N
        for r, i in enumerate(self.order):
            self.rank_of[i] = r
        J = max(n_steps) if n_steps else 0
        self.active = [sum(1 for n in n_steps if n > j) for j in range(J)]
        self.offset = [0] * (J + 1)
        for j in range(J):
            self.offset[j + 1] = self.offset[j] + self.active[j]
        self.n_blocks = self.offset[J]
        self.n_steps = J
        # Fast path: one sequence (or equal lengths, already rank-ordered) -> a plain pad + reshape.
        self.identity = self.N == 1
        if self.identity:
            self.row = None
        else:
            rows = []
            for i, L in enumerate(lengths):
                r = self.rank_of[i]
                t = torch.arange(L, device=device)
                j, c = t // step, t % step
                off = torch.tensor(self.offset[:-1], device=device, dtype=torch.long)
                rows.append((off[j] + r) * step + c if L else t)
            self.row = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=device)
        self.T_total = sum(lengths)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Packed tokens [T_total, *rest] -> zero-padded blocks [n_blocks, step, *rest]."""
        rest = tuple(x.shape[1:])
        if self.identity:
            pad = self.n_blocks * self.step - x.shape[0]
            if pad:
                x = torch.cat([x, x.new_zeros((pad,) + rest)], 0)
            return x.reshape((self.n_blocks, self.step) + rest)
        out = x.new_zeros((self.n_blocks * self.step,) + rest)
        out.index_copy_(0, self.row, x)
        return out.view((self.n_blocks, self.step) + rest)

    def from_blocks(self, xb: torch.Tensor) -> torch.Tensor:
        """Blocks [n_blocks, step, *rest] -> packed tokens [T_total, *rest]."""
        flat = xb.reshape((-1,) + tuple(xb.shape[2:]))
        if self.identity:
            return flat[: self.T_total]
        return flat.index_select(0, self.row)

    def states_to_rank(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.identity else s[self.order].contiguous()

    def states_from_rank(self, s: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return s
        return s[torch.tensor(self.rank_of, device=s.device, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------------------------
# UT transform: (I + A)^{-1} for strictly lower-triangular A, batched
# ----------------------------------------------------------------------------------------------------------------


def _forward_substitution_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)⁻¹ by forward substitution over rows: X_i = e_i − Σ_{j<i} A_ij X_j.  A [M, b, b] strictly lower.

    Written in place into one buffer; when autograd records, the rows are stacked as new tensors instead (the
    in-place form overwrites the rows an earlier product saved for the backward pass)."""
    M, b, _ = A.shape
    eye = torch.eye(b, dtype=A.dtype, device=A.device)
    if records_grad(A):
        X = eye[:1].expand(M, 1, b)  # [M, i, b]: the rows done so far
        for i in range(1, b):
            row = eye[i : i + 1] - torch.bmm(A[:, i : i + 1, :i], X)  # [M, 1, b]  (X has zeros from column i on)
            X = torch.cat([X, row], 1)
        return X
    X = eye.expand(M, b, b).clone()  # [M, b, b]
    for i in range(1, b):
        # Row i only has columns < i nonzero (besides the unit diagonal), and X[:, :i, :i] is already final.
        X[:, i : i + 1, :i] = -torch.bmm(A[:, i : i + 1, :i], X[:, :i, :i])  # [M, 1, i]
    return X


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)⁻¹ for the strictly lower part of A [M, C, C] (any C; the diagonal and upper part are never read),
    by recursive 2×2 block inversion.

        [[L11, 0], [A21, L22]]⁻¹ = [[T11, 0], [−T22·A21·T11, T22]]

    with 8×8 diagonal blocks done by forward substitution.  Both halves of a level are inverted in one batched
    call when they have the same size.
    """
    M, C, _ = A.shape
    if C <= _BASE_BLOCK:
        return _forward_substitution_inverse(A)
    h = C // 2
    if C % 2 == 0:
        both = unit_lower_inverse(torch.cat([A[:, :h, :h], A[:, h:, h:]], 0))  # [2M, h, h]
        T11, T22 = both[:M], both[M:]
    else:
        T11, T22 = unit_lower_inverse(A[:, :h, :h]), unit_lower_inverse(A[:, h:, h:])
    out = torch.zeros(M, C, C, dtype=A.dtype, device=A.device)
    out[:, :h, :h] = T11
    out[:, h:, h:] = T22
    out[:, h:, :h] = -torch.bmm(T22, torch.bmm(A[:, h:, :h], T11))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Chunked form
# ----------------------------------------------------------------------------------------------------------------


def _group_chunks(H_v: int, C: int, D: int) -> int:
    """How many chunk rows (× H_v heads) to prepare at once: ~256K floats per [rows, H, C, D] tensor, which keeps
    a group's q, k, v, W, U and output together within the L2/L3 cache of a CPU core."""
    return max(1, (256 * 1024) // max(1, H_v * C * D))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    cu_seqlens=None,
    chunk_size: int = 64,
):
    """Gated delta rule, chunked WY / UT-transform form (arXiv:2406.06484), batched over heads, chunks and sequences.

    Args:
        q, k:          [B, T, H_k, D_k]
        v:             [B, T, H_v, D_v]        value head h reads key head h // (H_v // H_k)
        g:             [B, T, H_v]             log-space decay
        beta:          [B, T, H_v]
        scale:         default D_k^(-1/2)
        initial_state: [N, H_v, D_k, D_v] or None
        cu_seqlens:    [N+1] or None (then B = 1 holds N packed sequences)
        chunk_size:    C ≥ 1
    Returns:
        o:           [B, T, H_v, D_v]  (v's dtype)
        final_state: [N, H_v, D_k, D_v] fp32 (None unless output_final_state)
    """
    who = "chunk_gated_delta_rule"
    B, T, H_k, D_k, H_v, D_v = _check(q, k, v, g, beta, who)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"{who}: chunk_size must be a positive integer, got {chunk_size}")
    C = int(chunk_size)
    lengths = _lengths(B, T, cu_seqlens, who)
    N = len(lengths)
    dev, cdt = v.device, _compute_dtype(v)
    scale = D_k ** -0.5 if scale is None else float(scale)
    r = H_v // H_k

    state = _initial_state(initial_state, N, H_v, D_k, D_v, cdt, dev, who)  # [N, H_v, D_k, D_v]
    lay = _StepMajorLayout(lengths, C, dev)
    S = lay.states_to_rank(state)  # [N, H_v, D_k, D_v], rank order
    if records_grad(q, k, v, g, beta, initial_state):
        o, S = _chunk_differentiable(q, k, v, g, beta, S, lay, scale=scale, use_qk_l2norm=use_qk_l2norm)
        return o, (lay.states_from_rank(S) if output_final_state else None)

    # Packed token-major views -> zero-padded chunk blocks [n_blocks, C, H, D] (padding is neutral: g=0, β=0, k=0).
    tok = B * T
    qb = lay.to_blocks(q.reshape(tok, H_k, D_k))  # [n, C, H_k, D_k]
    kb = lay.to_blocks(k.reshape(tok, H_k, D_k))  # [n, C, H_k, D_k]
    vb = lay.to_blocks(v.reshape(tok, H_v, D_v))  # [n, C, H_v, D_v]
    gb = lay.to_blocks(g.reshape(tok, H_v))  # [n, C, H_v]
    bb = lay.to_blocks(beta.reshape(tok, H_v))  # [n, C, H_v]
    if use_qk_l2norm:
        # (Σx² + eps)^(-1/2) per token and key head, from one streaming reduction over the contiguous token-major
        # input (cheaper than reducing the head-major strided views group by group); padded rows get 0.
        def inv_norm(x, mult):
            r = torch.linalg.vector_norm(x.reshape(tok, H_k, D_k).to(cdt), dim=-1).square_().add_(L2_EPS).rsqrt_()
            return lay.to_blocks(r.mul_(mult) if mult != 1.0 else r)  # [n, C, H_k]

        q_inv, k_inv = inv_norm(q, scale), inv_norm(k, 1.0)
    n_blocks = lay.n_blocks
    ob = _empty(n_blocks, C, H_v, D_v, dtype=v.dtype, device=dev)  # [n, C, H_v, D_v]

    ar = torch.arange(C, device=dev)
    lower_incl = ar[:, None] >= ar[None, :]  # [C, C]

    group = _group_chunks(H_v, C, max(D_k, D_v))
    # Per-group scratch, allocated once for the largest group and reused (sliced to the group's size).
    gmax = 0
    j = 0
    groups = []
    while j < lay.n_steps:
        # A group of whole steps whose blocks are contiguous: [b0, b1).
        j1 = j + 1
        while j1 < lay.n_steps and lay.offset[j1 + 1] - lay.offset[j] <= group:
            j1 += 1
        groups.append((j, j1))
        gmax = max(gmax, lay.offset[j1] - lay.offset[j])
        j = j1
    Mmax = gmax * H_v
    KQ_buf = _empty(Mmax, 2 * C, D_k, dtype=cdt, device=dev)  # rows [k̂ ; q̃] per (chunk, head)
    RHS_buf = _empty(Mmax, C, D_v + D_k, dtype=cdt, device=dev)  # [diag(β)V | diag(βγ)K̂]
    UW_buf = _empty(Mmax, C, D_v + D_k, dtype=cdt, device=dev)  # [U | W]
    WQ_buf = _empty(Mmax, 2 * C, D_k, dtype=cdt, device=dev)  # rows [W ; q̃⊙γ]
    O_buf = _empty(Mmax, C, D_v, dtype=cdt, device=dev)
    # The remaining per-group temporaries also live in buffers reused by every group: the same addresses stay in
    # cache from one group to the next, and no fresh allocation (or page fault) happens inside the loop.
    P_buf = _empty(Mmax, 2 * C, C, dtype=cdt, device=dev)  # [k̂; q̃] k̂ᵀ
    D_buf = _empty(Mmax, C, C, dtype=cdt, device=dev)  # e^{G_i − G_j}
    Kd_buf = _empty(Mmax, C, D_k, dtype=cdt, device=dev)  # k̂ e^{G_C − G}
    PS_buf = _empty(N * H_v, 2 * C, D_v, dtype=cdt, device=dev)  # per step: [W; q̃⊙γ] S
    Vn_buf = _empty(N * H_v, C, D_v, dtype=cdt, device=dev)  # per step: V_new
    upper = ~lower_incl  # [C, C]

    for j, j1 in groups:
        b0, b1 = lay.offset[j], lay.offset[j1]
        n = b1 - b0
        M = n * H_v

        # ---- intra-chunk quantities for the group, all heads at once (written straight into the scratch) -------
        KQ = KQ_buf[:M].view(n, H_k, r, 2 * C, D_k)  # head h = key head h // r, copy h % r
        q_in = qb[b0:b1].permute(0, 2, 1, 3)[:, :, None]  # [n, H_k, 1, C, D_k] (a view of the input)
        k_in = kb[b0:b1].permute(0, 2, 1, 3)[:, :, None]
        if use_qk_l2norm:
            qf, kf = q_in.to(cdt), k_in.to(cdt)
            q_mul = q_inv[b0:b1].permute(0, 2, 1)[:, :, None, :, None]  # [n, H_k, 1, C, 1]  scale / ‖q‖
            k_mul = k_inv[b0:b1].permute(0, 2, 1)[:, :, None, :, None]  # 1 / ‖k‖
            ex = (-1, -1, r, -1, -1)  # broadcast over the r value heads of each key head
            torch.mul(qf.expand(ex), q_mul.expand(ex), out=KQ[:, :, :, C:])  # q̃ = q̂ · scale
            torch.mul(kf.expand(ex), k_mul.expand(ex), out=KQ[:, :, :, :C])  # k̂
        else:
            torch.mul(q_in.to(cdt).expand(-1, -1, r, -1, -1), scale, out=KQ[:, :, :, C:])
            KQ[:, :, :, :C] = k_in
        KQ = KQ.view(M, 2 * C, D_k)
        Kn, Qs = KQ[:, :C], KQ[:, C:]  # [M, C, D_k] k̂ ; q̃
        G = gb[b0:b1].to(cdt).permute(0, 2, 1).cumsum(-1).reshape(M, C)  # [M, C] cumulative log-decay in the chunk
        bf = bb[b0:b1].to(cdt).permute(0, 2, 1).reshape(M, C)  # [M, C]

        # k̂_i·k̂_j and q̃_i·k̂_j in one product: [k̂; q̃] k̂ᵀ.
        P = torch.bmm(KQ, Kn.transpose(1, 2), out=P_buf[:M])  # [M, 2C, C]
        decay = torch.sub(G[:, :, None], G[:, None, :], out=D_buf[:M])  # [M, C, C]  G_i − G_j
        decay.masked_fill_(upper, -math.inf).exp_()  # e^{G_i−G_j} on/below the diagonal, 0 above (B6)
        # A = β_i (k̂_i·k̂_j) e^{G_i−G_j}; only its strictly lower part is ever read by `unit_lower_inverse` (the
        # upper part is 0 through the decay; the diagonal is left as is), so no masking pass is needed.
        A = P[:, :C].mul_(decay).mul_(bf[:, :, None])  # [M, C, C]
        Aqk = P[:, C:].mul_(decay)  # [M, C, C] (diagonal kept)
        Tinv = unit_lower_inverse(A)  # [M, C, C]  (I + A)⁻¹

        gamma = G.exp()  # [M, C]
        RHS = RHS_buf[:M]
        torch.mul(vb[b0:b1].to(cdt).permute(0, 2, 1, 3), bf.view(n, H_v, C, 1),
                  out=RHS[:, :, :D_v].view(n, H_v, C, D_v))  # diag(β) V, in fp32 also for bf16 inputs
        torch.mul(Kn, (bf * gamma)[:, :, None], out=RHS[:, :, D_v:])  # diag(βγ) K̂
        UW = torch.bmm(Tinv, RHS, out=UW_buf[:M])  # [M, C, D_v + D_k]  U | W
        U = UW[:, :, :D_v]  # [M, C, D_v]
        # Stack W and q̃⊙γ so one product per chunk gives W·S and (q̃⊙γ)·S.
        WQ = WQ_buf[:M]
        WQ[:, :C] = UW[:, :, D_v:]
        torch.mul(Qs, gamma[:, :, None], out=WQ[:, C:])
        G_last = G[:, -1:]  # [M, 1]
        Kd = torch.mul(Kn, (G_last - G).exp_()[:, :, None], out=Kd_buf[:M])  # [M, C, D_k]  k̂_j e^{G_C − G_j}
        chunk_decay = G_last.exp().view(n, H_v)  # [n, H_v]
        og = O_buf[:M]  # [M, C, D_v]

        # ---- sequential state propagation over the group's steps ------------------------------------------------
        for jj in range(j, j1):
            na = lay.active[jj]
            c0 = lay.offset[jj] - b0
            sl = slice(c0 * H_v, (c0 + na) * H_v)
            Sv = S[:na].view(na * H_v, D_k, D_v)  # [na·H_v, D_k, D_v]  (a view of the rank-ordered state)
            m = na * H_v
            PS = torch.bmm(WQ[sl], Sv, out=PS_buf[:m])  # [na·H_v, 2C, D_v]  W·S ; (q̃⊙γ)·S
            Vn = torch.sub(U[sl], PS[:, :C], out=Vn_buf[:m])  # [na·H_v, C, D_v]  V_new = U − W S
            torch.baddbmm(PS[:, C:], Aqk[sl], Vn, out=og[sl])  # O = (q̃⊙γ)S + Aqk V_new
            Sv.mul_(chunk_decay[c0 : c0 + na].reshape(-1, 1, 1))
            Sv.baddbmm_(Kd[sl].transpose(1, 2), Vn)  # S ← e^{G_C} S + (K̂ ⊙ e^{G_C−G})ᵀ V_new
        ob[b0:b1] = og.view(n, H_v, C, D_v).permute(0, 2, 1, 3)

    o = lay.from_blocks(ob).reshape(B, T, H_v, D_v)
    final = lay.states_from_rank(S) if output_final_state else None
    return o, final


def _chunk_differentiable(q, k, v, g, beta, S, lay: _StepMajorLayout, *, scale: float, use_qk_l2norm: bool):
    """The chunked form of `chunk_gated_delta_rule` written for autograd (its backward is torch's).

    Same equations as the inference path, without its buffers: every chunk's intra-chunk products (A, Aqk, the UT
    inverse, U, W) in one batch over all chunks and heads, then one step per chunk position whose new state is a
    new tensor.  S is the initial state in rank order [N, H_v, D_k, D_v] (compute dtype).
    Returns o [B, T, H_v, D_v] (v's dtype) and the final state in rank order.
    """
    B, T, H_k, D_k = q.shape
    H_v, D_v = v.shape[2], v.shape[3]
    C, n, r, tok = lay.step, lay.n_blocks, H_v // H_k, B * T
    M, cdt = n * H_v, S.dtype
    qf, kf = q.reshape(tok, H_k, D_k).to(cdt), k.reshape(tok, H_k, D_k).to(cdt)
    if use_qk_l2norm:
        qf, kf = l2_norm(qf), l2_norm(kf)

    def head_major(x, D):  # packed [tok, H_k, D] -> [M, C, D], key head h // r for value head h
        xb = lay.to_blocks(x).permute(0, 2, 1, 3)  # [n, H_k, C, D]
        if r > 1:
            xb = xb[:, :, None].expand(n, H_k, r, C, D)
        return xb.reshape(M, C, D)

    Q, K = head_major(qf * scale, D_k), head_major(kf, D_k)  # [M, C, D_k]  q̃ ; k̂
    V = lay.to_blocks(v.reshape(tok, H_v, D_v).to(cdt)).permute(0, 2, 1, 3).reshape(M, C, D_v)
    G = lay.to_blocks(g.reshape(tok, H_v).to(cdt)).permute(0, 2, 1).reshape(M, C).cumsum(-1)  # [M, C]
    bt = lay.to_blocks(beta.reshape(tok, H_v).to(cdt)).permute(0, 2, 1).reshape(M, C)  # [M, C]

    ar = torch.arange(C, device=v.device)
    upper = ar[:, None] < ar[None, :]  # [C, C]
    decay = (G[:, :, None] - G[:, None, :]).masked_fill(upper, -math.inf).exp()  # [M, C, C]  e^{G_i−G_j}, 0 above
    # Pieces are taken with torch.split, not slicing: the backward of a split is one concatenation, that of a
    # slice a zero tensor of the whole input per slice (per step, in the loop below).
    KK, QK = torch.split(torch.bmm(torch.cat([K, Q], 1), K.transpose(1, 2)), C, 1)  # [M, C, C]  k̂k̂ᵀ ; q̃k̂ᵀ
    A = KK * decay * bt[:, :, None]  # [M, C, C]  only its strictly lower part is read
    Aqk = QK * decay  # [M, C, C]  diagonal included
    gamma = G.exp()  # [M, C]
    UW = torch.bmm(unit_lower_inverse(A), torch.cat([V * bt[:, :, None], K * (bt * gamma)[:, :, None]], -1))
    U, W = torch.split(UW, [D_v, D_k], -1)  # [M, C, D_v], [M, C, D_k]
    WQ = torch.cat([W, Q * gamma[:, :, None]], 1)  # [M, 2C, D_k]  rows [W ; q̃⊙γ]
    G_last = G[:, -1:]  # [M, 1]
    Kd = (K * (G_last - G).exp()[:, :, None]).transpose(1, 2)  # [M, D_k, C]  (k̂_j e^{G_C − G_j})ᵀ
    chunk_decay = G_last.exp().view(n, H_v, 1, 1)  # [n, H_v, 1, 1]

    rows = [na * H_v for na in lay.active]  # step j holds blocks offset[j] .. offset[j] + active[j]
    steps = zip(torch.split(WQ, rows), torch.split(U, rows), torch.split(Aqk, rows), torch.split(Kd, rows),
                torch.split(chunk_decay, lay.active), lay.active, strict=True)
    outs = []
    for WQ_j, U_j, Aqk_j, Kd_j, decay_j, na in steps:
        Sa = S[:na].reshape(na * H_v, D_k, D_v)
        WS, QS = torch.split(torch.bmm(WQ_j, Sa), C, 1)  # [na·H_v, C, D_v] each  W·S ; (q̃⊙γ)·S
        Vn = U_j - WS  # V_new = U − W S
        outs.append(torch.baddbmm(QS, Aqk_j, Vn))  # O = (q̃⊙γ)S + Aqk V_new
        S_new = S[:na] * decay_j + torch.bmm(Kd_j, Vn).view(na, H_v, D_k, D_v)
        S = S_new if na == S.shape[0] else torch.cat([S_new, S[na:]], 0)
    ob = torch.cat(outs, 0).view(n, H_v, C, D_v).permute(0, 2, 1, 3)  # [n, C, H_v, D_v]
    return lay.from_blocks(ob).reshape(B, T, H_v, D_v).to(v.dtype), S


# ----------------------------------------------------------------------------------------------------------------
# Recurrent form (per token) and the fused decode update
# ----------------------------------------------------------------------------------------------------------------


def _token_step(S, q_t, k_t, v_t, g_t, b_t):
    """One token for a batch of (row, head) pairs, state updated in place.

    S [M, D_k, D_v] (fp32 view, possibly of a pool); q_t, k_t [M, D_k] (normalised/scaled, compute dtype);
    v_t [M, D_v]; g_t, b_t [M].  Returns o_t [M, D_v].
    """
    return _token_step_kq(S, torch.stack([k_t, q_t], dim=1), v_t, g_t, b_t)


def _token_step_kq(S, kq, v_t, g_t, b_t):
    """`_token_step` with k̂ and q̃ stacked: kq [M, 2, D_k] (row 0 = k̂, row 1 = q̃).

    One read of S gives both Sᵀk̂ and Sᵀq̃ (before the decay), then
        u = β (v − α Sᵀk̂),   S ← α S + k̂ uᵀ,   o = α Sᵀq̃ + (q̃·k̂) u
    which equals decay → delta → update → read-out (B1) with one read pass and one read-modify-write pass over S
    (the floor of a decode step: the state is read and written once).
    """
    alpha = g_t.exp()[:, None]  # [M, 1]
    P = torch.bmm(kq, S)  # [M, 2, D_v]  Sᵀk̂ ; Sᵀq̃
    u = torch.addcmul(v_t, alpha, P[:, 0], value=-1.0).mul_(b_t[:, None])  # [M, D_v]  β (v − α Sᵀk̂)
    qk = (kq[:, 0] * kq[:, 1]).sum(-1, keepdim=True)  # [M, 1]  q̃·k̂
    o = torch.addcmul(P[:, 1] * alpha, qk, u)  # [M, D_v]
    S.mul_(alpha[:, :, None]).addcmul_(kq[:, 0, :, None], u[:, None, :])  # S ← α S + k̂ uᵀ
    return o


def _token_step_kq_functional(S, kq, v_t, g_t, b_t):
    """`_token_step_kq` without writing into S (for autograd): returns (o_t [M, D_v], new S [M, D_k, D_v])."""
    alpha = g_t.exp()[:, None]  # [M, 1]
    P = torch.bmm(kq, S)  # [M, 2, D_v]  Sᵀk̂ ; Sᵀq̃
    u = (v_t - alpha * P[:, 0]) * b_t[:, None]  # [M, D_v]
    qk = (kq[:, 0] * kq[:, 1]).sum(-1, keepdim=True)  # [M, 1]
    o = P[:, 1] * alpha + qk * u
    return o, S * alpha[:, :, None] + kq[:, 0, :, None] * u[:, None, :]


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    cu_seqlens=None,
):
    """Gated delta rule token by token, batched over heads and sequences (arXiv:2412.06464).

    Args / Returns: as `chunk_gated_delta_rule` (no chunk_size).  Cost O(T·H_v·D_k·D_v), the decode form.
    """
    who = "recurrent_gated_delta_rule"
    B, T, H_k, D_k, H_v, D_v = _check(q, k, v, g, beta, who)
    lengths = _lengths(B, T, cu_seqlens, who)
    N = len(lengths)
    dev, cdt = v.device, _compute_dtype(v)
    scale = D_k ** -0.5 if scale is None else float(scale)
    r = H_v // H_k
    state = _initial_state(initial_state, N, H_v, D_k, D_v, cdt, dev, who)

    # Step-major layout with step = 1 token: at time t the active sequences are ranks 0..active[t]-1.
    lay = _StepMajorLayout(lengths, 1, dev)
    S = lay.states_to_rank(state)
    tok = B * T
    qf = q.reshape(tok, H_k, D_k).to(cdt)
    kf = k.reshape(tok, H_k, D_k).to(cdt)
    if use_qk_l2norm:
        qf, kf = l2_norm(qf), l2_norm(kf)
    qf = qf * scale
    if r > 1:
        qf, kf = qf.repeat_interleave(r, dim=1), kf.repeat_interleave(r, dim=1)
    qb = lay.to_blocks(qf)[:, 0]  # [n_blocks, H_v, D_k]
    kb = lay.to_blocks(kf)[:, 0]
    vb = lay.to_blocks(v.reshape(tok, H_v, D_v).to(cdt))[:, 0]  # [n_blocks, H_v, D_v]
    gb = lay.to_blocks(g.reshape(tok, H_v).to(cdt))[:, 0]  # [n_blocks, H_v]
    bb = lay.to_blocks(beta.reshape(tok, H_v).to(cdt))[:, 0]
    if records_grad(q, k, v, g, beta, initial_state):  # autograd: each token's state is a new tensor
        outs = []
        kq_all = torch.stack([kb, qb], dim=2)  # [n_blocks, H_v, 2, D_k]
        per_step = (torch.split(t, lay.active) for t in (kq_all, vb, gb, bb))  # split, not slices (see above)
        for kq, v_t, g_t, b_t, na in zip(*per_step, lay.active, strict=True):
            o_t, S_new = _token_step_kq_functional(S[:na].reshape(na * H_v, D_k, D_v), kq.reshape(na * H_v, 2, D_k),
                                                   v_t.reshape(-1, D_v), g_t.reshape(-1), b_t.reshape(-1))
            outs.append(o_t.view(na, H_v, D_v))
            S_new = S_new.view(na, H_v, D_k, D_v)
            S = S_new if na == S.shape[0] else torch.cat([S_new, S[na:]], 0)
        o = lay.from_blocks(torch.cat(outs, 0)[:, None]).reshape(B, T, H_v, D_v).to(v.dtype)
        return o, (lay.states_from_rank(S) if output_final_state else None)
    ob = _empty(lay.n_blocks, H_v, D_v, dtype=cdt, device=dev)
    for t in range(lay.n_steps):
        na, b0 = lay.active[t], lay.offset[t]
        sl = slice(b0, b0 + na)
        ob[sl] = _token_step(
            S[:na].view(na * H_v, D_k, D_v),
            qb[sl].reshape(-1, D_k),
            kb[sl].reshape(-1, D_k),
            vb[sl].reshape(-1, D_v),
            gb[sl].reshape(-1),
            bb[sl].reshape(-1),
        ).view(na, H_v, D_v)
    o = lay.from_blocks(ob[:, None]).reshape(B, T, H_v, D_v).to(v.dtype)
    return o, (lay.states_from_rank(S) if output_final_state else None)


def fused_recurrent_gated_delta_rule_update(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
):
    """One decode token per row, state read and written in place in `state_pool` at `slot_ids` (docs/state_cache.md).

    Args:
        q, k:       [B, 1, H_k, D_k]
        v:          [B, 1, H_v, D_v]
        g, beta:    [B, 1, H_v]
        state_pool: [S, H_v, D_k, D_v] fp32 (or float64), updated in place
        slot_ids:   [B] int; −1 = padding row: its output is zeros and no slot is touched
    Returns:
        o: [B, 1, H_v, D_v] (v's dtype)
    """
    who = "fused_recurrent_gated_delta_rule_update"
    B, T, H_k, D_k, H_v, D_v = _check(q, k, v, g, beta, who)
    if records_grad(q, k, v, g, beta, state_pool):
        raise ValueError(f"{who}: the in-place decode update is inference-only (it overwrites the state pool); for "
                         "gradients run chunk_gated_delta_rule or recurrent_gated_delta_rule with initial_state")
    if T != 1:
        raise ValueError(f"{who}: one token per row (T=1), got T={T}")
    if state_pool.dim() != 4 or tuple(state_pool.shape[1:]) != (H_v, D_k, D_v):
        raise ValueError(f"{who}: state_pool must be [S, H_v={H_v}, D_k={D_k}, D_v={D_v}], "
                         f"got {tuple(state_pool.shape)}")
    if state_pool.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{who}: state_pool must be fp32 (or float64), got {state_pool.dtype} (pitfall B8)")
    ids = check_slots(who, slot_ids, B, state_pool.shape[0])
    cdt = state_pool.dtype
    scale = D_k ** -0.5 if scale is None else float(scale)
    r = H_v // H_k
    kq = torch.stack([k[:, 0], q[:, 0]], dim=2).to(cdt)  # [B, H_k, 2, D_k]  row 0 = k, row 1 = q
    if use_qk_l2norm:  # (Σx² + eps)^(-1/2) per row, from one fused reduction
        kq = kq * torch.linalg.vector_norm(kq, dim=-1, keepdim=True).square_().add_(L2_EPS).rsqrt_()
    kq[:, :, 1].mul_(scale)  # q̃ = q̂ · scale
    if r > 1:
        kq = kq.repeat_interleave(r, dim=1)  # [B, H_v, 2, D_k]
    vf, gf, bf = v[:, 0].to(cdt), g[:, 0].to(cdt), beta[:, 0].to(cdt)
    runs = slot_runs(ids)
    if len(runs) == 1 and runs[0][2] == B:  # the common case: one contiguous run, no padding
        b0, s0, n = runs[0]
        o = _token_step_kq(state_pool[s0 : s0 + n].view(n * H_v, D_k, D_v), kq.reshape(n * H_v, 2, D_k),
                           vf.reshape(-1, D_v), gf.reshape(-1), bf.reshape(-1)).view(B, 1, H_v, D_v)
        return o.to(v.dtype)
    o = torch.zeros(B, H_v, D_v, dtype=cdt, device=v.device)
    for b0, s0, n in runs:
        o[b0 : b0 + n] = _token_step_kq(
            state_pool[s0 : s0 + n].view(n * H_v, D_k, D_v),  # a view: the pool itself is updated
            kq[b0 : b0 + n].reshape(n * H_v, 2, D_k),
            vf[b0 : b0 + n].reshape(-1, D_v),
            gf[b0 : b0 + n].reshape(-1),
            bf[b0 : b0 + n].reshape(-1),
        ).view(n, H_v, D_v)
    return o[:, None].to(v.dtype)

"""The Gated DeltaNet layer of Qwen3.5 (`linear_attn` in the checkpoint; HF `Qwen3_5GatedDeltaNet`).

For a packed input a [T_total, H] (one or more sequences, `cu_seqlens`):

    qkv = a W_qkvᵀ                         [T, conv_dim]     flat [Q | K | V] blocks, head-major inside each
    z   = a W_zᵀ,  b = a W_bᵀ,  a' = a W_aᵀ
    c   = silu(causal_conv1d(qkv))          q, k, v all go through the conv (z, b, a' do not)
    q, k, v = split(c, [key_dim, key_dim, value_dim])   → [T, H_k, D_k], [T, H_k, D_k], [T, H_v, D_v]
    β   = σ(b)                              [T, H_v]
    g   = −exp(A_log) · softplus(a' + dt_bias)          [T, H_v]   log-decay ≤ 0
    o   = gated_delta_rule(q, k, v; g, β)   L2 norm of q, k and the D_k^(-1/2) scale inside the rule
    y   = [gated_rms_norm(o_h, z_h, w_norm) for each value head] W_outᵀ          [T, H]

Qwen3.5 uses four flat projections; Qwen3-Next's fused, per-key-head grouped `in_proj_qkvz` / `in_proj_ba` do not
exist here (pitfall B3).  The layer carries two states per sequence: the conv state (last K-1
pre-activation qkv inputs, `[N, conv_dim, K-1]`) and the recurrent state (`[N, H_v, D_k, D_v]`, K-major).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from reference.conv import causal_conv1d
from reference.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from reference.norms import gated_rms_norm, sigmoid, softplus

__all__ = ["DeltaNetWeights", "gated_deltanet"]


@dataclass
class DeltaNetWeights:
    """Parameters of one Gated DeltaNet layer, named as in the checkpoint (`...linear_attn.<name>[.weight]`).

    Shapes (PyTorch [out, in] convention):
        in_proj_qkv: [conv_dim, H]     conv_dim = 2·key_dim + value_dim
        in_proj_z:   [value_dim, H]
        in_proj_b:   [H_v, H]
        in_proj_a:   [H_v, H]
        conv1d:      [conv_dim, K]     (a PyTorch [conv_dim, 1, K] weight is accepted and squeezed)
        dt_bias:     [H_v]
        A_log:       [H_v]
        norm:        [D_v]             plain weight of the gated RMSNorm (init 1)
        out_proj:    [H, value_dim]
    """

    in_proj_qkv: np.ndarray
    in_proj_z: np.ndarray
    in_proj_b: np.ndarray
    in_proj_a: np.ndarray
    conv1d: np.ndarray
    dt_bias: np.ndarray
    A_log: np.ndarray
    norm: np.ndarray
    out_proj: np.ndarray

    def __post_init__(self):
        w = np.asarray(self.conv1d)
        if w.ndim == 3 and w.shape[1] == 1:
            self.conv1d = w[:, 0, :]

    @staticmethod
    def expected_shapes(config) -> dict:
        """The shape of every field for `config` (a Qwen35Config or any object with the same attributes)."""
        H, H_v = config.hidden_size, config.linear_num_value_heads
        conv_dim, value_dim = config.conv_dim, config.value_dim
        return {
            "in_proj_qkv": (conv_dim, H),
            "in_proj_z": (value_dim, H),
            "in_proj_b": (H_v, H),
            "in_proj_a": (H_v, H),
            "conv1d": (conv_dim, config.linear_conv_kernel_dim),
            "dt_bias": (H_v,),
            "A_log": (H_v,),
            "norm": (config.linear_value_head_dim,),
            "out_proj": (H, value_dim),
        }

    def validate(self, config) -> None:
        """Raise ValueError naming the first field whose shape does not match `config`."""
        for name, shape in self.expected_shapes(config).items():
            got = np.shape(getattr(self, name))
            if got != shape:
                raise ValueError(f"DeltaNetWeights.{name}: expected shape {shape}, got {got}")

    def astype(self, dtype) -> DeltaNetWeights:
        return DeltaNetWeights(**{f.name: np.asarray(getattr(self, f.name), dtype=dtype) for f in fields(self)})

    @classmethod
    def random(cls, config, seed: int = 0, *, scale: float = 1.0) -> DeltaNetWeights:
        """Random weights of the right shapes (for tests and notebooks), scaled like a trained layer:
        projections ~ N(0, 1/fan_in), A_log = log(U(0.01, 16)) as in HF's init, dt_bias and norm near 1."""
        rng = np.random.default_rng(seed)
        shapes = cls.expected_shapes(config)

        def lin(name):
            out_f, in_f = shapes[name]
            return scale * rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)

        K = config.linear_conv_kernel_dim
        H_v, D_v = config.linear_num_value_heads, config.linear_value_head_dim
        return cls(
            in_proj_qkv=lin("in_proj_qkv"),
            in_proj_z=lin("in_proj_z"),
            in_proj_b=lin("in_proj_b"),
            in_proj_a=lin("in_proj_a"),
            conv1d=rng.standard_normal((config.conv_dim, K)) / np.sqrt(K),
            dt_bias=1.0 + 0.1 * rng.standard_normal(H_v),
            A_log=np.log(rng.uniform(0.01, 16.0, H_v)),
            norm=1.0 + 0.1 * rng.standard_normal(D_v),
            out_proj=lin("out_proj"),
        )


def gated_deltanet(
    x,
    w: DeltaNetWeights,
    config,
    *,
    cu_seqlens=None,
    conv_state=None,
    recurrent_state=None,
    mode: str = "chunk",
    chunk_size: int = 64,
    dtype=np.float64,
):
    """One Gated DeltaNet layer over packed sequences, for prefill (fresh or continued) and decode alike.

    A decode step for N requests is the same call with one token per sequence (cu_seqlens = [0, 1, …, N]) and the
    states of the previous call; a continued prefill passes the states too (pitfall B10: never restart from zero).

    Args:
        x:               [T_total, H]   the normalised layer input (input_layernorm already applied)
        w:               DeltaNetWeights
        config:          Qwen35Config (uses hidden_size, linear_* fields, rms_norm_eps, key_dim, value_dim, conv_dim)
        cu_seqlens:      [N+1] or None (one sequence)
        conv_state:      [N, conv_dim, K-1] or None (zeros)
        recurrent_state: [N, H_v, D_k, D_v] or None (zeros)
        mode:            "chunk" (WY form, arXiv:2406.06484) or "recurrent" (per-token loop); equal up to rounding
        chunk_size:      chunk length for mode="chunk"
        dtype:           compute dtype (float64 default; np.float32 mirrors an fp32 implementation)
    Returns:
        y:               [T_total, H]
        conv_state:      [N, conv_dim, K-1]
        recurrent_state: [N, H_v, D_k, D_v]
    """
    if mode not in ("chunk", "recurrent"):
        raise ValueError(f"gated_deltanet: mode must be 'chunk' or 'recurrent', got {mode!r}")
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2 or x.shape[1] != config.hidden_size:
        raise ValueError(f"gated_deltanet: x must be [T_total, H={config.hidden_size}], got {x.shape}")
    w.validate(config)
    w = w.astype(dtype)
    T = x.shape[0]
    H_k, H_v = config.linear_num_key_heads, config.linear_num_value_heads
    D_k, D_v = config.linear_key_head_dim, config.linear_value_head_dim
    key_dim = config.key_dim

    # Four flat projections (HF `Qwen3_5GatedDeltaNet.forward`).
    qkv = x @ w.in_proj_qkv.T  # [T, conv_dim]
    z = (x @ w.in_proj_z.T).reshape(T, H_v, D_v)  # [T, H_v, D_v]
    b = x @ w.in_proj_b.T  # [T, H_v]
    a = x @ w.in_proj_a.T  # [T, H_v]

    # Causal conv + SiLU over q, k and v together; the state keeps pre-activation inputs (docs/causal_conv.md).
    mixed, conv_state = causal_conv1d(
        qkv, w.conv1d, conv_state=conv_state, cu_seqlens=cu_seqlens, activation="silu", dtype=dtype
    )  # [T, conv_dim], [N, conv_dim, K-1]

    # Flat [Q | K | V] split, head-major inside each block.
    q = mixed[:, :key_dim].reshape(1, T, H_k, D_k)  # [1, T, H_k, D_k]
    k = mixed[:, key_dim:2 * key_dim].reshape(1, T, H_k, D_k)  # [1, T, H_k, D_k]
    v = mixed[:, 2 * key_dim:].reshape(1, T, H_v, D_v)  # [1, T, H_v, D_v]

    # Gates (HF `Qwen3_5GatedDeltaNet.forward`): β = σ(b), g = −exp(A_log) · softplus(a + dt_bias) ≤ 0.
    beta = sigmoid(b, dtype=dtype)[None]  # [1, T, H_v]
    g = (-np.exp(w.A_log) * softplus(a + w.dt_bias, dtype=dtype))[None]  # [1, T, H_v]

    rule = chunk_gated_delta_rule if mode == "chunk" else recurrent_gated_delta_rule
    extra = {"chunk_size": chunk_size} if mode == "chunk" else {}
    o, recurrent_state = rule(
        q, k, v, g=g, beta=beta, initial_state=recurrent_state, output_final_state=True,
        use_qk_l2norm=True, cu_seqlens=cu_seqlens, dtype=dtype, **extra,
    )  # [1, T, H_v, D_v], [N, H_v, D_k, D_v]

    # Gated RMSNorm per value head (norm over D_v, then · silu(z)), then out_proj.
    y = gated_rms_norm(o[0], z, w.norm, config.rms_norm_eps, dtype=dtype)  # [T, H_v, D_v]
    y = y.reshape(T, H_v * D_v) @ w.out_proj.T  # [T, H]
    return y, conv_state, recurrent_state

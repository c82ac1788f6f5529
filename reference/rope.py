"""Rotary position embedding for Qwen3.5: partial RoPE + interleaved multimodal RoPE (MRoPE).

Only the first R = rotary_dim = int(head_dim · partial_rotary_factor) channels of every q/k head rotate
(R = 64 of D_h = 256 in every published Qwen3.5 checkpoint); the other D_h − R channels pass through untouched.
The R rotary channels use the "rotate_half" (NeoX) pairing: channel i is paired with channel i + R/2.

Each of the R/2 frequencies belongs to exactly one of three position axes (t = time, h = height, w = width).
Qwen3.5 uses the *interleaved* assignment inherited from Qwen3-VL (docs/pitfalls.md, B19):

    axis(j) = h   if j % 3 == 1 and j < 3·s_h
              w   if j % 3 == 2 and j < 3·s_w
              t   otherwise                      j = 0 .. R/2 − 1,  (s_t, s_h, s_w) = mrope_section

For text every axis holds the same position, so MRoPE is exactly 1-D RoPE.  Image and video tokens
get (t, h, w) grid positions from the multimodal position planner `reference.multimodal.get_rope_index`;
generation continues with the stored `rope_delta` (`decode_position_ids`).

Sources: transformers' `models/qwen3_5/modeling_qwen3_5.py` (`Qwen3_5TextRotaryEmbedding`,
`apply_rotary_pos_emb`); docs/pitfalls.md, B18 (partial rotary), B19 (MRoPE layout).
Shape legend: T tokens, R rotary dim, D_h head dim, "heads" any head count.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

import numpy as np

from reference.errors import ConfigError

AXIS_NAMES = ("t", "h", "w")


def float_dtype(dtype) -> np.dtype:
    """np.float32 or np.float64 (the compute dtypes of the oracle's tables); ValueError for anything else."""
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


# ----------------------------------------------------------------------------------------------------------------
# Frequencies and the frequency → axis assignment
# ----------------------------------------------------------------------------------------------------------------


def inv_freq(rotary_dim: int, theta: float, *, dtype=np.float64) -> np.ndarray:
    """Inverse frequencies of the rotary channels.

        inv_freq[j] = θ^(−2j / R),   j = 0 .. R/2 − 1

    The exponent runs over the *rotary* dim R, never over head_dim (docs/pitfalls.md, B18: using head_dim agrees at
    position 0 and drifts with distance).  With dtype=float32 the arithmetic is done in float32, as HF does.

    Args:
        rotary_dim: R (even, > 0).
        theta: rope_theta (1e7 for Qwen3.5).
    Returns:
        [R/2] array of `dtype`.
    """
    dt = float_dtype(dtype)
    return (dt.type(1.0) / _theta_powers(rotary_dim, theta, dt)).astype(dt)


def _theta_powers(rotary_dim: int, theta: float, dt: np.dtype) -> np.ndarray:
    """θ^(2j/R), j = 0 .. R/2 − 1, in dtype dt ([R/2]; 1 / inv_freq)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even integer, got {rotary_dim}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    exponent = np.arange(0, rotary_dim, 2, dtype=dt) / dt.type(rotary_dim)  # [R/2]  2j/R
    return dt.type(theta) ** exponent


# ----------------------------------------------------------------------------------------------------------------
# RoPE scaling (context extension): default, linear, dynamic (NTK-aware), yarn
# ----------------------------------------------------------------------------------------------------------------
#
# Semantics of transformers' `modeling_rope_utils.py` (`_compute_linear_scaling_rope_parameters`,
# `_compute_dynamic_ntk_parameters`, `_compute_yarn_parameters`, `dynamic_rope_update`); YaRN: Peng et al. 2023,
# arXiv:2309.00071.  Every type returns (inv_freq [R/2], attention_factor); the cos/sin tables are multiplied by
# the attention factor (only the R rotary channels are affected; the pass-through channels are not).

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
# The keys each type reads from `rope_parameters` (others, such as mrope_section, belong to the config).
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
}


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _checked_real(where: str, key: str, value, *, minimum: float, strict: bool = False, optional: bool = False):
    """float(value) if it is a finite real number >= minimum (> minimum when strict); ConfigError otherwise."""
    if value is None and optional:
        return None
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if not _is_real(value) or not math.isfinite(float(value)) or (
            float(value) <= minimum if strict else float(value) < minimum):
        raise ConfigError(f"{where}.{key} must be a number {bound}, got {value!r}")
    return float(value)


def _check_scaling(fields_: dict, where: str) -> dict:
    """Validate and normalise the RopeScaling field values (names reported as `<where>.<key>`)."""
    t = fields_["rope_type"]
    if t not in ROPE_TYPES:
        raise ConfigError(f"{where}.rope_type {t!r} is not supported; supported rope types: {', '.join(ROPE_TYPES)}")
    out = dict(fields_)
    if t == "default":
        return out
    if fields_["factor"] is None:
        raise ConfigError(f"{where}.factor is required for rope_type {t!r} (a number >= 1)")
    out["factor"] = _checked_real(where, "factor", fields_["factor"], minimum=1.0)
    if t != "yarn":
        return out
    ompe = fields_["original_max_position_embeddings"]
    if isinstance(ompe, bool) or not isinstance(ompe, (int, np.integer)) or ompe <= 0:
        raise ConfigError(f"{where}.original_max_position_embeddings must be a positive integer (the pre-training "
                          f"context length), got {ompe!r}")
    out["original_max_position_embeddings"] = int(ompe)
    out["beta_fast"] = _checked_real(where, "beta_fast", fields_["beta_fast"], minimum=0.0, strict=True)
    out["beta_slow"] = _checked_real(where, "beta_slow", fields_["beta_slow"], minimum=0.0, strict=True)
    if out["beta_fast"] < out["beta_slow"]:
        raise ConfigError(f"{where}.beta_fast ({out['beta_fast']:g}) must be >= {where}.beta_slow "
                          f"({out['beta_slow']:g})")
    for key in ("mscale", "mscale_all_dim"):
        out[key] = _checked_real(where, key, fields_[key], minimum=0.0, optional=True)
    out["attention_factor"] = _checked_real(where, "attention_factor", fields_["attention_factor"], minimum=0.0,
                                            strict=True, optional=True)
    if not isinstance(fields_["truncate"], (bool, np.bool_)):
        raise ConfigError(f"{where}.truncate must be true or false, got {fields_['truncate']!r}")
    out["truncate"] = bool(fields_["truncate"])
    return out


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE is extended past the pre-training window: `rope_type` and its parameters (frozen, hashable).

    | rope_type | keys read                                                                         |
    |-----------|-----------------------------------------------------------------------------------|
    | default   | —                                                                                 |
    | linear    | factor (required, >= 1)                                                           |
    | dynamic   | factor (required, >= 1); the original window L0 is max_position_embeddings       |
    | yarn      | factor (required), original_max_position_embeddings, beta_fast = 32, beta_slow = 1, |
    |           | mscale, mscale_all_dim, attention_factor, truncate = True                          |

    Build it from a config's `rope_parameters` mapping with `from_rope_parameters`; `to_rope_parameters` writes
    the keys back.  Parameters of another type are ignored, as transformers does (it only warns).
    """

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        checked = _check_scaling({f.name: getattr(self, f.name) for f in dataclass_fields(self)}, "rope_parameters")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_rope_parameters(cls, params: Mapping, *, max_position_embeddings: int,
                             source: str = "rope_parameters") -> RopeScaling:
        """Parse a `rope_parameters` (or legacy `rope_scaling`) mapping, as transformers reads it.

        * `rope_type`, or its legacy alias `type` (`rope_type` wins when both are present); absent -> "default".
        * yarn: `original_max_position_embeddings` absent -> `max_position_embeddings` (transformers'
          `standardize_rope_params`); `beta_fast`/`beta_slow`/`truncate` absent or null -> 32 / 1 / True.
        * Keys of other types and unrelated keys (rope_theta, mrope_section, ...) are ignored here.
        Errors (ConfigError) name `<source>.<key>`: an unsupported type (longrope, llama3, ...), a missing
        `factor`, a value that is not a number (bools included), factor < 1, beta <= 0, beta_fast < beta_slow.
        """
        if not isinstance(params, Mapping):
            raise ConfigError(f"{source} must be a mapping, got {type(params).__name__}")
        t = params.get("rope_type", params.get("type", "default"))
        if not isinstance(t, str) or t not in ROPE_TYPES:
            raise ConfigError(f"{source}.rope_type {t!r} is not supported; supported rope types: "
                              f"{', '.join(ROPE_TYPES)}")
        kw: dict = {"rope_type": t}
        for key in ROPE_SCALING_KEYS[t]:
            if params.get(key) is not None:
                kw[key] = params[key]
        if t != "default" and "factor" not in kw:
            raise ConfigError(f"{source}.factor is required for rope_type {t!r} (a number >= 1)")
        if t == "yarn":
            kw.setdefault("original_max_position_embeddings", max_position_embeddings)
        defaults = {f.name: f.default for f in dataclass_fields(cls)}
        return cls(**_check_scaling({**defaults, **kw}, source))

    def to_rope_parameters(self) -> dict:
        """The `rope_parameters` keys: rope_type + the keys its type reads (unset optional keys left out)."""
        d: dict = {"rope_type": self.rope_type}
        for key in ROPE_SCALING_KEYS[self.rope_type]:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @property
    def depends_on_seq_len(self) -> bool:
        """True for `dynamic`: its frequencies are recomputed for the sequence length."""
        return self.rope_type == "dynamic"

    def max_seq_len(self, max_position_embeddings: int) -> int:
        """Longest sequence this scaling is meant for (the default of `Qwen35Config.resolve_max_seq_len`).

            default:          max_position_embeddings
            linear, dynamic:  ⌊factor · max_position_embeddings⌋        (the window is max_position_embeddings)
            yarn:             max(max_position_embeddings, ⌊factor · original_max_position_embeddings⌋)
        """
        if self.rope_type == "default":
            return int(max_position_embeddings)
        if self.rope_type == "yarn":
            return max(int(max_position_embeddings), int(self.factor * self.original_max_position_embeddings))
        return int(self.factor * max_position_embeddings)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor (arXiv:2309.00071 Eq. 21):  0.1 · mscale · ln(s) + 1  for s > 1, else 1."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: RopeScaling) -> float:
    """The factor the yarn cos/sin tables are multiplied by.

        attention_factor                                       if given
        get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)  if mscale and mscale_all_dim are both non-zero
        get_mscale(s) = 0.1 · ln(s) + 1                        otherwise
    """
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_get_mscale(scaling.factor, scaling.mscale) / yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_get_mscale(scaling.factor)


def yarn_correction_range(rotary_dim: int, theta: float, original_max_position_embeddings: int,
                          beta_fast: float, beta_slow: float, truncate: bool = True) -> tuple[float, float]:
    """The dimension range [low, high] over which YaRN blends extrapolation into interpolation.

    Frequency j has wavelength λ_j = 2π θ^(2j/R) and makes r_j = L / λ_j rotations over the original window L.
    The (fractional) dimension at which exactly n rotations fit solves r_d = n:

        d(n) = R · ln(L / (2π n)) / (2 ln θ)

        low = d(beta_fast),  high = d(beta_slow)          (beta_fast = 32 rotations, beta_slow = 1)
        truncate: low = ⌊low⌋, high = ⌈high⌉
        low = max(low, 0),  high = min(high, R − 1)       (the R − 1 bound is transformers')
    """
    def dim_of(n_rot: float) -> float:
        return rotary_dim * math.log(original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def yarn_ramp(low: float, high: float, num_freqs: int, *, dtype=np.float64) -> np.ndarray:
    """The linear ramp over the frequency index:  γ_j = clip((j − low) / (high − low), 0, 1),  j = 0 .. R/2 − 1.

    γ_j = 0 (j <= low: fast frequencies, many rotations in the window) keeps θ_j (extrapolation); γ_j = 1
    (j >= high: slow frequencies) uses θ_j / s (interpolation).  high = low is widened by 0.001 (no 0/0).
    Returns [R/2] in `dtype`.
    """
    dt = float_dtype(dtype)
    if low == high:
        high = high + 0.001
    ramp = (np.arange(num_freqs, dtype=dt) - dt.type(low)) / dt.type(high - low)  # [R/2]
    return np.clip(ramp, 0, 1).astype(dt)


def dynamic_ntk_theta(theta: float, factor: float, seq_len: int, original_len: int, rotary_dim: int) -> float:
    """The NTK-aware base for a sequence of length L past the original window L0 (transformers' dynamic type):

        θ' = θ · ((s · L / L0) − (s − 1))^(R / (R − 2))      with L = max(L, L0)  (so θ' = θ for L <= L0)
    """
    L = max(int(seq_len), int(original_len))
    return float(theta) * ((factor * L / original_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def scaled_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling, *, max_position_embeddings: int,
                    seq_len: int | None = None, dtype=np.float64) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] and the cos/sin attention factor of one RoPE scaling.

    With inv_freq_j = θ^(−2j/R) (`inv_freq`) and s = factor:

        default:  inv_freq_j,                                                  factor 1
        linear:   inv_freq_j / s,                                              factor 1
        dynamic:  θ'^(−2j/R),  θ' = dynamic_ntk_theta(θ, s, L, L0, R),         factor 1
                  L = seq_len (None or <= L0 = max_position_embeddings: plain inv_freq)
        yarn:     inv_freq_j / s · γ_j + inv_freq_j · (1 − γ_j),               yarn_attention_factor
                  γ = yarn_ramp(yarn_correction_range(R, θ, L_orig, beta_fast, beta_slow, truncate))

    dtype=float32 does the arithmetic in float32, as transformers; float64 is the oracle.  `default` is exactly
    `inv_freq(rotary_dim, theta, dtype=dtype)`.
    """
    dt = float_dtype(dtype)
    t = scaling.rope_type
    if t == "default":
        return inv_freq(rotary_dim, theta, dtype=dt), 1.0
    if t == "linear":
        return (inv_freq(rotary_dim, theta, dtype=dt) / dt.type(scaling.factor)).astype(dt), 1.0
    if t == "dynamic":
        if seq_len is None or seq_len <= max_position_embeddings:
            return inv_freq(rotary_dim, theta, dtype=dt), 1.0
        base = dynamic_ntk_theta(theta, scaling.factor, seq_len, max_position_embeddings, rotary_dim)
        return inv_freq(rotary_dim, base, dtype=dt), 1.0
    # yarn
    powers = _theta_powers(rotary_dim, theta, dt)  # [R/2]  θ^(2j/R)
    extrapolation = dt.type(1.0) / powers  # [R/2]  inv_freq_j
    interpolation = dt.type(1.0) / (dt.type(scaling.factor) * powers)  # [R/2]  inv_freq_j / s
    low, high = yarn_correction_range(rotary_dim, theta, scaling.original_max_position_embeddings,
                                      scaling.beta_fast, scaling.beta_slow, scaling.truncate)
    keep = dt.type(1.0) - yarn_ramp(low, high, rotary_dim // 2, dtype=dt)  # [R/2]  extrapolation weight 1 − γ_j
    blended = interpolation * (dt.type(1.0) - keep) + extrapolation * keep  # [R/2]
    return blended.astype(dt), yarn_attention_factor(scaling)


def request_seq_len(position_ids) -> int:
    """The sequence length a `dynamic` table is computed for: max position (over t, h, w) of the chunk + 1."""
    p = np.asarray(position_ids)
    return int(p.max()) + 1 if p.size else 0


def mrope_axis_of_frequency(mrope_section, *, interleaved: bool = True) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the R/2 frequencies.

    interleaved=True (Qwen3.5 / Qwen3-VL): start from t everywhere, then h takes j ≡ 1 (mod 3) for
    j < 3·s_h and w takes j ≡ 2 (mod 3) for j < 3·s_w.
    interleaved=False (Qwen2-VL "sectioned"/chunked layout; NOT Qwen3.5 — kept for teaching and negative tests):
    the first s_t frequencies are t, the next s_h are h, the last s_w are w.

    Args:
        mrope_section: (s_t, s_h, s_w) with s_t + s_h + s_w = R/2.
    Returns:
        [R/2] int array with values in {0, 1, 2}.
    """
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    if min(s_t, s_h, s_w) < 0:
        raise ValueError(f"mrope_section entries must be >= 0, got {tuple(mrope_section)}")
    half = s_t + s_h + s_w
    j = np.arange(half)
    if not interleaved:
        return np.repeat(np.array([0, 1, 2]), [s_t, s_h, s_w])
    axis = np.zeros(half, dtype=np.int64)
    axis[(j % 3 == 1) & (j < 3 * s_h)] = 1
    axis[(j % 3 == 2) & (j < 3 * s_w)] = 2
    counts = np.bincount(axis, minlength=3)
    if tuple(counts) != (s_t, s_h, s_w):
        # e.g. s_h much larger than s_t: the interleaved pattern cannot give each axis its share.
        raise ValueError(
            f"mrope_section {tuple(mrope_section)} is not realisable by the interleaved layout "
            f"(it gives t/h/w = {tuple(int(c) for c in counts)} frequencies)"
        )
    return axis


# ----------------------------------------------------------------------------------------------------------------
# Position ids
# ----------------------------------------------------------------------------------------------------------------


def text_position_ids(num_tokens: int, start: int = 0) -> np.ndarray:
    """Positions of a text-only run: the same `start + arange(T)` on all three axes.

    Returns:
        [3, T] int64.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    row = np.arange(start, start + num_tokens, dtype=np.int64)  # [T]
    return np.broadcast_to(row, (3, num_tokens)).copy()  # [3, T]


def decode_position_ids(past_len: int, num_tokens: int = 1, rope_delta: int = 0) -> np.ndarray:
    """Positions of tokens appended after `past_len` cached tokens (decode, or a later prefill chunk).

        pos = past_len + i + rope_delta  on all three axes,  i = 0 .. num_tokens − 1

    `rope_delta` (= max(prompt position) + 1 − prompt length, from `reference.multimodal.get_rope_index`) is 0
    for text-only prompts and negative after images, whose grid positions advance slower than their token count.
    Only valid once every multimodal run has been consumed; chunks that still contain image tokens must slice
    the one-shot `get_rope_index` result instead.

    Returns:
        [3, num_tokens] int64.
    """
    if past_len < 0:
        raise ValueError(f"past_len must be >= 0, got {past_len}")
    return text_position_ids(num_tokens, start=int(past_len) + int(rope_delta))


def _check_position_ids(position_ids) -> np.ndarray:
    p = np.asarray(position_ids)
    if p.ndim == 1:  # plain 1-D positions: broadcast to the three axes
        p = np.broadcast_to(p, (3, p.shape[0]))
    if p.ndim != 2 or p.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, T] (t, h, w rows) or [T], got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"position_ids must be integers, got dtype {p.dtype}")
    return p


# ----------------------------------------------------------------------------------------------------------------
# cos / sin tables
# ----------------------------------------------------------------------------------------------------------------


def mrope_angles(position_ids, inv_freq_, mrope_section, *, interleaved: bool = True) -> np.ndarray:
    """Rotation angles θ[t, j] = pos_{axis(j)}[t] · inv_freq[j].

    Each row of `position_ids` is read through its own stride, so non-contiguous slices of a larger
    [3, max_tokens] buffer are fine (docs/pitfalls.md, B19: a kernel that read only row 0 broke grounding).

    Args:
        position_ids: [3, T] integer (rows t, h, w) or [T] (broadcast to all rows).
        inv_freq_: [R/2], float32 or float64 (its dtype is the compute dtype).
        mrope_section: (s_t, s_h, s_w), summing to R/2.
    Returns:
        [T, R/2] angles in inv_freq's dtype.
    """
    p = _check_position_ids(position_ids)
    f = np.asarray(inv_freq_)
    dt = float_dtype(f.dtype)
    if f.ndim != 1:
        raise ValueError(f"inv_freq must be 1-D [R/2], got shape {f.shape}")
    if sum(int(s) for s in mrope_section) != f.shape[0]:
        raise ValueError(
            f"sum(mrope_section) = {sum(int(s) for s in mrope_section)} must equal R/2 = {f.shape[0]} "
            "(docs/pitfalls.md, B18: a mismatch means the rotary dim was taken over the wrong width)"
        )
    axis = mrope_axis_of_frequency(mrope_section, interleaved=interleaved)  # [R/2]
    pos = p.astype(dt)  # [3, T]  (positions < 2^24 are exact in float32)
    angles_all = pos[:, :, None] * f[None, None, :]  # [3, T, R/2]  one product per axis, as HF
    j = np.arange(f.shape[0])
    return angles_all[axis, :, j].T.copy()  # [T, R/2]  pick axis(j) for frequency j


def mrope_cos_sin(position_ids, inv_freq_, mrope_section, *, interleaved: bool = True,
                  attention_factor: float = 1.0):
    """cos and sin tables of width R for partial (M)RoPE.

        θ = mrope_angles(...)           [T, R/2]
        cos = a · cos(cat(θ, θ)),  sin = a · sin(cat(θ, θ))   (rotate_half pairs j with j + R/2)

    a = attention_factor (1 except for yarn, see `scaled_inv_freq`; a = 1 multiplies nothing).  Text-only
    positions (three equal rows) give exactly the 1-D RoPE table.

    Args:
        position_ids: [3, T] integer (t, h, w) or [T].
        inv_freq_: [R/2] (float32 mirrors HF's fp32 tables; float64 is the oracle).
        mrope_section: (s_t, s_h, s_w).
        interleaved: True for Qwen3.5; False gives the Qwen2-VL sectioned layout (negative tests only).
        attention_factor: a, the scale of both tables.
    Returns:
        cos, sin: [T, R] in inv_freq's dtype.
    """
    theta = mrope_angles(position_ids, inv_freq_, mrope_section, interleaved=interleaved)  # [T, R/2]
    emb = np.concatenate([theta, theta], axis=-1)  # [T, R]
    cos, sin = np.cos(emb), np.sin(emb)
    if attention_factor != 1.0:
        a = theta.dtype.type(attention_factor)
        cos, sin = cos * a, sin * a
    return cos, sin


def rope_tables(position_ids, config, *, dtype=np.float64):
    """cos, sin [T, R] of one request's chunk under the config's RoPE scaling (what `gated_attention` uses).

        inv_freq, a = scaled_inv_freq(R, θ, config.rope_scaling, L = request_seq_len(position_ids))
        cos, sin = mrope_cos_sin(position_ids, inv_freq, mrope_section, interleaved, attention_factor=a)

    Only `dynamic` reads L (max position of this chunk + 1, over t, h, w); the rule per request and per call
    is explained in docs/rope_and_mrope.md.  `config` supplies rotary_dim, rope_theta, rope_scaling,
    max_position_embeddings, mrope_section and mrope_interleaved.
    """
    scaling = getattr(config, "rope_scaling", None) or RopeScaling()
    seq_len = request_seq_len(position_ids) if scaling.depends_on_seq_len else None
    freqs, factor = scaled_inv_freq(config.rotary_dim, config.rope_theta, scaling, seq_len=seq_len,
                                    max_position_embeddings=config.max_position_embeddings, dtype=dtype)  # [R/2]
    return mrope_cos_sin(position_ids, freqs, config.mrope_section,
                         interleaved=bool(getattr(config, "mrope_interleaved", True)), attention_factor=factor)


def rope_cos_sin(positions, inv_freq_):
    """Plain 1-D RoPE tables (the text-only special case, used as an independent check).

    Args:
        positions: [T] integer.  inv_freq_: [R/2].
    Returns:
        cos, sin: [T, R].
    """
    f = np.asarray(inv_freq_)
    theta = np.asarray(positions).astype(f.dtype)[:, None] * f[None, :]  # [T, R/2]
    emb = np.concatenate([theta, theta], axis=-1)  # [T, R]
    return np.cos(emb), np.sin(emb)


# ----------------------------------------------------------------------------------------------------------------
# Applying the rotation
# ----------------------------------------------------------------------------------------------------------------


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] → [−x2, x1] over the last axis (halves of width R/2)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_partial_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first R channels of every head; copy channels R..D_h−1 bit-exactly (docs/pitfalls.md, B18).

        x_rot = x[..., :R] · cos + rotate_half(x[..., :R]) · sin
        out   = [x_rot | x[..., R:]]

    cos/sin are cast to x's dtype first (HF casts the tables to the activation dtype).

    Args:
        x: [T, heads, D_h] (float32 or float64).
        cos, sin: [T, R] with R even and R <= D_h.
    Returns:
        [T, heads, D_h], same dtype as x.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be [T, heads, D_h], got shape {x.shape}")
    if cos.shape != sin.shape or cos.ndim != 2:
        raise ValueError(f"cos and sin must both be [T, R], got {cos.shape} and {sin.shape}")
    T, _, D_h = x.shape
    R = cos.shape[1]
    if cos.shape[0] != T:
        raise ValueError(f"cos/sin have {cos.shape[0]} rows but x has T = {T}")
    if R % 2 or R > D_h or R == 0:
        raise ValueError(f"rotary width R = {R} must be even, positive and <= head_dim {D_h}")
    c = cos.astype(x.dtype)[:, None, :]  # [T, 1, R]
    s = sin.astype(x.dtype)[:, None, :]  # [T, 1, R]
    out = x.copy()  # pass-through channels keep their exact bits
    x_rot = x[..., :R]  # [T, heads, R]
    out[..., :R] = x_rot * c + rotate_half(x_rot) * s
    return out

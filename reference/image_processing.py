"""Image and video preprocessing for the Qwen3.5 vision tower, in NumPy, plus the prompt's placeholder expansion.

What Hugging Face's Qwen2-VL-family image processor (`Qwen2VLImageProcessorPil`, which transformers 5.24 maps
`qwen3_5` to) does, checked against the installed source, step by step for one RGB image [H, W, 3]:

    1. smart_resize: pick (H', W') divisible by factor = patch_size · merge_size (16·2 = 32) with
       min_pixels ≤ H'·W' ≤ max_pixels, keeping the aspect ratio as well as rounding allows:
           H' = round(H / f)·f,  W' = round(W / f)·f                                 (Python round: half to even)
           if H'·W' > max_pixels:  β = sqrt(H·W / max_pixels);  H' = max(f, ⌊H/β/f⌋·f),  W' likewise
           elif H'·W' < min_pixels: β = sqrt(min_pixels / (H·W)); H' = ⌈H·β/f⌉·f,  W' likewise
       An aspect ratio above 200 is an error.
    2. resize to (H', W') with PIL's BICUBIC convolution (here re-implemented in NumPy, see `resize`).
    3. rescale by 1/255, normalise per channel: (x − mean) / std.
    4. a still image is one frame; the temporal patch (T_p = 2) holds that frame twice.  A video's frame count
       is padded to a multiple of T_p by repeating its last frame.
    5. patchify: rows of C·T_p·P·P values in (C, T_p, P, P) order, one per patch, in *spatial-merge-block
       order* (the m×m patches of one merge window consecutive, windows row-major; frames outermost);
       grid_thw = (frames / T_p, H'/P, W'/P).

Defaults: patch 16, merge 2, T_p 2 from the vision config; mean = std = (0.5, 0.5, 0.5) and the pixel bounds
min_pixels = 65 536 (= 64 merged tokens) and max_pixels = 16 777 216 are the Qwen3-VL-family published
preprocessor values — UNCONFIRMED for Qwen3.5 checkpoints from here (the HF class defaults, 56·56 / 28·28·1280
and CLIP mean/std, are Qwen2-VL's); every value is an argument, and a checkpoint's preprocessor_config.json wins.
Videos use the Qwen3-VL video rule (`smart_resize_video`: the pixel bounds apply to frames·H'·W').

Prompt expansion (HF `Qwen3VLProcessor.replace_image_token`): each image is written in the prompt as one
`<image_pad>` (inside `<vision_start> … <vision_end>`), and is expanded to t·h·w / m² copies — one per merged
token of the tower's output.  A video placeholder becomes, per temporal patch, optional timestamp tokens then
`<vision_start> <video_pad>×(h·w/m²) <vision_end>` (`replace_video_token`).

Shape legend: H, W image size; P patch size; T_p temporal patch size; m merge size; N patches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from reference.vision import num_merged_tokens

__all__ = [
    "smart_resize", "smart_resize_video", "resample_weights", "resize", "normalize", "patchify",
    "ImageProcessor", "image_placeholder_tokens", "video_placeholder_tokens", "expand_vision_placeholders",
]

QWEN_VL_MEAN = (0.5, 0.5, 0.5)
QWEN_VL_STD = (0.5, 0.5, 0.5)
QWEN_VL_MIN_PIXELS = 65_536  # 256·256: at least 64 merged tokens (Qwen3-VL preprocessor_config; UNCONFIRMED here)
QWEN_VL_MAX_PIXELS = 16_777_216  # 4096·4096
VIDEO_MIN_PIXELS = 128 * 32 * 32  # HF Qwen3VLVideoProcessor.size (installed source)
VIDEO_MAX_PIXELS = 32 * 32 * 768


# ----------------------------------------------------------------------------------------------------------------
# Target size
# ----------------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, *, factor: int = 32, min_pixels: int = QWEN_VL_MIN_PIXELS,
                 max_pixels: int = QWEN_VL_MAX_PIXELS) -> tuple[int, int]:
    """Target (H', W') for an image (the rule in the module docstring, step 1).

    Both sides become multiples of `factor` (= patch · merge), the pixel count lands in
    [min_pixels, max_pixels], and the aspect ratio is kept as closely as rounding allows.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_video(num_frames: int, height: int, width: int, *, temporal_factor: int = 2, factor: int = 32,
                       min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """Target frame size (H', W') of a video (HF Qwen3-VL video rule).

    As `smart_resize`, but the bounds apply to T'·H'·W' with T' = round(frames / T_p)·T_p, and frames smaller than
    `factor` are first scaled up (int-truncated) so that the short side reaches `factor`.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        s = max(factor / height, factor / width)
        height, width = int(height * s), int(width * s)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ----------------------------------------------------------------------------------------------------------------
# Resampling (PIL's separable convolution convention)
# ----------------------------------------------------------------------------------------------------------------


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = −0.5 (PIL's BICUBIC), support 2."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    """Linear hat kernel (PIL's BILINEAR), support 1."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_triangle, 1.0)}
_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


def resample_weights(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
    """The [out_size, in_size] matrix of one axis of a PIL-style resize (float64; rows sum to 1).

    Output pixel i has its centre at c = (i + 0.5)·s in input coordinates, s = in/out.  When shrinking
    (s > 1) the kernel is stretched by s, which low-pass filters ("antialias"); when enlarging it is not.
    Input pixel j contributes kernel((j − c + 0.5) / max(s, 1)) for j in [⌊c − support + 0.5⌋, ⌊c + support + 0.5⌋),
    clipped to the image (no reflection: the clipped taps are dropped and the row renormalised).
    """
    if method not in _FILTERS:
        raise ValueError(f"resample method must be one of {sorted(_FILTERS)}, got {method!r}")
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    kernel, base_support = _FILTERS[method]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    inv = 1.0 / filterscale
    M = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward 0, as C does
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = kernel((j - center + 0.5) * inv)
        total = w.sum()
        if total != 0.0:
            w = w / total
        M[i, lo:hi] = w
    return M


def _resample_axis_uint8(img: np.ndarray, M: np.ndarray, axis: int) -> np.ndarray:
    """One pass on 8-bit data with PIL's fixed-point arithmetic: 22-bit integer weights, round-half-up, clamp."""
    one = 1 << _PRECISION_BITS
    K = np.where(M < 0, np.trunc(-0.5 + M * one), np.trunc(0.5 + M * one)).astype(np.int64)  # [out, in]
    x = np.moveaxis(img.astype(np.int64), axis, 0)  # [in, ...]
    acc = np.tensordot(K, x, axes=(1, 0)) + (1 << (_PRECISION_BITS - 1))  # [out, ...]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize(image: np.ndarray, size: tuple[int, int], method: str = "bicubic", *, order: str = "hv") -> np.ndarray:
    """Resize an [H, W, C] image to `size` = (H', W') with PIL's convolution resampling.

    uint8 images follow PIL's 8-bit path bit for bit: one pass per axis whose size changes, each rounded and
    clamped to uint8.  `order="hv"` (horizontal pass first) is PIL's classic order and what Pillow 13 still does
    whenever the height is not scaled down more than the width; Pillow 13 (python-pillow/Pillow#9549) runs the
    vertical pass first when the height shrinks "significantly more" than the width, which moves a few pixels
    by a few levels — pass `order="vh"` to get that order.  Float images use the same weights in float64 (no
    rounding, so the order does not matter beyond float rounding).  An unchanged size returns a copy.
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {img.shape}")
    if order not in ("hv", "vh"):
        raise ValueError(f"order must be 'hv' or 'vh', got {order!r}")
    H, W = img.shape[:2]
    Ho, Wo = int(size[0]), int(size[1])
    out = img.copy()
    for axis in ((1, 0) if order == "hv" else (0, 1)):
        n_in, n_out = (W, Wo) if axis == 1 else (H, Ho)
        if n_in == n_out:
            continue
        M = resample_weights(n_in, n_out, method)  # [out, in]
        if out.dtype == np.uint8:
            out = _resample_axis_uint8(out, M, axis)
        else:
            out = np.moveaxis(np.tensordot(M, np.moveaxis(out.astype(np.float64), axis, 0), axes=(1, 0)), 0, axis)
    return out


def normalize(image: np.ndarray, mean, std, *, rescale_factor: float | None = 1 / 255, dtype=np.float32):
    """(image · rescale_factor − mean) / std per channel, in `dtype` (channels last).

    With dtype float32 this follows HF's order of operations exactly: the rescale in float64, cast to float32,
    then subtract and divide in float32.
    """
    x = np.asarray(image, dtype=np.float64)
    if rescale_factor is not None:
        x = x * rescale_factor
    x = x.astype(dtype)
    mean = np.asarray(mean, dtype=dtype)
    std = np.asarray(std, dtype=dtype)
    return (x - mean) / std


def patchify(frames: np.ndarray, patch_size: int = 16, temporal_patch_size: int = 2, merge_size: int = 2):
    """Cut [F, H, W, C] frames (H, W multiples of P·m) into rows of C·T_p·P·P values, merge-block order.

    F is padded to a multiple of T_p by repeating the last frame (a still image, F = 1, is thus duplicated).
    Row order: temporal patch, merge-window row, merge-window col, in-window row, in-window col; each row holds
    (C, T_p, P, P) flattened — the layout of the Conv3d kernel.

    Returns:
        patches [N, C·T_p·P·P] (N = t·h·w),  grid_thw (t, h, w) in patches.
    """
    x = np.asarray(frames)
    if x.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, C], got shape {x.shape}")
    F, H, W, C = x.shape
    P, Tp, m = patch_size, temporal_patch_size, merge_size
    if H % (P * m) or W % (P * m):
        raise ValueError(f"frame size {H}x{W} must be a multiple of patch_size·merge_size = {P * m}")
    if F % Tp:
        x = np.concatenate([x, np.repeat(x[-1:], Tp - F % Tp, axis=0)])  # repeat the last frame
    t, h, w = x.shape[0] // Tp, H // P, W // P
    x = x.reshape(t, Tp, h // m, m, P, w // m, m, P, C)  # [t, T_p, bh, ih, py, bw, iw, px, C]
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # [t, bh, bw, ih, iw, C, T_p, py, px]
    return x.reshape(t * h * w, C * Tp * P * P), (t, h, w)


@dataclass
class ImageProcessor:
    """RGB images / videos → `pixel_values`, `grid_thw` for the vision tower (see the module docstring).

    Use `ImageProcessor.from_vision_config(config.vision_config)` to take patch, merge and temporal sizes from
    the model; override the rest (e.g. from a checkpoint's preprocessor_config.json) as keyword arguments.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = QWEN_VL_MIN_PIXELS
    max_pixels: int = QWEN_VL_MAX_PIXELS
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    image_mean: tuple = field(default=QWEN_VL_MEAN)
    image_std: tuple = field(default=QWEN_VL_STD)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    resize_order: str = "hv"  # PIL pass order, see `resize` (Pillow 13 sometimes runs "vh")
    dtype: type = np.float32

    @classmethod
    def from_vision_config(cls, vision_config, **overrides) -> ImageProcessor:
        kw = dict(patch_size=vision_config.patch_size, temporal_patch_size=vision_config.temporal_patch_size,
                  merge_size=vision_config.spatial_merge_size)
        kw.update(overrides)
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def _frames(self, frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Resize + normalise [F, H, W, 3] frames to [F, H', W', 3] in self.dtype."""
        if frames.shape[-1] != 3:
            raise ValueError(f"images must be RGB, channels last ([..., H, W, 3]); got shape {frames.shape}")
        rescale = self.rescale_factor if frames.dtype == np.uint8 else None  # float input: already in [0, 1]
        out = [normalize(resize(f, size, self.resample, order=self.resize_order), self.image_mean, self.image_std,
                         rescale_factor=rescale, dtype=self.dtype) for f in frames]
        return np.stack(out)

    def preprocess(self, images) -> dict:
        """images: one [H, W, 3] array or a list of them (uint8 0..255, or float in [0, 1]).

        Returns {"pixel_values": [Σ N_i, C·T_p·P·P], "image_grid_thw": [n, 3] int64}.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        rows, grids = [], []
        for img in images:
            img = np.asarray(img)
            if img.ndim != 3:
                raise ValueError(f"each image must be [H, W, 3], got shape {img.shape}")
            size = smart_resize(img.shape[0], img.shape[1], factor=self.factor, min_pixels=self.min_pixels,
                                max_pixels=self.max_pixels)
            p, grid = patchify(self._frames(img[None], size), self.patch_size, self.temporal_patch_size,
                               self.merge_size)
            rows.append(p)
            grids.append(grid)
        return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.array(grids, dtype=np.int64)}

    def preprocess_video(self, videos) -> dict:
        """videos: one [F, H, W, 3] frame stack (already sampled) or a list of them.

        Returns {"pixel_values_videos": [Σ N_i, C·T_p·P·P], "video_grid_thw": [n, 3] int64}.
        """
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        rows, grids = [], []
        for v in videos:
            v = np.asarray(v)
            if v.ndim != 4:
                raise ValueError(f"each video must be [F, H, W, 3], got shape {v.shape}")
            size = smart_resize_video(max(v.shape[0], self.temporal_patch_size), v.shape[1], v.shape[2],
                                      temporal_factor=self.temporal_patch_size, factor=self.factor,
                                      min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels)
            p, grid = patchify(self._frames(v, size), self.patch_size, self.temporal_patch_size, self.merge_size)
            rows.append(p)
            grids.append(grid)
        return {"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.array(grids, dtype=np.int64)}


# ----------------------------------------------------------------------------------------------------------------
# Prompt expansion
# ----------------------------------------------------------------------------------------------------------------


def image_placeholder_tokens(grid_thw, config) -> list[int]:
    """`<vision_start> <image_pad>×n <vision_end>` for one image, n = t·h·w / m²."""
    n = int(num_merged_tokens(grid_thw, config.vision_config.spatial_merge_size)[0])
    return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]


def video_placeholder_tokens(grid_thw, config, timestamp_tokens=None) -> list[int]:
    """Per temporal patch k: timestamp_tokens[k] (optional) + `<vision_start> <video_pad>×(h·w/m²) <vision_end>`."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    n = h * w // config.vision_config.spatial_merge_size ** 2
    out = []
    for k in range(t):
        if timestamp_tokens is not None:
            out.extend(int(x) for x in timestamp_tokens[k])
        out += [config.vision_start_token_id] + [config.video_token_id] * n + [config.vision_end_token_id]
    return out


def expand_vision_placeholders(tokens, config, image_grid_thw=None, video_grid_thw=None, *,
                               video_timestamp_tokens=None) -> list[int]:
    """Expand a prompt written with one `<image_pad>` per image (one `<video_pad>` per video) to the model form.

    The k-th image_token_id becomes t·h·w/m² copies of itself (grid k of `image_grid_thw`); the k-th
    video_token_id is replaced by `video_placeholder_tokens(grid k, ...)` (its own vision_start / end per temporal
    patch, as HF's Qwen3-VL processor writes it).  Counts of placeholders and grids must agree.
    """
    img = [] if image_grid_thw is None else list(np.asarray(image_grid_thw).reshape(-1, 3))
    vid = [] if video_grid_thw is None else list(np.asarray(video_grid_thw).reshape(-1, 3))
    m = config.vision_config.spatial_merge_size
    out: list[int] = []
    ni = nv = 0
    for tok in np.asarray(tokens).tolist():
        if tok == config.image_token_id:
            if ni >= len(img):
                raise ValueError(f"the prompt has more image placeholders than the {len(img)} image grids given")
            out += [tok] * int(num_merged_tokens(img[ni], m)[0])
            ni += 1
        elif tok == config.video_token_id:
            if nv >= len(vid):
                raise ValueError(f"the prompt has more video placeholders than the {len(vid)} video grids given")
            ts = None if video_timestamp_tokens is None else video_timestamp_tokens[nv]
            out += video_placeholder_tokens(vid[nv], config, ts)
            nv += 1
        else:
            out.append(tok)
    if ni != len(img) or nv != len(vid):
        raise ValueError(f"{len(img)} image and {len(vid)} video grids were given but the prompt holds {ni} image "
                         f"and {nv} video placeholders")
    return out

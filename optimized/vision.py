"""The Qwen3.5 vision tower in PyTorch: the twin of reference/vision.py (same math, same order of rows).

    x   = patches Wpᵀ + bp + Σ_k w_k · pos_embed[idx_k]          [N, D]
    repeat depth: x += Attn(LN1 x) (2-D rotary, per-frame segments);  x += MLP(LN2 x) (gelu tanh)
    out = fc2(GELU(fc1(LN(x) viewed as [N/m², m²·D])))          [N/m², H_out]

What runs where:
- The grid-derived inputs (bilinear `indices`/`weights`, rotary `position_ids`, `cu_seqlens`) are integer / small
  host-side arrays that depend on `grid_thw` only; they come from `reference.vision.vision_inputs` (one owner, as
  MAX precomputes them on the host) and are moved to the device once per call.
- Attention uses `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU)
  once per segment (one image or video frame), never a dense [N, N] block-diagonal mask, so memory stays
  O(max segment²) per head at most.
- The rotary embedding is applied in fp32 and cast back (HF `apply_rotary_pos_emb_vision`); LayerNorm, the
  linears and the activations run in the weights' dtype (float32, bfloat16, or float64 for exact checks).

Shape legend: N patches, D vision hidden, nh heads, D_h head dim, m merge size, H_out LM hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from optimized.rope import rotate_half
from reference.multimodal import MultimodalPlan, MultimodalPrefill, plan_multimodal_prefill
from reference.vision import VisionInputs, check_grid_thw, num_patches, vision_inputs

__all__ = ["VisionTower", "vision_rope_cos_sin", "multimodal_prefill_inputs"]

_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
               "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
               "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")


def vision_rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """fp32 cos/sin [N, D_h] from (row, col) ids [N, 2]: [θ(row) | θ(col)] duplicated (reference twin)."""
    spatial = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float64, device=position_ids.device) / spatial))
    dt = torch.float64 if position_ids.dtype == torch.float64 else torch.float32
    ang = position_ids.to(dt)[:, :, None] * inv.to(dt)  # [N, 2, D_h/4]
    half = torch.cat([ang[:, 0], ang[:, 1]], dim=-1)  # [N, D_h/2]
    emb = torch.cat([half, half], dim=-1)  # [N, D_h]
    return emb.cos(), emb.sin()



@dataclass
class _Block:
    n1w: torch.Tensor
    n1b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    n2w: torch.Tensor
    n2b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor


class VisionTower:
    """The tower with its weights on one device.  `tower(pixel_values, grid_thw) -> [N/m², H_out]`."""

    def __init__(self, tensors: dict, vision_config, *, device="cpu", dtype=torch.float32):
        vc = vision_config
        self.config = vc
        self.device = torch.device(device)
        self.dtype = dtype

        def get(name, shape):
            if name not in tensors:
                raise KeyError(f"vision weights: missing tensor {name!r} (expected shape {shape})")
            t = torch.as_tensor(np.asarray(tensors[name]) if not torch.is_tensor(tensors[name]) else tensors[name])
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"vision weights: {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            return t.to(device=self.device, dtype=dtype)

        D, I, m2 = vc.hidden_size, vc.intermediate_size, vc.merge_unit
        shapes = dict(zip(_BLOCK_KEYS, [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (I, D), (I,),
                                        (D, I), (D,)], strict=True))
        self.patch_w = get("patch_embed.proj.weight", (D, vc.in_channels, vc.temporal_patch_size, vc.patch_size,
                                                       vc.patch_size)).reshape(D, -1)  # [D, C·T_p·P·P]
        self.patch_b = get("patch_embed.proj.bias", (D,))
        self.pos_embed = get("pos_embed.weight", (vc.num_position_embeddings, D))  # [S·S, D]
        self.blocks = [_Block(*(get(f"blocks.{i}.{k}", shapes[k]) for k in _BLOCK_KEYS)) for i in range(vc.depth)]
        self.m_nw = get("merger.norm.weight", (D,))
        self.m_nb = get("merger.norm.bias", (D,))
        self.m_fc1_w = get("merger.linear_fc1.weight", (m2 * D, m2 * D))
        self.m_fc1_b = get("merger.linear_fc1.bias", (m2 * D,))
        self.m_fc2_w = get("merger.linear_fc2.weight", (vc.out_hidden_size, m2 * D))
        self.m_fc2_b = get("merger.linear_fc2.bias", (vc.out_hidden_size,))

    @classmethod
    def from_state_dict(cls, tensors: dict, vision_config, *, device="cpu", dtype=torch.float32) -> VisionTower:
        """From the `model.visual.*` tensors with the prefix stripped (numpy arrays or torch tensors)."""
        return cls(tensors, vision_config, device=device, dtype=dtype)

    def _attention(self, x: torch.Tensor, b: _Block, cos, sin, cu: list[int]) -> torch.Tensor:
        N, D = x.shape
        nh = self.config.num_heads
        qkv = F.linear(x, b.qkv_w, b.qkv_b).view(N, 3, nh, D // nh)  # [N, 3, nh, D_h]
        rdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k = (qkv[:, i].to(rdt) for i in range(2))
        q = (q * cos[:, None] + rotate_half(q) * sin[:, None]).to(x.dtype)  # rotary in fp32 (HF)
        k = (k * cos[:, None] + rotate_half(k) * sin[:, None]).to(x.dtype)
        v = qkv[:, 2]
        out = torch.empty_like(v)  # [N, nh, D_h]
        for s, e in pairwise(cu):  # one image / frame per call: no cross-segment attention
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1))  # [nh, L, D_h]
            out[s:e] = o.transpose(0, 1)
        return F.linear(out.reshape(N, D), b.proj_w, b.proj_b)

    @torch.no_grad()
    def __call__(self, pixel_values, grid_thw, *, inputs: VisionInputs | None = None) -> torch.Tensor:
        """pixel_values [N, C·T_p·P·P] (tensor or array), grid_thw [n, 3] → merged embeddings [N/m², H_out]."""
        vc = self.config
        g = check_grid_thw(np.asarray(grid_thw.cpu() if torch.is_tensor(grid_thw) else grid_thw),
                           vc.spatial_merge_size)
        inp = inputs if inputs is not None else vision_inputs(g, vc)
        if not np.array_equal(inp.grid_thw, g):
            raise ValueError(f"precomputed vision inputs were built for a different grid_thw "
                             f"({np.asarray(inp.grid_thw).tolist()}, not {g.tolist()})")
        pv = torch.as_tensor(pixel_values).to(device=self.device, dtype=self.dtype)
        N = num_patches(g)
        if tuple(pv.shape) != (N, vc.patch_dim):
            raise ValueError(f"pixel_values must be [{N}, {vc.patch_dim}] for grid_thw {g.tolist()}, "
                             f"got {tuple(pv.shape)}")
        dev = self.device
        idx = torch.as_tensor(inp.indices, device=dev)  # [N, 4]
        wts = torch.as_tensor(inp.weights, device=dev).to(self.dtype)  # [N, 4]
        pos = torch.as_tensor(inp.position_ids, device=dev)  # [N, 2]
        if self.dtype == torch.float64:
            pos = pos.to(torch.float64)
        cos, sin = vision_rope_cos_sin(pos, vc.head_dim, vc.rope_theta)  # [N, D_h] fp32 (fp64 for checks)
        cu = [int(c) for c in inp.cu_seqlens]

        x = F.linear(pv, self.patch_w, self.patch_b)  # [N, D]
        x = x + (self.pos_embed[idx] * wts[:, :, None]).sum(1)  # [N, D]
        eps = vc.layer_norm_eps
        D = vc.hidden_size
        for b in self.blocks:
            x = x + self._attention(F.layer_norm(x, (D,), b.n1w, b.n1b, eps), b, cos, sin, cu)
            h = F.gelu(F.linear(F.layer_norm(x, (D,), b.n2w, b.n2b, eps), b.fc1_w, b.fc1_b), approximate="tanh")
            x = x + F.linear(h, b.fc2_w, b.fc2_b)
        y = F.layer_norm(x, (D,), self.m_nw, self.m_nb, eps).reshape(N // vc.merge_unit, vc.merge_unit * D)
        y = F.gelu(F.linear(y, self.m_fc1_w, self.m_fc1_b))  # exact GELU
        return F.linear(y, self.m_fc2_w, self.m_fc2_b)  # [N/m², H_out]


def multimodal_prefill_inputs(ctx, tower: VisionTower | None, config, *,
                              plan: MultimodalPlan | None = None) -> MultimodalPrefill:
    """The optimized twin of `reference.multimodal.multimodal_prefill_inputs`.

    Validation, placeholder rows and MRoPE positions come from `reference.multimodal.plan_multimodal_prefill`
    (one owner); only the tower runs here.  `plan`: that function's result for `ctx` when the caller already has
    it (the model plans before it builds the tower), so it is not computed twice.  `embeddings` is a tensor [n, H]
    on the tower's device and dtype, `image_rows` / `position_ids` stay NumPy int64 (host-side, as the model packs
    them).
    """
    if plan is None:
        plan = plan_multimodal_prefill(ctx, config)
    if plan.inputs and tower is None:
        raise ValueError(f"request {getattr(ctx, 'request_id', '?')!r} carries pixels but no vision tower was given")
    if not plan.inputs:
        dev, dt = (tower.device, tower.dtype) if tower is not None else ("cpu", torch.float32)
        emb = torch.zeros((0, config.hidden_size), device=dev, dtype=dt)
    else:
        feats = [tower(pix, g) for _, pix, g in plan.inputs]  # each [Σ t·h·w / m², H]
        emb = torch.cat(feats)[torch.as_tensor(plan.order, device=tower.device)]
    return MultimodalPrefill(image_rows=plan.image_rows, embeddings=emb, position_ids=plan.position_ids,
                             rope_delta=plan.rope_delta)

"""Multimodal prompt cases shared by the image / video test files (reference and optimized models alike).

Prompts on the tiny multimodal checkpoint of tests/hf_checkpoints.py (`tiny_config("multimodal")`), with the
placeholders already expanded as a Hugging Face processor would, and seeded random pixels.
"""
from __future__ import annotations

import numpy as np

from reference.image_processing import expand_vision_placeholders
from tests.hf_checkpoints import tiny_config

CFG = tiny_config("multimodal")
IMG, VID, VS, VE = CFG.image_token_id, CFG.video_token_id, CFG.vision_start_token_id, CFG.vision_end_token_id


def pixels(grid, seed):
    """Random pixel values [Σ t·h·w, patch_dim] float32 for the grids [n, 3]."""
    n = int(np.prod(np.asarray(grid).reshape(-1, 3), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, CFG.vision_config.patch_dim)).astype(np.float32)


def prompt_case(name):
    """(prompt tokens with expanded placeholders, TextAndVisionContext pixel kwargs) of a named case:
    "one-image", "two-images" (different grids: 8 and 3 merged tokens) or "video" (two temporal patches)."""
    if name == "one-image":
        grid = np.array([[1, 6, 4]])
        toks = [1, 2, 3, VS, IMG, VE, 5, 6, 7]
        return expand_vision_placeholders(toks, CFG, grid, None), dict(pixel_values=pixels(grid, 1),
                                                                       image_grid_thw=grid)
    if name == "two-images":
        grid = np.array([[1, 4, 8], [1, 6, 2]])  # different grids: 8 and 3 merged tokens
        toks = [4, 5, VS, IMG, VE, 8, VS, IMG, VE, 9, 10, 11]
        return expand_vision_placeholders(toks, CFG, grid, None), dict(pixel_values=pixels(grid, 2),
                                                                       image_grid_thw=grid)
    if name == "video":
        grid = np.array([[2, 4, 4]])  # two temporal patches: two runs of 4 placeholders
        toks = [3, 4, VID, 12, 13]
        return expand_vision_placeholders(toks, CFG, None, grid), dict(pixel_values_videos=pixels(grid, 3),
                                                                       video_grid_thw=grid)
    raise KeyError(name)


def inside_placeholder_runs(toks):
    """Split points k (chunk [0, k), [k, ...)) with placeholders on both sides: inside a run."""
    t = np.asarray(toks)
    ph = np.isin(t, [IMG, VID])
    return [k for k in range(1, len(t)) if ph[k - 1] and ph[k]]


def hf_kwargs(toks, kw):
    """Keyword arguments of a Hugging Face forward call for the prompt `toks` with pixel kwargs `kw`."""
    import torch

    ids = torch.tensor([toks])
    types = torch.zeros_like(ids)  # HF computes MRoPE positions from mm_token_type_ids
    types[ids == IMG] = 1
    types[ids == VID] = 2
    return dict(input_ids=ids, mm_token_type_ids=types, **{k: torch.from_numpy(np.asarray(v)) for k, v in kw.items()})

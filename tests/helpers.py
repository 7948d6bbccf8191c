"""Shared test inputs."""

import torch

from tiny_models import TINY_DIT


def video_inputs(batch=1, frames=3, height=8, width=12, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY_DIT["in_channels"], frames, height, width, generator=g)
    text = torch.randn(batch, text_len, TINY_DIT["text_dim"], generator=g)
    refs = torch.randn(batch, TINY_DIT["in_channels"], 2, height, width, generator=g)
    return x, torch.full((batch,), 700.0), text, refs

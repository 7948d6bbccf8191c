"""Fewer DiT evaluations: diffusers' cache hooks (FirstBlockCache, MagCache, TaylorSeer) on our DiT, one cache
state per guidance pass (`dit.cache_context(pass name)`), and MagCache calibration on our own model.

The exact text K/V cache is not here: it is `TextKVCache` (`transformer_refalign.py`), which the sampler run owns
and passes to the DiT's forward."""

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

CACHES = ("none", "first_block", "magcache", "taylorseer")
DEFAULT_THRESHOLDS = {"first_block": 0.05, "magcache": 0.06}
DEFAULT_INTERVAL = 3
# diffusers' default TaylorSeer patterns end in "attn" and so miss Wan's attn1 / attn2: name Wan's modules
TAYLORSEER_MODULES = [r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn"]


def cache_config(kind: str, steps: int, threshold: float | None = None, interval: int | None = None,
                 mag_ratios: list[float] | None = None):
    """The diffusers cache config for `kind` (None for "none"). MagCache needs `mag_ratios` from
    `MagCalibration` (any step count: diffusers interpolates them to `steps`)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    threshold = DEFAULT_THRESHOLDS.get(kind) if threshold is None else threshold
    if kind == "none":
        return None
    if kind == "first_block":
        return FirstBlockCacheConfig(threshold=threshold)
    if kind == "magcache":
        if mag_ratios is None:
            raise ValueError("MagCache needs calibrated mag_ratios")
        return MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=list(mag_ratios),
                              max_skip_steps=3, retention_ratio=0.2)
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=interval or DEFAULT_INTERVAL, disable_cache_before_step=3,
                                     max_order=1, taylor_factors_dtype=torch.float32,
                                     cache_identifiers=TAYLORSEER_MODULES)
    raise ValueError(f"unknown cache {kind!r}")


@contextlib.contextmanager
def dit_cache(dit, config):
    """Enable a diffusers cache on the DiT for one sampling run, with fresh state; removed afterwards."""
    if config is None:
        yield
        return
    if getattr(dit, "_cache_config", None) is not None:
        dit.disable_cache()
    dit.enable_cache(config)
    hooked = sum(getattr(m, "_diffusers_hook", None) is not None and bool(m._diffusers_hook.hooks)
                 for m in dit.blocks.modules())
    if not hooked:
        dit.disable_cache()
        raise RuntimeError(f"{type(config).__name__} attached to no block of this DiT")
    dit._reset_stateful_cache()
    try:
        yield
    finally:
        dit.disable_cache()


class MagCalibration:
    """Measures MagCache's magnitude ratios on our model during one uncached run: per DiT call, the residual
    r = (last block output − first block input); ratio_t = mean over tokens of ‖r_t‖ / ‖r_{t−1}‖, per guidance pass,
    averaged over the passes."""

    def __init__(self, dit):
        self.dit, self.context, self.inputs = dit, None, None
        self.residuals: dict[str, list[torch.Tensor]] = {}
        self.ratios: dict[str, list[float]] = {}
        self.handles = [dit.blocks[0].register_forward_pre_hook(self._first, with_kwargs=True),
                        dit.blocks[-1].register_forward_hook(self._last)]

    def _first(self, module, args, kwargs):
        self.inputs = args[0] if args else kwargs["hidden_states"]

    def _last(self, module, args, output):
        residual = (output - self.inputs).float()
        ratios = self.ratios.setdefault(self.context, [])
        previous = self.residuals.get(self.context)
        ratios.append(1.0 if previous is None else
                      (residual.norm(dim=-1) / (previous.norm(dim=-1) + 1e-8)).mean().item())
        self.residuals[self.context] = residual

    def close(self) -> list[float]:
        """Removes the hooks; returns the per-step ratios averaged over the passes ([] if nothing ran)."""
        for handle in self.handles:
            handle.remove()
        if not self.ratios:
            return []
        steps = min(len(r) for r in self.ratios.values())
        return [sum(r[i] for r in self.ratios.values()) / len(self.ratios) for i in range(steps)]

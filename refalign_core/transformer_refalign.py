"""RefAlign DiT: Wan2.1 `WanTransformer3DModel` with the reference tail.

Reference latents `[B, C, K, H, W]` are appended after the video latents on the frame axis, patchified with the
same `patch_embedding` and processed with shared weights. Compared with plain Wan2.1:

* RoPE: reference k gets temporal position F + k (F = video latent frames); its spatial grid restarts at 0.
* Modulation: reference tokens share the video's (noisy) timestep modulation.
* Text cross-attention updates video tokens only (`VideoOnlyCrossAttnProcessor`).
* Reference tokens are dropped before the head; the output is the velocity of the F video frames.

There are no new parameters: a RefAlign checkpoint has exactly the Wan2.1 T2V key set.

`RefAlignTransformer3DModel.forward` is adapted from `WanTransformer3DModel.forward` of diffusers 0.42.1 (its
source hash is pinned in `PARENT_FORWARD_SHA256`; `tests/test_transformer.py` fails when it changes). Our four
changes: (1) the reference latents are concatenated on the frame axis before RoPE and patchify; (2) each block runs
with the reference-token count passed to its cross-attention processor (and, for a padded training batch, the
padded references' key mask to its self-attention processor); (3) the reference tokens' residual stream is returned
for the blocks asked for (training); (4) only the video tokens enter the head. Not carried over: Wan2.2 per-token
timesteps and the I2V image embeddings (this is a T2V DiT).
"""

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import BaseOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
from diffusers.utils import apply_lora_scale

PARENT_FORWARD_SHA256 = "9f81a7225288656f1fa424fbd502206d5d242bad2bda9e11e2571eb5bf25ed30"


class VideoOnlyCrossAttnProcessor(WanAttnProcessor):
    """Wan cross-attention applied to the leading video tokens only.

    `num_reference_tokens` trailing tokens get a zero update, so the block's residual leaves them unchanged. The
    model sets it right before calling the block (inside the checkpointed function, so recomputation sees it too).

    Text K/V cache (exact): with `text_kv_key` set, the text keys and values (to_k / to_v / norm_k of the prompt
    embeddings, constant over a sampling run) are computed once per key and reused; the sampler keys them by
    guidance pass and clears them after the run (`RefAlignTransformer3DModel.clear_text_kv_cache`).
    """

    def __init__(self):
        super().__init__()
        self.num_reference_tokens = 0
        self.text_kv_key = None
        self.text_kv = {}

    def _text_key_value(self, attn, encoder_hidden_states):
        if self.text_kv_key is not None and self.text_kv_key in self.text_kv:
            return self.text_kv[self.text_kv_key]
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if self.text_kv_key is not None:
            self.text_kv[self.text_kv_key] = (key, value)
        return key, value

    def _cross_attention(self, attn, hidden_states, encoder_hidden_states):
        """Wan2.1 T2V text cross-attention (no RoPE, no mask, no image branch), with the text K/V cache."""
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key, value = self._text_key_value(attn, encoder_hidden_states)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None or attn.fused_projections or attention_mask is not None or \
                rotary_emb is not None:
            raise ValueError("VideoOnlyCrossAttnProcessor is for Wan2.1 T2V cross-attention (unfused, no image "
                             "branch, no mask, no RoPE)")
        n_ref = self.num_reference_tokens
        if n_ref == 0:
            return self._cross_attention(attn, hidden_states, encoder_hidden_states)
        video = self._cross_attention(attn, hidden_states[:, :-n_ref], encoder_hidden_states)
        return F.pad(video, (0, 0, 0, n_ref))


class ReferenceMaskedSelfAttnProcessor(WanAttnProcessor):
    """Wan self-attention whose keys skip padded reference tokens.

    A training batch whose samples have different numbers of references is padded to the largest K; `key_mask`
    `[B, 1, 1, L]` (True = attend) keeps every sample's tokens from attending to its padding, so each sample's
    output equals its unpadded forward. None (the default, and always at inference) is plain Wan self-attention."""

    def __init__(self):
        super().__init__()
        self.key_mask = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.key_mask is not None:
            attention_mask = self.key_mask
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@dataclass
class RefAlignTransformerOutput(BaseOutput):
    """`sample`: velocity for the video frames `[B, C_out, F, H, W]`.
    `reference_features`: block index -> residual stream of the reference tokens after that block, `[B, K*T, dim]`
    (T = tokens per reference), only for the blocks asked for."""

    sample: torch.Tensor
    reference_features: dict[int, torch.Tensor] | None = None


def _run_block(block, num_reference_tokens, text_kv_key, key_mask, hidden_states, encoder_hidden_states,
               timestep_proj, rotary_emb):
    processor, self_processor = block.attn2.processor, block.attn1.processor
    if not isinstance(processor, VideoOnlyCrossAttnProcessor):
        raise RuntimeError(
            "a block's cross-attention processor was replaced; RefAlign needs VideoOnlyCrossAttnProcessor there "
            "(use set_attention_backend to change the attention backend)"
        )
    processor.num_reference_tokens, processor.text_kv_key = num_reference_tokens, text_kv_key
    if key_mask is not None:
        if not isinstance(self_processor, ReferenceMaskedSelfAttnProcessor):
            raise RuntimeError("a block's self-attention processor was replaced; a padded reference batch needs "
                               "ReferenceMaskedSelfAttnProcessor there")
        self_processor.key_mask = key_mask
    try:
        return block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
    finally:
        if key_mask is not None:
            self_processor.key_mask = None


class RefAlignTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 T2V DiT that takes clean reference latents as extra trailing frames (see module docstring)."""

    # The parent's context-parallel plan splits the whole token sequence across ranks at block 0. Here the sequence
    # is video + reference tail and the cross-attention must know which tokens are references, which a split
    # sequence does not tell it: no context-parallel plan (enable_parallelism refuses), rather than a silently wrong
    # one.
    _cp_plan = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.image_dim is not None or self.config.added_kv_proj_dim is not None:
            raise ValueError("RefAlign is a text-to-video DiT: image_dim / added_kv_proj_dim (I2V) are not supported")
        for block in self.blocks:
            block.attn1.set_processor(ReferenceMaskedSelfAttnProcessor())
            block.attn2.set_processor(VideoOnlyCrossAttnProcessor())

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of `height` x `width` latent pixels."""
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states) -> None:
        """Shapes that would otherwise broadcast into a wrong result (or fail deep inside) are refused here."""
        c = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != c.in_channels:
            raise ValueError(f"hidden_states must be [B, {c.in_channels}, F, H, W], got {tuple(hidden_states.shape)}")
        batch = hidden_states.shape[0]
        _, p_h, p_w = c.patch_size
        if hidden_states.shape[3] % p_h or hidden_states.shape[4] % p_w:
            raise ValueError(f"the latent height and width must be multiples of the patch size {(p_h, p_w)}, got "
                             f"{tuple(hidden_states.shape[3:])}")
        steps = torch.as_tensor(timestep)
        if steps.ndim > 1 or (steps.ndim == 1 and steps.shape[0] != batch):
            raise ValueError(f"timestep must be a scalar or [B={batch}], got shape {tuple(steps.shape)}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch or \
                encoder_hidden_states.shape[2] != c.text_dim:
            raise ValueError(f"encoder_hidden_states must be [B={batch}, L, {c.text_dim}], got "
                             f"{tuple(encoder_hidden_states.shape)}")

    def _key_mask(self, reference_mask, batch_size, num_references, num_video_tokens, tokens_per_reference, device):
        """`[B, K]` reference mask -> self-attention key mask `[B, 1, 1, L]`, or None when nothing is padded."""
        if reference_mask is None:
            return None
        if reference_mask.shape != (batch_size, num_references) or reference_mask.dtype != torch.bool:
            raise ValueError(f"reference_mask must be a bool tensor [B, K] = {[batch_size, num_references]}, got "
                             f"{reference_mask.dtype} {list(reference_mask.shape)}")
        if bool(reference_mask.all()):
            return None
        if self.config.patch_size[0] != 1:
            raise ValueError("reference_mask needs a DiT with temporal patch size 1 (one token frame per reference)")
        video = torch.ones(batch_size, num_video_tokens, dtype=torch.bool, device=device)
        references = reference_mask.to(device).repeat_interleave(tokens_per_reference, dim=1)
        return torch.cat([video, references], dim=1)[:, None, None, :]

    def clear_text_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn2.processor.text_kv.clear()

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
        reference_feature_blocks: Sequence[int] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        text_kv_key: str | None = None,
        reference_mask: torch.Tensor | None = None,
    ) -> RefAlignTransformerOutput | tuple:
        """
        hidden_states: noisy video latents `[B, C, F, H, W]`.
        timestep: `[B]` or scalar, in [0, 1000] (= 1000·sigma).
        encoder_hidden_states: text embeddings `[B, L_text, text_dim]`.
        reference_latents: clean reference latents `[B, C, K, H, W]` (K may be 0), or None.
        reference_feature_blocks: block indices whose reference-token output to return (training).
        text_kv_key: reuse the text K/V cached under this key (same `encoder_hidden_states` as when it was cached).
        reference_mask: `[B, K]` bool, False for padding frames of a batch whose samples have fewer than K
            references (training); their tokens are hidden from every self-attention key. None: all are real.
        """
        self._check_inputs(hidden_states, timestep, encoder_hidden_states)
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if reference_latents is not None and reference_latents.shape[2] > 0:
            expected = (batch_size, hidden_states.shape[1], height, width)
            got = (reference_latents.shape[0], reference_latents.shape[1], *reference_latents.shape[3:])
            if reference_latents.ndim != 5 or got != expected:
                raise ValueError(
                    f"reference_latents must be [B, C, K, H, W] with (B, C, H, W) = {expected} like hidden_states, "
                    f"got {tuple(reference_latents.shape)}"
                )
            num_references = reference_latents.shape[2]
            hidden_states = torch.cat([hidden_states, reference_latents.to(hidden_states.dtype)], dim=2)
        else:
            num_references = 0
        if num_references % p_t:
            raise ValueError(f"the number of references ({num_references}) must be a multiple of patch_size[0]={p_t}")
        post_patch_frames, post_patch_height, post_patch_width = num_frames // p_t, height // p_h, width // p_w
        num_video_tokens = post_patch_frames * post_patch_height * post_patch_width
        num_reference_tokens = (num_references // p_t) * post_patch_height * post_patch_width
        key_mask = self._key_mask(reference_mask, batch_size, num_references, num_video_tokens,
                                  post_patch_height * post_patch_width, hidden_states.device)

        # RoPE over F + K frames: reference k sits at temporal position F + k on the same (h, w) grid.
        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(timestep, encoder_hidden_states)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        features = {} if reference_feature_blocks is not None else None
        wanted = set(reference_feature_blocks or ())
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        for index, block in enumerate(self.blocks):
            run = partial(_run_block, block, num_reference_tokens, text_kv_key, key_mask)
            args = (hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
            hidden_states = self._gradient_checkpointing_func(run, *args) if checkpointing else run(*args)
            if index in wanted:
                features[index] = hidden_states[:, num_video_tokens:]

        # The head is token-wise: running it on the video tokens only equals cropping its output.
        hidden_states = hidden_states[:, :num_video_tokens]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        # With multi-device placement (accelerate), temb sits on the first device and hidden_states on the last.
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(
            batch_size, post_patch_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
        )
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output, features)
        return RefAlignTransformerOutput(sample=output, reference_features=features)

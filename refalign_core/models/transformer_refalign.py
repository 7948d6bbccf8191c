"""RefAlign DiT: Wan2.1 `WanTransformer3DModel` with the reference tail.

Reference latents `[B, C, K, H, W]` are appended after the video latents on the frame axis, patchified with the
same `patch_embedding` and processed with shared weights. Compared with plain Wan2.1:

* RoPE: reference k gets temporal position F + k (F = video latent frames); its spatial grid restarts at 0.
* Modulation: reference tokens share the video's (noisy) timestep modulation.
* Text cross-attention updates video tokens only (`VideoOnlyCrossAttnProcessor`).
* Reference tokens are dropped before the head; the output is the velocity of the F video frames.

There are no new parameters: a RefAlign checkpoint has exactly the Wan2.1 T2V key set.

`RefAlignTransformer3DModel.forward` and `RefAlignTransformerBlock.forward` are adapted from diffusers 0.42.1's
`WanTransformer3DModel.forward` and `WanTransformerBlock.forward` (their source hashes are pinned in
`PARENT_SOURCE_SHA256`; `tests/models/test_transformer.py` fails when one changes). Changes to the model forward: (1)
the reference latents are concatenated on the frame axis before RoPE and patchify; (2) each block gets this call's
reference-token count, the self-attention key mask (the padded references in training; with `reference_strength` ≠ 1
an additive log-bias on the reference keys) and its text K/V cache entry as arguments; (3) the
reference tokens' residual stream is returned for the blocks asked for (training); (4) only the video tokens enter the
head. Changes to the block forward: the key mask goes to the self-attention as its `attention_mask`, the
reference-token count and text K/V entry to the cross-attention as keyword arguments. Nothing of a call is stored on
the model or its processors. Not carried over: Wan2.2 per-token timesteps and the I2V image embeddings (this is a T2V
DiT).
"""

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import BaseOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel, WanTransformerBlock
from diffusers.utils import apply_lora_scale

PARENT_SOURCE_SHA256 = {
    "WanTransformer3DModel.forward": "9f81a7225288656f1fa424fbd502206d5d242bad2bda9e11e2571eb5bf25ed30",
    "WanTransformerBlock.forward": "21c15441b009932c886757e6fee7875fa866ce1bc2746743cadec3f6c1ad865d",
}


@dataclass
class BlockTextKV:
    """One block's text keys and values, each `[B, L_text, heads, head_dim]`; None until its cross-attention ran."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None


class TextKVCache:
    """The cross-attention text K/V of one `encoder_hidden_states`, per block: computed by the first forward given
    this cache, reused by the later ones (exact). Its owner keeps it while the prompt embeddings stay the same (the
    sampler: one per guidance pass, for one run). Objects, not dicts: device hooks copy the dicts they move."""

    def __init__(self):
        self.blocks: dict[int, BlockTextKV] = {}

    def block(self, index: int) -> BlockTextKV:
        return self.blocks.setdefault(index, BlockTextKV())


class VideoOnlyCrossAttnProcessor(WanAttnProcessor):
    """Wan cross-attention applied to the leading video tokens only.

    `num_reference_tokens` trailing tokens get a zero update, so the block's residual leaves them unchanged.
    `text_kv`: the block's entry of a `TextKVCache`; its text keys and values (to_k / to_v / norm_k of the prompt
    embeddings) are computed on the first call and reused after. Both come with each call (from the block)."""

    def _text_key_value(self, attn, encoder_hidden_states, text_kv: BlockTextKV | None):
        if text_kv is not None and text_kv.key is not None:
            return text_kv.key, text_kv.value
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if text_kv is not None:
            text_kv.key, text_kv.value = key, value
        return key, value

    def _cross_attention(self, attn, hidden_states, encoder_hidden_states, text_kv):
        """Wan2.1 T2V text cross-attention (no RoPE, no mask, no image branch), with the text K/V cache."""
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key, value = self._text_key_value(attn, encoder_hidden_states, text_kv)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 num_reference_tokens: int = 0, text_kv: BlockTextKV | None = None):
        if attn.add_k_proj is not None or attn.fused_projections or attention_mask is not None or \
                rotary_emb is not None:
            raise ValueError("VideoOnlyCrossAttnProcessor is for Wan2.1 T2V cross-attention (unfused, no image "
                             "branch, no mask, no RoPE)")
        if num_reference_tokens == 0:
            return self._cross_attention(attn, hidden_states, encoder_hidden_states, text_kv)
        video = self._cross_attention(attn, hidden_states[:, :-num_reference_tokens], encoder_hidden_states, text_kv)
        return F.pad(video, (0, 0, 0, num_reference_tokens))


class RefAlignTransformerBlock(WanTransformerBlock):
    """`WanTransformerBlock` (same parameters) whose forward passes this call's reference arguments to its
    attention. The model's blocks are built by the parent's `__init__` and take this class (nothing is rebuilt)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor], *, num_reference_tokens: int = 0,
                key_mask: torch.Tensor | None = None, text_kv: BlockTextKV | None = None) -> torch.Tensor:
        """hidden_states: video then reference tokens `[B, L, dim]`; encoder_hidden_states: `[B, L_text, dim]`;
        temb: `[B, 6, dim]`; rotary_emb: (cos, sin), each `[1, L, 1, head_dim]`.
        num_reference_tokens: trailing tokens the cross-attention leaves unchanged.
        key_mask: `[B, 1, 1, L]` self-attention keys: bool (True = attend) or an additive float bias; None: all.
        text_kv: this block's text K/V cache entry, or None: computed and not kept."""
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, key_mask, rotary_emb)
        hidden_states = (hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)

        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None,
                                 num_reference_tokens=num_reference_tokens, text_kv=text_kv)
        hidden_states = hidden_states + attn_output

        norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
            hidden_states
        )
        ff_output = self.ffn(norm_hidden_states)
        return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states)


# diffusers' cache hooks (FirstBlockCache, MagCache) look a block's metadata up by its exact class
TransformerBlockRegistry.register(
    RefAlignTransformerBlock,
    dataclasses.replace(TransformerBlockRegistry.get(WanTransformerBlock), _cached_parameter_indices=None),
)


@dataclass
class RefAlignTransformerOutput(BaseOutput):
    """`sample`: velocity for the video frames `[B, C_out, F, H, W]`.
    `reference_features`: block index -> residual stream of the reference tokens after that block, `[B, K*T, dim]`
    (T = tokens per reference), only for the blocks asked for."""

    sample: torch.Tensor
    reference_features: dict[int, torch.Tensor] | None = None


class RefAlignTransformer3DModel(WanTransformer3DModel):
    """Wan2.1 T2V DiT that takes clean reference latents as extra trailing frames (see module docstring)."""

    # The parent's context-parallel plan splits the whole token sequence across ranks at block 0. Here the sequence
    # is video + reference tail and the cross-attention must know which tokens are references, which a split
    # sequence does not tell it: no context-parallel plan (enable_parallelism refuses), rather than a silently wrong
    # one.
    _cp_plan = None
    _no_split_modules = ["RefAlignTransformerBlock"]
    _repeated_blocks = ["RefAlignTransformerBlock"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.image_dim is not None or self.config.added_kv_proj_dim is not None:
            raise ValueError("RefAlign is a text-to-video DiT: image_dim / added_kv_proj_dim (I2V) are not supported")
        for block in self.blocks:
            block.__class__ = RefAlignTransformerBlock
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

    @staticmethod
    def _reference_bias(key_mask, strength: float, batch_size: int, num_video_tokens: int, num_reference_tokens: int,
                        like: torch.Tensor) -> torch.Tensor:
        """Self-attention key bias `[B, 1, 1, L]`: log(strength) on the reference keys (−inf at 0), 0 on the video's;
        keys hidden by `key_mask` stay hidden."""
        if not math.isfinite(strength) or strength < 0:
            raise ValueError(f"reference_strength must be a finite number ≥ 0, got {strength}")
        bias = torch.zeros(batch_size, num_video_tokens + num_reference_tokens, device=like.device, dtype=like.dtype)
        bias[:, num_video_tokens:] = math.log(strength) if strength > 0 else float("-inf")
        bias = bias[:, None, None, :]
        return bias if key_mask is None else bias.masked_fill(~key_mask, float("-inf"))

    def _check_processors(self) -> None:
        for block in self.blocks:
            if not isinstance(block.attn2.processor, VideoOnlyCrossAttnProcessor):
                raise RuntimeError(
                    "a block's cross-attention processor was replaced; RefAlign needs VideoOnlyCrossAttnProcessor "
                    "there (use set_attention_backend to change the attention backend)"
                )

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
        text_kv: TextKVCache | None = None,
        reference_mask: torch.Tensor | None = None,
        reference_strength: float = 1.0,
    ) -> RefAlignTransformerOutput | tuple:
        """
        hidden_states: noisy video latents `[B, C, F, H, W]`.
        timestep: `[B]` or scalar, in [0, 1000] (= 1000·sigma).
        encoder_hidden_states: text embeddings `[B, L_text, text_dim]`.
        reference_latents: clean reference latents `[B, C, K, H, W]` (K may be 0), or None.
        reference_feature_blocks: block indices whose reference-token output to return (training).
        text_kv: the caller's text K/V cache for these `encoder_hidden_states`: filled on first use, reused after.
        reference_mask: `[B, K]` bool, False for padding frames of a batch whose samples have fewer than K
            references (training); their tokens are hidden from every self-attention key. None: all are real.
        reference_strength: ≥ 0, scales the attention every token pays to the reference keys (an additive log-bias on
            them in self-attention; 0 hides them, so the video tokens see what they see without references). 1: as
            trained, and the bias is not built.

        One function, as the parent's is: it follows `WanTransformer3DModel.forward` step by step, so a diffusers
        upgrade can be compared with it side by side (the parent's source hash is pinned in the tests).
        """
        self._check_inputs(hidden_states, timestep, encoder_hidden_states)
        self._check_processors()
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
        if reference_strength != 1.0 and num_reference_tokens:
            key_mask = self._reference_bias(key_mask, reference_strength, batch_size, num_video_tokens,
                                            num_reference_tokens, hidden_states)

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
            run = partial(block, num_reference_tokens=num_reference_tokens, key_mask=key_mask,
                          text_kv=None if text_kv is None else text_kv.block(index))
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

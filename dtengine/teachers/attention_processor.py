"""A diffusers attention processor that runs the teacher's self-attention through `dtengine.ops.attention`.

It restates diffusers' `AttnProcessor2_0` for the self-attention blocks of a `UNet2DModel` (group norm,
q/k/v projections, output projection, residual, rescale) and swaps only the attention call, so the backend
switch (Triton / xformers / SDPA, env var included) applies to the teacher. Calls it does not handle (cross-
attention, attention masks, q/k norms) go to diffusers' own processor unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from dtengine.ops import attention


class DTEngineAttnProcessor:
    """Self-attention through `dtengine.ops.attention(backend=backend)`; anything else through diffusers."""

    def __init__(self, backend: str = "auto"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.backend = backend
        self.fallback = AttnProcessor2_0()

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        handled = (
            encoder_hidden_states is None and attention_mask is None and attn.norm_q is None and attn.norm_k is None
        )
        if not handled:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) -> (B, H*W, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        batch, tokens, _ = hidden_states.shape
        heads_first = [
            proj(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        ]
        hidden_states = attention(*heads_first, scale=attn.scale, backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, tokens, -1)  # (B, N, inner_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # projection, dropout

        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape[0], -1, *image_shape[2:])
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_dtengine_attention(model: nn.Module, backend: str = "auto") -> int:
    """Give every diffusers `Attention` module in `model` a `DTEngineAttnProcessor`; returns how many."""
    from diffusers.models.attention_processor import Attention

    layers = [module for module in model.modules() if isinstance(module, Attention)]
    processor = DTEngineAttnProcessor(backend)
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)

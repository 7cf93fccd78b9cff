"""Regional LoRA: every person's adapter acts only in that person's region of the picture.

`RegionalLora` installs one attention processor per UNet attention module. Each holds the
LoRA factors that every person has for its module and adds person p's delta
`x @ A_p.T @ B_p.T` to the projections (to_q, to_k, to_v, to_out.0) only where p acts:

- rows (the composite method): on the batch rows that belong to p, in full;
- masks (the masked method): scaled by p's region mask at the layer's resolution, and
  cross-attention runs once per region against that region's own prompt, the outputs
  blended by the region masks (regional prompting).

A person's text-encoder LoRA acts only while that person's prompt is encoded
(`text_encoder_lora`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

from personas import UNET_TARGETS

Factors = tuple[Any, Any]  # (A (r, in), B (out, r)), the LoRA scale folded into B


def layer_size(n_tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a UNet layer with `n_tokens` spatial tokens for latents of `latent_size`.

    Every UNet level halves the latents with a stride-2 convolution (rounding up), so the
    level is the one whose size has exactly `n_tokens` cells.
    """
    h, w = latent_size
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_tokens:
        raise ValueError(f"no UNet level of {latent_size} latents has {n_tokens} tokens")
    return h, w


def lora_delta(x: Any, factors: Factors) -> Any:
    """`x @ A.T @ B.T`, computed as peft's LoRA layers do (lora_B(lora_A(x)))."""
    import torch.nn.functional as F

    a, b = factors
    return F.linear(F.linear(x, a), b)


class RegionalLora:
    """Per-person LoRA factors in every UNet attention module, applied per region.

    `adapters[p]` is person p's `LoraWeights.attention_layers()` ({attention path: {target:
    (A, B)}}), or None for a person without a UNet LoRA. Use inside `installed()`, and call
    `use_rows` or `use_masks` before each UNet call.
    """

    def __init__(self, unet: Any, adapters: list[dict[str, dict[str, Factors]] | None], *, device: Any, dtype: Any):
        self.unet = unet
        self.mode: str | None = None
        self._rows: dict[int, Any] = {}
        self._masks_at: Callable[[int, int], Any] | None = None
        self._region_person: list[int | None] = []
        self._mask_cache: dict[int, Any] = {}
        self._latent_size = (0, 0)
        self.region_text: Any = None
        self.processors: dict[str, RegionalAttnProcessor] = {}
        for key in unet.attn_processors:  # "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
            path = key[: -len(".processor")]
            factors: dict[str, dict[int, Factors]] = {t: {} for t in UNET_TARGETS}
            for p, layers in enumerate(adapters):
                for target, (a, b) in (layers or {}).get(path, {}).items():
                    factors[target][p] = (a.to(device, dtype), b.to(device, dtype))
            self.processors[key] = RegionalAttnProcessor(self, factors)

    @contextlib.contextmanager
    def installed(self) -> Iterator["RegionalLora"]:
        """Our processors in the UNet inside the block; the UNet's own ones restored after."""
        original = self.unet.attn_processors
        self.unet.set_attn_processor(dict(self.processors))
        try:
            yield self
        finally:
            self.unet.set_attn_processor(original)
            self.mode = None

    def use_rows(self, row_person: list[int | None]) -> None:
        """Composite: batch row i carries person row_person[i]'s adapter (None: no adapter)."""
        import torch

        self.mode = "rows"
        people = {p for p in row_person if p is not None}
        device = next(iter(self.unet.parameters())).device
        self._rows = {p: torch.tensor([i for i, q in enumerate(row_person) if q == p], device=device) for p in people}

    def use_masks(self, masks_at: Callable[[int, int], Any], region_person: list[int | None],
                  region_text: Any, latent_size: tuple[int, int]) -> None:
        """Masked: `masks_at(h, w)` gives the regions' weights (R, h, w) at a layer of that size
        (summing to 1 over R); region r belongs to person region_person[r] (None: background)
        and its cross-attention reads region_text[r] (R, B, L, C)."""
        self.mode = "masks"
        self._masks_at = masks_at
        self._region_person = list(region_person)
        self.region_text = region_text
        self._latent_size = latent_size
        self._mask_cache = {}

    # -- what the processors ask -------------------------------------------------------------

    def region_masks(self, n_tokens: int) -> Any:
        """(R, N) region weights at the layer with `n_tokens` tokens (masked mode)."""
        if n_tokens not in self._mask_cache:
            h, w = layer_size(n_tokens, self._latent_size)
            self._mask_cache[n_tokens] = self._masks_at(h, w).reshape(len(self._region_person), h * w)
        return self._mask_cache[n_tokens]

    def spatial_where(self, n_tokens: int) -> dict[int, Any]:
        """Where each person acts on a (B, N, C) input: batch rows (int tensor) or a (1, N, 1) mask."""
        if self.mode == "rows":
            return self._rows
        if self.mode == "masks":
            masks = self.region_masks(n_tokens)
            return {p: masks[r].view(1, -1, 1) for r, p in enumerate(self._region_person) if p is not None}
        return {}

    def region_rows(self, batch: int) -> dict[int, Any]:
        """Masked cross-attention stacks the regions' texts as (R * B) rows: person p's rows."""
        import torch

        device = self.region_text.device
        return {p: torch.arange(r * batch, (r + 1) * batch, device=device)
                for r, p in enumerate(self._region_person) if p is not None}


class RegionalAttnProcessor:
    """diffusers' AttnProcessor2_0 (SDPA), with every person's LoRA added where they act."""

    def __init__(self, regional: RegionalLora, factors: dict[str, dict[int, Factors]]):
        self.regional = regional
        self.factors = factors  # {target: {person: (A, B)}}

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape  # (B, N, C)
        cross = encoder_hidden_states is not None
        if attention_mask is not None:
            sequence_length = (encoder_hidden_states if cross else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        where = self.regional.spatial_where(tokens)
        query = self._project(attn.to_q, "to_q", hidden_states, where)  # (B, N, inner)
        if cross and self.regional.mode == "masks":
            out = self._regional_cross_attention(attn, query, attention_mask)
        else:
            if not cross:
                context = hidden_states
            elif attn.norm_cross:
                context = attn.norm_encoder_hidden_states(encoder_hidden_states)
            else:
                context = encoder_hidden_states
            # Self-attention keys are the same tokens as the queries (same masks); cross-attention
            # keys in rows mode are the same batch rows.
            key = self._project(attn.to_k, "to_k", context, where)
            value = self._project(attn.to_v, "to_v", context, where)
            out = _attention(attn, query, key, value, attention_mask)  # (B, N, inner)

        out = self._project(attn.to_out[0], "to_out.0", out, where)
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _project(self, layer: Any, target: str, x: Any, where: dict[int, Any]) -> Any:
        """layer(x) plus each person's LoRA delta where they act."""
        out = layer(x)
        for p, factors in self.factors[target].items():
            w = where.get(p)
            if w is None:
                continue
            if w.dtype.is_floating_point:  # a mask over the tokens, (1, N, 1)
                out = out + lora_delta(x, factors) * w
            else:  # batch rows that are all this person's
                out[w] = out[w] + lora_delta(x[w], factors)
        return out

    def _regional_cross_attention(self, attn: Any, query: Any, attention_mask: Any) -> Any:
        """Each region's queries attend to its own prompt (with its person's LoRA on the keys and
        values); the outputs are blended by the region masks."""
        regional = self.regional
        text = regional.region_text  # (R, B, L, C)
        regions, batch, length, _ = text.shape
        context = text.reshape(regions * batch, length, -1)  # (R*B, L, C)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        rows = regional.region_rows(batch)
        key = self._project(attn.to_k, "to_k", context, rows)  # (R*B, L, inner)
        value = self._project(attn.to_v, "to_v", context, rows)
        queries = query.repeat(regions, 1, 1)  # (R*B, N, inner)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat(regions, 1, 1, 1)
        out = _attention(attn, queries, key, value, attention_mask)  # (R*B, N, inner)
        tokens = query.shape[1]
        weights = regional.region_masks(tokens).view(regions, 1, tokens, 1)  # (R, 1, N, 1)
        return (out.view(regions, batch, tokens, -1) * weights).sum(0)  # (B, N, inner)


def _attention(attn: Any, query: Any, key: Any, value: Any, attention_mask: Any) -> Any:
    """Multi-head scaled dot-product attention over (B, N, inner) projections."""
    import torch.nn.functional as F

    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, inner)


@contextlib.contextmanager
def text_encoder_lora(text_encoder: Any, layers: dict[str, Factors] | None) -> Iterator[None]:
    """One person's text-encoder LoRA ({module path: (A, B)}) acts inside the block only."""
    if not layers:
        yield
        return
    modules = dict(text_encoder.named_modules())
    handles = []
    try:
        for path, factors in layers.items():
            handles.append(modules[path].register_forward_hook(
                lambda module, args, output, factors=factors: output + lora_delta(args[0], factors)
            ))
        yield
    finally:
        for handle in handles:
            handle.remove()

"""A hand count of the U-Net forward's FLOPs from its config: every convolution, dense layer and
attention product, 2 FLOPs per multiply-add. GFLOP/s and MFU are XLA's count over time; this
count is what holds XLA's count honest (tests/test_flop_count.py).

- convolution: 2 * Cin * Cout * (kernel taps that land on the image) per output position.
  With zero padding the border positions have fewer taps (a 3x3 conv over h x w has
  (3h - 2)(3w - 2) taps, not 9hw): XLA counts only those, and so does this (the textbook
  2 * H * W * Cin * Cout * k * k overcounts the 4x4 maps of a small U-Net by 30 %).
- dense: 2 * tokens * in * out.
- attention: 2 * 2 * B * heads * N * T * d (scores Q K^T and the weighted sum P V).

Norms, activations, softmax and residual additions are left out: a few FLOPs per element
against hundreds per element in the products.
"""

from __future__ import annotations

import dataclasses

from core_jax.models.unet import UNetConfig


@dataclasses.dataclass
class FlopCount:
    """FLOPs by kind; `total` is their sum."""

    conv: float = 0.0
    dense: float = 0.0
    attention: float = 0.0

    @property
    def total(self) -> float:
        return self.conv + self.dense + self.attention


def _taps(size: int, kernel: int, stride: int, pad: int) -> int:
    """Kernel taps inside the input, summed over the output positions of one spatial axis."""
    out = (size + 2 * pad - kernel) // stride + 1
    return sum(
        sum(1 for k in range(kernel) if 0 <= o * stride - pad + k < size) for o in range(out)
    )


def conv_flops(
    batch: int, size: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1
) -> float:
    """A square `kernel` convolution over `size` x `size` maps, padding kernel // 2."""
    taps = _taps(size, kernel, stride, kernel // 2)
    return 2.0 * batch * c_in * c_out * taps * taps


def unet_forward_flops(config: UNetConfig, batch: int = 1, context_tokens: int = 77) -> FlopCount:
    """FLOPs of one forward of a U-Net with `config` at its `sample_size`, `batch` latents,
    `context_tokens` cross-attention keys."""
    count = FlopCount()
    channels = config.block_out_channels
    n_blocks = len(channels)
    time_dim = 4 * channels[0]

    def dense(tokens: int, d_in: int, d_out: int) -> None:
        count.dense += 2.0 * tokens * d_in * d_out

    def resnet(size: int, c_in: int, c_out: int) -> None:
        count.conv += conv_flops(batch, size, c_in, c_out)
        dense(batch, time_dim, c_out)  # time_emb_proj
        count.conv += conv_flops(batch, size, c_out, c_out)
        if c_in != c_out:
            count.conv += conv_flops(batch, size, c_in, c_out, kernel=1)

    def transformer(size: int, width: int, heads: int, layers: int) -> None:
        tokens = batch * size * size
        n = size * size
        # proj_in / proj_out: a 1x1 convolution or a dense layer, the same products.
        dense(tokens, width, width)
        for _ in range(layers):
            dense(tokens, width, 3 * width)  # attn1 to_q, to_k, to_v
            count.attention += 2 * 2 * batch * n * n * width  # heads * head_dim = width
            dense(tokens, width, width)  # attn1 to_out
            dense(tokens, width, width)  # attn2 to_q
            dense(batch * context_tokens, config.cross_attention_dim, 2 * width)  # to_k, to_v
            count.attention += 2 * 2 * batch * n * context_tokens * width
            dense(tokens, width, width)  # attn2 to_out
            dense(tokens, width, 8 * width)  # GEGLU proj: value and gate, 4 * width each
            dense(tokens, 4 * width, width)  # ff net_2
        dense(tokens, width, width)

    # The time embedding (and SDXL's added text-time embedding): two dense layers each.
    dense(batch, channels[0], time_dim)
    dense(batch, time_dim, time_dim)
    if config.addition_embed_type == "text_time":
        dense(batch, config.projection_class_embeddings_input_dim, time_dim)
        dense(batch, time_dim, time_dim)

    size = config.sample_size
    count.conv += conv_flops(batch, size, config.in_channels, channels[0])
    skips = [channels[0]]
    c_in = channels[0]
    for i, block in enumerate(config.down_block_types):
        for _ in range(config.layers_per_block):
            resnet(size, c_in, channels[i])
            c_in = channels[i]
            if block == "CrossAttnDownBlock2D":
                transformer(size, c_in, config.heads_per_block[i], config.transformer_layers[i])
            skips.append(c_in)
        if i < n_blocks - 1:
            count.conv += conv_flops(batch, size, c_in, c_in, stride=2)
            size //= 2
            skips.append(c_in)

    resnet(size, c_in, channels[-1])
    transformer(size, channels[-1], config.heads_per_block[-1], config.transformer_layers[-1])
    resnet(size, channels[-1], channels[-1])
    c_in = channels[-1]

    for i, block in enumerate(config.up_block_types):
        r = n_blocks - 1 - i
        for _ in range(config.layers_per_block + 1):
            resnet(size, c_in + skips.pop(), channels[r])
            c_in = channels[r]
            if block == "CrossAttnUpBlock2D":
                transformer(size, c_in, config.heads_per_block[r], config.transformer_layers[r])
        if i < n_blocks - 1:
            size *= 2
            count.conv += conv_flops(batch, size, c_in, c_in)  # after nearest upsampling

    count.conv += conv_flops(batch, size, channels[0], config.out_channels)
    return count

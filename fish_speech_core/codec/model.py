"""The Firefly VQ-GAN of Fish Speech 1.4: log-mel front end, causal ConvNeXt encoder,
downsampling grouped FSQ, and the HiFi-GAN head.

Module and attribute names mirror the reference checkpoint's state-dict keys, so the real
``firefly-gan-vq-fsq-8x1024-21hz-generator.pth`` loads without a key map (see
``checkpoint.py`` for the prefix and container forms). Shapes: audio (B, T) at 44.1 kHz,
mels (B, n_mels, T // hop), features (B, C, frames), codes (B, groups * codebooks, frames // 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from fish_speech_core.codec.config import (
    EncoderConfig,
    FireflyConfig,
    HeadConfig,
    QuantizerConfig,
    SpecConfig,
)

# --------------------------------------------------------------------------- front end


class LogMelSpectrogram(nn.Module):
    """Log-mel exactly as the reference computes it; one clip gives ``len // hop`` frames."""

    def __init__(self, config: SpecConfig) -> None:
        super().__init__()
        import torchaudio.functional as AF  # only the filterbank math; no I/O backend

        if config.center:
            raise ValueError("center=True is not supported (Fish Speech 1.4 uses center=False)")
        self.config = config
        f_max = config.f_max if config.f_max is not None else config.sample_rate / 2
        # Buffers are non-persistent: the reference checkpoint does not store them.
        # Built on CPU even under a meta-device context: the filterbank math needs real values.
        with torch.device("cpu"):
            window = torch.hann_window(config.win_length)  # periodic
            fb = AF.melscale_fbanks(
                n_freqs=config.n_fft // 2 + 1,
                f_min=config.f_min,
                f_max=f_max,
                n_mels=config.n_mels,
                sample_rate=config.sample_rate,
                norm="slaney",
                mel_scale="slaney",
            )
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("fb", fb, persistent=False)  # (n_freqs, n_mels)

    def forward(self, audio: Tensor) -> Tensor:
        """(B, T) or (T,) float audio -> (B, n_mels, T // hop) or (n_mels, T // hop)."""
        c = self.config
        squeeze = audio.dim() == 1
        x = audio[None] if squeeze else audio
        pad = (c.n_fft - c.hop_length) // 2  # 768: reflect padding makes exactly T // hop frames
        x = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
        spec = torch.stft(
            x,
            c.n_fft,
            hop_length=c.hop_length,
            win_length=c.win_length,
            window=self.window,
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        spec = torch.view_as_real(spec)
        spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-6)  # (B, n_freqs, frames)
        mel = torch.matmul(self.fb.T, spec)
        mel = torch.log(torch.clamp(mel, min=1e-5))
        return mel[0] if squeeze else mel


# --------------------------------------------------------------------------- conv parts


def _extra_padding(length: int, kernel: int, stride: int, padding: int) -> int:
    """Right padding so a strided conv covers the whole input (output = ceil(T / stride))."""
    n_frames = (length - kernel + padding) / stride + 1
    ideal = (math.ceil(n_frames) - 1) * stride + (kernel - padding)
    return ideal - length


class CausalConv1d(nn.Module):
    """Conv1d left-padded by ``(k - 1) * dilation - (stride - 1)``: frame t sees no future."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups
        )
        self.stride = stride
        self.effective_kernel = (kernel_size - 1) * dilation + 1

    def forward(self, x: Tensor) -> Tensor:
        pad = self.effective_kernel - self.stride
        extra = _extra_padding(x.shape[-1], self.effective_kernel, self.stride, pad)
        return self.conv(F.pad(x, (pad, extra)))


class CausalTransposeConv1d(nn.Module):
    """ConvTranspose1d with ``kernel - stride`` samples cut from the right."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.trim = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return x[..., : x.shape[-1] - self.trim] if self.trim else x


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of (B, C, T), written out as the ConvNeXt reference does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None] * x + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv -> LayerNorm -> Linear(4x) -> GELU -> Linear -> x gamma, residual."""

    def __init__(
        self, dim: int, kernel_size: int = 7, layer_scale_init_value: float = 1e-6, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(mlp_ratio * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init_value))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T)
        y = self.dwconv(x).transpose(1, 2)  # (B, T, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class ConvNeXtEncoder(nn.Module):
    """Mels (B, n_mels, T) -> features (B, dims[-1], T); causal, so frame t sees mels <= t."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        dims = config.dims
        stem = nn.Sequential(
            CausalConv1d(config.input_channels, dims[0], config.kernel_size),
            ChannelsFirstLayerNorm(dims[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(1, len(dims)):
            self.downsample_layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i - 1]), nn.Conv1d(dims[i - 1], dims[i], 1))
            )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    ConvNeXtBlock(dim, config.kernel_size, config.layer_scale_init_value)
                    for _ in range(depth)
                )
            )
            for dim, depth in zip(dims, config.depths, strict=True)
        )
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x: Tensor) -> Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return self.norm(x)


# --------------------------------------------------------------------------- quantizer


class ResidualFSQ(nn.Module):
    """One group's finite scalar quantizer: project to len(levels) dims, bound, round.

    Parity quirk (vector_quantize_pytorch 1.14.24): the projected input is bounded once
    before the first quantizer and the quantizer bounds it again before rounding.
    """

    def __init__(self, dim: int, levels: Sequence[int], num_quantizers: int) -> None:
        super().__init__()
        codebook_dim = len(levels)
        if dim == codebook_dim:
            raise ValueError(f"group dim {dim} equal to len(levels) is not supported")
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        self.num_quantizers = num_quantizers
        # Real values even under a meta-device context (load_codec builds on meta and assigns the
        # checkpoint's tensors; these buffers are not in it). Place values in Python: torch.cumprod
        # on meta runs a Python decomposition that imports torch._dynamo (~2 s).
        levels_t = torch.tensor(list(levels), dtype=torch.int32, device="cpu")
        basis = torch.tensor([math.prod(levels[:i]) for i in range(codebook_dim)], dtype=torch.int32, device="cpu")
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)  # [1, 8, 40, 200]

    def bound(self, z: Tensor, eps: float = 1e-3) -> Tensor:
        """tanh squashing into (-L/2, L/2), shifted for even L so rounding gives L values."""
        half_l = (self.levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def encode(self, x: Tensor) -> Tensor:
        """(..., dim) float -> (..., num_quantizers) int32 indices in [0, prod(levels))."""
        half_width = self.levels // 2
        residual = self.bound(self.project_in(x).float())
        indices = []
        for i in range(self.num_quantizers):
            scale = (self.levels - 1).float() ** -i
            digits = torch.round(self.bound(residual / scale))  # torch.round: half to even
            quantized = digits / half_width
            residual = residual - quantized * scale
            index = ((digits + half_width).to(torch.int32) * self.basis).sum(-1, dtype=torch.int32)
            indices.append(index)
        return torch.stack(indices, dim=-1)

    def decode(self, indices: Tensor) -> Tensor:
        """(..., num_quantizers) int indices -> (..., dim) float."""
        half_width = self.levels // 2
        out = 0.0
        for i in range(self.num_quantizers):
            digits = (indices[..., i, None].long() // self.basis) % self.levels
            codes = (digits - half_width) / half_width
            out = out + codes * (self.levels - 1).float() ** -i
        return self.project_out(out)


class DownsampleFSQ(nn.Module):
    """Features (B, C, T) -> x4 fewer frames -> 8 groups of residual FSQ -> codes (B, G*R, T/4)."""

    def __init__(self, config: QuantizerConfig, kernel_size: int = 7) -> None:
        super().__init__()
        factors = config.downsample_factor
        dims = config.downsample_dims or (config.input_dim,) * len(factors)
        all_dims = (config.input_dim, *dims)
        if all_dims[-1] % config.n_groups:
            raise ValueError(f"quantizer dim {all_dims[-1]} not divisible by {config.n_groups} groups")
        self.n_groups = config.n_groups
        group_dim = all_dims[-1] // config.n_groups
        self.residual_fsq = nn.Module()  # key prefix ``residual_fsq.rvqs.<g>``
        self.residual_fsq.rvqs = nn.ModuleList(
            ResidualFSQ(group_dim, config.levels, config.n_codebooks) for _ in range(config.n_groups)
        )
        self.downsample = nn.Sequential(
            *(
                nn.Sequential(
                    CausalConv1d(all_dims[i], all_dims[i + 1], factor, stride=factor),
                    ConvNeXtBlock(all_dims[i + 1], kernel_size),
                )
                for i, factor in enumerate(factors)
            )
        )
        self.upsample = nn.Sequential(
            *(
                nn.Sequential(
                    CausalTransposeConv1d(all_dims[i + 1], all_dims[i], factor, stride=factor),
                    ConvNeXtBlock(all_dims[i], kernel_size),
                )
                for i, factor in reversed(list(enumerate(factors)))
            )
        )

    def encode(self, features: Tensor) -> Tensor:
        """(B, C, T) -> int32 (B, groups * codebooks, ceil(T / 4))."""
        z = self.downsample(features).transpose(1, 2)  # (B, T', C)
        chunks = z.chunk(self.n_groups, dim=-1)
        codes = [fsq.encode(chunk) for fsq, chunk in zip(self.residual_fsq.rvqs, chunks)]
        # (B, T', R) per group -> (B, G * R, T'): row g * R + r is group g, codebook r
        return torch.cat(codes, dim=-1).transpose(1, 2).contiguous()

    def decode(self, codes: Tensor) -> Tensor:
        """int (B, G * R, T') -> features (B, C, 4 T')."""
        per_group = codes.transpose(1, 2).chunk(self.n_groups, dim=-1)  # (B, T', R) each
        z = torch.cat([fsq.decode(c) for fsq, c in zip(self.residual_fsq.rvqs, per_group)], dim=-1)
        return self.upsample(z.transpose(1, 2))


# --------------------------------------------------------------------------- HiFi-GAN head


def _wn_conv(*args, **kwargs) -> CausalConv1d:
    conv = CausalConv1d(*args, **kwargs)
    conv.conv = weight_norm(conv.conv)  # keys ...conv.parametrizations.weight.original0/1
    return conv


def _wn_transpose(*args, **kwargs) -> CausalTransposeConv1d:
    conv = CausalTransposeConv1d(*args, **kwargs)
    conv.conv = weight_norm(conv.conv)
    return conv


class ResBlock1(nn.Module):
    """Both convs of each pair use the pair's dilation (checked against decode/ fixtures)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_wn_conv(channels, channels, kernel_size, dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(_wn_conv(channels, channels, kernel_size, dilation=d) for d in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.silu(c1(F.silu(x))))
        return x


class ParallelBlock(nn.Module):
    """Mean of ResBlock1 branches with different kernel sizes."""

    def __init__(self, channels: int, kernel_sizes: Sequence[int], dilations: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock1(channels, k, d) for k, d in zip(kernel_sizes, dilations, strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([block(x) for block in self.blocks], dim=0).mean(dim=0)


class HiFiGANGenerator(nn.Module):
    """Quantizer output (B, num_mels, T) -> audio (B, 1, T * prod(upsample_rates)) in [-1, 1]."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if math.prod(config.upsample_rates) != config.hop_length:
            raise ValueError("prod(upsample_rates) must equal hop_length")
        ch = config.upsample_initial_channel
        self.conv_pre = _wn_conv(config.num_mels, ch, config.pre_conv_kernel_size)
        self.ups = nn.ModuleList(
            _wn_transpose(ch // 2**i, ch // 2 ** (i + 1), k, stride=u)
            for i, (u, k) in enumerate(
                zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True)
            )
        )
        self.resblocks = nn.ModuleList(
            ParallelBlock(ch // 2 ** (i + 1), config.resblock_kernel_sizes, config.resblock_dilation_sizes)
            for i in range(len(self.ups))
        )
        self.conv_post = _wn_conv(ch // 2 ** len(self.ups), 1, config.post_conv_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_pre(x)
        for up, block in zip(self.ups, self.resblocks, strict=True):
            x = block(up(F.silu(x)))
        return torch.tanh(self.conv_post(F.silu(x)))


# --------------------------------------------------------------------------- whole codec


class NonFiniteEncodingError(ValueError):
    """The encoder produced NaN/Inf features for the clips at ``indices`` of the batch."""

    def __init__(self, indices: tuple[int, ...]) -> None:
        super().__init__(f"encoder output is not finite for batch item(s) {list(indices)}")
        self.indices = indices


class FireflyCodec(nn.Module):
    """Audio <-> semantic codes. Submodule names match the reference state dict.

    ``decoder=False`` builds the audio -> codes half only (``head`` is None): extraction never
    runs the HiFiGAN decoder, and building it (its weight-norm parametrizations, whose first use
    imports ``torch._dynamo``) is most of a codec load's time on CPU.
    """

    def __init__(self, config: FireflyConfig, decoder: bool = True) -> None:
        super().__init__()
        if config.backbone.dims[-1] != config.quantizer.input_dim:
            raise ValueError("backbone.dims[-1] must equal quantizer.input_dim")
        if config.backbone.input_channels != config.spec_transform.n_mels:
            raise ValueError("backbone.input_channels must equal spec_transform.n_mels")
        self.config = config
        self.spec_transform = LogMelSpectrogram(config.spec_transform)
        self.backbone = ConvNeXtEncoder(config.backbone)
        self.head = HiFiGANGenerator(config.head) if decoder else None
        self.quantizer = DownsampleFSQ(config.quantizer, config.backbone.kernel_size)

    @property
    def sample_rate(self) -> int:
        return self.config.spec_transform.sample_rate

    def encode_mels(self, mels: Tensor) -> Tensor:
        """(B, n_mels, T) -> int32 codes (B, G * R, ceil(T / 4)); frame t sees mels < 4 (t+1).

        Raises:
            NonFiniteEncodingError: NaN/Inf features (FSQ would round them to INT32_MIN codes).
        """
        features = self.backbone(mels)
        finite = torch.isfinite(features).flatten(1).all(1)
        if not bool(finite.all()):
            raise NonFiniteEncodingError(tuple(int(i) for i in torch.nonzero(~finite).flatten()))
        return self.quantizer.encode(features)

    def encode(
        self, audios: Sequence[Tensor], autocast_dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """Encode clips of any lengths (1-D float at ``sample_rate``) to int32 (G * R, frames).

        Batch-invariant by construction: each clip's log-mel is computed at its own length
        (so its last frames see its own reflect padding), then zero-padded; the encoder and
        downsampling are causal, so a clip's kept frames never see the padding. ``frames =
        (len // hop) // 4``, exactly what the reference writes. ``autocast_dtype`` (e.g.
        bfloat16) runs the encoder under autocast; the log-mel and FSQ rounding stay float32.
        """
        if not audios:
            return []
        for audio in audios:
            if audio.shape[-1] < self.config.samples_per_code:
                raise ValueError(
                    f"clip of {audio.shape[-1]} samples is shorter than one code frame "
                    f"({self.config.samples_per_code} samples at {self.sample_rate} Hz)"
                )
        mels = [self.spec_transform(audio) for audio in audios]  # (n_mels, len // hop) each
        return self.encode_log_mels(mels, [audio.shape[-1] for audio in audios], autocast_dtype)

    def encode_log_mels(
        self, mels: Sequence[Tensor], num_samples: Sequence[int], autocast_dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """The second half of :meth:`encode`: per-clip log-mels -> int32 codes (G * R, frames).

        ``mels[i]`` is ``spec_transform(clip_i)`` (n_mels, len // hop), computed at the clip's own
        length, and ``num_samples[i]`` that clip's length: extraction computes the log-mels
        while the previous batch encodes, and the codes equal :meth:`encode`'s.
        """
        longest = max(m.shape[-1] for m in mels)
        batch = torch.stack([F.pad(m, (0, longest - m.shape[-1])) for m in mels])
        with torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            codes = self.encode_mels(batch)
        return [codes[i, :, : self.config.num_code_frames(n)] for i, n in enumerate(num_samples)]

    def decoder_head(self) -> HiFiGANGenerator:
        """The HiFiGAN head; a clear error for a codec built without it."""
        if self.head is None:
            raise RuntimeError("this codec was loaded without its decoder (decoder=False); load it "
                               "with decoder=True to turn codes into audio")
        return self.head

    def decode(self, codes: Tensor) -> Tensor:
        """int codes (B, G * R, T) -> audio (B, 1, T * samples_per_code)."""
        return self.decoder_head()(self.quantizer.decode(codes))

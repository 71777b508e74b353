"""The FSDM of `fsdm_eqx` (paper UNet denoiser, ViT set encoder) in plain PyTorch, for timing.

A standalone transcription (torch and numpy only; no JAX, no `fsdm_eqx`) of:

- `fsdm_eqx/nn/vit.py` `ImageTokenEncoder`: linear patch embedding (patches flattened as
  ``(p, p, c)``), class token, optional timestep token (a linear map of the sinusoidal embedding
  of ``t``, width 256), position embeddings shared by every image of the set, pre-norm
  transformer (bias-free q and fused k/v projections, exact GELU MLP, dropout on the embeddings,
  the attention output and both MLP layers), pooling (`cls`, `mean` or `sum` over all tokens),
  head LayerNorm + Linear;
- `fsdm_eqx/nn/posterior.py` `GaussianPosterior` (Linear, SiLU, Linear to mean and
  log-variance), reparameterised sample, KL to N(0, I) in bits per dimension;
- `fsdm_eqx/nn/unet.py` `UNet` with FiLM conditioning: GroupNorm(32), FiLM scale/shift from
  ``SiLU([time embedding, context])`` in every residual block, spatial self-attention with a
  head-major fused qkv (guided diffusion's legacy order; its 1x1 layers are `Conv1d`s over the
  pixel tokens here, as in guided diffusion, with the parameters of the JAX linear layers), and
  every residual branch, attention output projection and the output convolution zero-initialised;
- `fsdm_eqx/nn/fsdm.py` `FSDM.loss`: each image ``x_i`` of a set is denoised given the context of
  the other ``ns - 1`` images, the ``batch * ns`` subsets going through the encoder as one batch;
  the encoder's timestep token gets the timestep of the image being denoised; the loss is
  ``mean_i(L_i + klc_i)``;
- `fsdm_eqx/diffusion/gaussian.py` `training_losses`: epsilon MSE plus ``vlb_weight * T`` times
  the variational-bound term L_t (bits per dimension; the decoder NLL at t = 0) computed with the
  predicted mean stop-gradiented, the learned-range variance (improved DDPM);
- `fsdm_eqx/diffusion/samplers.py` `ddim_sample`: one DDIM step (clipped x_0, eps recomputed);
- `fsdm_eqx/train`: AdamW (optax's, which torch's matches), clipping by global norm when
  `grad_clip > 0`, and the EMA ``ema <- decay * ema + (1 - decay) * model`` after every step, with
  the library's decay (a copy before `ema_start`, `ema_decay` every `ema_every` steps after).

Weights are random with PyTorch's default initialisation (that of `eqx.nn.Linear`/`Conv2d` too),
the layers the JAX code zeroes set to zero, and the class token and position embeddings drawn
from N(0, 0.02^2) as in JAX. Only float32. On a GPU, float32 matmuls may use TF32, as JAX's
default precision does there.

Protocol (as the torch side of ``test_inception_throughput.py``)::

    python torch_fsdm.py CONFIG_JSON

``CONFIG_JSON`` holds the `ModelConfig` fields that matter (hdim, encoder_depth, encoder_heads,
encoder_head_dim, encoder_mlp_dim, encoder_patch_size, encoder_time_token, encoder_dropout,
pooling, variational, unet_model_channels, unet_channel_mult, unet_num_res_blocks,
unet_attention_resolutions, unet_num_heads, unet_dropout, learned_variance, image_size, channels,
ns), ``batch_sets``, ``threads``, ``mode`` (``train`` or ``sample``), ``seed`` and, optionally,
``diffusion`` and ``optim`` objects with `DiffusionConfig` / `OptimConfig` fields (the library's
defaults otherwise). The script builds the model, takes one step (the warm-up), prints one JSON
line ``{"torch", "device", "threads", "parameters": {"encoder", "posterior", "denoiser"},
"loss"}`` (``loss``: the first training step's loss; null in ``sample`` mode), then for every
line ``run`` on stdin takes one step and prints its wall-clock seconds; any other line ends it.

- ``train``: one training step (forward, backward, AdamW, EMA) on a fixed batch
  ``numpy.random.default_rng(seed).uniform(-1, 1, (batch_sets, ns, c, h, w))`` (float32).
- ``sample``: one DDIM step of the EMA model's denoiser (no gradient, no dropout) over the
  ``batch_sets * ns`` images of fixed noise, each with a fixed context (the leave-one-out context
  of its set at the step's timestep, computed once): one UNet forward and the DDIM update at the
  first step of the schedule respaced to ``diffusion.sampling_steps`` steps.
"""

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
TIME_TOKEN_DIM = 256  # the set transformer's default `time_dim`, as `build_encoder` leaves it

DIFFUSION_DEFAULTS = {  # fsdm_eqx.config.DiffusionConfig
    "num_steps": 1000,
    "schedule": "linear",
    "variance": "learned_range",
    "loss": "hybrid",
    "vlb_weight": 0.001,
    "sampling_steps": 250,
    "ddim_eta": 0.0,
    "clip_denoised": True,
}
OPTIM_DEFAULTS = {  # fsdm_eqx.config.OptimConfig
    "lr": 1e-4,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "grad_clip": 0.0,
    "ema_decay": 0.995,
    "ema_start": 2000,
    "ema_every": 10,
}


def timestep_embedding(t, dim, max_period=10000.0):
    """``[cos(t f), sin(t f)]`` with ``f_k = max_period ** (-k / (dim // 2))`` (zero-padded)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def leave_one_out_indices(ns):
    """Row ``i`` lists the indices of ``range(ns)`` without ``i``: an ``(ns, ns - 1)`` array."""
    cols = np.arange(ns - 1)[None, :]
    return cols + (cols >= np.arange(ns)[:, None])


def zero_(module):
    """Zero a layer's weight and bias (guided diffusion's ``zero_module``)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


# --------------------------------------------------------------------------- UNet


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, FiLM from the conditioning vector, dropout, zero conv3x3."""

    def __init__(self, in_ch, out_ch, cond_dim, dropout):
        super().__init__()
        self.in_norm = nn.GroupNorm(GROUPS, in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * out_ch)
        self.out_norm = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, cond):
        h = self.in_conv(F.silu(self.in_norm(x)))
        scale, shift = self.film(F.silu(cond)).chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Spatial self-attention, qkv head-major (each head's q, k, v adjacent), zero projection."""

    def __init__(self, ch, num_heads):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero_(nn.Conv1d(ch, ch, 1))
        self.num_heads = num_heads

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        qkv = qkv.reshape(b, self.num_heads, 3 * c // self.num_heads, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, head_dim)
        out = out.transpose(2, 3).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Module):
    """A residual block, an optional attention block and an optional upsampling."""

    def __init__(self, res, attn, upsample):
        super().__init__()
        self.res, self.attn, self.upsample = res, attn, upsample

    def forward(self, x, cond):
        h = self.res(x, cond)
        if self.attn is not None:
            h = self.attn(h)
        return h if self.upsample is None else self.upsample(h)


class UNet(nn.Module):
    """The guided-diffusion UNet with FiLM conditioning on ``[time embedding, context]``."""

    def __init__(
        self,
        *,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult,
        num_heads,
        dropout,
        context_dim,
        image_size,
    ):
        super().__init__()
        levels = len(channel_mult)
        factor = 2 ** (levels - 1)
        padded = -(-image_size // factor) * factor
        self.pad, self.image_size, self.model_channels = (
            padded - image_size,
            image_size,
            model_channels,
        )
        sides = [padded // 2**i for i in range(levels)]
        time_dim = 4 * model_channels
        cond_dim = time_dim + context_dim

        def res(cin, cout):
            return ResBlock(cin, cout, cond_dim, dropout)

        self.time_in = nn.Linear(model_channels, time_dim)
        self.time_out = nn.Linear(time_dim, time_dim)
        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips, down = [ch], []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out = model_channels * mult
                attn = (
                    SelfAttention(out, num_heads) if sides[level] in attention_resolutions else None
                )
                down.append(Stage(res(ch, out), attn, None))
                ch = out
                skips.append(ch)
            if level != levels - 1:
                down.append(Downsample(ch))
                skips.append(ch)
        self.down = nn.ModuleList(down)
        self.mid_res1 = res(ch, ch)
        self.mid_attn = SelfAttention(ch, num_heads)
        self.mid_res2 = res(ch, ch)
        up = []
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                out = model_channels * channel_mult[level]
                block = res(ch + skips.pop(), out)
                ch = out
                attn = (
                    SelfAttention(ch, num_heads) if sides[level] in attention_resolutions else None
                )
                upsample = Upsample(ch) if level and i == num_res_blocks else None
                up.append(Stage(block, attn, upsample))
        self.up = nn.ModuleList(up)
        self.out_norm = nn.GroupNorm(GROUPS, ch)
        self.out_conv = zero_(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, t, context):
        emb = self.time_out(F.silu(self.time_in(timestep_embedding(t, self.model_channels))))
        cond = torch.cat([emb, context], dim=1)
        lo, hi = self.pad // 2, self.pad - self.pad // 2
        if self.pad:
            x = F.pad(x, (lo, hi, lo, hi))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, cond) if isinstance(block, Stage) else block(h)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, cond)), cond)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), cond)
        out = self.out_conv(F.silu(self.out_norm(h)))
        if self.pad:
            out = out[:, :, lo : lo + self.image_size, lo : lo + self.image_size]
        return out


# --------------------------------------------------------------------------- set encoder


class Attention(nn.Module):
    """Multi-head self-attention: bias-free q and fused k/v projections, dropout on the output."""

    def __init__(self, dim, num_heads, head_dim, dropout):
        super().__init__()
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, x):
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.to_kv(x).view(b, n, 2, self.num_heads, self.head_dim)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.dropout(self.to_out(out))


class MLP(nn.Module):
    def __init__(self, dim, hidden_dim, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim, num_heads, head_dim, mlp_dim, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SetTransformer(nn.Module):
    """Class (and timestep) token, per-image shared position embeddings, blocks, pooling, head."""

    def __init__(
        self, *, num_patches, dim, depth, num_heads, head_dim, mlp_dim, hdim, pooling, dropout,
        time_token,
    ):  # fmt: skip
        super().__init__()
        if pooling not in ("cls", "mean", "sum"):
            raise ValueError(f"pooling={pooling!r}: this transcription has cls, mean and sum.")
        num_special = 2 if time_token else 1
        self.cls_token = nn.Parameter(0.02 * torch.randn(dim))
        self.position = nn.Parameter(0.02 * torch.randn(num_special + num_patches, dim))
        self.time_proj = nn.Linear(TIME_TOKEN_DIM, dim) if time_token else None
        self.dropout = nn.Dropout(dropout)
        blocks = [
            TransformerBlock(dim, num_heads, head_dim, mlp_dim, dropout) for _ in range(depth)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, hdim)
        self.pooling = pooling

    def forward(self, patches, t):
        n, m, p, dim = patches.shape
        special = [self.cls_token.expand(n, 1, dim)]
        if self.time_proj is not None:
            special.append(self.time_proj(timestep_embedding(t, TIME_TOKEN_DIM))[:, None])
        k = len(special)
        position = torch.cat([self.position[:k], self.position[k:].repeat(m, 1)], dim=0)
        tokens = torch.cat([*special, patches.reshape(n, m * p, dim)], dim=1) + position
        tokens = self.dropout(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "mean":
            pooled = tokens.mean(dim=1)
        else:
            pooled = tokens.sum(dim=1)
        return self.head(self.head_norm(pooled))


class ViTSetEncoder(nn.Module):
    """Linear embedding of each image's patches, then the set transformer over the whole set."""

    def __init__(self, *, image_size, channels, patch_size, time_token, **trunk):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(channels * patch_size**2, trunk["dim"])
        self.trunk = SetTransformer(
            num_patches=(image_size // patch_size) ** 2, time_token=time_token, **trunk
        )

    def forward(self, x_sets, t):
        n, m, c, h, w = x_sets.shape
        p = self.patch_size
        patches = x_sets.reshape(n, m, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 4, 6, 2)
        patches = patches.reshape(n, m, (h // p) * (w // p), p * p * c)
        return self.trunk(self.patch_embed(patches), t)


class GaussianPosterior(nn.Module):
    def __init__(self, hdim):
        super().__init__()
        self.hidden = nn.Linear(hdim, hdim)
        self.out = nn.Linear(hdim, 2 * hdim)

    def forward(self, h):
        return self.out(F.silu(self.hidden(h))).chunk(2, dim=-1)


# --------------------------------------------------------------------------- diffusion


def beta_schedule(name, num_steps):
    if name == "linear":
        scale = 1000.0 / num_steps
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_steps), 0.999)
    if name == "cosine":
        t = np.arange(num_steps, dtype=np.float64)
        alpha_bar = lambda t: np.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.minimum(1.0 - alpha_bar(t + 1) / alpha_bar(t), 0.999)
    raise ValueError(f"schedule={name!r}")


class Schedule:
    """The schedule's per-step quantities, derived in float64 and stored as float32 tensors."""

    def __init__(self, name, num_steps, device, sampling_steps=None):
        betas = beta_schedule(name, num_steps)
        timesteps = np.arange(num_steps)
        if sampling_steps is not None and sampling_steps != num_steps:
            if sampling_steps == 1:
                timesteps = np.array([num_steps - 1])
            else:
                stride = (num_steps - 1) / (sampling_steps - 1)
                timesteps = np.round(np.arange(sampling_steps) * stride).astype(np.int64)
            abar = np.cumprod(1.0 - betas)[timesteps]
            betas = 1.0 - abar / np.append(1.0, abar[:-1])
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        clipped = np.append(post_var[1], post_var[1:]) if len(betas) > 1 else betas
        arrays = dict(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_log_variance_clipped=np.log(clipped),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            fixed_large_log_variance=np.log(np.append(post_var[1:2], betas[1:])),
        )
        for key, value in arrays.items():
            setattr(self, key, torch.as_tensor(value, dtype=torch.float32, device=device))
        self.timesteps = torch.as_tensor(timesteps, device=device)
        self.num_steps = len(betas)

    def at(self, name, t):
        """``name[t]`` shaped to broadcast over images ``(n, c, h, w)``."""
        return getattr(self, name)[t].view(-1, 1, 1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )  # fmt: skip


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability of 8-bit data in [-1, 1] under a discretised Gaussian (exact CDF)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    ndtr = torch.special.ndtr
    delta = torch.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_delta = torch.log(torch.clamp(delta, min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta))


def model_log_variance(schedule, v, t, variance, like):
    if variance == "learned_range":
        min_log = schedule.at("posterior_log_variance_clipped", t)
        max_log = torch.log(schedule.at("betas", t))
        frac = (v + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    name = {
        "fixed_small": "posterior_log_variance_clipped",
        "fixed_large": "fixed_large_log_variance",
    }
    return schedule.at(name[variance], t).expand_as(like)


def training_losses(schedule, output, x0, x_t, t, noise, diffusion):
    """Per-image ``loss``, ``mse`` and ``vb`` (bits per dimension), as `training_losses` in JAX."""
    c = x0.shape[1]
    learned = diffusion["variance"] == "learned_range"
    eps, v = (output[:, :c], output[:, c:]) if learned else (output, None)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    eps_frozen = eps.detach()  # the bound term trains the variance only
    coef1, coef2 = schedule.at("posterior_mean_coef1", t), schedule.at("posterior_mean_coef2", t)
    true_mean = coef1 * x0 + coef2 * x_t
    true_log_var = schedule.at("posterior_log_variance_clipped", t)
    log_var = model_log_variance(schedule, v, t, diffusion["variance"], x_t)
    pred_x0 = (
        schedule.at("sqrt_recip_alphas_cumprod", t) * x_t
        - schedule.at("sqrt_recipm1_alphas_cumprod", t) * eps_frozen
    )
    mean = coef1 * pred_x0 + coef2 * x_t
    kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3))
    vb = torch.where(t == 0, nll / math.log(2.0), kl)
    weight = diffusion["vlb_weight"] * schedule.num_steps if diffusion["loss"] == "hybrid" else 0.0
    return mse + weight * vb, mse, vb


def ddim_step(schedule, output, x, i, diffusion):
    """One DDIM step (Song et al. eq. 12) from step ``i`` of ``schedule``, as `ddim_sample`."""
    c = x.shape[1]
    eps = output[:, :c]
    sra = schedule.sqrt_recip_alphas_cumprod[i]
    srm1 = schedule.sqrt_recipm1_alphas_cumprod[i]
    pred_x0 = sra * x - srm1 * eps
    if diffusion["clip_denoised"]:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    eps = (sra * x - pred_x0) / srm1
    abar, abar_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
    sigma = diffusion["ddim_eta"] * torch.sqrt(
        (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    )
    mean = (
        torch.sqrt(abar_prev) * pred_x0
        + torch.sqrt(torch.clamp(1 - abar_prev - sigma**2, min=0)) * eps
    )
    noise = torch.randn_like(x)
    return mean + (sigma if i > 0 else 0.0) * noise


# --------------------------------------------------------------------------- the model


class FSDM(nn.Module):
    """Set encoder -> optional Gaussian posterior -> UNet, with leave-one-out contexts."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = ViTSetEncoder(
            image_size=cfg["image_size"],
            channels=cfg["channels"],
            patch_size=cfg["encoder_patch_size"],
            time_token=cfg["encoder_time_token"],
            dim=cfg["hdim"],
            depth=cfg["encoder_depth"],
            num_heads=cfg["encoder_heads"],
            head_dim=cfg["encoder_head_dim"],
            mlp_dim=cfg["encoder_mlp_dim"],
            hdim=cfg["hdim"],
            pooling=cfg["pooling"],
            dropout=cfg["encoder_dropout"],
        )
        self.posterior = GaussianPosterior(cfg["hdim"]) if cfg["variational"] else None
        channels = cfg["channels"]
        self.denoiser = UNet(
            in_channels=channels,
            model_channels=cfg["unet_model_channels"],
            out_channels=2 * channels if cfg["learned_variance"] else channels,
            num_res_blocks=cfg["unet_num_res_blocks"],
            attention_resolutions=tuple(cfg["unet_attention_resolutions"]),
            channel_mult=tuple(cfg["unet_channel_mult"]),
            num_heads=cfg["unet_num_heads"],
            dropout=cfg["unet_dropout"],
            context_dim=cfg["hdim"],
            image_size=cfg["image_size"],
        )
        self.time_token = cfg["encoder_time_token"]
        self._indices = {}

    def parameter_counts(self):
        def count(module):
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        return {name: count(getattr(self, name)) for name in ("encoder", "posterior", "denoiser")}

    def leave_one_out_context(self, x, t, *, sample):
        """Contexts ``Enc(X \\ {x_i})`` of every image of every set, ``(batch * ns, hdim)``, with
        the posterior's mean and log-variance (None when deterministic). ``t``: ``(batch, ns)``
        timesteps of the images, given to the encoder's timestep token when it has one;
        ``sample``: draw from the posterior (training) instead of taking its mean."""
        b, ns = x.shape[:2]
        if (ns, x.device) not in self._indices:  # made once: no host-to-device copy per step
            self._indices[ns, x.device] = torch.as_tensor(
                leave_one_out_indices(ns), device=x.device
            )
        index = self._indices[ns, x.device]
        subsets = x[:, index].flatten(0, 1)  # (b * ns, ns - 1, c, h, w)
        h = self.encoder(subsets, t.reshape(b * ns) if self.time_token else None)
        if self.posterior is None:
            return h, None, None
        mu, logvar = self.posterior(h)
        c = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        return c, mu, logvar

    def loss(self, x, schedule, diffusion):
        """The mean over sets of ``mean_i(L_i + klc_i)`` for a batch ``(batch, ns, c, h, w)``."""
        b, ns = x.shape[:2]
        t = torch.randint(0, schedule.num_steps, (b * ns,), device=x.device)
        timesteps = schedule.timesteps[t].float()
        context, mu, logvar = self.leave_one_out_context(x, timesteps.view(b, ns), sample=True)
        x0 = x.flatten(0, 1)
        noise = torch.randn_like(x0)
        x_t = schedule.at("sqrt_alphas_cumprod", t) * x0 + (
            schedule.at("sqrt_one_minus_alphas_cumprod", t) * noise
        )
        output = self.denoiser(x_t, timesteps, context)
        loss, _, _ = training_losses(schedule, output, x0, x_t, t, noise, diffusion)
        if mu is not None:
            kl = 0.5 * (-logvar + torch.exp(logvar) + mu**2 - 1.0)
            loss = loss + kl.mean(dim=1) / math.log(2.0)
        return loss.mean()


def ema_decay_at(step, optim):
    """The library's EMA decay after optimiser step ``step`` (0: copy; 1: unchanged)."""
    if step < optim["ema_start"]:
        return 0.0
    return optim["ema_decay"] if step % optim["ema_every"] == 0 else 1.0


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv):
    cfg = json.loads(argv[1])
    diffusion = {**DIFFUSION_DEFAULTS, **cfg.get("diffusion", {})}
    optim = {**OPTIM_DEFAULTS, **cfg.get("optim", {})}
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg["seed"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # JAX's default float32 precision on GPUs
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model = FSDM(cfg).to(device)
    ema = FSDM(cfg).to(device)
    ema.load_state_dict(model.state_dict())
    shape = (cfg["batch_sets"], cfg["ns"], cfg["channels"], cfg["image_size"], cfg["image_size"])
    batch = np.random.default_rng(int(cfg["seed"])).uniform(-1.0, 1.0, shape).astype(np.float32)
    x = torch.from_numpy(batch).to(device)
    params = list(model.parameters())
    ema_params = list(ema.parameters())

    if cfg["mode"] == "train":
        schedule = Schedule(diffusion["schedule"], diffusion["num_steps"], device)
        try:
            optimizer = torch.optim.AdamW(
                params, lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
                weight_decay=optim["weight_decay"], fused=True,
            )  # fmt: skip
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(
                params, lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
                weight_decay=optim["weight_decay"], foreach=True,
            )  # fmt: skip
        model.train()
        count = [0]

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(x, schedule, diffusion)
            loss.backward()
            if optim["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, optim["grad_clip"])
            optimizer.step()
            count[0] += 1
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay_at(count[0], optim))
            return loss.item()

    elif cfg["mode"] == "sample":
        schedule = Schedule(
            diffusion["schedule"], diffusion["num_steps"], device, diffusion["sampling_steps"]
        )
        ema.eval()
        i = schedule.num_steps - 1  # the sampler's first step
        t = schedule.timesteps[i].float().expand(x.shape[0] * x.shape[1])
        noise = torch.randn(x.flatten(0, 1).shape, device=device)
        with torch.inference_mode():
            context, _, _ = ema.leave_one_out_context(x, t.view(x.shape[:2]), sample=False)

        def step():
            with torch.inference_mode():
                output = ema.denoiser(noise, t, context)
                ddim_step(schedule, output, noise, i, diffusion)
            return None

    else:
        raise ValueError(f"mode={cfg['mode']!r}: use 'train' or 'sample'.")

    loss = step()
    synchronize(device)
    info = {
        "torch": torch.__version__,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "parameters": model.parameter_counts(),
        "loss": loss,
    }
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        step()
        synchronize(device)
        print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    main(sys.argv)

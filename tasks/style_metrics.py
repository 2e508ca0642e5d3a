"""Style-shift metrics: did the LoRA move samples toward the training images?

Both measures compare base and LoRA samples of the same prompts and seeds with the training set:

- Latent Frechet distance. Each latent (the sampler's final denoised latent, in the scaled space the
  transformer works in) is flattened to one vector. A full-covariance Frechet distance needs more
  samples than dimensions (4 x 64 x 64 = 16384 at 512 px, against a handful of prompts), so we use
  the diagonal-covariance form: every latent position is a 1-D Gaussian, and the distance is
  |mu_a - mu_b|^2 + |sd_a - sd_b|^2 summed over positions. It is well defined from a single sample
  (population variance) and ignores correlations between positions.
- Colour distance: the mean absolute per-channel difference (0-255) between each image's mean colour
  and the training images' mean colour, averaged over images. The training images are the cached
  training latents decoded by the same VAE, so the VAE's own colour cast cancels out.

Lower is closer to the training style; latent_fd_ratio = base / LoRA is above 1 when the LoRA helped.
"""

from __future__ import annotations

import math

import numpy as np


def frechet_distance_diagonal(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two sample sets [n, ...] under a diagonal-Gaussian model."""
    a = _as_vectors(a, "a")
    b = _as_vectors(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sizes differ: {a.shape[1]} vs {b.shape[1]} values per sample")
    mean_term = np.square(a.mean(axis=0) - b.mean(axis=0)).sum()
    # (sd_a - sd_b)^2 == var_a + var_b - 2 sqrt(var_a var_b), the diagonal of the trace term.
    spread_term = np.square(a.std(axis=0) - b.std(axis=0)).sum()
    return float(mean_term + spread_term)


def mean_colors(images: np.ndarray) -> np.ndarray:
    """Mean RGB (0-255) of each image in a uint8 [n, height, width, 3] batch, as [n, 3]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images shaped [n, height, width, 3], got {list(images.shape)}")
    return images.astype(np.float64).mean(axis=(1, 2))


def color_distance(images: np.ndarray, reference_color: np.ndarray) -> float:
    """Mean absolute per-channel distance between each image's mean colour and `reference_color`."""
    return float(np.abs(mean_colors(images) - reference_color).mean())


def style_shift(
    base_latents: np.ndarray,
    lora_latents: np.ndarray,
    train_latents: np.ndarray,
    base_images: np.ndarray,
    lora_images: np.ndarray,
    train_images: np.ndarray,
) -> dict:
    """Base vs LoRA distance to the training set, in latent space and in colour."""
    fd_base = frechet_distance_diagonal(base_latents, train_latents)
    fd_lora = frechet_distance_diagonal(lora_latents, train_latents)
    train_color = mean_colors(train_images).mean(axis=0)
    return {
        "latent_fd_base": fd_base,
        "latent_fd_lora": fd_lora,
        "latent_fd_ratio": fd_base / fd_lora if fd_lora > 0 else math.inf,
        "color_distance_base": color_distance(base_images, train_color),
        "color_distance_lora": color_distance(lora_images, train_color),
        "mean_rgb_base": _rounded(mean_colors(base_images).mean(axis=0)),
        "mean_rgb_lora": _rounded(mean_colors(lora_images).mean(axis=0)),
        "mean_rgb_train": _rounded(train_color),
    }


def _as_vectors(samples: np.ndarray, name: str) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim < 2 or len(samples) == 0:
        raise ValueError(f"{name}: expected a non-empty batch [n, ...], got shape {list(samples.shape)}")
    vectors = samples.reshape(len(samples), -1)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return vectors


def _rounded(color: np.ndarray) -> list[float]:
    return [round(float(c), 2) for c in color]

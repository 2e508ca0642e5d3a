"""Style-shift metrics: did the LoRA move samples toward the training images?

Every measure compares each model's samples (base, LoRA, checkpoints; same prompts and seeds) with
the training set; lower is closer to the training style:

- Latent Frechet distance. The reference is the training set as training saw it: the latent cache
  stores each image's VAE posterior N(mean, std^2), and every training step draws a fresh latent
  from it, so the training distribution is the mixture of those posteriors (scaled by the VAE's
  scaling factor, like the sampler's final latents). For a trained VAE the posteriors are narrow
  and this is close to the set of means; for a random (tiny) VAE the std dominates, and comparing
  samples with the means alone would charge the LoRA for learning exactly that spread. Each
  latent is one vector (4 x 64 x 64 = 16384 values at 512 px against a handful of prompts), too
  many dimensions for a full covariance, so the Frechet distance is the diagonal-Gaussian one:
  |mu_a - mu_b|^2 + |sd_a - sd_b|^2 summed over positions, defined from a single sample and
  blind to correlations between positions. Meaningful for any VAE, even a random one.
- Colour distance: the mean absolute per-channel difference (0-255) between each image's mean colour
  and the training images' mean colour. The training images are the training latents decoded by
  the same VAE, so the VAE's own colour cast cancels out.
- CLIP similarity (when `evaluate.clip_model` is set): mean cosine similarity between each
  sample's CLIP image embedding and the mean embedding of the (decoded) training images; higher
  is closer, and -1..1.

latent_fd_ratio = base / LoRA is above 1 when the LoRA helped. metrics.json keeps the flat
base/LoRA keys (what the report and UI read) and `models`, every metric per model name as it
appears in results.jsonl's `model` column.
"""

from __future__ import annotations

import math

import numpy as np


def posterior_mixture(means: np.ndarray, stds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and std of the mixture of N(means[i], stds[i]^2), as flat vectors."""
    means = _as_vectors(means, "means")
    stds = _as_vectors(stds, "stds")
    if means.shape != stds.shape:
        raise ValueError(f"means {list(means.shape)} and stds {list(stds.shape)} differ in shape")
    mu = means.mean(axis=0)
    variance = (np.square(stds) + np.square(means)).mean(axis=0) - np.square(mu)
    return mu, np.sqrt(np.maximum(variance, 0.0))


def frechet_to_reference(samples: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> float:
    """Diagonal-Gaussian Frechet distance between samples [n, ...] and a reference (mu, sd)."""
    vectors = _as_vectors(samples, "samples")
    if vectors.shape[1] != mu.size:
        raise ValueError(f"sample sizes differ: {vectors.shape[1]} vs {mu.size} values per sample")
    mean_term = np.square(vectors.mean(axis=0) - mu.reshape(-1)).sum()
    # (sd_a - sd_b)^2 == var_a + var_b - 2 sqrt(var_a var_b), the diagonal of the trace term.
    spread_term = np.square(vectors.std(axis=0) - sd.reshape(-1)).sum()
    return float(mean_term + spread_term)


def frechet_distance_diagonal(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two sample sets [n, ...] under a diagonal-Gaussian model."""
    b = _as_vectors(b, "b")
    return frechet_to_reference(a, b.mean(axis=0), b.std(axis=0))


def mean_colors(images: np.ndarray) -> np.ndarray:
    """Mean RGB (0-255) of each image in a uint8 [n, height, width, 3] batch, as [n, 3]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images shaped [n, height, width, 3], got {list(images.shape)}")
    return images.astype(np.float64).mean(axis=(1, 2))


def color_distance(images: np.ndarray, reference_color: np.ndarray) -> float:
    """Mean absolute per-channel distance between each image's mean colour and `reference_color`."""
    return float(np.abs(mean_colors(images) - reference_color).mean())


def clip_similarity(embeddings: np.ndarray, train_embeddings: np.ndarray) -> float:
    """Mean cosine similarity of each embedding [n, d] to the training embeddings' mean direction."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    centre = (train_embeddings / np.linalg.norm(train_embeddings, axis=1, keepdims=True)).mean(axis=0)
    return float((unit @ (centre / np.linalg.norm(centre))).mean())


def style_shift(
    latents: dict[str, np.ndarray],
    images: dict[str, np.ndarray],
    train_means: np.ndarray,
    train_stds: np.ndarray,
    train_images: np.ndarray,
    clip: dict[str, np.ndarray] | None = None,
) -> dict:
    """Every model's distance to the training set. `latents`/`images`/`clip` map model names
    ('base', 'lora', 'checkpoint-N') to its samples; `clip` also holds 'train'."""
    mu, sd = posterior_mixture(train_means, train_stds)
    train_color = mean_colors(train_images).mean(axis=0)
    models = {}
    for name, samples in latents.items():
        models[name] = {
            "latent_fd": frechet_to_reference(samples, mu, sd),
            "color_distance": color_distance(images[name], train_color),
            "mean_rgb": _rounded(mean_colors(images[name]).mean(axis=0)),
        }
        if clip is not None:
            models[name]["clip_similarity"] = clip_similarity(clip[name], clip["train"])
    base, lora = models["base"], models["lora"]
    flat = {
        "latent_fd_base": base["latent_fd"],
        "latent_fd_lora": lora["latent_fd"],
        "latent_fd_ratio": base["latent_fd"] / lora["latent_fd"] if lora["latent_fd"] > 0 else math.inf,
        "color_distance_base": base["color_distance"],
        "color_distance_lora": lora["color_distance"],
        "mean_rgb_base": base["mean_rgb"],
        "mean_rgb_lora": lora["mean_rgb"],
        "mean_rgb_train": _rounded(train_color),
    }
    if clip is not None:
        flat |= {
            "clip_similarity_base": base["clip_similarity"],
            "clip_similarity_lora": lora["clip_similarity"],
        }
    return flat | {"models": models}


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

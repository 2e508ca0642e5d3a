"""The work dir's layout, in one place: every stage finds its inputs and outputs here.

    WORKDIR/
      oxen/                  local Oxen repos (the demo's dataset repo, the results repo)
      cache/images/          dataset images, named by the sha256 of their bytes
      cache/captions/        caption shards        (contracts.CAPTION_CACHE)
      cache/text/            T5 embedding shards   (contracts.TEXT_EMBEDDINGS)
      cache/latents/         VAE latent shards     (contracts.LATENTS)
      cache/train/<key>/     one LoRA training run per input+settings hash (checkpoints, adapter)
      cache/eval/<key>/      evaluation images per adapter+settings hash
      runs/<run id>/         manifest, captions, reports and run_summary.json of one run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def resolve(self, path: str | Path) -> Path:
        """Relative paths in configs are relative to the work dir."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def images(self) -> Path:
        return self.root / "cache" / "images"

    @property
    def captions_cache(self) -> Path:
        return self.root / "cache" / "captions"

    @property
    def text_cache(self) -> Path:
        return self.root / "cache" / "text"

    @property
    def latent_cache(self) -> Path:
        return self.root / "cache" / "latents"

    def train_dir(self, key: str) -> Path:
        return self.root / "cache" / "train" / key[:16]

    def eval_dir(self, key: str) -> Path:
        return self.root / "cache" / "eval" / key[:16]

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

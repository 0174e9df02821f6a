"""``zoo.json``: what a built zoo contains, how it was built, and how its models scored."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "zoo.json"


@dataclass(frozen=True)
class ZooManifest:
    """A built zoo. Model directories are relative to ``root``; ``scores[model][skill]`` holds the
    build-time scores on the report split (``mc``: multiple-choice accuracy, ``em``: exact match)."""

    root: Path
    variant: str
    seed: int
    zoo_version: str
    skills: tuple[str, ...]
    base: str
    experts: dict[str, str]
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    build_seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, Path]:
        """Absolute directory of every model, base first, keyed by directory name."""
        names = [self.base, *self.experts.values()]
        return {name: self.root / name for name in names}

    @property
    def base_path(self) -> Path:
        return self.root / self.base

    def expert_path(self, skill: str) -> Path:
        return self.root / self.experts[skill]

    def write(self) -> Path:
        data = asdict(self)
        del data["root"]
        data["skills"] = list(self.skills)
        path = self.root / MANIFEST_NAME
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, root: Path) -> ZooManifest:
        data = json.loads((Path(root) / MANIFEST_NAME).read_text())
        data["skills"] = tuple(data["skills"])
        return cls(root=Path(root), **data)

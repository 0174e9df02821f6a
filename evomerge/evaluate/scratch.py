"""A scratch folder that backends save a candidate's weights into (to load or reload them).

Backends that cannot score an ``nn.Module`` directly (vLLM's engine, a quantized HF copy) save
each candidate here first: on tmpfs when ``/dev/shm`` exists (no disk write), created on first use,
removed by :meth:`ScratchModelDir.remove` or, at the latest, when the object is collected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any


class ScratchModelDir:
    """One reusable folder holding the last saved model (and its tokenizer)."""

    def __init__(self, prefix: str, parent: str | Path | None = None) -> None:
        self.prefix = prefix
        self.parent = parent
        self.path: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def save(self, model: Any, tokenizer: Any = None) -> Path:
        """Save ``model`` (safetensors) and, if given, ``tokenizer``; returns the folder."""
        if self.path is None:
            parent = self.parent or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
            self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
        model.save_pretrained(self.path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.path)
        return self.path

    def remove(self) -> None:
        """Delete the folder now (a later :meth:`save` makes a new one). Safe to call twice."""
        if self._cleanup is not None:
            self._cleanup()
        self.path = self._cleanup = None

"""Model references: ``path_or_repo[@revision][+lora_path]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ModelRef:
    """Where a model lives: a local directory or a hub repo id, at an optional revision.

    ``lora`` names a PEFT LoRA adapter (a directory or hub id, ``[@revision]``) applied on top
    when the model is read (merge_engine.io.lora).
    """

    path: str
    revision: str | None = None
    lora: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        text = text.strip()
        if not text:
            raise ValueError("model reference is empty; give a local directory or a hub repo id")
        lora = None
        if "+" in text:
            text, lora = text.split("+", 1)
        revision = None
        if "@" in text:
            text, revision = text.rsplit("@", 1)
            if not revision:
                raise ValueError(f"model reference {text}@ has an empty revision")
        return cls(path=text, revision=revision, lora=lora or None)

    def __str__(self) -> str:
        out = self.path
        if self.revision:
            out += "@" + self.revision
        if self.lora:
            out += "+" + self.lora
        return out

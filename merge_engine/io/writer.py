"""Write a merged model as sharded safetensors into a temporary directory, then publish atomically."""

from __future__ import annotations

import errno
import json
import os
import queue
import secrets
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from merge_engine.errors import CheckpointError, MergeError, OutputExistsError
from merge_engine.io import DEFAULT_SHARD_SIZE, current_umask
from merge_engine.io.stream import PlannedTensor, ShardStream

INDEX_NAME = "model.safetensors.index.json"


class OutputWriter:
    """Stream planned tensors into shards from a background thread; publish them as one directory.

    Lifecycle: construct (refuses an existing ``out_dir`` unless ``force``; creates a hidden temp
    directory ``.<name>.tmp-<random>`` next to it) -> :meth:`plan` every tensor (name, shape,
    dtype) -> ``add`` them in any order, plus ``write_json`` / ``write_text`` / ``copy_files`` ->
    ``publish()``, which checks every planned tensor arrived, writes
    ``model.safetensors.index.json`` when there are several shards, then renames the temp
    directory to ``out_dir`` (with ``force``, the old directory is moved aside first and deleted
    last). ``abort()`` deletes the temp directory; as a context manager, leaving the block without
    ``publish()`` (or with an exception) aborts, so a failed merge leaves nothing behind.

    Shards hold at most ``shard_size`` bytes (a larger tensor gets a shard of its own); their
    headers are written by :meth:`plan`, and each added tensor's bytes go straight to its place
    from the writer thread, so only a few tensors wait in memory. ``add`` keeps a reference to
    the tensor: do not modify it afterwards. A failure in the thread (disk full: MergeError) is
    raised by the next call, after the temp directory is removed. Not thread-safe: one caller.
    """

    def __init__(self, out_dir: Path | str, *, shard_size: int = DEFAULT_SHARD_SIZE,
                 force: bool = False) -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.shard_size = shard_size
        self.force = force
        if _exists(self.out_dir) and not force:
            raise OutputExistsError(f"output directory {self.out_dir} exists; pass --force to replace it")
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
            # mkdtemp makes the folder 0700; the published model folder gets a new folder's
            # normal permissions (the umask's), like `mkdir` would give it
            os.chmod(self.tmp_dir, 0o777 & ~current_umask())
        except OSError as exc:
            raise _os_error(exc, self.out_dir) from None
        self._state = "open"  # open -> published | aborted
        self._stream: ShardStream | None = None
        self._names: set[str] = set()
        self._error: BaseException | None = None
        self._cancel = False
        self._slots = threading.Semaphore(1)  # tensors handed off and not yet written (set by plan)
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"OutputWriter({self.out_dir.name})", daemon=True)
        self._thread.start()

    # -- caller API ---------------------------------------------------------------------------

    def plan(self, entries: list[PlannedTensor], max_pending_tensors: int = 4) -> None:
        """Declare every tensor (name, shape, dtype) up front; required before the first add().

        Shard files and headers are laid out now; each :meth:`add` then writes the tensor's
        bytes in place from the background thread, so at most ``max_pending_tensors`` tensors
        wait in memory.
        """
        self._check_open()
        if self._names or self._stream is not None:
            raise MergeError("plan() must come before the first add(); this is a bug")
        try:
            self._stream = ShardStream(self.tmp_dir, entries, self.shard_size)
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.out_dir) from None
        self._slots = threading.Semaphore(max_pending_tensors)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` to be written as ``name`` (planned by :meth:`plan`; moved to CPU)."""
        self._check_open()
        if self._stream is None:
            raise MergeError("plan() must come before the first add(); this is a bug")
        if name in self._names:
            raise ValueError(f"tensor {name} was already added to {self.out_dir}")
        self._names.add(name)
        self._slots.acquire()
        self._queue.put((name, tensor.detach().to("cpu")))

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON to ``name`` inside the output."""
        self.write_text(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """Write ``text`` (UTF-8) to ``name`` inside the output."""
        self._check_open()
        path = self._target(name)
        self._guard(lambda: path.write_text(text, encoding="utf-8"), path)

    def copy_files(self, src_dir: Path | str, names: list[str]) -> None:
        """Copy ``names`` from ``src_dir`` into the output (symlinks followed, as in the hub cache)."""
        self._check_open()
        src_dir = Path(src_dir)
        for name in names:
            src = src_dir / name
            if not src.is_file():
                raise CheckpointError(f"{src} does not exist; check the source model directory")
            dst = self._target(name)
            self._guard(lambda: shutil.copyfile(src, dst), dst)

    def publish(self) -> Path:
        """Finish writing, write the index, and move the result to ``out_dir``."""
        self._check_open()
        if self._stream is None:
            self.abort()
            raise MergeError(f"nothing to write to {self.out_dir}: no tensors were added; check the recipe")
        try:
            self._stop_thread()
            self._raise_thread_error()
            stream, self._stream = self._stream, None
            stream.close()
            index = stream.index()
            if index is not None:
                (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            self._swap_in()
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise _os_error(exc, self.out_dir) from None
            raise
        self._state = "published"
        return self.out_dir

    def abort(self) -> None:
        """Stop writing and delete the temp directory. Does nothing after publish or a prior abort."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._cancel = True
        self._stop_thread()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            for fd in stream.fds:
                os.close(fd)
            stream.fds = []
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise MergeError(f"output writer for {self.out_dir} is already {self._state}; start a new one")
        self._raise_thread_error()

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self.abort()
            raise error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            name, tensor = item
            if self._error is None and not self._cancel:
                try:
                    self._stream.write(name, tensor)
                except OSError as exc:
                    self._error = _os_error(exc, self.out_dir)
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc
            del item, tensor  # free the tensor's memory before making room for the next one
            self._slots.release()

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _swap_in(self) -> None:
        if not _exists(self.out_dir):
            os.rename(self.tmp_dir, self.out_dir)
            return
        if not self.force:
            raise OutputExistsError(f"output directory {self.out_dir} exists; pass --force to replace it")
        aside = self.out_dir.with_name(f".{self.out_dir.name}.old-{secrets.token_hex(4)}")
        os.rename(self.out_dir, aside)
        try:
            os.rename(self.tmp_dir, self.out_dir)
        except BaseException:
            os.rename(aside, self.out_dir)
            raise
        _remove(aside)

    def _target(self, name: str) -> Path:
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"output file name {name!r} must be a relative path inside the output directory")
        if name == INDEX_NAME or name.endswith(".safetensors"):
            raise ValueError(f"output file name {name!r} is reserved for weights; use add() for tensors")
        path = self.tmp_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _guard(self, action: Any, path: Path) -> None:
        try:
            action()
        except OSError as exc:
            self.abort()
            raise _os_error(exc, self.out_dir) from None


def _os_error(exc: OSError, out_dir: Path) -> MergeError:
    if exc.errno == errno.ENOSPC:
        return MergeError(f"disk full while writing {out_dir}; free space or choose another --out")
    return MergeError(f"could not write {out_dir}: {exc.strerror or exc}; check permissions or choose another --out")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- files that travel with the weights ------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def tokenizer_files(model_dir: Path | str) -> list[str]:
    """Names of the tokenizer (and generation config) files present in ``model_dir``."""
    model_dir = Path(model_dir)
    return [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]


def model_card(recipe_yaml: str, inputs: list[str], method: str) -> str:
    """A README.md for a merged model: hub front matter (tags, base_model), inputs, method, recipe."""
    front = yaml.safe_dump(
        {"base_model": list(inputs), "library_name": "transformers", "tags": ["merge", "evomerge"]},
        sort_keys=False,
        allow_unicode=True,
    )
    fence = "`" * max(3, _longest_backtick_run(recipe_yaml) + 1)
    listed = "\n".join(f"- `{name}`" for name in inputs)
    return (
        f"---\n{front}---\n\n"
        f"# Merged model\n\n"
        f"This model was made by merging {len(inputs)} models with the `{method}` method, using evomerge.\n\n"
        f"## Inputs\n\n{listed}\n\n"
        f"## Recipe\n\nThe recipe below is mergekit-compatible YAML and reproduces this model.\n\n"
        f"{fence}yaml\n{recipe_yaml.rstrip()}\n{fence}\n"
    )


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return longest

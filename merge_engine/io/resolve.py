"""Turn a ModelRef into a local model directory (a local path, or a snapshot in the hub cache)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from merge_engine.errors import CheckpointError
from merge_engine.io.refs import ModelRef

# Files a merge needs from a hub repo: weights, configs, tokenizer files, chat templates.
# Pickle weights are fetched only when asked for, so repos carrying both formats download once.
HUB_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.json",  # config, generation config, shard index, tokenizer json files
    "*.jinja",
    "*.model",  # sentencepiece
    "*.txt",  # merges.txt, vocab.txt
    "*.tiktoken",
)
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt")
#: Seconds to wait for the hub to accept a connection before working from the cache alone
#: (huggingface_hub's own retries on an unreachable hub take about 25 s per file).
HUB_PROBE_TIMEOUT = 3.0


_REACHABLE: dict[str, bool] = {}  # endpoint -> answer, once per process (a dead hub costs one wait)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``) accepts a TCP connection within ``timeout`` s.

    Always False under ``HF_HUB_OFFLINE=1``; always True behind an HTTP(S) proxy (the probe
    cannot see through it: the hub client then tries, and says what failed). Name resolution is
    the system resolver's. The answer is kept for the process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    if constants.ENDPOINT not in _REACHABLE:
        _REACHABLE[constants.ENDPOINT] = _accepts_connection(constants.ENDPOINT, timeout)
    return _REACHABLE[constants.ENDPOINT]


def _accepts_connection(endpoint: str, timeout: float) -> bool:
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def looks_local(path: str) -> bool:
    """True when ``path`` is written as a filesystem path rather than a hub repo id."""
    return path.startswith(("/", ".", "~", "\\")) or (len(path) > 1 and path[1] == ":")


def resolve_model_dir(
    ref: ModelRef, *, cache_dir: str | Path | None = None, allow_pickle: bool = False
) -> Path:
    """Return the local directory holding the model ``ref`` names.

    An existing local directory is returned as is. Anything else that does not look like a local
    path is taken for a hub repo id and fetched with ``huggingface_hub.snapshot_download`` into
    ``cache_dir`` (default: the hub cache, ``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1``, or when
    the hub does not answer within :data:`HUB_PROBE_TIMEOUT` s, only the cache is consulted.
    Only weights (safetensors; pickle too when ``allow_pickle``), JSON configs
    and tokenizer files are fetched. Every failure is a one-line ``CheckpointError`` with a fix.

    For a ``base+adapter`` ref this is the *base* model's directory (its config, tokenizer and
    chat template are the adapted model's); the adapter directory is resolved too, so a missing
    adapter fails here, but its weights are applied only by a reader
    (:class:`merge_engine.io.lora.LoraReader`, opened by the merge session). Code that loads
    the directory's weights directly gets the base without the adapter.
    """
    if ref.lora:
        resolve_adapter_dir(ref, cache_dir=cache_dir, allow_pickle=allow_pickle)
        ref = ModelRef(ref.path, ref.revision)
    local = Path(ref.path).expanduser()
    if local.is_dir():
        if ref.revision:
            raise CheckpointError(
                f"model {ref}: {local} is a local directory, which has no revisions; drop '@{ref.revision}'"
            )
        return local
    if local.exists():
        raise CheckpointError(f"model path {local} is a file, not a model directory; give its directory")
    if looks_local(ref.path):
        raise CheckpointError(f"model directory {local} does not exist; check the path")
    return _snapshot(ref, cache_dir, allow_pickle)


def resolve_adapter_dir(
    ref: ModelRef, *, cache_dir: str | Path | None = None, allow_pickle: bool = False
) -> Path:
    """The local directory of the LoRA adapter of a ``base+adapter[@revision]`` ref: a local
    directory, or a hub repo fetched like a model (see :func:`resolve_model_dir`)."""
    if not ref.lora:
        raise ValueError(f"model {ref} names no adapter")
    try:
        adapter = ModelRef.parse(ref.lora)
    except ValueError as err:
        raise CheckpointError(f"model {ref}: adapter reference {err}") from None
    try:
        return resolve_model_dir(adapter, cache_dir=cache_dir, allow_pickle=allow_pickle)
    except CheckpointError as err:
        raise CheckpointError(f"adapter of {ref.path}: {err}") from None


def _snapshot(ref: ModelRef, cache_dir: str | Path | None, allow_pickle: bool) -> Path:
    # Imported late: huggingface_hub is only needed for hub ids.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    repo = ref.path
    patterns = list(HUB_PATTERNS) + (list(PICKLE_PATTERNS) if allow_pickle else [])
    download_hint = f"run `hf download {repo}` where the hub is reachable"
    # An unreachable hub: answer from the cache at once instead of after the hub's retries.
    reachable = hub_reachable()
    try:
        folder = snapshot_download(
            repo,
            revision=ref.revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=patterns,
            local_files_only=not reachable,
        )
    except hub_errors.HFValidationError:
        raise CheckpointError(
            f"model {repo!r} is neither an existing local directory nor a valid hub repo id; check the path"
        ) from None
    except hub_errors.GatedRepoError:
        raise CheckpointError(
            f"hub repo {repo} is gated; accept its terms on the hub and log in with `hf auth login`"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"hub repo {repo} not found (or private) and no local directory {repo} exists; "
            "check the name, or log in with `hf auth login`"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointError(
            f"revision {ref.revision!r} not found in hub repo {repo}; check the branch, tag or commit"
        ) from None
    except hub_errors.IncompleteSnapshotError:
        raise CheckpointError(
            f"the cached snapshot of {ref} is incomplete (an interrupted download?); {download_hint} to complete it"
        ) from None
    except hub_errors.LocalEntryNotFoundError as exc:
        # Raised when the hub is unreachable (or offline mode is on) and the cache lacks the snapshot.
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"model {ref} is neither a local directory nor in the hub cache, and HF_HUB_OFFLINE is set; "
                f"fix the path, or {download_hint} (or unset HF_HUB_OFFLINE)"
            ) from None
        raise CheckpointError(
            f"could not reach the hub ({constants.ENDPOINT}) to fetch {ref}, and the hub cache "
            f"does not hold it ({type(exc).__name__}); "
            f"check the network, or {download_hint} and set HF_HUB_OFFLINE=1"
        ) from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        # Other HTTP failures and cache problems (permissions, disk) land here.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"could not fetch {ref} from the hub: {first_line}; {download_hint} and set HF_HUB_OFFLINE=1"
        ) from None
    return Path(folder)


def loadable_model_dir(ref: ModelRef, *, allow_pickle: bool = False) -> Path:
    """The directory a program that loads the model itself (transformers, vLLM) can load ``ref``
    from. A ``+lora`` ref has none (its weights exist only as the merge engine reads them), so it
    is refused with the fix: merge it into a folder first."""
    if ref.lora:
        raise CheckpointError(
            f"model {ref}: an adapter ref is applied when a recipe is merged, not when a model is "
            f"loaded; merge it first (a one-model linear recipe: models: [{{model: {ref}}}]) and "
            "use the merged folder")
    return resolve_model_dir(ref, allow_pickle=allow_pickle)

"""Model access: references, lazy checkpoint readers, layer layout, sharded writer."""

import os

DEFAULT_SHARD_SIZE = 5 * 2**30  # bytes per output shard; here so the CLI can show it without torch


def current_umask() -> int:
    """The process umask (read by setting it and back: there is no other way). Temporary files
    and folders that become user-visible output get ``0o666``/``0o777`` minus this, as a normal
    new file or folder would, instead of ``mkstemp``'s/``mkdtemp``'s private 0600/0700."""
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""Files on the Hugging Face Hub as local paths: `hf://owner/repo[@revision][/path]`, fetched through huggingface_hub,
so its cache, `HF_HUB_OFFLINE` and tokens work as the user has set them. Every loader of the package that reads a
file the user names (SAE folders, concept statistics, class_params) accepts such a location, and so does every config
option that they read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

HUB_SCHEME = "hf://"


class HubLocation(NamedTuple):
    """A file or folder in a Hub model repository."""

    repo_id: str
    """`owner/name`."""
    revision: str | None
    """Branch, tag or commit; `None` = the default branch."""
    path: str
    """Path inside the repository; `""` = the whole repository."""


def parse_hub_location(location: str | os.PathLike) -> HubLocation | None:
    """The parts of a `hf://owner/repo[@revision][/path]` location; `None` for anything else (a local path)."""
    text = str(location)
    if not text.startswith(HUB_SCHEME):
        return None
    owner, _, rest = text[len(HUB_SCHEME):].partition("/")
    name, _, path = rest.partition("/")
    name, _, revision = name.partition("@")
    if not owner or not name:
        raise ValueError(f"{text!r} names no Hub repository; expected hf://owner/repo[@revision][/path].")
    return HubLocation(f"{owner}/{name}", revision or None, path.strip("/"))


def local_path(location: str | os.PathLike) -> Path:
    """`location` as a path, or the local copy of a `hf://` location: a file (a name with a suffix) through
    `hf_hub_download`, a folder (or the whole repository) through `snapshot_download` of the files under it."""
    hub = parse_hub_location(location)
    if hub is None:
        return Path(location)
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        if Path(hub.path).suffix:
            return Path(hf_hub_download(hub.repo_id, hub.path, revision=hub.revision))
        patterns = [f"{hub.path}/*"] if hub.path else None
        return Path(snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns)) / hub.path
    except LocalEntryNotFoundError as error:  # offline, or the Hub unreachable, and not in the cache
        raise FileNotFoundError(f"{location} is not in the Hugging Face cache and the Hub cannot be reached "
                                "(HF_HUB_OFFLINE is set, or there is no network); fetch it once online.") from error
    except (EntryNotFoundError, HfHubHTTPError) as error:
        raise FileNotFoundError(f"{location} could not be fetched from the Hub ({type(error).__name__}).") from error

"""Activation shards (docs/method.md §8): WebDataset `.tar` files plus a `manifest.json` describing them.

One sample per (image, sampling step), key `"{prompt_id}_{step:04d}"`, holding `act.npy` (float16 `[N, d]`, no
pickle) and `json` (labels and provenance, `SAMPLE_META_KEYS`). A shard appears under its final name only once it
is complete, so a crashed writer leaves at most one `.tar.tmp` file and every `.tar` in a folder is whole.
A shard folder is read from a path or from any URL webdataset opens (`http(s)://` through curl, `pipe:` commands);
`saemnesia.shard_reading` reads the samples.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds

from saemnesia.concepts import ConceptVocabulary
from saemnesia.io import atomic_write_text
from saemnesia.shard_reading import is_url, read_url

MANIFEST_FILE = "manifest.json"
SHARD_DTYPE = "float16"
SAMPLE_META_KEYS = ("object", "style", "step", "timestep", "prompt_id", "prompt", "seed", "hookpoint", "half")
"""Keys every sample's `json` must carry."""
MANIFEST_KEYS = ("hookpoint", "d_in", "tokens_per_sample", "num_steps", "concepts", "dtype", "shards")
#: Fields on which manifests written by different ranks must agree to be merged.
MERGE_FIELDS = ("hookpoint", "d_in", "tokens_per_sample", "num_steps", "concepts", "dtype")


def shard_location(folder: str | os.PathLike, name: str) -> str:
    """Path or URL of the shard `name` inside a local or remote (URL) shard folder."""
    return f"{str(folder).rstrip('/')}/{name}" if is_url(folder) else str(Path(folder) / name)


def sample_key(prompt_id: str | int, step: int) -> str:
    """The sample key of one (prompt, step): unique, and sorts by prompt then step."""
    return f"{prompt_id}_{step:04d}"


def prompt_id_of_key(key: str) -> str:
    """Inverse of `sample_key` for the prompt part (prompt ids may contain `_`; the step never does)."""
    return key.rsplit("_", 1)[0]


@dataclass
class ShardRecord:
    """One complete shard file of a folder."""

    name: str
    """File name inside the shard folder, e.g. `shard-r0-000000.tar`."""
    num_samples: int
    """Number of (image, step) samples in the file."""
    num_bytes: int | None = None
    """File size; `None` in manifests written before it was recorded. A local shard of another size is refused
    before training starts, rather than when the stream first draws it (hours in, at SD1.5 scale)."""


@dataclass
class ShardManifest:
    """What a shard folder holds; `manifest.json` on disk (JSON keys = field names, `concepts` as a dict)."""

    hookpoint: str
    """Module path of the cached block, e.g. `unet.up_blocks.1.attentions.1`."""
    d_in: int
    """Channels of the block output = width `d` of every token."""
    tokens_per_sample: int
    """Tokens `N = H·W` per sample (one image at one step)."""
    num_steps: int
    """Sampling steps `T` of the generation (samples may hold a subset of them)."""
    concepts: ConceptVocabulary
    """Vocabulary the object/style labels come from."""
    shards: list[ShardRecord] = field(default_factory=list)
    """Complete shards, in reading order."""
    dtype: str = SHARD_DTYPE
    """Stored activation dtype; always `float16`."""

    @property
    def num_samples(self) -> int:
        return sum(record.num_samples for record in self.shards)

    def to_dict(self) -> dict:
        return {"hookpoint": self.hookpoint, "d_in": self.d_in, "tokens_per_sample": self.tokens_per_sample,
                "num_steps": self.num_steps, "concepts": self.concepts.to_dict(), "dtype": self.dtype,
                "shards": [{"name": r.name, "num_samples": r.num_samples, "num_bytes": r.num_bytes}
                           for r in self.shards]}

    def save(self, folder: str | os.PathLike, filename: str = MANIFEST_FILE) -> Path:
        """Write the manifest atomically into `folder`; returns its path."""
        path = Path(folder) / filename
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, location: str | os.PathLike) -> ShardManifest:
        """Read a manifest from a shard folder (its `manifest.json`) or a manifest file, each a path or a URL
        (a URL whose path does not end in `.json` is a folder; a `pipe:` command prints the file)."""
        if is_url(location):
            url = str(location)
            if not url.startswith("pipe:") and not urlparse(url).path.endswith(".json"):
                url = f"{url.rstrip('/')}/{MANIFEST_FILE}"
            return cls.from_json(read_url(url, what="Shard manifest"), url)
        path = Path(location)
        if path.is_dir():
            path = path / MANIFEST_FILE
            if not path.is_file():
                raise FileNotFoundError(f"Shard folder {path.parent} has no {MANIFEST_FILE}; expected the manifest "
                                        "written when activation caching finished.")
        elif not path.exists():
            raise FileNotFoundError(f"{path} does not exist; expected a shard folder holding {MANIFEST_FILE} "
                                    "or a manifest file.")
        return cls.from_json(path.read_bytes(), path)

    @classmethod
    def from_json(cls, text: str | bytes, source: str | os.PathLike) -> ShardManifest:
        """Parse the JSON of a manifest read from `source` (named in errors)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Shard manifest {source} is not valid JSON "
                             f"({error.msg} at line {error.lineno}).") from None
        missing = [key for key in MANIFEST_KEYS if not isinstance(data, dict) or key not in data]
        if missing:
            raise ValueError(f"Shard manifest {source} is missing keys {missing}; expected {list(MANIFEST_KEYS)}.")
        if data["dtype"] != SHARD_DTYPE:
            raise ValueError(f"Shard manifest {source} has dtype {data['dtype']!r}; only {SHARD_DTYPE!r} is supported.")
        return cls(hookpoint=data["hookpoint"], d_in=int(data["d_in"]),
                   tokens_per_sample=int(data["tokens_per_sample"]), num_steps=int(data["num_steps"]),
                   concepts=ConceptVocabulary.from_dict(data["concepts"]),
                   shards=[ShardRecord(r["name"], int(r["num_samples"]), r.get("num_bytes")) for r in data["shards"]],
                   dtype=data["dtype"])

    @classmethod
    def merge(cls, manifests: list[ShardManifest]) -> ShardManifest:
        """Combine per-rank manifests of one folder: they must agree on everything but their shards."""
        if not manifests:
            raise ValueError("Cannot merge shard manifests: none were given.")
        first = manifests[0]
        for other in manifests[1:]:
            for name in MERGE_FIELDS:
                if getattr(other, name) != getattr(first, name):
                    raise ValueError(f"Cannot merge shard manifests: they disagree on {name} "
                                     f"({getattr(first, name)!r} vs {getattr(other, name)!r}).")
        shards = [record for manifest in manifests for record in manifest.shards]
        names = [record.name for record in shards]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"Cannot merge shard manifests: shards {repeated} are listed more than once.")
        return cls(hookpoint=first.hookpoint, d_in=first.d_in, tokens_per_sample=first.tokens_per_sample,
                   num_steps=first.num_steps, concepts=first.concepts, shards=shards, dtype=first.dtype)


def shard_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of one complete shard, from the tar headers only (the activations are not read)."""
    with tarfile.open(path, mode="r:") as archive:
        return list(dict.fromkeys(name.split(".", 1)[0] for name in archive.getnames()))


def scan_shards(folder: str | os.PathLike, prefix: str = "") -> list[ShardRecord]:
    """Records of the complete shards in `folder` whose names start with `prefix` (temporary files are ignored)."""
    paths = sorted(Path(folder).glob(f"{prefix}*.tar"))
    return [ShardRecord(path.name, len(shard_keys(path)), path.stat().st_size) for path in paths]


def stored_prompt_ids(folder: str | os.PathLike, prefix: str = "") -> set[str]:
    """Prompt ids (as strings) present in complete shards; `ShardSink` never splits a prompt across shards."""
    paths = sorted(Path(folder).glob(f"{prefix}*.tar"))
    return {prompt_id_of_key(key) for path in paths for key in shard_keys(path)}


class ShardSink:
    """Size-capped writer of `{prefix}-{index:06d}.tar` shards, each written as `.tar.tmp` and renamed when whole.

    A shard is closed at the first new prompt after it reached `max_samples` samples or `max_bytes` bytes, so a
    prompt's samples (written consecutively) never straddle two shards and a complete shard holds complete prompts;
    a shard can therefore exceed the cap by less than one prompt. Existing complete shards with the same prefix are
    kept (resume): numbering continues after them and `close()` returns their records too.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, tokens_per_sample: int, d_in: int,
                 max_samples: int = 1000, max_bytes: int = 1 << 30, vocabulary: ConceptVocabulary | None = None):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"ShardSink needs max_samples >= 1 and max_bytes >= 1, got {max_samples} and {max_bytes}.")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shape = (tokens_per_sample, d_in)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.vocabulary = vocabulary
        self.records = scan_shards(self.folder, f"{prefix}-")
        self.next_index = 1 + max((int(r.name[len(prefix) + 1:-len(".tar")]) for r in self.records), default=-1)
        self.keys: set[str] = set()
        self.writer: wds.TarWriter | None = None
        self.stream = None
        self.samples_in_shard = 0
        self.bytes_in_shard = 0
        self.last_prompt_id: str | None = None

    def _final_path(self) -> Path:
        return self.folder / f"{self.prefix}-{self.next_index:06d}.tar"

    def _open_shard(self) -> None:
        self.stream = open(self._final_path().with_suffix(".tar.tmp"), "wb")
        # A whole-second mtime fits the plain ustar header; webdataset's default (a float) adds a pax header to every
        # file, which doubles the headers a reader parses.
        self.writer = wds.TarWriter(self.stream, mtime=int(time.time()))
        self.samples_in_shard = self.bytes_in_shard = 0

    def _finish_shard(self) -> None:
        """Complete the open shard: end-of-archive blocks, flush to disk, then rename to the final name."""
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        final = self._final_path()
        os.replace(final.with_suffix(".tar.tmp"), final)
        self.records.append(ShardRecord(final.name, self.samples_in_shard, final.stat().st_size))
        self.next_index += 1
        self.writer = self.stream = None

    def _validate(self, key: str, act: np.ndarray, meta: dict) -> np.ndarray:
        if not key or "." in key or "/" in key:
            raise ValueError(f"Sample key {key!r} must be non-empty without '.' or '/' (WebDataset splits on them).")
        if key in self.keys:
            raise ValueError(f"Sample key {key!r} was already written by this ShardSink.")
        if tuple(act.shape) != self.shape or not np.issubdtype(act.dtype, np.floating):
            raise ValueError(f"Sample {key} has activations {act.dtype}{list(act.shape)}; expected floats "
                             f"of shape {list(self.shape)} [tokens, d].")
        missing = [name for name in SAMPLE_META_KEYS if name not in meta]
        if missing:
            raise ValueError(f"Sample {key} metadata is missing keys {missing}; expected {list(SAMPLE_META_KEYS)}.")
        if meta["half"] not in ("cond", "uncond"):
            raise ValueError(f"Sample {key} has half {meta['half']!r}; expected 'cond' or 'uncond'.")
        if self.vocabulary is not None:
            try:
                self.vocabulary.object_index(meta["object"])
                self.vocabulary.style_index(meta["style"])
            except KeyError as error:
                raise ValueError(f"Sample {key}: {error.args[0]}") from None
        with np.errstate(over="ignore"):  # overflow is reported below, as one sentence
            act16 = act.astype(np.float16)
        if not np.isfinite(act16).all():
            raise ValueError(f"Sample {key} has activations that are not finite in float16 (|x| > 65504 or NaN).")
        return act16

    def write(self, key: str, act: np.ndarray | torch.Tensor, meta: dict) -> None:
        """Add one sample; write all samples of a prompt consecutively."""
        if isinstance(act, torch.Tensor):
            act = act.detach().cpu()
            act = (act.float() if act.is_floating_point() else act).numpy()  # numpy has no bfloat16
        act16 = self._validate(key, act, meta)
        prompt_id = str(meta["prompt_id"])
        full = self.samples_in_shard >= self.max_samples or self.bytes_in_shard >= self.max_bytes
        if self.writer is not None and full and prompt_id != self.last_prompt_id:
            self._finish_shard()
        if self.writer is None:
            self._open_shard()
        self.bytes_in_shard += self.writer.write({"__key__": key, "act.npy": act16, "json": meta})
        self.samples_in_shard += 1
        self.keys.add(key)
        self.last_prompt_id = prompt_id

    def close(self) -> list[ShardRecord]:
        """Complete the open shard (if any) and return the records of every complete shard with this prefix."""
        if self.writer is not None:
            self._finish_shard()
        return list(self.records)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        if error is None:
            self.close()
        elif self.writer is not None:
            # A failed run must not publish a partial shard: leave only the temporary file behind.
            self.writer.close()
            self.stream.close()

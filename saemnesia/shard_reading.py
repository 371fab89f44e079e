"""Reading activation shards (docs/method.md §8), sample by sample.

A local shard is mapped into memory once per process and indexed once (`mapped_shard`): its maps are views of the
page cache, so a batch copies each byte once. A URL (`http(s)://`, through curl) or a `pipe:` command is streamed as
webdataset opens it. Either way a sample is decoded into `{__key__, __url__, act.npy: float16 [N, d], json: dict}`.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import tarfile
from collections.abc import Iterator
from functools import lru_cache
from typing import IO

import numpy as np
import webdataset as wds
from webdataset.gopen import Pipe
from webdataset.tariterators import group_by_keys

from saemnesia.tar_reader import tar_files

SAMPLE_FILES = ("act.npy", "json")
"""Files of every sample, by extension."""
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
"""Start of a URL or `pipe:` command (two letters at least, so that a Windows drive letter stays a path)."""


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL or `pipe:` command for webdataset to open, rather than a local path."""
    return bool(URL_SCHEME.match(str(location)))


def close_stream(stream: IO[bytes]) -> None:
    """Close a stream from `wds.gopen`; a `pipe:` command or download (curl) that failed raises an OSError saying
    which program exited with which status (webdataset's own error prints the whole argument list)."""
    try:
        stream.close()
    except OSError as error:
        if not isinstance(stream, Pipe):
            raise
        command = stream.args[0][0]  # the shell command of `pipe:`, or curl's argument list
        program = command if isinstance(command, str) else command[0]
        raise OSError(f"{program!r} exited with status {stream.status}") from error


def read_url(url: str, what: str) -> bytes:
    """The whole content at a URL or `pipe:` command; FileNotFoundError naming `what` if it cannot be fetched."""
    try:
        stream = wds.gopen(url)
        try:
            content = stream.read()
        finally:
            close_stream(stream)
    except OSError as error:
        raise FileNotFoundError(f"{what} {url} could not be read ({error}).") from error
    return content


@lru_cache(maxsize=16)
def npy_layout(header: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an `.npy` header (the bytes before the data). Cached: numpy parses the header with `ast`,
    which costs more than reading a toy map, and every map of a folder has the same header."""
    formats = np.lib.format
    with io.BytesIO(header) as stream:
        version = formats.read_magic(stream)
        read_header = formats.read_array_header_1_0 if version == (1, 0) else formats.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    if fortran_order:  # never written by ShardSink; a C-order view would transpose it silently
        raise ValueError("Expected a C-ordered .npy array, got a Fortran-ordered one.")
    return shape, dtype


def npy_array(contents: np.ndarray) -> np.ndarray:
    """The array of an `.npy` file's bytes (uint8), as a view of them: `np.load` would copy it once more."""
    # Version 1 headers give their length in 2 bytes after the 8-byte magic and version, later versions in 4.
    length_bytes = 2 if contents[6:7].tobytes() == b"\x01" else 4
    offset = 8 + length_bytes + int.from_bytes(contents[8:8 + length_bytes].tobytes(), "little")
    shape, dtype = npy_layout(contents[:offset].tobytes())
    return contents[offset:].view(dtype).reshape(shape)


MAPPED_SHARDS = 32
"""Local shards each process keeps mapped and indexed: training draws shards again and again, and mapping a file's
pages and parsing its headers cost about as much as copying its bytes once."""
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux's flag to map a file's pages at once; elsewhere they are faulted in on first touch."""


def decoded_samples(files: Iterator[tuple[str, np.ndarray]], url: str) -> Iterator[dict]:
    """Samples of a shard's (name, bytes) files, decoded: `{__key__, __url__, act.npy: float16 [N, d] array,
    json: dict}`. A sample missing a file raises `tarfile.ReadError`: tarfile (which reads the streams) ends quietly
    at a header that was cut short, so a shard truncated there would otherwise lose the end of a sample unnoticed."""
    for sample in group_by_keys({"fname": name, "data": contents, "__url__": url} for name, contents in files):
        missing = [name for name in SAMPLE_FILES if name not in sample]
        if missing:
            raise tarfile.ReadError(f"sample {sample['__key__']} lacks {missing}")
        sample["act.npy"], sample["json"] = npy_array(sample["act.npy"]), json.loads(sample["json"].tobytes())
        yield sample


@lru_cache(maxsize=MAPPED_SHARDS)
def mapped_shard(path: str, identity: tuple[int, int, int]) -> list[dict]:
    """The decoded samples of a local shard, each `act.npy` a read-only view of the file mapped into memory (no
    copy: batches are built straight from the page cache). `identity` (inode, size, mtime) makes a shard replaced
    under the same name a new entry. The pages are mapped at once (`MAP_POPULATE`), not faulted in one by one.
    A file cut short *in place* while mapped would kill the reader (SIGBUS) instead of raising; the shard writers
    never do that (they rename complete files into place), so only an outside tool rewriting shards could."""
    with open(path, "rb") as file:
        archive = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ)
    return list(decoded_samples(tar_files(archive), path))


def shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard (a path or URL) in file order, decoded (`decoded_samples`). A local shard's maps are
    views of the mapped file (`mapped_shard`); a URL or `pipe:` command is streamed, each map read into an array."""
    if not is_url(url):
        status = os.stat(url)
        for sample in mapped_shard(str(url), (status.st_ino, status.st_size, status.st_mtime_ns)):
            yield dict(sample)  # the cached sample stays as it was, whatever a consumer does with its copy
        return
    stream = wds.gopen(url)
    try:
        yield from decoded_samples(tar_files(stream), url)
    except Exception:
        close_stream(stream)  # a failed command or download says more than the tar error it caused
        raise
    close_stream(stream)  # (a consumer that stops early leaves the stream to the garbage collector, unchecked)

"""The files of a tar archive as numpy arrays, fast for the many small files of activation shards.

A local archive is mapped into memory and each file is given as a view of its bytes there: nothing is copied until
a batch is built from it, so the bytes of a map are copied once, from the page cache into the batch (a `read`
into an array and a copy from it into the batch would be two passes). `tarfile` decodes every field of every header
in Python, which took half the time of streaming toy-sized maps (2 KiB each); `local_tar_files` parses the few
fields a shard needs from the 512-byte headers itself, and hands anything unusual back to `tarfile` (`tar_files`).
"""

from __future__ import annotations

import mmap
import struct
import tarfile
from collections.abc import Iterator
from itertools import islice
from typing import IO, NamedTuple

import numpy as np

TAR_BLOCK = 512
"""Tar headers and file data come in blocks of this many bytes."""
TAR_END_BLOCK = bytes(TAR_BLOCK)
TAR_REGULAR = (b"0", b"\0", b"7")
"""Typeflags of regular files."""
TAR_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")
"""Typeflags of links, devices, folders and FIFOs: no file to yield."""
TAR_SIGNED_BYTES = struct.Struct("148b8x356b")
"""A header's bytes but its checksum field, as signed integers (the checksum of some old tar writers)."""


class TarHeader(NamedTuple):
    """What the reader needs of one 512-byte tar header."""

    name: str
    """The file's path inside the archive (a pax or GNU long-name header before it may replace it)."""
    size: int
    """Bytes of the file's data, which follow the header padded to a whole block."""
    kind: bytes
    """The typeflag: `0` (or NUL, `7`) a regular file, `x` a pax header, `L` a GNU long name, …"""


class UnusualTar(Exception):
    """A header `local_tar_files` leaves to `tarfile` (global pax headers, sparse files, base-256 sizes, …)."""


def parse_tar_header(block: bytes) -> TarHeader | None:
    """The header in one 512-byte block; None at the end of the archive (a zero block, or the end of the file,
    where `tarfile` ends quietly too). A block cut short or with a wrong checksum raises `tarfile.ReadError`."""
    if not block or block == TAR_END_BLOCK:
        return None
    if len(block) < TAR_BLOCK:
        raise tarfile.ReadError("truncated header")
    if block[124] & 0x80:  # a base-256 size (files over 8 GiB)
        raise UnusualTar("base-256 size field")
    try:
        checksum, size = int(block[148:156].strip(b"\0 ") or b"0", 8), int(block[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("invalid header") from None
    # The checksum field counts as 8 spaces; tarfile also accepts the sum of signed bytes (old writers).
    if checksum != sum(block) - sum(block[148:156]) + 256 and checksum != sum(TAR_SIGNED_BYTES.unpack(block)) + 256:
        raise tarfile.ReadError("bad checksum")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000" and block[345] != 0:  # POSIX ustar splits long names into prefix/name
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return TarHeader(name.decode("utf-8", "surrogateescape"), size, block[156:157])


def pax_records(data: bytes) -> dict[str, str]:
    """The `key=value` records of a pax header's data (each `"{length} {key}={value}\\n"`)."""
    records, position = {}, 0
    try:
        while position < len(data):
            space = data.index(b" ", position)
            end = position + int(data[position:space])
            key, value = data[space + 1:end - 1].split(b"=", 1)
            records[key.decode()] = value.decode("utf-8", "surrogateescape")
            position = end
    except ValueError:
        raise tarfile.ReadError("invalid pax header") from None
    return records


def view_block_data(archive: mmap.mmap, size: int) -> np.ndarray:
    """A read-only view of the `size` data bytes after a header; moves past them and the padding to a whole block."""
    start = archive.tell()
    if start + size > len(archive):
        raise tarfile.ReadError("unexpected end of data")
    archive.seek(min(start + size + -size % TAR_BLOCK, len(archive)))  # the padding of the last file may be cut
    return np.frombuffer(archive, np.uint8, size, start)


def local_tar_files(archive: mmap.mmap) -> Iterator[tuple[str, np.ndarray]]:
    """`tar_files` of a mapped tar file, parsing the headers here: `tarfile` decodes every field of every header
    in Python, which took half the time of streaming toy-sized maps (2 KiB). Raises `UnusualTar` at a header kind
    it does not handle."""
    overrides: dict[str, str] = {}  # from a pax or GNU long-name header, for the next file
    archive.seek(0)
    while (header := parse_tar_header(archive.read(TAR_BLOCK))) is not None:
        if header.kind in TAR_REGULAR:
            size = int(overrides.get("size", header.size))
            yield overrides.get("path", header.name), view_block_data(archive, size)
            overrides = {}
        elif header.kind == b"x":
            overrides = pax_records(view_block_data(archive, header.size).tobytes())
            if any(key.startswith("GNU.sparse") for key in overrides):
                raise UnusualTar("pax sparse file")
        elif header.kind == b"L":
            overrides = {"path": view_block_data(archive, header.size).tobytes().split(b"\0", 1)[0]
                         .decode("utf-8", "surrogateescape")}
        elif header.kind in TAR_SKIPPED:  # links, devices, folders: no file to yield
            view_block_data(archive, header.size)
            overrides = {}
        else:
            raise UnusualTar(f"typeflag {header.kind!r}")


def tarfile_files(stream: IO[bytes] | mmap.mmap) -> Iterator[tuple[str, np.ndarray]]:
    """`tar_files` by the standard library: any tar format, read in order (streams cannot seek)."""
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            if member.isreg():
                contents = np.empty(member.size, np.uint8)  # writable, unlike a view of the bytes read
                if archive.extractfile(member).readinto(contents) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                yield member.name, contents


def tar_files(source: IO[bytes] | mmap.mmap) -> Iterator[tuple[str, np.ndarray]]:
    """(name, bytes as a uint8 array) of each regular file of a tar archive, in order.

    A mapped local file is parsed here, each file given as a view of the mapping; at a header kind that reader
    leaves alone it starts over with `tarfile`, skipping the files already given. Streams (URLs, `pipe:` commands)
    are read by `tarfile`, each file into a new array.
    """
    if not isinstance(source, mmap.mmap):
        yield from tarfile_files(source)
        return
    given = 0
    try:
        for name_and_contents in local_tar_files(source):
            yield name_and_contents
            given += 1
    except UnusualTar:
        source.seek(0)
        yield from islice(tarfile_files(source), given, None)

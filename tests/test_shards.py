"""Shard writing (ShardSink), the manifest, and resume helpers, checked by reading the tars with `tarfile` directly."""

from __future__ import annotations

import io
import json
import mmap
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOY_VOCABULARY, write_synthetic_shards

from saemnesia.shards import (
    ShardManifest,
    ShardRecord,
    ShardSink,
    prompt_id_of_key,
    sample_key,
    scan_shards,
    stored_prompt_ids,
)
from saemnesia.tar_reader import UnusualTar, local_tar_files, tar_files

N, D = 4, 8


def meta_for(prompt_id: int, step: int, obj: str = "Bears", style: str | None = "Cubism") -> dict:
    return {"object": obj, "style": style, "step": step, "timestep": 900 - step, "prompt_id": prompt_id,
            "prompt": "An image of Bears.", "seed": 188, "hookpoint": "unet.mid_block", "half": "cond"}


def read_tar(path: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Independent reader: every sample of a tar as (activations, metadata), by key."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, extension = member.name.split(".", 1)
            members.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return {key: (np.load(io.BytesIO(files["act.npy"]), allow_pickle=False), json.loads(files["json"]))
            for key, files in members.items()}


def test_sink_round_trip_keeps_prompts_whole_and_names_shards_by_prefix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    written = {}
    with ShardSink(tmp_path, "shard-r3", N, D, max_samples=5) as sink:
        for prompt_id in range(4):
            for step in range(3):
                act = rng.normal(size=(N, D)).astype(np.float32)
                written[sample_key(prompt_id, step)] = (act, meta_for(prompt_id, step))
                sink.write(sample_key(prompt_id, step), torch.from_numpy(act), meta_for(prompt_id, step))
    records = sink.close()
    # 12 samples of 3-step prompts, cap 5: a shard closes at the first new prompt after 5 samples → 6 + 6.
    names = ["shard-r3-000000.tar", "shard-r3-000001.tar"]
    assert records == [ShardRecord(name, 6, (tmp_path / name).stat().st_size) for name in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    read = {key: value for record in records for key, value in read_tar(tmp_path / record.name).items()}
    assert read.keys() == written.keys()
    for key, (act, meta) in written.items():
        assert read[key][0].dtype == np.float16
        np.testing.assert_array_equal(read[key][0], act.astype(np.float16))
        assert read[key][1] == meta
    first_shard_prompts = {prompt_id_of_key(key) for key in read_tar(tmp_path / records[0].name)}
    assert first_shard_prompts == {"0", "1"}


def test_sink_that_dies_mid_shard_leaves_only_a_temporary_file_and_resumes(tmp_path: Path) -> None:
    act = np.zeros((N, D), np.float16)
    with pytest.raises(RuntimeError, match="generation crashed"):
        with ShardSink(tmp_path, "shard-r0", N, D, max_samples=2) as sink:
            for prompt_id in range(3):
                sink.write(sample_key(prompt_id, 0), act, meta_for(prompt_id, 0))
            assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-r0-000000.tar", "shard-r0-000001.tar.tmp"]
            raise RuntimeError("generation crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-r0-000000.tar", "shard-r0-000001.tar.tmp"]
    assert stored_prompt_ids(tmp_path) == {"0", "1"}

    with ShardSink(tmp_path, "shard-r0", N, D, max_samples=2) as resumed:
        resumed.write(sample_key(2, 0), act, meta_for(2, 0))
    assert resumed.close() == [ShardRecord(name, count, (tmp_path / name).stat().st_size)
                               for name, count in (("shard-r0-000000.tar", 2), ("shard-r0-000001.tar", 1))]
    assert scan_shards(tmp_path) == resumed.close()
    assert stored_prompt_ids(tmp_path) == {"0", "1", "2"}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(("key", "act", "meta", "message"), [
    ("a.b", np.zeros((N, D)), meta_for(0, 0), "without '.' or '/'"),
    ("p_0000", np.zeros((N + 1, D)), meta_for(0, 0), r"expected floats of shape \[4, 8\]"),
    ("p_0000", np.zeros((N, D), np.int32), meta_for(0, 0), "expected floats"),
    ("p_0000", np.full((N, D), 1e6), meta_for(0, 0), "not finite in float16"),
    ("p_0000", np.zeros((N, D)), {"object": "Bears"}, r"missing keys \['style'"),
    ("p_0000", np.zeros((N, D)), {**meta_for(0, 0), "half": "both"}, "expected 'cond' or 'uncond'"),
    ("p_0000", np.zeros((N, D)), meta_for(0, 0, obj="Whales"), "Unknown object 'Whales'"),
    ("p_0000", np.zeros((N, D)), meta_for(0, 0, style="Baroque"), "Unknown style 'Baroque'"),
])
def test_sink_rejects_bad_samples(tmp_path: Path, key: str, act: np.ndarray, meta: dict, message: str) -> None:
    with ShardSink(tmp_path, "shard-r0", N, D, vocabulary=TOY_VOCABULARY) as sink:
        with pytest.raises(ValueError, match=message):
            sink.write(key, act, meta)


def test_sink_rejects_a_repeated_key(tmp_path: Path) -> None:
    with ShardSink(tmp_path, "shard-r0", N, D) as sink:
        sink.write("p_0000", np.zeros((N, D)), meta_for(0, 0))
        with pytest.raises(ValueError, match="already written"):
            sink.write("p_0000", np.zeros((N, D)), meta_for(0, 0))


def test_manifest_save_load_round_trip_and_merge(tmp_path: Path) -> None:
    samples = write_synthetic_shards(tmp_path, ranks=2)
    manifest = ShardManifest.load(tmp_path)
    assert ShardManifest.load(tmp_path / "manifest.json") == manifest
    assert manifest.concepts == TOY_VOCABULARY and (manifest.d_in, manifest.tokens_per_sample) == (8, 4)
    assert manifest.num_samples == len(samples)
    assert {r.name for r in manifest.shards} == {p.name for p in tmp_path.glob("*.tar")}
    assert {r.name: r.num_samples for r in manifest.shards} == {p.name: len(read_tar(p))
                                                                for p in tmp_path.glob("*.tar")}

    rank0 = replace(manifest, shards=manifest.shards[:1])
    rank1 = replace(manifest, shards=manifest.shards[1:])
    assert ShardManifest.merge([rank0, rank1]) == manifest
    with pytest.raises(ValueError, match=r"disagree on d_in \(8 vs 16\)"):
        ShardManifest.merge([rank0, replace(rank1, d_in=16)])
    with pytest.raises(ValueError, match="disagree on concepts"):
        ShardManifest.merge([rank0, replace(rank1, concepts=replace(TOY_VOCABULARY, styles=()))])
    with pytest.raises(ValueError, match="listed more than once"):
        ShardManifest.merge([rank0, rank0])


def test_manifest_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-folder does not exist"):
        ShardManifest.load(tmp_path / "missing-folder")
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        ShardManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        ShardManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"hookpoint": "h", "d_in": 8}))
    with pytest.raises(ValueError, match=r"manifest.json is missing keys \['tokens_per_sample'"):
        ShardManifest.load(tmp_path)


def write_tar(path: Path, tar_format: int, pax_headers: dict[str, str] | None = None) -> Path:
    """A tar in `tar_format` whose headers the fast reader must decode: a name longer than 100 characters
    (ustar prefix, GNU long name or pax path), a float mtime (a pax header), a folder, a symbolic link, an
    empty file and files whose sizes are and are not whole blocks."""
    contents = {"short.bin": b"abc", "empty.bin": b"", "block.bin": bytes(range(256)) * 2,
                "folder-" + "x" * 80 + "/long-" + "y" * 40 + ".npy": np.arange(300, dtype=np.float16).tobytes()}
    with tarfile.open(path, "w", format=tar_format, pax_headers=pax_headers or {}) as archive:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for index, (name, data) in enumerate(contents.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000 + (0.5 if tar_format == tarfile.PAX_FORMAT else 0)
            archive.addfile(info, io.BytesIO(data))
            if index == 1:
                link = tarfile.TarInfo("link.bin")
                link.type, link.linkname = tarfile.SYMTYPE, "short.bin"
                archive.addfile(link)
    return path


def files_by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    """Independent reader: (name, contents) of every regular file of a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers() if m.isreg()]


def mapped(data: bytes, folder: Path) -> mmap.mmap:
    """`data` as a local shard is read: a file mapped into memory."""
    path = folder / "archive.tar"
    path.write_bytes(data)
    with open(path, "rb") as file:
        return mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)


def files_by_tar_files(data: bytes, folder: Path, reader=tar_files) -> list[tuple[str, bytes]]:
    return [(name, contents.tobytes()) for name, contents in reader(mapped(data, folder))]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_files_parses_every_format_as_tarfile_does(tmp_path: Path, tar_format: int) -> None:
    data = write_tar(tmp_path / "files.tar", tar_format).read_bytes()
    expected = files_by_tarfile(data)
    assert len(expected) == 4
    assert files_by_tar_files(data, tmp_path, local_tar_files) == files_by_tar_files(data, tmp_path) == expected
    assert [(name, contents.tobytes()) for name, contents in tar_files(io.BytesIO(data))] == expected  # a stream


def test_tar_files_leaves_unusual_headers_to_tarfile_midway(tmp_path: Path) -> None:
    """A global pax header (typeflag `g`) after the first file: the fast reader stops there, tarfile goes on."""
    plain = write_tar(tmp_path / "plain.tar", tarfile.USTAR_FORMAT).read_bytes()
    global_header = write_tar(tmp_path / "global.tar", tarfile.PAX_FORMAT, {"comment": "g"}).read_bytes()[:1024]
    assert global_header[156:157] == b"g"  # its header block, then one block of records
    first_file_end = 512 + 1024  # the folder's header, then short.bin's header and data block
    data = plain[:first_file_end] + global_header + plain[first_file_end:]
    with pytest.raises(UnusualTar):
        files_by_tar_files(data, tmp_path, local_tar_files)
    assert files_by_tar_files(data, tmp_path) == files_by_tarfile(data) == files_by_tarfile(plain)


def test_tar_files_rejects_a_damaged_header(tmp_path: Path) -> None:
    data = bytearray(write_tar(tmp_path / "files.tar", tarfile.USTAR_FORMAT).read_bytes())
    data[512 + 3] ^= 1  # a name byte of the second header: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(tar_files(mapped(bytes(data), tmp_path)))
    with pytest.raises(tarfile.ReadError, match="truncated header"):
        list(tar_files(mapped(bytes(data[:512 + 100]), tmp_path)))
    data[512 + 3] ^= 1
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        cut = archive.getmember("block.bin").offset_data + 10
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(tar_files(mapped(bytes(data[:cut]), tmp_path)))

"""Shards streamed from HTTP (a local `http.server`) and `pipe:` commands read exactly what the local folder holds."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import write_synthetic_shards

from cli import main
from datamodules.activations import ActivationDataModule
from saemnesia.sae import SparseAutoencoder
from saemnesia.shards import ShardManifest

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.mid_block"  # the synthetic shards' hookpoint


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging each request to stderr."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """`serve(folder)` publishes `folder` on 127.0.0.1 (a free port) and returns its base URL, until the test ends."""
    servers: list[ThreadingHTTPServer] = []

    def start(folder: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two writer ranks, 16 prompts × 3 steps = 48 samples in 6 shards."""
    folder = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(folder, num_prompts=16, num_steps=3, ranks=2, samples_per_shard=7)
    return folder


def batches(data: ActivationDataModule, split: str) -> list[dict]:
    return list(data.train_dataloader() if split == "train" else data.val_dataloader())


def assert_same_batches(remote: list[dict], local: list[dict]) -> None:
    assert len(remote) == len(local) > 0
    for got, expected in zip(remote, local):
        assert got.keys() == expected.keys()
        for name, value in expected.items():  # activations bit for bit, labels, keys
            assert got[name] == value if name == "key" else torch.equal(got[name], value), name


@pytest.mark.parametrize(("token_level", "num_workers"), [(False, 0), (True, 0), (False, 2)])
def test_http_folder_streams_the_local_folders_batches(shard_folder, serve, token_level: bool,
                                                       num_workers: int) -> None:
    options = dict(batch_size=12 if token_level else 4, token_level=token_level, val_shards=2, steps_per_epoch=5,
                   shuffle_buffer=24, num_workers=num_workers)
    base = serve(shard_folder)
    local = ActivationDataModule(str(shard_folder), **options)
    remote = ActivationDataModule(base + "/", **options)  # the manifest comes from the server too
    assert (remote.d_in, remote.hookpoint, remote.vocabulary) == (local.d_in, local.hookpoint, local.vocabulary)
    assert remote.train_urls == [f"{base}/{Path(url).name}" for url in local.train_urls]
    for split in ("train", "val"):  # the seeded training stream, and the ordered validation pass
        assert_same_batches(batches(remote, split), batches(local, split))


def test_http_and_pipe_shard_lists_with_a_manifest_url(shard_folder, serve) -> None:
    base = serve(shard_folder)
    local = batches(ActivationDataModule(str(shard_folder), batch_size=4, val_shards=2), "val")
    pipes = [f"pipe:curl -s {base}/{record.name}" for record in ShardManifest.load(shard_folder).shards]
    for shards, manifest in ((f"{base}/shard-r{{0..1}}-{{000000..000002}}.tar", f"{base}/manifest.json"),
                             (pipes, f"pipe:cat {shard_folder}/manifest.json")):
        remote = ActivationDataModule(shards, manifest=manifest, batch_size=4, val_shards=2)
        assert_same_batches(batches(remote, "val"), local)


def test_fit_on_http_shards_trains_the_sae_of_the_local_shards(shard_folder, serve, tmp_path, monkeypatch) -> None:
    """`cli.py fit` on the served folder ends with the SAE it trains on the local folder (the same seeded stream),
    and another data seed ends elsewhere (the weights do depend on the stream)."""
    base, weights = serve(shard_folder), {}
    for run, shards, seed in (("local", str(shard_folder), 0), ("remote", base, 0), ("other_seed", base, 1)):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        main(["fit", "-c", str(REPO / "configs/toy/sae.yaml"), f"--data.init_args.shards={shards}",
              f"--data.init_args.seed={seed}", "--trainer.fast_dev_run=3", "--data.init_args.batch_size=32",
              "--data.init_args.shuffle_buffer=64", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"])
        weights[run] = SparseAutoencoder.load(tmp_path / run / "runs/toy/sae", HOOKPOINT).state_dict()
    for name, value in weights["local"].items():
        assert torch.equal(weights["remote"][name], value), name
    assert not torch.equal(weights["other_seed"]["W_dec"], weights["local"]["W_dec"])


def test_missing_remote_files_fail_naming_them(shard_folder, serve, tmp_path, monkeypatch) -> None:
    partial = shutil.copytree(shard_folder, tmp_path / "partial")
    (partial / "shard-r0-000000.tar").unlink()
    base = serve(partial)
    data = ActivationDataModule(base, batch_size=4, val_fraction=0.0)
    data.train_urls = [f"{base}/shard-r0-000000.tar"]
    with pytest.raises(ValueError, match=rf"Shard {base}/shard-r0-000000.tar could not be opened or downloaded "
                                         r"\('curl' exited with status 22\)"):  # curl -f: the server said 404
        list(data.train_dataloader())
    data.train_urls = [f"pipe:cat {tmp_path}/nowhere.tar"]
    with pytest.raises(ValueError, match=r"could not be opened or downloaded \('cat .*nowhere.tar' exited with "
                                         r"status 1\)"):
        list(data.train_dataloader())
    (partial / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"Shard manifest {base}/manifest.json could not be read "
                                                r"\('curl' exited with status 22\)"):
        ActivationDataModule(base)
    with pytest.raises(ValueError, match=r"data.manifest is required when data.shards .* is not a shard folder"):
        ActivationDataModule(f"{base}/shard-r0-000001.tar")
    monkeypatch.setenv("PATH", str(tmp_path))  # no curl: webdataset has no other way to read http URLs
    with pytest.raises(FileNotFoundError, match=r"could not be read \(.*No such file or directory: 'curl'\)"):
        ActivationDataModule(base)

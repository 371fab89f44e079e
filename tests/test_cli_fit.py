"""`fit` through the CLI entry point: both toy configs, 2-process CPU DDP on one or two (simulated) nodes, and exact
resumption."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_synthetic_shards
from safetensors.torch import load_file

from cli import main
from datamodules.activations import ActivationDataModule
from saemnesia.concepts import load_concept_latents
from saemnesia.sae import SparseAutoencoder
from saemnesia import training  # noqa: F401  (allows the checkpoints' hyper-parameter classes in weights_only loads)
from saemnesia.assignment import estimate_concept_latents

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "unet.mid_block"  # the synthetic shards' hookpoint
SMALL = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def toy_run(tmp_path, monkeypatch):
    """A working directory holding synthetic activations where the toy configs expect them."""
    monkeypatch.chdir(tmp_path)
    write_synthetic_shards(tmp_path / "runs/toy/activations", num_prompts=24, num_steps=2, d_in=8,
                           samples_per_shard=8, hookpoint=HOOKPOINT)
    return tmp_path


def run_cli(*args: str) -> None:
    main(["fit", *args, *SMALL])


def test_toy_configs_fit_and_export_through_the_cli(toy_run):
    run_cli("-c", str(REPO / "configs/toy/sae.yaml"), "--trainer.fast_dev_run=2")
    unsupervised = SparseAutoencoder.load(toy_run / "runs/toy/sae", HOOKPOINT)
    assert unsupervised.d_in == 8 and unsupervised.num_latents == 8 * 16  # d_in linked from the manifest

    run_cli("-c", str(REPO / "configs/toy/sae_supervised.yaml"), "--trainer.fast_dev_run=2",
            "--data.init_args.batch_size=4")
    folder = toy_run / "runs/toy/sae_supervised" / HOOKPOINT
    latents = load_concept_latents(folder / "concept_latents.json")
    assert set(latents) == {"Bears", "Cats", "Dogs", "Cubism", "Monet"} and len(set(latents.values())) == 5
    # The assignment read every training sample once (the config's 64 batches cover them), not the resampled stream.
    data = ActivationDataModule("runs/toy/activations", batch_size=4, val_fraction=0.1)
    whole_pass = data.train_pass_dataloader()
    assert latents == estimate_concept_latents(unsupervised, whole_pass, data.vocabulary, data.num_steps)
    supervised = SparseAutoencoder.load(folder)
    assert not torch.equal(supervised.W_dec, unsupervised.W_dec)  # fine-tuning started from, and moved, the SAE


def printed_model(config: str, capsys: pytest.CaptureFixture) -> tuple[str, dict]:
    """`--print_config` of a config: the whole text and the model's `init_args`."""
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(REPO / config), "--print_config"])
    printed = capsys.readouterr().out
    return printed, yaml.safe_load(printed)["model"]["init_args"]


def test_print_config_shows_the_linked_recipe(toy_run, capsys):
    printed, model = printed_model("configs/sd15_unlearncanvas/sae_supervised.yaml", capsys)
    assert model["objective"]["class_path"] == "saemnesia.objectives.SupervisedObjective" and model["lr"] == 5e-6
    assert "reload_dataloaders_every_n_epochs: 1" in printed


@pytest.mark.parametrize(("config", "own", "foreign"), [
    ("configs/toy/sae.yaml", {"auxk_alpha", "dead_feature_threshold", "encoder_backward"},
     {"concept_weight", "assignment_batches", "concept_latents", "concept_logits"}),
    ("configs/toy/sae_supervised.yaml", {"concept_weight", "assignment_batches", "concept_latents"},
     {"auxk_alpha", "dead_feature_threshold", "encoder_backward", "multi_topk_weight"}),
])
def test_each_objective_shows_only_its_own_options(toy_run, capsys, config, own, foreign):
    printed, model = printed_model(config, capsys)
    assert own <= set(model["objective"]["init_args"])
    assert not any(name in printed for name in foreign)


def test_a_class_error_surfaces_as_its_own_sentence(toy_run):
    """A check in a configured class's `__init__` reaches the user as its one sentence, not wrapped in the parser's
    list of Union subtypes (with the whole config dumped after it)."""
    with pytest.raises(ValueError) as raised:
        run_cli("-c", str(REPO / "configs/toy/sae.yaml"), "--data.init_args.batch_size=0")
    assert str(raised.value) == "data.batch_size must be a positive integer, got 0."
    with pytest.raises(ValueError, match=r"^model.lr must be positive, got -1.0.$"):
        run_cli("-c", str(REPO / "configs/toy/sae.yaml"), "--model.init_args.lr=-1")
    with pytest.raises(FileNotFoundError, match="missing/sae"):  # and keeps its type
        run_cli("-c", str(REPO / "configs/toy/sae_supervised.yaml"), "--model.init_args.init_from=missing/sae")


def start_cli(workdir: Path, data: Path, *args: str, config: str = "configs/toy/sae.yaml",
              env: dict[str, str] | None = None, log: str = "cli.log") -> subprocess.Popen:
    """Start `cli.py fit` of a toy SAE config in its own process, in `workdir` (whose runs/ it owns), on `data`,
    with `env` added to the environment; its output goes to `workdir/log` (a pipe could fill and block it)."""
    (workdir / "runs/toy").mkdir(parents=True, exist_ok=True)
    if not (workdir / "runs/toy/activations").exists():
        (workdir / "runs/toy/activations").symlink_to(data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), **(env or {})}
    with (workdir / log).open("w") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, str(REPO / "cli.py"), "fit", "-c", str(REPO / config),
                                 *SMALL, "--trainer.max_steps=6", "--data.init_args.steps_per_epoch=3",
                                 "--data.init_args.batch_size=64", "--trainer.limit_val_batches=0",
                                 "--trainer.callbacks+=cli_probes.DumpRankState", "--trainer.callbacks.dirpath=final",
                                 *args], cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT)


def wait_for_cli(process: subprocess.Popen, log: Path) -> None:
    """Wait for a `start_cli` process and check it succeeded, showing the end of its output if not."""
    try:
        process.wait(timeout=300)
    finally:
        process.kill()  # no-op once it has exited; ends it if the wait timed out
    assert process.returncode == 0, log.read_text()[-3000:]


def cli_subprocess(workdir: Path, data: Path, *args: str, config: str = "configs/toy/sae.yaml") -> None:
    """`cli.py fit` of a toy SAE config in its own process, in `workdir` (whose runs/ it owns), on `data`."""
    wait_for_cli(start_cli(workdir, data, *args, config=config), workdir / "cli.log")


def assert_ranks_identical(folder: Path) -> dict[str, torch.Tensor]:
    rank0, rank1 = (load_file(str(folder / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    return rank0


def test_two_process_ddp_fit_keeps_ranks_identical(toy_run):
    data, workdir = toy_run / "runs/toy/activations", toy_run / "ddp"
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    cli_subprocess(workdir, data, *ddp)
    rank0 = assert_ranks_identical(workdir / "final")
    # Counters move by the tokens of both ranks (6 steps × 64 tokens × 2 ranks at most).
    assert 6 * 64 < rank0["objective.tokens_since_fired"].max() <= 6 * 64 * 2
    unsupervised = SparseAutoencoder.load(workdir / "runs/toy/sae", HOOKPOINT)
    torch.testing.assert_close(unsupervised.W_dec, rank0["sae.W_dec"])  # rank 0 exported what the ranks share

    # Fine-tuning: both ranks reduce the assignment statistics, then train in step.
    cli_subprocess(workdir, data, *ddp, "--model.init_args.objective.init_args.assignment_batches=2",
                   "--data.init_args.batch_size=4", config="configs/toy/sae_supervised.yaml")
    rank0 = assert_ranks_identical(workdir / "final")
    assert not torch.equal(rank0["sae.W_dec"], unsupervised.W_dec)
    latents = load_concept_latents(workdir / "runs/toy/sae_supervised" / HOOKPOINT / "concept_latents.json")
    assert len(set(latents.values())) == 5


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it for a socket bound to port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_of_one_process_train_in_step(toy_run):
    """Two `cli.py fit` launches with node ranks 0 and 1, started as a scheduler or torchrun starts them on two
    machines (here both on 127.0.0.1): Lightning reads the rendezvous from the environment and spawns nothing."""
    data, workdir = toy_run / "runs/toy/activations", toy_run / "nodes"
    nodes = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    launches = [start_cli(workdir, data, *nodes, env={**rendezvous, "NODE_RANK": str(node)}, log=f"node{node}.log")
                for node in (0, 1)]
    for node, process in enumerate(launches):
        wait_for_cli(process, workdir / f"node{node}.log")
    rank0 = assert_ranks_identical(workdir / "final")  # node 1's process ran as global rank 1
    # Both nodes' tokens reached the shared dead-latent counters (6 steps × 64 tokens × 2 ranks at most).
    assert 6 * 64 < rank0["objective.tokens_since_fired"].max() <= 6 * 64 * 2
    unsupervised = SparseAutoencoder.load(workdir / "runs/toy/sae", HOOKPOINT)
    torch.testing.assert_close(unsupervised.W_dec, rank0["sae.W_dec"])


def test_resumed_training_equals_uninterrupted_training(toy_run):
    data = toy_run / "runs/toy/activations"
    cli_subprocess(toy_run / "straight", data)
    # Interrupted after the first epoch (3 steps), then resumed from the last checkpoint with the same command.
    cli_subprocess(toy_run / "resumed", data, "--trainer.callbacks+=cli_probes.StopAtStep",
                   "--trainer.callbacks.step=3")
    last = torch.load(toy_run / "resumed/runs/toy/sae/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and "objective.tokens_since_fired" in last["state_dict"]
    cli_subprocess(toy_run / "resumed", data, "--ckpt_path=last")
    straight = load_file(str(toy_run / "straight/final/rank0.safetensors"))
    resumed = load_file(str(toy_run / "resumed/final/rank0.safetensors"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)

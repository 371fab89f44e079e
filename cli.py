"""Command line: every step of the method is a LightningCLI run (`fit`, `predict` or `test`) of one config.

    python cli.py fit -c configs/toy/sae.yaml
    saemnesia fit -c configs/toy/sae_supervised.yaml --print_config

The model and data classes are chosen in the config (`class_path`), so one entry point serves every step;
properties of the data (activation width, hookpoint, concept vocabulary) are linked into the model.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class SaemnesiaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Read from the shard manifest once the data module exists, so no config repeats them. (Link targets
        # vanish from printed configs, so they must not share a name with an argument of another model class.)
        for source, target in (("d_in", "d_in"), ("hookpoint", "activations_hookpoint"), ("vocabulary", "vocabulary")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")
        # Streams are seeded per epoch when the loader is built, so it must be rebuilt every epoch.
        parser.set_defaults({"trainer.reload_dataloaders_every_n_epochs": 1})


def main(args: list[str] | None = None) -> SaemnesiaCLI:
    return SaemnesiaCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()

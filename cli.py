"""Command line: every step of the method is a LightningCLI run (`fit`, `predict` or `test`) of one config.

    python cli.py fit -c configs/toy/sae.yaml
    saemnesia fit -c configs/toy/sae_supervised.yaml --print_config

The model and data classes are chosen in the config (`class_path`), so one entry point serves every step;
properties of the data (activation width, hookpoint, concept vocabulary) are linked into the model.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


def raised_by_parser(error: BaseException) -> bool:
    """Whether `error` was raised inside jsonargparse (rather than by the code it called)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def class_error(error: BaseException) -> BaseException:
    """The error a configured class raised, without the layers jsonargparse wraps around it: a subclass-mode
    `model` or `data` is a Union with None, so the parser reports "Does not validate against any of the Union
    subtypes", lists our sentence among the subtypes' errors and dumps the whole config."""
    while error.__cause__ is not None and raised_by_parser(error):
        error = error.__cause__
    return error


class SaemnesiaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Read from the shard manifest once the data module exists, so no config repeats them. (Link targets
        # vanish from printed configs, so they must not share a name with an argument of another model class.)
        for source, target in (("d_in", "d_in"), ("hookpoint", "activations_hookpoint"), ("vocabulary", "vocabulary")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")
        # Streams are seeded per epoch when the loader is built, so it must be rebuilt every epoch.
        parser.set_defaults({"trainer.reload_dataloaders_every_n_epochs": 1})

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = class_error(error)
            if cause is error:
                raise
            raise cause from None  # its own traceback ends at the check that failed, with its one sentence


def main(args: list[str] | None = None) -> SaemnesiaCLI:
    return SaemnesiaCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()

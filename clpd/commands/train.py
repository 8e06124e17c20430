"""``clpd train``: the Hydra app. Hydra composes and validates the config before :func:`main` runs,
and only then is the pipeline (:mod:`clpd.commands.run_train`: torch, transformers, the models)
imported, so that a refused override costs a fraction of a second instead of seconds of imports."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from clpd.commands.job import run_command
from clpd.config.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    from clpd.commands.run_train import run_train  # the pipeline: torch, transformers, the models

    return run_command("train", run_train, cfg)

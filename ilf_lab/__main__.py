"""`python -m ilf_lab [overrides]`: one ILF experiment; `-m` a sweep; `--cfg job` prints the config."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from ilf_lab.config import register_configs, validate
from ilf_lab.errors import IlfError

register_configs()
log = logging.getLogger("ilf_lab")


@hydra.main(version_base="1.3", config_path="pkg://ilf_lab.conf", config_name="config")
def task(cfg: DictConfig) -> float | None:
    """Run one experiment; return MBPPTest pass@1 (the metric a Hydra sweeper optimises)."""
    from ilf_lab.logs import quiet_third_party
    from ilf_lab.pipeline import run_experiment

    quiet_third_party()

    try:
        validate(cfg)
        results = run_experiment(cfg)
    except IlfError as e:
        _fail(f"error: {type(e).__name__}: {e}")
    return results.get("pass@1")


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def main() -> None:
    task()


if __name__ == "__main__":
    main()

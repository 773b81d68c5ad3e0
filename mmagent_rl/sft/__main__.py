"""``python -m mmagent_rl.sft``: the Hydra entry point (same config tree as RL)."""
from __future__ import annotations


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mmagent_rl.config import register
    from mmagent_rl.sft.loop import run_sft

    register()

    @hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
    def _run(cfg) -> None:
        run_sft(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)

    _run()


if __name__ == "__main__":
    main()

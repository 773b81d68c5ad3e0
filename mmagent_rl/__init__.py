"""mmagent_rl: RL for vision-language agents that think with images."""

__version__ = "0.1.0"

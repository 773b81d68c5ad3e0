"""The agent's tools: the interface (base.py), the run's tool list loaded by import path
(registry.py, ``rollout.tools``), the call parser (parse.py) and the built-in tools,
zoom.py (the default) and rotate.py. docs/tools.md explains how to add one."""

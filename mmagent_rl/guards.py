"""Run-level watches the driver keeps between steps (their counters are checkpointed;
their settings come from the config)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# config values, taken from the resumed run's config, never from a checkpoint
SETTINGS = ("limit", "floor")


class NonfiniteGuard:
    """Counts learner steps skipped for a NaN/inf loss or gradient, in a row; the run
    stops after ``limit`` of them (0 = never)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def update(self, metrics: dict) -> int:
        if metrics.get("train/skipped_nonfinite", 0.0):
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0
        return self.in_a_row

    @property
    def should_stop(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit

    def stop_reason(self, step: int) -> str:
        return (f"stopped at step {step}: the last {self.in_a_row} steps had a NaN/inf "
                f"loss or gradient and were skipped (trainer.max_nonfinite_steps="
                f"{self.limit}); the weights are unchanged since step {step - self.in_a_row}")


class ToolCollapseWatch:
    """Tool-call collapse, which users of other frameworks report: ``tool/collapse_alarm``
    is 1 on steps whose tool-use rate is below the floor; the first such step warns."""

    def __init__(self, floor: float):
        self.floor, self.warned = floor, False

    def update(self, use_rate: float | None, step: int) -> dict:
        if not self.floor or use_rate is None:
            return {}
        low = use_rate < self.floor
        if low and not self.warned:
            self.warned = True
            log.warning("tool-call collapse? tool/use_rate=%.3f < trainer.tool_collapse_floor"
                        "=%.3f at step %d (warned once; tool/collapse_alarm marks every such "
                        "step)", use_rate, self.floor, step)
        return {"tool/collapse_alarm": float(low)}

"""How far a run has come: optimizer steps, and the training seconds and network calls spent, against
`train.steps`, `train.time_budget_s` and `train.call_budget`. Equal-compute comparisons hold methods to
the same wall clock or the same UNet calls; progressive stages split whichever runs out first."""

from __future__ import annotations

from dataclasses import dataclass

from shortft.config import TrainConfig


@dataclass
class Budget:
    steps: int
    seconds: float | None = None  # training steps only: evaluation and checkpoints are not counted
    calls: int | None = None  # network calls, with gradient and without
    spent_seconds: float = 0.0
    spent_calls: int = 0
    reached: int = 1  # the furthest progressive stage a step has been in

    @classmethod
    def of(cls, train: TrainConfig, state: dict | None = None) -> Budget:
        """The run's budget; `state` (a checkpoint's) holds what was spent before a resume."""
        state = state or {}
        return cls(train.steps, train.time_budget_s, train.call_budget,
                   float(state.get("spent_seconds", 0.0)), int(state.get("spent_calls", 0)), int(state.get("stage", 1)))

    def spend(self, seconds: float, calls: int) -> None:
        self.spent_seconds += seconds
        self.spent_calls += calls

    def stage(self, step: int, stages: int) -> int:
        """The progressive stage (1-based) of the step after `step` steps: the stages split the steps
        evenly, and the time and call budgets too, whichever is further along. Never one before a stage
        the run was in: a resume with a longer `train.steps` (or budget) stretches the stages left, it
        does not go back to one whose LoRA was frozen (and its optimizer state dropped)."""
        by_steps = step * stages // self.steps
        by_budget = max(self._fraction(self.spent_seconds, self.seconds), self._fraction(self.spent_calls, self.calls))
        self.reached = max(self.reached, min(stages, max(by_steps, int(by_budget * stages)) + 1))
        return self.reached

    def done(self, steps_done: int) -> bool:
        return (steps_done >= self.steps or self._fraction(self.spent_seconds, self.seconds) >= 1
                or self._fraction(self.spent_calls, self.calls) >= 1)

    def state(self) -> dict:
        return {"spent_seconds": self.spent_seconds, "spent_calls": self.spent_calls, "stage": self.reached}

    @staticmethod
    def _fraction(spent: float, budget: float | None) -> float:
        return spent / budget if budget else 0.0


def ends_run(train: TrainConfig, metrics: dict) -> bool:
    """Whether the step these metrics report (`step`, `train_seconds`, `calls_total`, as every step logs
    them) is the run's last: its steps, or its time or call budget, are spent."""
    spent = {"spent_seconds": metrics.get("train_seconds", 0.0), "spent_calls": metrics.get("calls_total", 0)}
    return Budget.of(train, spent).done(metrics.get("step", 0))

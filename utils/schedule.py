"""The run's optimizer steps, epoch after epoch, and where the run stands in them.

Each epoch's steps come from ``utils.batching.token_budget_batches`` (seeded by ``seed`` and the epoch), planned
when the run reaches that epoch. A :class:`Position` names the next step to run; checkpoints store it and a resumed
run continues from it.
"""
import math
from dataclasses import asdict, dataclass

from utils.batching import token_budget_batches


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``global_step`` optimizer steps done, the next one being step ``step_in_epoch`` of
    ``epoch`` (0-based)."""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    def as_dict(self):
        """The JSON form checkpoints store (``trainer_state.json``)."""
        return asdict(self)

    @classmethod
    def of(cls, state):
        """The position a checkpoint's state holds."""
        return cls(state["global_step"], state["epoch"], state["step_in_epoch"])


class StepSchedule:
    """``num_train_epochs`` epochs (a fractional last epoch runs that fraction of its steps), or ``max_steps``
    steps when > 0 (as in transformers' TrainingArguments), of the token-budget plan of ``costs``."""

    def __init__(self, costs, weights, *, max_tokens, batch_tokens_divider, h_accumulation_steps, world_size,
                 seed, num_train_epochs, max_steps, group_by_length=False):
        self._plan_epoch = lambda epoch: token_budget_batches(
            costs, max_tokens, batch_tokens_divider=batch_tokens_divider, h_accumulation_steps=h_accumulation_steps,
            world_size=world_size, seed=seed, epoch=epoch, loss_weights=weights, group_by_length=group_by_length)
        self._plans = []
        if max_steps > 0:
            self.total_steps = max_steps
        else:
            epochs = math.ceil(num_train_epochs)
            last_fraction = num_train_epochs - (epochs - 1)
            self.total_steps = (sum(len(self.plan(e)) for e in range(epochs - 1))
                                + math.ceil(len(self.plan(epochs - 1)) * last_fraction))

    def plan(self, epoch):
        """The steps of ``epoch`` (a list of ``utils.batching.Step``)."""
        while len(self._plans) <= epoch:
            self._plans.append(self._plan_epoch(len(self._plans)))
        return self._plans[epoch]

    def steps(self, position=Position()):
        """Yield ``(epoch, step_in_epoch, step, after)`` from ``position`` to the end of the run: ``step`` (a
        ``utils.batching.Step``) is step ``step_in_epoch`` of ``epoch``; ``after`` the Position once it is done."""
        global_step, epoch, index = position.global_step, position.epoch, position.step_in_epoch
        while global_step < self.total_steps:
            plan = self.plan(epoch)
            for index in range(index, len(plan)):
                if global_step >= self.total_steps:
                    return
                global_step += 1
                after = Position(global_step, epoch, index + 1) if index + 1 < len(plan) else \
                    Position(global_step, epoch + 1, 0)
                yield epoch, index, plan[index], after
            epoch, index = epoch + 1, 0

    def tokens_before(self, position):
        """Tokens (all ranks, all micro-batches) of the steps before ``position``: HF's ``num_input_tokens_seen``."""
        return sum(step.num_tokens for epoch in range(position.epoch + 1) for i, step in enumerate(self.plan(epoch))
                   if epoch < position.epoch or i < position.step_in_epoch)

    def epoch_progress(self, epoch, step_in_epoch):
        """Epochs done once that step is done, as a float (what the logs call ``epoch``)."""
        return round(epoch + (step_in_epoch + 1) / len(self.plan(epoch)), 4)

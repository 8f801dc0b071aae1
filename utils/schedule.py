"""The run's optimizer steps, epoch after epoch, and where the run stands in them.

Each epoch's steps come from ``utils.batching.token_budget_batches`` (seeded by ``seed`` and the epoch), planned
when the run reaches that epoch. A position ``{"global_step", "epoch", "step_in_epoch"}`` names the next step to
run; checkpoints store it and a resumed run continues from it.
"""
import math

from utils.batching import token_budget_batches


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

    def steps(self, position=None):
        """Yield ``(epoch, step_in_epoch, step)`` from ``position`` (default: the start) to the end of the run."""
        position = position or {"global_step": 0, "epoch": 0, "step_in_epoch": 0}
        global_step, epoch, index = position["global_step"], position["epoch"], position["step_in_epoch"]
        while global_step < self.total_steps:
            plan = self.plan(epoch)
            for index in range(index, len(plan)):
                if global_step >= self.total_steps:
                    return
                yield epoch, index, plan[index]
                global_step += 1
            epoch, index = epoch + 1, 0

    def tokens_before(self, position=None):
        """Tokens (all ranks, all micro-batches) of the steps before ``position``: HF's ``num_input_tokens_seen``."""
        if not position:
            return 0
        return sum(step.num_tokens for epoch in range(position["epoch"] + 1) for i, step in enumerate(self.plan(epoch))
                   if epoch < position["epoch"] or i < position["step_in_epoch"])

    def position_after(self, global_step, epoch, step_in_epoch):
        """The position once step ``step_in_epoch`` of ``epoch`` (the run's ``global_step``-th) is done."""
        if step_in_epoch + 1 == len(self.plan(epoch)):
            return {"global_step": global_step, "epoch": epoch + 1, "step_in_epoch": 0}
        return {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch + 1}

    def epoch_progress(self, epoch, step_in_epoch):
        """Epochs done once that step is done, as a float (what the logs call ``epoch``)."""
        return round(epoch + (step_in_epoch + 1) / len(self.plan(epoch)), 4)

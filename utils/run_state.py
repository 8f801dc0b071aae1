"""The typed state of a training run: what train.py's ``setup`` builds once and its loop, evaluation and saving read."""
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Run:
    """Everything a run's loop reads, built once by train.py's ``setup``."""
    rank: int
    world: int
    device: Any                # torch.device
    say: Any                   # print on rank 0, silent elsewhere
    tokenizer: Any
    splits: list               # [utils.token_data.Split]: train, then dev, then the test files
    objective: Any             # utils.objectives.Objective of the run's SampleLayout
    schedule: Any              # utils.schedule.StepSchedule
    engine: Any                # the DeepSpeed engine around utils.modeling.ResponseLogProbs
    scheduler: Any             # the learning-rate scheduler
    log: Any                   # utils.run_log.RunLog
    position: Any              # utils.schedule.Position to start from
    resumed: bool
    identity: dict             # utils.provenance.run_identity, stored in every checkpoint
    saved_model: Any           # what save_pretrained writes: the model, or its LoRA adapter
    peft_model: Optional[Any]  # the PeftModel with --use_peft
    trainer_clips: bool        # ZeRO stage 0: train.py clips gradients itself (utils.ds_config)
    bf16: bool
    eval_budget: int           # tokens per device per evaluation micro-batch

    is_main = property(lambda self: self.rank == 0)
    train_split = property(lambda self: self.splits[0])
    dev = property(lambda self: next((s for s in self.splits if s.role == "dev"), None))
    tests = property(lambda self: [s for s in self.splits if s.role == "test"])

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

"""Where a run reports: the console (``Progress``), ``metrics.jsonl`` (one JSON object per logged step, appended),
TensorBoard / Weights & Biases when ``--report_to`` asks, and ``loss.png`` at the end."""
import io
import json
import os
import sys

from utils.errors import UsageError
from utils.record_io import atomic_write_bytes


class RunLog:
    def __init__(self, output_dir, report_to, run_name, config, resume_step=None, enabled=True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled, self.rows, self.writers = enabled, [], []
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:  # keep what happened up to the checkpoint
                self.rows = [r for r in map(_row, f) if r and r["step"] <= resume_step]
        self._rewrite()  # a new run starts an empty file; a resumed one drops the steps it will redo
        targets = set(filter(None, report_to.split(","))) - {"none"}
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--report_to tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writers.append(("tensorboard", SummaryWriter(os.path.join(output_dir, "runs"))))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError:
                raise UsageError("--report_to wandb needs the wandb package (pip install wandb)") from None
            # the run's files in output_dir/wandb (offline with WANDB_MODE=offline: wandb sync uploads them later)
            self.writers.append(("wandb", wandb.init(name=run_name, config=config, dir=output_dir)))

    def log(self, row):
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:  # one line a logged step (a torn last line is skipped)
            f.write(json.dumps(row) + "\n")
        self._report(row)

    def add_to_last(self, values):
        """Merge values (e.g. the final evaluation) into the last logged step (the file is rewritten, once)."""
        if self.enabled and self.rows:
            self.rows[-1].update(values)
            self._rewrite()
            self._report({"step": self.rows[-1]["step"], **values})

    def _rewrite(self):
        if self.enabled:
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def _report(self, row):
        scalars = {k: v for k, v in row.items() if k not in ("step", "epoch") and isinstance(v, (int, float))}
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for k, v in scalars.items():
                    writer.add_scalar(k, v, row["step"])
            else:
                writer.log(scalars, step=row["step"])

    def close(self):
        for kind, writer in self.writers:
            writer.close() if kind == "tensorboard" else writer.finish()

    def plot_loss(self, path):
        """Training loss (and dev loss where evaluated) against the step, as a PNG."""
        if not self.enabled or not self.rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        dev = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        for points, label in ((train, "train loss"), (dev, "dev loss")):
            if points:
                ax.plot(*zip(*points), marker="o" if label == "dev loss" else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())


def _row(line):
    """A metrics.jsonl line, or None for a line a killed run left half-written."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def quiet_when_logged():
    """In a log file (stderr not a terminal), no progress bars of transformers' (loading, saving) either."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def progress_bar(total=None, desc=None, unit="it", enabled=True, initial=0):
    """The project's one progress bar: tqdm on stderr when ``enabled`` and stderr is a terminal, else a silent one
    (a log file gets no carriage-return lines)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


class Progress:
    """The console during training. In a terminal, a tqdm bar whose postfix shows the last logged loss and tokens/s;
    in a log file (train.sh tees to training.log), one plain line per logged step instead of the bar's carriage
    returns. ``note`` prints a line either way (dev evaluations, checkpoints)."""

    def __init__(self, total, initial, enabled):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.bar = progress_bar(total, "train", "step", enabled, initial)

    def step(self):
        self.bar.update(1)

    def logged(self, step, row):
        shown = {"loss": row.get("loss"), "acc": row.get("rewards/accuracies"), "margin": row.get("rewards/margins")}
        shown = {k: float(v) for k, v in shown.items() if v is not None}
        if self.tty:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, tok_s=f"{row['tokens_per_second']:.0f}")
        elif self.enabled:
            print(f"step {step}/{self.total}: {format_metrics(shown)}, learning_rate {row['learning_rate']:.3g}, "
                  f"tokens/s {row['tokens_per_second']:.0f}", flush=True)

    def note(self, text):
        if self.enabled:
            self.bar.write(text) if self.tty else print(text, flush=True)

    def close(self):
        self.bar.close()


def print_summary(before, after, test_results, output_dir):
    """The end of a run on the console: the dev metrics before and after training, each test file's, and where the
    outputs are."""
    if after:
        names = sorted(after)
        print("\ndev set          " + "  ".join(f"{n:>16}" for n in names))
        if before:
            print("  before training " + "  ".join(f"{before[n]:>16.4f}" for n in names))
        print("  after training  " + "  ".join(f"{after[n]:>16.4f}" for n in names))
    if test_results:  # the metrics, and how many records were evaluated (the other counts were warned about)
        first = next(iter(test_results.values()))
        names = [n for n in sorted(first) if isinstance(first[n], float)] + ["records_evaluated"]
        print("\ntest file        " + "  ".join(f"{n:>17}" for n in names))
        for file_name, metrics in test_results.items():
            print(f"  {file_name:<15}" + "  ".join(f"{metrics[n]:>17.4f}" if isinstance(metrics[n], float)
                                                 else f"{metrics[n]:>17}" for n in names))
    print(f"\nmodel, metrics.jsonl, loss.png{', test_results.json' if test_results else ''} in {output_dir}")


def describe_run(objective, samples, total_steps, world, args, model_args, warmup, attention):
    """The run's first lines: what is trained, on what, and its settings."""
    layout = objective.layout
    settings = ", ".join(filter(None, (objective.describe(), layout.describe())))
    return (f"{layout.kind.name}: {samples} training samples, {total_steps} optimizer steps, {world} process(es), "
            f"{args.per_device_train_batch_max_tokens} tokens per device per micro-batch, "
            f"{args.h_accumulation_steps} micro-batch(es) per device per step, attention {attention}"
            f"{', bf16 autocast' if args.bf16 else ''}\n"
            f"settings: model {model_args.model_name_or_path}, learning_rate {args.learning_rate} "
            f"({args.lr_scheduler_type}, warmup {warmup} steps), optim {args.optim}, weight_decay {args.weight_decay}, "
            f"max_grad_norm {args.max_grad_norm}, "
            f"{f'max_steps {args.max_steps}' if args.max_steps > 0 else f'num_train_epochs {args.num_train_epochs}'}, "
            f"seed {args.seed}, deepspeed {args.deepspeed}" + (f", {settings}" if settings else ""))

"""One rank of a two-process DDP (CPU, gloo) trl.GRPOTrainer run with EntropyProbeCallback, for
test_trl_callback.py::test_two_ddp_processes_log_the_one_process_numbers.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trl_ddp_worker.py BASE_FOLDER OUT

(PYTHONPATH=tests). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, from which
accelerate's PartialState (use_cpu=True) makes a MULTI_CPU gloo group, as under `accelerate launch --cpu`. One
optimizer step (STEPS = 1), probed (global_step 0). Each rank writes OUT/rank{r}.json (its world size, the
entropy_probe/* entries of its state.log_history, its probe rows and why the probe is off, if it is) and
OUT/rank{r}.pt (p.grad at on_pre_optimizer_step, i.e. DDP's all-reduced and HF's clipped gradient, by parameter
name; and the rank's generation batch, which the covariance proxy is over).

`grpo_trainer` and `probe_callback` build the same run with one process for the test's reference.
"""

import json
import sys
from pathlib import Path

import datasets
import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl_runs import G, LEARNING_RATE, MAX_COMPLETION_LENGTH, WEIGHT_DECAY, completion_length_reward

from probe_lightning.integrations.trl import EntropyProbeCallback

STEPS = 1
B_E, G_E, B_V = 3, 3, 3  # 3 prompts over 2 ranks: rank 0 takes rows 0 and 2 of each draw, rank 1 row 1
SEED = 7
# Prompts of one token length (4): a rank's prompts are left-padded to the longest of its own share, so prompts of
# differing lengths would pad differently with 1 and 2 processes, and float32 forwards of differing shapes differ
# in their last bits (δH₁ and the true change by a few 1e-6 with trl_runs.PROMPTS), which is no DDP logic.
PROMPTS = ["The cat sat on", "Two plus two is", "Once upon a time"]


def grpo_trainer(base_folder: Path, output_dir: Path, processes: int, callbacks: list) -> trl.GRPOTrainer:
    """STEPS steps of the tiny model on PROMPTS; the global generation batch (PROMPTS × G rows, one step) is the
    same for any number of processes: each holds len(PROMPTS) · G / processes rows of it."""
    torch.manual_seed(0)
    args = trl.GRPOConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, disable_tqdm=True,
        per_device_train_batch_size=len(PROMPTS) * G // processes, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=MAX_COMPLETION_LENGTH, max_steps=STEPS, logging_steps=1,
        save_strategy="no", learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, seed=0,
    )  # fmt: skip
    return trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float64),  # float64: see the test
        reward_funcs=completion_length_reward, args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(base_folder), callbacks=callbacks,
    )  # fmt: skip


def probe_callback() -> EntropyProbeCallback:
    return EntropyProbeCallback(every_n_steps=1, B_E=B_E, G_E=G_E, B_V=B_V, seed=SEED)


def probe_logs(trainer: trl.GRPOTrainer) -> list[dict]:
    """The trainer's log entries with the probe's numbers: step and entropy_probe/* only."""
    return [
        {"step": entry["step"]} | {key: value for key, value in entry.items() if key.startswith("entropy_probe/")}
        for entry in trainer.state.log_history
        if "entropy_probe/delta_h1" in entry
    ]


class GradientRecorder(TrainerCallback):
    """p.grad of each trainable parameter at on_pre_optimizer_step of the first step: what AdamW receives."""

    def __init__(self):
        self.gradient: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.gradient = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    base_folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    probe, recorder = probe_callback(), GradientRecorder()
    trainer = grpo_trainer(base_folder, out / "output", 2, [probe, recorder])
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"gradient": recorder.gradient, "trainer_batch": probe._trainer_batch}, out / f"rank{rank}.pt")
    logged = {"world_size": trainer.accelerator.num_processes, "logged": probe_logs(trainer), "rows": probe.rows,
              "disabled": probe.disabled}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(logged))

"""On-policy distillation with erpd's reduced KL loss (CPU, a few seconds).

A student samples completions, a frozen teacher (another tiny model) scores them, and the
student minimizes the mean reverse KL(student ‖ teacher) over the completion tokens, with
gradient accumulation over micro-batches (GKD's on-policy setting with beta = 1). Note:

* ``erpd.nn.LinearKL(reduction="mean")`` takes both models' final hidden states and LM heads:
  neither [B, T, V] logits tensor exists, and because the loss is reduced, its gradients are
  computed during the forward, so ``backward()`` is a scale.
* ``num_items`` carries the token count of the whole step, so the micro-batch gradients add up
  to the one-batch gradient; padding after the EOS is ``ignore_index``.

    python examples/distill_loop.py             (ERPD_EXAMPLE_STEPS=n for the step count)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import completion_hidden, sample_batch, tiny_model  # noqa: E402

import erpd  # noqa: E402


def main() -> None:
    steps = int(os.environ.get("ERPD_EXAMPLE_STEPS", "4"))
    student, teacher = tiny_model(seed=1), tiny_model(seed=2).requires_grad_(False)
    loss_fn = erpd.nn.LinearKL(direction="reverse", reduction="mean")
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for step in range(steps):
        prompts, completions, mask, _, _ = sample_batch(student, n_prompts=4, group=2, seed=step)
        targets = completions.masked_fill(~mask, -100)  # tokens after the EOS do not count
        num_items = int(mask.sum())  # tokens in the whole step, shared by its micro-batches
        opt.zero_grad()
        total = 0.0
        for rows in torch.arange(completions.shape[0]).split(4):
            with torch.no_grad():
                t_hidden = completion_hidden(teacher, prompts[rows], completions[rows])
            hidden = completion_hidden(student, prompts[rows], completions[rows])
            loss = loss_fn(hidden, student.lm_head.weight, targets[rows], teacher_hidden=t_hidden,
                           teacher_weight=teacher.lm_head.weight, num_items=num_items)
            loss.backward()
            total += loss.item()
        opt.step()
        print(f"step {step}: loss (mean reverse KL) {total:.4f} over {num_items} tokens")


if __name__ == "__main__":
    main()

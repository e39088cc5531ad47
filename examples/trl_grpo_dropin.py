"""erpd as a drop-in for Liger's fused GRPO loss, called the way TRL's GRPOTrainer calls it.

With ``use_liger_kernel=True`` TRL's GRPOTrainer up to 1.13 builds a ``LigerFusedLinearGRPOLoss``
(TRL 1.13: its own ``trl.losses.FusedLinearGRPOLoss``, same call) from its config and, in
``compute_loss``, runs the backbone only and calls it with the completion hidden states, the LM
head, the completion ids and mask, the advantages and the old / reference log-probs. The erpd
module has the same constructor and call, so swapping it in is one line (the attribute is
``liger_loss`` in TRL 1.8-1.13, ``liger_grpo_loss`` up to 1.7)::

    from erpd.adapters.trl import FusedLinearGRPOLoss
    trainer.liger_loss = FusedLinearGRPOLoss(beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high, loss_type=args.loss_type, temperature=args.temperature,
        use_bias_correction_kl=args.use_bias_correction_kl, ...)

TRL 1.15 and later compute per-token log-probs with a fused LM head instead: there, call
``erpd.adapters.trl.use_erpd()`` before building the trainer (README, *Drop-ins*).

This script does the same steps by hand on a tiny random Llama (CPU, a few seconds): sample a
group of completions per prompt, score them, then take a few GRPO steps on the batch (so the
ratio moves away from 1 and the clip engages), printing the loss and the metrics; where
liger-kernel is installed it also runs Liger's module on the second step and prints the gap.

    python examples/trl_grpo_dropin.py          (ERPD_EXAMPLE_STEPS=n for the step count)
"""

import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import completion_hidden, sample_batch, tiny_model  # noqa: E402

import erpd  # noqa: E402
from erpd.adapters.trl import FusedLinearGRPOLoss  # noqa: E402


def main() -> None:
    steps = int(os.environ.get("ERPD_EXAMPLE_STEPS", "5"))
    model = tiny_model()
    prompts, completions, mask, adv, rewards = sample_batch(model)
    head = model.lm_head
    print(f"batch: {completions.shape[0]} completions x {completions.shape[1]} tokens, mean reward {rewards.mean():.2f}")

    # What TRL computes before its update epochs: the old policy's log-probs (here via erpd, no logits).
    with torch.no_grad():
        old, _ = erpd.linear_logprobs(completion_hidden(model, prompts, completions), head.weight, completions)

    config = dict(beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, temperature=1.0)
    loss_fn = FusedLinearGRPOLoss(**config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        hidden = completion_hidden(model, prompts, completions)
        loss, metrics = loss_fn(hidden, head.weight, completions, mask.long(), adv, bias=head.bias,
                                old_per_token_logps=old)
        # Step 1: the batch has moved off-policy (at step 0 the ratio is 1 and the loss is ~0).
        if step == min(1, steps - 1) and importlib.util.find_spec("liger_kernel") is not None:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            liger_loss, _ = LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=False, **config)(
                hidden, head.weight, completions, mask.long(), adv, bias=head.bias, old_per_token_logps=old)
            print(f"liger loss {liger_loss.item():+.6f}  erpd loss {loss.item():+.6f}  "
                  f"|diff| {abs(liger_loss.item() - loss.item()):.1e}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():+.4f}  clip_ratio {metrics[-1].item():.3f}")


if __name__ == "__main__":
    main()

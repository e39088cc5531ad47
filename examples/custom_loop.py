"""A hand-written policy-optimization loop on erpd's fused policy loss (CPU, a few seconds).

The shape of ERPD's stage 1: one fixed batch of sampled completions, several off-policy epochs
on it against the frozen sampling policy (old = π0), a loose trust region (here SAPO's soft
gate), gradient accumulation over micro-batches. Two things to note:

* ``erpd.linear_policy_loss`` takes the backbone's hidden states and the LM head: no [B, T, V]
  logits, and the gradients are computed in the forward, so ``backward()`` is a scale.
* ``num_items`` carries the token count of the whole step, so the micro-batch gradients add up
  to the one-batch gradient (token-mean normalised per micro-batch would not).

    python examples/custom_loop.py              (ERPD_EXAMPLE_STEPS=n for the epoch count)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import completion_hidden, sample_batch, tiny_model  # noqa: E402

import erpd  # noqa: E402


def main() -> None:
    epochs = int(os.environ.get("ERPD_EXAMPLE_STEPS", "4"))
    model = tiny_model(seed=1)
    prompts, completions, mask, adv, rewards = sample_batch(model, n_prompts=4, group=4, seed=1)
    head = model.lm_head
    with torch.no_grad():
        old, _ = erpd.linear_logprobs(completion_hidden(model, prompts, completions), head.weight, completions)
        ref = old.clone()  # the KL anchor: π0 itself

    loss_fn = erpd.nn.LinearPolicyLoss(method="sapo", agg="token-mean", kl_coef=0.01, entropy_coef=0.001)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    num_items = int(mask.sum())  # tokens in the whole step, shared by its micro-batches
    micro = torch.arange(completions.shape[0]).split(4)
    for epoch in range(epochs):
        opt.zero_grad()
        total = 0.0
        for rows in micro:
            hidden = completion_hidden(model, prompts[rows], completions[rows])
            loss, metrics = loss_fn(hidden, head.weight, completions[rows], old[rows], adv[rows], mask[rows],
                                    ref_logprobs=ref[rows], num_items=num_items)
            loss.backward()
            total += loss.item()
        opt.step()
        m = {k: round(v.item(), 4) for k, v in metrics.items()}  # metrics of the last micro-batch
        print(f"epoch {epoch}: loss {total:+.4f}  ratio [{m['ratio_min']}, {m['ratio_max']}]  "
              f"approx_kl {m['approx_kl']}  kl_ref {m['kl_ref']}  entropy {m['entropy']}")


if __name__ == "__main__":
    main()

"""Peer measurement for benchmarks/dpo_step.py: one DPO train step in Hugging Face
transformers + TRL (PyTorch, CPU, float32).

argv: one JSON object {model_dir, batch (an .npz of alignjax's [B, 2, L] preference batch),
lr, weight_decay, beta}. After setting up it prints a JSON line ({"ready": true}), then reads
commands from stdin, one per line: "step" runs one train step and prints {"seconds", "loss"};
"done" prints the first step's mean summed log-probs and versions, and exits. (The caller
alternates its own steps with the peer's.)

Policy and reference are loaded from the same exported checkpoint (reference: eval mode,
no grad). Both are patched with TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`,
exactly as `DPOTrainer.__init__` does), and the loss is TRL's own
`trl.trainer.dpo_trainer.DPOTrainer._compute_loss`, called unbound with a stand-in `self`
holding the attributes it reads for `loss_type="sigmoid"` (as
third_party/trl_fixtures/generate.py does): policy forward and `torch.no_grad()` reference
forward on input_ids [2B, L] = [chosen; rejected] with attention_mask and completion_mask,
per-token log-probs of the completion tokens (TRL's chunked log-prob kernel; on CPU every
position is scored and masked), summed per sequence, loss = mean(-logsigmoid(beta *
((pc - qc) - (pr - qr)))), plus TRL's logged metrics (entropy, mean logits, token accuracy,
rewards; several `.item()` syncs). Then `loss.backward()`, `torch.optim.AdamW.step()`,
`zero_grad(set_to_none=True)`; no gradient clipping (the alignjax side has none either).
Before the steps, one untimed no-grad call checks that TRL can be called this way.

Fallback (if TRL is missing or the call fails): plain `model(input_ids, attention_mask).logits`,
log_softmax + gather of the completion tokens, summed, and the sigmoid DPO formula in torch.
"""

import json
import sys
import time
import types
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
import transformers


class Accelerator:
  """The accelerate.Accelerator surface `_compute_loss` touches, for one CPU process."""
  device = torch.device("cpu")

  @staticmethod
  def gather(t):
    return t

  @staticmethod
  def gather_for_metrics(t):
    return t

  @staticmethod
  def unwrap_model(m):
    return m


def load(model_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(
      model_dir, dtype=torch.float32, attn_implementation="sdpa")


def trl_loss_fn(policy, ref, beta):
  """TRL's DPOTrainer._compute_loss on the real models; returns (fn, metrics dict)."""
  from trl.trainer.dpo_trainer import DPOTrainer  # noqa: PLC0415
  from trl.trainer.utils import add_fused_lm_head  # noqa: PLC0415
  # As DPOTrainer.__init__: the policy's head also computes the metric fields.
  add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
  add_fused_lm_head(ref)
  metrics = defaultdict(lambda: defaultdict(list))
  trainer = types.SimpleNamespace(
      model=policy, ref_model=ref, accelerator=Accelerator(), aux_loss_enabled=False,
      precompute_ref_logps=False, beta=beta, loss_types=["sigmoid"], loss_weights=[1.0],
      ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
      label_smoothing=0.0, use_weighting=False,
      args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
      _metrics=metrics, _total_train_tokens=0, _tp_size=1)

  def fn(inputs):
    return DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)

  def first_logps():
    m = metrics["train"]
    return m["logps/chosen"][0], m["logps/rejected"][0]

  return fn, first_logps, metrics.clear


def formula_loss_fn(policy, ref, beta):
  """Fallback: full logits, log_softmax, summed completion log-probs, sigmoid DPO."""
  seen = []

  def logps(model, inputs):
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   use_cache=False).logits[:, :-1]
    targets = inputs["input_ids"][:, 1:]
    mask = inputs["completion_mask"][:, 1:].to(logits.dtype)
    lp = torch.gather(logits.log_softmax(-1), 2, targets[..., None])[..., 0]
    return (lp * mask).sum(-1)

  def fn(inputs):
    p = logps(policy, inputs)
    with torch.no_grad():
      q = logps(ref, inputs)
    pc, pr = p.chunk(2)
    qc, qr = q.chunk(2)
    seen.append((pc.mean().item(), pr.mean().item()))
    return -F.logsigmoid(beta * ((pc - qc) - (pr - qr))).mean()

  return fn, lambda: seen[0], seen.clear


def main():
  spec = json.loads(sys.argv[1])
  data = np.load(spec["batch"])
  cat = lambda x: torch.from_numpy(np.concatenate([x[:, 0], x[:, 1]], 0).astype(np.int64))
  inputs = {"input_ids": cat(data["tokens"]), "attention_mask": cat(data["segment_ids"]),
            "completion_mask": cat(data["response_mask"])}  # [chosen; rejected], as TRL's collator
  torch.manual_seed(0)
  policy = load(spec["model_dir"]).train()
  ref = load(spec["model_dir"]).eval().requires_grad_(False)
  try:
    import trl  # noqa: PLC0415
    trl_version = trl.__version__
    loss_fn, first_logps, reset = trl_loss_fn(policy, ref, spec["beta"])
    impl = ("TRL's own DPOTrainer._compute_loss (loss_type sigmoid; TRL fused LM head log-probs; "
            "unbound, stand-in self)")
    with torch.no_grad():  # probe: is TRL callable this way? (forward only, untimed)
      loss_fn(inputs)
    reset()
  except Exception as e:  # noqa: BLE001
    trl_version = locals().get("trl_version", "n/a")
    policy, ref = load(spec["model_dir"]).train(), load(spec["model_dir"]).eval()
    ref.requires_grad_(False)
    loss_fn, first_logps, _ = formula_loss_fn(policy, ref, spec["beta"])
    impl = (f"fallback: transformers logits + log_softmax and the sigmoid DPO formula in torch "
            f"(TRL call failed: {type(e).__name__}: {e})")
  opt = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=spec["weight_decay"])

  def step():
    loss = loss_fn(inputs)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

  reply({"ready": True})
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "step":
      t = time.perf_counter()
      loss = step()
      reply({"seconds": time.perf_counter() - t, "loss": loss})
    elif cmd == "done":
      pc, pr = first_logps()
      reply({"logp_chosen": pc, "logp_rejected": pr, "loss_impl": impl,
             "torch": torch.__version__, "transformers": transformers.__version__,
             "trl": trl_version, "threads": torch.get_num_threads()})
      return
    else:
      raise ValueError(f"unknown command {cmd!r}")


if __name__ == "__main__":
  main()

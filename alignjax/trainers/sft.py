"""Supervised fine-tuning (task `sft`): next-token NLL on completion tokens, or the
probability-weighted DFT / anchored ASFT objectives (`sft.loss`, losses/token.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from alignjax.data import sft as sft_data
from alignjax.data import synthetic
from alignjax.losses import token as token_losses
from alignjax.losses.logprobs import shift_targets, token_kl, token_logprobs
from alignjax.losses.sft import sft_cross_entropy
from alignjax.sampling import Sampler, SamplingConfig
from alignjax.trainers import common, loop


SFT_LOSSES = ("nll", "dft", "asft")


def make_loss_fn(chunk_size: int, loss: str = "nll", asft_lam: float = 0.1):
  """loss_fn(model, batch[, frozen]) for the loop: sums over completion tokens of the NLL
  (`loss="nll"`), DFT's -sg(p) log p, or ASFT's DFT + lam KL(pi_ref || pi) (the reference's
  state is the loop's `frozen`); metrics: entropy, nll (and kl) sums, num_tokens.
  *On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
  Rectification* (`dft`); *Anchored Supervised Fine-Tuning* (`asft`)."""
  if loss not in SFT_LOSSES:
    raise ValueError(f"config.sft.loss={loss!r}; expected one of {SFT_LOSSES}.")

  def loss_fn(model, batch, frozen=None):
    h = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
    targets, mask = shift_targets(batch["tokens"], batch["loss_mask"])
    w = model.unembedding()
    logp, entropy = token_logprobs(h, w, targets, chunk_size=chunk_size, with_entropy=True)
    nll_sum, denom, _ = sft_cross_entropy(logp, mask)
    metrics = {"num_tokens": denom, "entropy": jnp.sum(entropy * mask)}
    if loss == "nll":
      return nll_sum, denom, metrics
    metrics["nll"] = jax.lax.stop_gradient(nll_sum)
    if loss == "dft":
      loss_sum, denom, extra = token_losses.dft(logp, mask)
    else:
      ref = nnx.merge(nnx.graphdef(model), frozen)
      h_ref = jax.lax.stop_gradient(
          ref.hidden(batch["tokens"], batch["positions"], batch["segment_ids"]))
      kl = token_kl(h, w, h_ref, jax.lax.stop_gradient(ref.unembedding()),
                    chunk_size=chunk_size)
      loss_sum, denom, extra = token_losses.asft(logp, kl, mask, lam=asft_lam)
      metrics["kl"] = jax.lax.stop_gradient(jnp.sum(kl * mask))
    metrics.update({k: v for k, v in extra.items() if k not in metrics})
    return loss_sum, denom, metrics

  return loss_fn


def arithmetic_accuracy(model, tokenizer, examples, max_new_tokens: int = 0,
                        sampler: Sampler | None = None) -> float:
  """Exact-match accuracy of greedy answers (KV-cache sampler, stopping at eos) on (prompt,
  answer) pairs. `max_new_tokens` 0: the longest answer's length + 1 (for the end token).
  Pass a `sampler` to reuse its compiled programs across evaluations (it is synced to
  `model`)."""
  if max_new_tokens <= 0:
    max_new_tokens = max(len(tokenizer.encode(a)) for _, a in examples) + 1
  prompts = [tokenizer.encode(p, add_bos=tokenizer.add_bos_token) for p, _ in examples]
  sampler = sampler.sync(model) if sampler is not None else Sampler(model, pad_id=tokenizer.pad_id)
  stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
  out = sampler.generate(prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                                 stop_ids=stop))
  answers = [tokenizer.decode([t for t in row if t not in stop]) for row in out.completions()]
  return sum(a.strip() == ans for a, (_, ans) in zip(answers, examples)) / len(examples)


def build_task(config, tokenizer=None) -> loop.Task:
  tokenizer = tokenizer or common.build_tokenizer(config)
  cfg = common.model_config(config, tokenizer.vocab_size)
  dc, seq_len, batch = config.data, config.data.seq_len, config.data.batch_size
  sft_cfg = config.sft
  logging.info("model: %s (%.2fM parameters)", cfg, cfg.num_params() / 1e6)

  def iterator(split, seed):
    return sft_data.make_sft_iterator(dc, tokenizer, seq_len=seq_len, global_batch_size=batch,
                                      seed=seed, split=split,
                                      num_epochs=1 if split == "eval" else None)

  has_eval = bool(dc.eval_files or dc.synthetic)
  evaluate = None
  if dc.synthetic == "arithmetic" and config.sft.eval_examples > 0:
    opts = dc.arithmetic
    examples = synthetic.arithmetic_eval_examples(
        config.sft.eval_examples, config.seed, max_digits=opts.max_digits, ops=opts.ops)

    samplers = []  # one Sampler, created on first use, keeps its compiled programs

    def evaluate(model, step):
      if not samplers:
        samplers.append(Sampler(model, pad_id=tokenizer.pad_id))
      return {"eval_accuracy": arithmetic_accuracy(model, tokenizer, examples,
                                                   config.sft.max_new_tokens, samplers[0])}

  return loop.Task(
      build_model=lambda mesh, rules: common.build_model(config, cfg, mesh, rules),
      loss_fn=make_loss_fn(config.train.logprob_chunk_size, sft_cfg.get("loss", "nll"),
                           float(sft_cfg.get("asft_lam", 0.1))),
      train_iter=lambda: iterator("train", config.seed),
      eval_iter=(lambda: iterator("eval", config.seed)) if has_eval else None,
      evaluate=evaluate,
      flops_per_token=cfg.flops_per_token(seq_len),
      tokens_per_batch=batch * seq_len,
      build_frozen=(lambda model, mesh, rules: common.reference_state(
          config, model, mesh, rules, sft_cfg.get("reference_checkpoint", "")))
      if sft_cfg.get("loss", "nll") == "asft" else None,
  )


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "sft"`."""
  summary = loop.train(config, workdir, build_task(config))
  if "eval_accuracy" in summary and jax.process_index() == 0:
    before = summary.get("initial_eval_accuracy")
    print(f"held-out accuracy: before {before:.1%}, after {summary['eval_accuracy']:.1%} "
          f"({config.sft.eval_examples} problems never seen in training)" if before is not None
          else f"held-out accuracy: {summary['eval_accuracy']:.1%}", flush=True)
  return summary

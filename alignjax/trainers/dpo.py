"""Offline preference optimisation (task `dpo`): the DPO family on preference records.

The policy is trained on chosen/rejected (or listwise) completions against a frozen
reference, through the shared loop. See docs/dpo.md.

- `config.dpo.loss`: one registered loss name or several (with `dpo.weights`); kinds
  `dpo` (pairs), `unpaired` (KTO: chosen rows desirable, rejected rows undesirable) and
  `policy_list` (ADPO, RankDPO on listwise records). Each kernel's positional parameter names
  say which inputs it needs (`alignjax.losses.dpo.INPUTS`); the task computes exactly those.
- Log-probs come from the final hidden states and the unembedding in chunks
  (`losses.logprobs.token_logprobs`), never as [B, L, V] float32 logits.
- The reference (`dpo.reference`): "live" (a frozen copy of the initial policy, or
  `dpo.reference_checkpoint` / `dpo.reference_hf_path`, run every step; kept in
  `TrainState.frozen` and checkpointed), "precomputed" (summed reference log-probs stored in
  the records by the `ref_logps` task: `ref_chosen_logps`, `ref_rejected_logps`, or
  `ref_logps` [K] for lists) or "none". Losses that use no reference (SimPO, ORPO, ...) never
  run one. `dpo.ref_update_steps = N > 0` resets the live reference every N steps to
  `alpha * policy + (1 - alpha) * reference` (`dpo.ref_update_alpha`; 1 = hard reset: the
  dynamic anchor of *Learn Your Reference Model for Real Good Alignment*, TR-DPO).
- Metrics (train and `eval_*`): implicit rewards `reward_chosen`, `reward_rejected` =
  beta (logpi - logpi_ref) (reference-free: beta logpi / n), `margin`, `accuracy` (implicit
  reward accuracy; ties count 1/2; lists: `list_accuracy`, top-1), `logp_chosen`, `logp_rejected` (summed), `ranking_acc`
  and `ranking_acc_norm` (1[logpi(y_w) > logpi(y_l)], summed and per token), and with a true
  preference probability (`dpo.true_pref_prob` or the records' `pref_prob` field via
  data.extra_fields) `idealized_ranking_acc` and `alignment_gap` = IRA - RA
  (*Preference Learning Algorithms Do Not Learn Preference Rankings*; METHODS 6.10).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from alignjax.data import preference as pref_data
from alignjax.losses import dpo as dpo_losses
from alignjax.losses import kto as kto_lib
from alignjax.losses import ranked as ranked_lib
from alignjax.losses import registry
from alignjax.losses.common import wsum
from alignjax.losses.logprobs import shift_targets, token_logprobs
from alignjax.trainers import common, loop

KINDS = ("dpo", "unpaired", "policy_list")
REFERENCES = ("live", "precomputed", "none")
# Record fields of precomputed reference log-probs (written by the ref_logps task).
REF_FIELDS = {"pairwise": ("ref_chosen_logps", "ref_rejected_logps"), "listwise": ("ref_logps",)}
# Kernel input -> record field read through data.extra_fields.
FIELD_INPUTS = {"score_c": "score_chosen", "score_r": "score_rejected",
                "consistency": "consistency"}
# Kernel input -> record field holding an extra response row (data.extra_responses).
RESPONSE_INPUTS = {"y0_ratio": "reference_sample"}


def _loss_names(kinds=KINDS) -> list[str]:
  return [n for n in registry.names() if registry.get(n).kind in kinds]


def _params_section() -> ml_collections.ConfigDict:
  """`dpo.params.<loss>`: every DPO-family loss's keyword defaults."""
  return ml_collections.ConfigDict({name: registry.defaults(name) for name in _loss_names()})


def dpo_config(loss="dpo_sigmoid") -> ml_collections.ConfigDict:
  """`config.dpo`: the loss (or losses), beta, the reference and evaluation settings."""
  return ml_collections.ConfigDict(dict(
      loss=loss,                 # a registered name, or a tuple of names (summed)
      weights=(),                # one weight per loss (empty: all 1)
      beta=-1.0,                 # >= 0: beta of every loss (else dpo.params.<loss>.beta)
      params=_params_section(),  # dpo.params.<loss>.<key>: each loss's hyper-parameters
      reference="live",          # live | precomputed | none (reference-free losses: none)
      reference_checkpoint="",   # live reference from an alignjax run (default: initial policy)
      reference_hf_path="",      # ... or from a local HF checkpoint
      ref_update_steps=0,        # > 0: reset the reference to the policy every N steps
      ref_update_alpha=1.0,      # reset: ref <- alpha * policy + (1 - alpha) * ref
      adpo_target="onehot",      # adpo's target q from scores: onehot | softmax | smooth
      adpo_tau_q=1.0,            # softmax target temperature
      adpo_eps=0.1,              # smooth target: (1 - eps) on the best
      treg_better="revise the response to make it better",  # t_reg contrastive prompts
      treg_worse="revise the response to make it worse",    # (data.contrast_template)
      true_pref_prob=-1.0,       # alpha for idealized ranking accuracy (< 0: off, unless
                                 # records carry `pref_prob` in data.extra_fields)
  ))


def selected(config) -> list[tuple[str, float]]:
  """[(loss name, weight)] of `config.dpo`, checked."""
  dc = config.dpo
  names = (dc.loss,) if isinstance(dc.loss, str) else tuple(dc.loss)
  if not names:
    raise ValueError("config.dpo.loss is empty; name a loss, e.g. 'dpo_sigmoid'.")
  for n in names:
    if n not in registry.names() or registry.get(n).kind not in KINDS:
      raise ValueError(f"config.dpo.loss names {n!r}, which is not a DPO-family loss; "
                       f"choose from {', '.join(_loss_names())}.")
  weights = tuple(dc.weights) or (1.0,) * len(names)
  if len(weights) != len(names):
    raise ValueError(f"config.dpo.weights has {len(weights)} entries for {len(names)} losses "
                     f"{names}; give one per loss or leave it empty.")
  return list(zip(names, (float(w) for w in weights)))


def _inputs(name: str) -> tuple[str, ...]:
  return dpo_losses.required_inputs(registry.get(name).fn)


def needs_reference(config) -> bool:
  """Whether any selected loss reads reference log-probs."""
  def uses(name):
    entry = registry.get(name)
    if entry.kind == "dpo":
      return dpo_losses.uses_reference(entry.fn)
    return True  # kto's u and the listwise l_ref are policy - reference log-ratios
  return any(uses(n) for n, _ in selected(config))


def reference_mode(config) -> str:
  mode = config.dpo.reference
  if mode not in REFERENCES:
    raise ValueError(f"config.dpo.reference={mode!r}; expected one of {REFERENCES}.")
  if not needs_reference(config):
    return "none"
  if mode == "none":
    raise ValueError(f"config.dpo.reference='none', but loss {config.dpo.loss!r} needs "
                     "reference log-probs; set it to 'live' or 'precomputed'.")
  return mode


def data_kind(config) -> str:
  kinds = {registry.get(n).kind for n, _ in selected(config)}
  if "policy_list" in kinds and kinds != {"policy_list"}:
    raise ValueError(f"config.dpo.loss mixes listwise losses with pairwise ones ({kinds}); "
                     "they read different records.")
  return "listwise" if kinds == {"policy_list"} else "pairwise"


def prepare_data_config(config) -> None:
  """Adds the record fields the selected losses read to data.extra_fields/extra_responses."""
  dc, kind = config.data, data_kind(config)
  fields, responses = list(dc.extra_fields), list(dc.extra_responses)
  wanted = set()
  for name, _ in selected(config):
    wanted.update(_inputs(name) if registry.get(name).kind == "dpo" else ())
  for inp in sorted(wanted):
    if inp in FIELD_INPUTS and FIELD_INPUTS[inp] not in fields:
      fields.append(FIELD_INPUTS[inp])
    if inp in RESPONSE_INPUTS and RESPONSE_INPUTS[inp] not in responses:
      responses.append(RESPONSE_INPUTS[inp])
  if reference_mode(config) == "precomputed":
    fields += [f for f in REF_FIELDS[kind] if f not in fields]
  contrasts = tuple(dc.contrast_instructions)
  if {"rt_c", "rt_r"} & wanted and not contrasts:
    contrasts = (config.dpo.treg_better, config.dpo.treg_worse)
  if contrasts and len(contrasts) != 2:
    raise ValueError(f"data.contrast_instructions={contrasts!r}: t_reg needs exactly two, the "
                     "'better' and the 'worse' instruction.")
  with dc.unlocked():
    dc.extra_fields, dc.extra_responses = tuple(fields), tuple(responses)
    dc.contrast_instructions = contrasts


def check_config(config) -> None:
  ref = reference_mode(config)
  kind = data_kind(config)
  for name, _ in selected(config):
    inputs = set(_inputs(name)) if registry.get(name).kind == "dpo" else set()
    if ref == "precomputed" and inputs & {"tq_c", "tq_r", "y0_ratio"}:
      raise ValueError(f"loss {name!r} needs per-token or sampled reference log-probs "
                       f"({sorted(inputs & {'tq_c', 'tq_r', 'y0_ratio'})}); precomputed "
                       "records hold only sums: set config.dpo.reference='live'.")
    if {"rt_c", "rt_r"} & inputs and ref != "live":
      raise ValueError(f"loss {name!r} computes token rewards with the live reference; set "
                       "config.dpo.reference='live'.")
  if ref == "precomputed" and any(registry.get(n).kind == "unpaired" for n, _ in selected(config)):
    raise ValueError("kto's z0 needs reference log-probs of mismatched pairs, which "
                     "precomputed records do not hold; set config.dpo.reference='live'.")
  if config.dpo.ref_update_steps and ref != "live":
    raise ValueError("config.dpo.ref_update_steps > 0 resets a live reference; set "
                     "config.dpo.reference='live' (or ref_update_steps=0).")
  if not 0.0 < config.dpo.ref_update_alpha <= 1.0:
    raise ValueError("config.dpo.ref_update_alpha must be in (0, 1].")
  if kind == "listwise" and "unpaired" in {registry.get(n).kind for n, _ in selected(config)}:
    raise ValueError("kto reads pairwise records.")


# ---------------------------------------------------------------------------- log-probs


def sequence_logps(model, batch, chunk_size: int, vocab_chunk_size=None):
  """Per-token log-probs [N, L] of each row's response tokens, their mask [N, L], and the
  summed log-probs [N], for rows `tokens` [..., L] flattened to N rows."""
  flat = lambda x: x.reshape(-1, x.shape[-1])
  tokens = flat(batch["tokens"])
  h = model.hidden(tokens, flat(batch["positions"]), flat(batch["segment_ids"]))
  targets, mask = shift_targets(tokens, flat(batch["response_mask"]))
  kw = {} if vocab_chunk_size is None else {"vocab_chunk_size": vocab_chunk_size}
  tlp = token_logprobs(h, model.unembedding(), targets, chunk_size=chunk_size, **kw)
  tlp = jnp.where(mask > 0, tlp, 0.0)
  return tlp, mask, jnp.sum(tlp, axis=-1)


def mismatched_rows(batch: dict) -> dict:
  """Host-side (numpy) KTO KL rows: row i = prompt of example i + chosen response of example
  i - 1 (cyclic within this host's batch), as `kl_tokens`, `kl_positions`,
  `kl_segment_ids`, `kl_response_mask` [B, L]. *KTO: Model Alignment as Prospect Theoretic
  Optimization* (z0 from mismatched pairs); METHODS `kto`."""
  tokens, rmask = batch["tokens"][:, 0], batch["response_mask"][:, 0]
  seg = batch["segment_ids"][:, 0]
  b, l = tokens.shape
  out = {k: np.zeros((b, l), v) for k, v in (("kl_tokens", np.int32), ("kl_positions", np.int32),
                                             ("kl_segment_ids", np.int32),
                                             ("kl_response_mask", np.float32))}
  pad = tokens[0, -1] if b else 0
  out["kl_tokens"][:] = pad
  for i in range(b):
    j = (i - 1) % b
    resp_j = np.nonzero(rmask[j])[0]
    real_i = int(seg[i].sum())
    resp_i = np.nonzero(rmask[i])[0]
    p = int(resp_i[0]) if resp_i.size else real_i
    if real_i == 0 or not resp_j.size:
      continue
    ids = np.concatenate([tokens[i, :p], tokens[j, resp_j]])[:l]
    n = ids.size
    out["kl_tokens"][i, :n] = ids
    out["kl_segment_ids"][i, :n] = 1
    out["kl_positions"][i, :n] = np.arange(n)
    out["kl_response_mask"][i, p:n] = 1.0
  return out


# ---------------------------------------------------------------------------- the loss


def _align(x_BxKxL, response_mask_BxKxL):
  """Shifted token arrays [B, K, L] moved to response coordinates: out[..., j] = x[..., s - 1
  + j], s = the row's first response position (x[t] scores token t + 1); 0 past the end."""
  length = x_BxKxL.shape[-1]
  start = jnp.argmax(response_mask_BxKxL > 0, axis=-1)[..., None]
  idx = start - 1 + jnp.arange(length)
  ok = (idx >= 0) & (idx < length)
  return jnp.where(ok, jnp.take_along_axis(x_BxKxL, jnp.clip(idx, 0, length - 1), -1), 0.0)


def _orient(x_Bx2, flip_B):
  """Swaps rows 0 and 1 of [B, 2, ...] where flip_B (records labelled -1: rejected better)."""
  f = flip_B.reshape(flip_B.shape + (1,) * (x_Bx2.ndim - 1))
  return jnp.where(f, x_Bx2[:, ::-1], x_Bx2)


def _kwargs(fn, params: dict, beta: float) -> dict:
  accepted = inspect.signature(fn).parameters
  kw = {k: v for k, v in params.items() if k in accepted}
  if "beta" in accepted and beta >= 0:
    kw["beta"] = beta
  return kw


def metric_beta(config) -> float:
  """beta of the implicit-reward metrics: `dpo.beta`, else the first selected loss's beta
  (0.1 if it has none)."""
  if config.dpo.beta >= 0:
    return float(config.dpo.beta)
  for name, _ in selected(config):
    if "beta" in config.dpo.params[name]:
      return float(config.dpo.params[name].beta)
  return 0.1


def _ranking_metrics(pc, pr, nc, nr, qc, qr, w, beta, alpha):
  """RA, normalised RA, and (given alpha [B]) IRA and the alignment gap, as sums over w."""
  f32 = jnp.float32
  m = {"ranking_acc": wsum(w, (pc > pr).astype(f32)),
       "ranking_acc_norm": wsum(w, (pc / nc > pr / nr).astype(f32))}
  if alpha is not None and qc is not None:
    a = jnp.clip(alpha, 1e-3, 1 - 1e-3)
    ideal = (qc - qr + jnp.log(a / (1 - a)) / beta) > 0
    m["idealized_ranking_acc"] = wsum(w, ideal.astype(f32))
    m["alignment_gap"] = m["idealized_ranking_acc"] - m["ranking_acc"]
  return m


def make_loss_fn(config):
  """loss_fn(model, batch[, frozen]) -> (loss_sum, denom, metrics) for the loop.

  Several losses: sum_i w_i * loss_i, each rescaled to the number of pairs (exact across
  micro-batches when every loss is a mean over pairs, as all pairwise ones are by default).
  """
  losses = selected(config)
  kind = data_kind(config)
  ref_mode = reference_mode(config)
  dc = config.dpo
  beta = float(dc.beta)
  params = {n: dict(dc.params[n]) for n, _ in losses}
  mbeta = metric_beta(config)
  chunk = config.train.logprob_chunk_size
  vchunk = int(config.train.get("logprob_vocab_chunk_size", 0)) or None
  alpha_const = float(dc.true_pref_prob)
  alpha_field = "pref_prob" in tuple(config.data.extra_fields)
  need_kl = any(registry.get(n).kind == "unpaired" for n, _ in losses)
  extra_rows = tuple(config.data.extra_responses)
  contrast_rows = bool(tuple(config.data.get("contrast_instructions", ())))
  logps = functools.partial(sequence_logps, chunk_size=chunk, vocab_chunk_size=vchunk)

  def reference_model(model, frozen):
    return None if frozen is None else nnx.merge(nnx.graphdef(model), frozen)

  def pairwise_loss(model, batch, ref):
    b, k = batch["tokens"].shape[:2]
    tlp, tmask, p = logps(model, batch)
    tlp, tmask, p = tlp.reshape(b, k, -1), tmask.reshape(b, k, -1), p.reshape(b, k)
    n = jnp.maximum(jnp.sum(tmask, -1), 1.0)
    label = batch["label"]
    flip = label < 0
    w = batch["example_mask"] * (label != 0)     # ties carry no DPO preference
    if ref is not None:
      tq, _, q = jax.lax.stop_gradient(logps(ref, batch))
      tq, q = tq.reshape(b, k, -1), q.reshape(b, k)
    elif ref_mode == "precomputed":
      tq = None
      q = jnp.stack([batch["ref_chosen_logps"], batch["ref_rejected_logps"]], 1)
      q = jnp.concatenate([q, jnp.zeros((b, k - 2), q.dtype)], 1)
    else:
      tq = q = None
    o = lambda x: None if x is None else _orient(x[:, :2], flip)
    # Token arrays in response coordinates (index 0 = first response token), so rows with
    # different prompts (T-REG's contrast rows) line up.
    tlp, tmask = _align(tlp, batch["response_mask"]), _align(tmask, batch["response_mask"])
    tq = None if tq is None else _align(tq, batch["response_mask"])
    P, N, TLP, TM, Q, TQ = o(p), o(n), o(tlp), o(tmask), o(q), o(tq)
    inputs = {"pc": P[:, 0], "pr": P[:, 1], "nc": N[:, 0], "nr": N[:, 1],
              "tlp_c": TLP[:, 0], "tlp_r": TLP[:, 1], "tmask_c": TM[:, 0], "tmask_r": TM[:, 1]}
    if Q is not None:
      inputs.update(qc=Q[:, 0], qr=Q[:, 1])
    if TQ is not None:
      inputs.update(tq_c=TQ[:, 0], tq_r=TQ[:, 1])
    if "score_chosen" in batch:
      sc, sr = _orient(jnp.stack([batch["score_chosen"], batch["score_rejected"]], 1), flip).T
      inputs.update(score_c=sc, score_r=sr)
    if "consistency" in batch:
      inputs["consistency"] = batch["consistency"]
    if RESPONSE_INPUTS["y0_ratio"] in extra_rows and q is not None:
      y0 = 2 + extra_rows.index(RESPONSE_INPUTS["y0_ratio"])
      inputs["y0_ratio"] = p[:, y0] - q[:, y0]
    if contrast_rows:
      # T-REG token rewards rt = log pi(y_t | x_better) - log pi(y_t | x_worse), by the
      # frozen reference (the initial model: "offline"), per response.
      base = 2 + len(extra_rows)
      src = tq if tq is not None else jax.lax.stop_gradient(tlp)
      both = tmask[:, base:base + 2] * tmask[:, base + 2:base + 4]
      rt = _orient((src[:, base:base + 2] - src[:, base + 2:base + 4]) * both, flip)
      inputs.update(rt_c=rt[:, 0], rt_r=rt[:, 1])
    if need_kl:
      kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
      _, kl_mask, pk = logps(model, kl_batch)
      _, _, qk = jax.lax.stop_gradient(logps(ref, kl_batch)) if ref is not None else (
          None, None, jnp.zeros_like(pk))
      has_kl = (jnp.sum(kl_mask, -1) > 0) * batch["example_mask"]
      inputs["z0"] = kto_lib.kto_z0(pk - qk, mask=has_kl)
    return inputs, w

  def listwise_loss(model, batch, ref):
    b, k = batch["tokens"].shape[:2]
    _, tmask, p = logps(model, batch)
    p = p.reshape(b, k)
    n = jnp.maximum(jnp.sum(tmask.reshape(b, k, -1), -1), 1.0)
    if ref is not None:
      q = jax.lax.stop_gradient(logps(ref, batch)[2]).reshape(b, k)
    else:
      q = batch["ref_logps"]
    valid = batch["valid"]
    return {"l": p, "l_ref": q, "n": n, "g": batch["scores"], "valid": valid,
            "scores": batch["scores"]}, batch["example_mask"]

  def call(name, inputs, w):
    entry = registry.get(name)
    kw = _kwargs(entry.fn, params[name], beta)
    if entry.kind == "unpaired":   # chosen rows desirable, rejected rows undesirable
      u = jnp.concatenate([inputs["pc"] - inputs["qc"], inputs["pr"] - inputs["qr"]])
      desirable = jnp.concatenate([jnp.ones_like(w), jnp.zeros_like(w)])
      return entry.fn(u, desirable, inputs["z0"], mask=jnp.concatenate([w, w]), **kw)
    if name == "adpo":
      q_BxK = ranked_lib.adpo_target(inputs["scores"], inputs["valid"], mode=dc.adpo_target,
                                     tau_q=dc.adpo_tau_q, eps=dc.adpo_eps)
      return entry.fn(inputs["l"], inputs["l_ref"], q_BxK, inputs["valid"], mask=w, **kw)
    args = {a: inputs[a] for a in dpo_losses.required_inputs(entry.fn)}
    return entry.fn(**args, mask=w, **kw)

  def loss_fn(model, batch, frozen=None):
    ref = reference_model(model, frozen) if ref_mode == "live" else None
    if kind == "listwise":
      inputs, w = listwise_loss(model, batch, ref)
    else:
      inputs, w = pairwise_loss(model, batch, ref)
    num = jnp.sum(w)
    if len(losses) == 1:
      name, weight = losses[0]
      loss_sum, denom, extra = call(name, inputs, w)
      loss_sum = weight * loss_sum
      metrics = dict(extra)
    else:
      loss_sum, denom, metrics = 0.0, num, {}
      for name, weight in losses:
        ls, d, extra = call(name, inputs, w)
        scale = jnp.where(d > 0, num / jnp.maximum(d, 1e-12), 0.0)
        loss_sum = loss_sum + weight * ls * scale
        metrics[f"loss_{name}"] = ls * scale
        metrics.update({f"{name}_{k}": v if k.startswith("num_") else v * scale
                        for k, v in extra.items()})
    # Standard metrics, as sums over pairs (lists), rescaled to the loss's denominator.
    to_denom = jnp.where(num > 0, denom / jnp.maximum(num, 1e-12), 0.0)
    if kind == "listwise":
      std = _list_metrics(inputs, w, mbeta)
    else:
      std = _pair_metrics(inputs, w, mbeta, alpha_const, batch.get("pref_prob") if alpha_field
                          else None)
    metrics.update({k: v if k.startswith("num_") else v * to_denom for k, v in std.items()})
    return loss_sum, denom, jax.lax.stop_gradient(metrics)

  return loss_fn


def _pair_metrics(inputs, w, beta, alpha_const, alpha_B):
  f32 = jnp.float32
  pc, pr, nc, nr = inputs["pc"], inputs["pr"], inputs["nc"], inputs["nr"]
  qc, qr = inputs.get("qc"), inputs.get("qr")
  if qc is not None:
    rc, rr = beta * (pc - qc), beta * (pr - qr)
  else:
    rc, rr = beta * pc / nc, beta * pr / nr
  d = rc - rr
  alpha = alpha_B if alpha_B is not None else (
      jnp.full_like(pc, alpha_const) if alpha_const >= 0 else None)
  return {"reward_chosen": wsum(w, rc), "reward_rejected": wsum(w, rr), "margin": wsum(w, d),
          "accuracy": wsum(w, (d > 0).astype(f32) + 0.5 * (d == 0).astype(f32)),
          "logp_chosen": wsum(w, pc), "logp_rejected": wsum(w, pr),
          **_ranking_metrics(pc, pr, nc, nr, qc, qr, w, beta, alpha), "num_pairs": jnp.sum(w)}


def _list_metrics(inputs, w, beta):
  """`list_accuracy`: top-1 implicit-reward accuracy of lists (the best-scored response has
  the highest implicit reward; ties split); `list_reward_best`: its implicit reward."""
  r = beta * (inputs["l"] - inputs["l_ref"])
  valid = inputs["valid"] > 0
  r = jnp.where(valid, r, -jnp.inf)
  best = jnp.argmax(jnp.where(valid, inputs["scores"], -jnp.inf), axis=-1)
  r_best = jnp.take_along_axis(r, best[:, None], axis=-1)[:, 0]
  ahead = jnp.sum((r > r_best[:, None]) & valid, -1)
  tied = jnp.sum((r == r_best[:, None]) & valid, -1)
  top1 = jnp.where(ahead == 0, 1.0 / jnp.maximum(tied, 1), 0.0)
  return {"list_accuracy": wsum(w, top1), "list_reward_best": wsum(w, r_best),
          "num_lists": jnp.sum(w)}


# ---------------------------------------------------------------------------- the task


def build_reference_state(config, cfg, policy, mesh, rules):
  """The frozen reference's state: a copy of the initial policy, or loaded from
  `dpo.reference_checkpoint` / `dpo.reference_hf_path` (same architecture)."""
  return common.reference_state(config, policy, mesh, rules, config.dpo.reference_checkpoint,
                                config.dpo.reference_hf_path, "config.dpo.reference_hf_path")


def make_update_frozen(config):
  """The dynamic anchor: every `ref_update_steps` steps, ref <- a * policy + (1 - a) * ref."""
  every, a = int(config.dpo.ref_update_steps), float(config.dpo.ref_update_alpha)
  if every <= 0:
    return None

  def update(step, params, frozen):
    mixed = jax.tree.map(lambda p, r: (a * p + (1 - a) * r).astype(r.dtype), params, frozen)
    return jax.lax.cond(step % every == 0, lambda: mixed, lambda: frozen)

  return update


def build_task(config, tokenizer=None) -> loop.Task:
  prepare_data_config(config)
  check_config(config)
  tokenizer = tokenizer or common.build_tokenizer(config)
  cfg = common.model_config(config, tokenizer.vocab_size)
  dc = config.data
  kind = data_kind(config)
  ref_mode = reference_mode(config)
  need_kl = any(registry.get(n).kind == "unpaired" for n, _ in selected(config))
  logging.info("dpo: %s; reference %s; %s data; model %s", selected(config), ref_mode, kind, cfg)

  def iterator(split):
    ds, _, _ = pref_data.make_preference_dataset(
        dc, tokenizer, kind=kind, seq_len=dc.seq_len, global_batch_size=dc.batch_size,
        seed=config.seed, split=split, num_epochs=1 if split == "eval" else None)
    if need_kl:
      ds = ds.map(lambda batch: {**batch, **mismatched_rows(batch)})
    return iter(ds)

  rows = {"pairwise": 2 + len(dc.extra_responses) + 2 * len(dc.contrast_instructions),
          "listwise": dc.max_responses}[kind]
  # Forward-only rows per example: the reference's, and KTO's mismatched rows (policy and
  # reference; z0 carries no gradient).
  live = ref_mode == "live"
  forward_only = (rows if live else 0) + ((2 if live else 1) if need_kl else 0)
  has_eval = bool(dc.eval_files or dc.synthetic)
  return loop.Task(
      build_model=lambda mesh, rules: common.build_model(config, cfg, mesh, rules),
      loss_fn=make_loss_fn(config),
      train_iter=lambda: iterator("train"),
      eval_iter=(lambda: iterator("eval")) if has_eval else None,
      # Trained rows: forward + backward (6 N per token); forward-only rows: 2 N.
      flops_per_token=cfg.flops_per_token(dc.seq_len) * (rows + forward_only / 3) / rows,
      tokens_per_batch=dc.batch_size * rows * dc.seq_len,
      build_frozen=(lambda model, mesh, rules: build_reference_state(config, cfg, model, mesh,
                                                                     rules))
      if live else None,
      update_frozen=make_update_frozen(config),
  )


def run(config, workdir: str) -> dict:
  """Entry point for `config.task == "dpo"`."""
  summary = loop.train(config, workdir, build_task(config))
  key = "eval_list_accuracy" if data_kind(config) == "listwise" else "eval_accuracy"
  if jax.process_index() == 0 and key in summary:
    before = summary.get(f"initial_{key}")
    prefix = f"before {before:.1%}, after " if before is not None else ""
    what = "top-1 implicit-reward accuracy of lists" if "list" in key else \
        "implicit-reward accuracy"
    print(f"held-out {what}: {prefix}{summary[key]:.1%}", flush=True)
    if "eval_ranking_acc" in summary:
      before = summary.get("initial_eval_ranking_acc")
      prefix = f"before {before:.1%}, after " if before is not None else ""
      print(f"held-out ranking accuracy (logpi(y_w) > logpi(y_l)): {prefix}"
            f"{summary['eval_ranking_acc']:.1%}", flush=True)
  return summary

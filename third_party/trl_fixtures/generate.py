#!/usr/bin/env python
"""Generate reference loss values for alignjax's DPO-family kernels by running TRL's own code.

Run from the repository root with the reference venv (torch CPU + transformers + trl):

    /work/venv_ref/bin/python third_party/trl_fixtures/generate.py

Output: third_party/trl_fixtures/dpo_losses.json (deterministic; see README.md).

Nothing here re-implements a loss formula. Every loss value, per-example loss and reward in
the fixture is read out of TRL's own trainer code, run verbatim on CPU in float64 (two
exceptions, both TRL's own doing: its alpha-divergence branch fails in float64 and is run in
float32, and ORPO's odds_ratio_loss casts to float32 itself):

  * DPO family   `trl.trainer.dpo_trainer.DPOTrainer._compute_loss`  (every `loss_type`,
                 multi-loss `loss_weights`, `f_divergence_type`, `ld_alpha`, `label_smoothing`,
                 `discopop_tau`)
  * KTO          `trl.trainer.kto_trainer.KTOTrainer._compute_loss` (+ `_compute_kl_logps`)
  * CPO / SimPO  `trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics`
                 (-> `concatenated_forward`, `get_batch_logps`, `cpo_loss`)
  * ORPO         `trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics`
                 (-> `concatenated_forward`, `get_batch_logps`, `odds_ratio_loss`)

The methods are called unbound with a minimal stand-in `self` (a SimpleNamespace carrying
exactly the attributes the method reads) instead of a constructed trainer, and the language
models are replaced by stand-ins that return prescribed per-token log-probabilities (the DPO
and KTO trainers read `outputs.log_probs` of TRL's fused LM head) or logits (CPO / ORPO read
`outputs.logits`). Intermediate values that the TRL methods do not return (per-example losses,
rewards, the KTO KL estimate) are read from the method's own local variables with a
`sys.settrace` hook; the returned scalar loss is checked against the mean of the captured
per-example losses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import platform
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import transformers  # noqa: E402  (recorded in the versions block)
import trl  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

OUT = Path(__file__).resolve().parent / "dpo_losses.json"
SEED = 20240611
DTYPE = torch.float64
GRID = 64  # every log-prob is a multiple of 1/64: sums and differences are exact in fp32 and fp64
PROMPT_LEN = 2  # tokens before each completion in the stand-in batches

warnings.filterwarnings("ignore")

# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def q64(x):
  return np.round(np.asarray(x, np.float64) * GRID) / GRID


def split_tokens(total: float, n: int, rng: np.random.Generator) -> list[float]:
  """Split a summed log-prob into n strictly negative per-token values on the 1/64 grid (exact sum)."""
  assert n >= 1 and total <= -n / GRID, (total, n)
  for _ in range(100):
    w = rng.uniform(0.2, 1.0, n)
    head = -np.maximum(1.0, np.round(-total * w[:-1] / w.sum() * GRID)) / GRID
    last = total - head.sum()
    if last <= -1.0 / GRID:
      toks = [float(v) for v in head] + [float(last)]
      assert math.fsum(toks) == total and sum(toks) == total
      return toks
  toks = [-1.0 / GRID] * (n - 1) + [total + (n - 1) / GRID]
  assert sum(toks) == total
  return toks


def make_case(name, pc, pr, qc, qr, nc, nr, beta, note, rng):
  pc, pr, qc, qr = (q64(v) for v in (pc, pr, qc, qr))
  nc, nr = np.asarray(nc, np.int64), np.asarray(nr, np.int64)
  tokens = {k: [split_tokens(float(s), int(n), rng) for s, n in zip(v, lens)]
            for k, v, lens in (("pc", pc, nc), ("pr", pr, nr), ("qc", qc, nc), ("qr", qr, nr))}
  return {"name": name, "note": note, "beta": beta, "B": len(pc),
          "pc": pc.tolist(), "pr": pr.tolist(), "qc": qc.tolist(), "qr": qr.tolist(),
          "nc": nc.tolist(), "nr": nr.tolist(), "tokens": tokens}


def make_cases(rng: np.random.Generator) -> list[dict]:
  cases = []
  # METHODS.md section 2 golden inputs.
  cases.append(make_case(
      "golden", [-12, -30.5, -7.25, -18], [-14, -29, -9.5, -25], [-12.5, -31, -7, -19],
      [-13, -30, -9, -22], [4, 10, 3, 6], [5, 8, 3, 9], 0.1,
      "METHODS.md section 2 golden inputs (uc=[.5,.5,-.25,1], ur=[-1,1,-.5,-3], D=[1.5,-.5,.25,4])", rng))

  def random_case(name, beta, u_scale, note, equal_len=None):
    b = 8
    if equal_len is None:
      nc, nr = rng.integers(3, 21, b), rng.integers(3, 21, b)
    else:
      nc = nr = np.full(b, equal_len)
    qc, qr = rng.uniform(-55, -8, b), rng.uniform(-55, -8, b)
    uc, ur = rng.normal(0, u_scale, b), rng.normal(0, u_scale, b)
    pc, pr = np.minimum(qc + uc, -1.0), np.minimum(qr + ur, -1.0)
    return make_case(name, pc, pr, qc, qr, nc, nr, beta, note, rng)

  cases.append(random_case("random", 0.1, 2.0, "seeded random, moderate log-ratios, beta .1"))
  cases.append(random_case("random_b05", 0.5, 4.0, "seeded random, larger log-ratios, beta .5"))
  cases.append(random_case("equal_len", 0.1, 2.0, "seeded random with nc = nr = 12 on every row "
                           "(token-mean and sequence-mean NLL coincide)", equal_len=12))

  # Saturating: |D| in [40, 80] with mixed signs; with beta .5 the DPO logit is +-20..40.
  b = 8
  sign = np.array([1, -1, 1, -1, 1, 1, -1, -1], np.float64)
  mag = rng.uniform(20, 40, b)
  qc, qr = rng.uniform(-60, -40, b), rng.uniform(-60, -40, b)
  uc, ur = sign * mag, -sign * rng.uniform(20, 40, b)
  pc, pr = qc + uc, qr + ur
  nc, nr = rng.integers(3, 21, b), rng.integers(3, 21, b)
  cases.append(make_case("saturating", pc, pr, qc, qr, nc, nr, 0.5,
                         "|uc|, |ur| in [20, 40] with opposite signs: |D| in [40, 80], beta .5 "
                         "(sigmoid-type losses saturate at 0 or grow linearly)", rng))

  # METHODS.md simpo / orpo golden: mean log-probs c = [-.8, -1.5, -.3], r = [-1.2, -1.4, -2].
  case = make_case(
      "golden_simpo", pc=[-4, -6, -3], pr=[-6, -7, -8], qc=[-4.5, -6, -2.5], qr=[-5, -7.5, -9],
      nc=[5, 4, 10], nr=[5, 5, 4], beta=0.1,
      note="METHODS.md simpo/orpo golden: pc/nc = [-.8, -1.5, -.3], pr/nr = [-1.2, -1.4, -2] "
      "(qc, qr arbitrary; only the CPO/ORPO configs are run on this case)", rng=rng)
  case["only"] = ["CPOTrainer", "ORPOTrainer"]
  cases.append(case)

  # Ties.
  cases.append(make_case(
      "ties",
      pc=[-20, -15, -30, -12, -9.5, -9.5, -33.25, -30],
      pr=[-20, -25, -18, -42, -11, -11, -33.25, -18],
      qc=[-22, -15, -31, -12, -10, -10, -30, -31],
      qr=[-22, -25, -19, -40, -10.5, -10.5, -36, -19],
      nc=[6, 5, 7, 4, 3, 3, 10, 12],
      nr=[6, 9, 7, 8, 3, 3, 10, 4],
      beta=0.1,
      note="rows 0-2 D=0 (row 0 all equal, row 1 uc=ur=0, row 2 uc=ur=1 with pc!=pr); row 3 uc=0; "
      "rows 4,5 identical (sort ties for aot); row 6 pc=pr; row 7 = row 2 with other lengths",
      rng=rng))
  return cases


# --------------------------------------------------------------------------- #
# Stand-ins
# --------------------------------------------------------------------------- #


class Accelerator:
  """The accelerate.Accelerator surface the loss methods touch, for a single CPU process."""
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

  @staticmethod
  def autocast():
    return contextlib.nullcontext()


class FusedLMStandIn:
  """Stand-in for a causal LM patched with TRL's fused LM head (`fused_lm_head=True`).

  Returns `log_probs` [N, T-1] that are zero where the shifted labels are -100 (as TRL's
  `_fused_forward` does) and hold the prescribed per-token log-probs, in order, elsewhere.
  `table` maps an input_ids tensor to the per-row token lists for that call.
  """

  training = True
  is_gradient_checkpointing = False

  def __init__(self, table, dtype=DTYPE):
    self.table = table  # list of (input_ids, per-row token lists)
    self.dtype = dtype

  def __call__(self, *, input_ids, labels, fused_lm_head, **kwargs):
    assert fused_lm_head is True and labels is not None
    for ids, rows in self.table:
      if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
        break
    else:
      raise AssertionError("unexpected input_ids")
    mask = labels[:, 1:] != -100
    out = torch.zeros(mask.shape, dtype=self.dtype)
    for i, toks in enumerate(rows):
      assert int(mask[i].sum()) == len(toks), (i, int(mask[i].sum()), len(toks))
      out[i, mask[i]] = torch.tensor(toks, dtype=self.dtype)
    zeros = torch.zeros(mask.shape, dtype=self.dtype)
    return types.SimpleNamespace(log_probs=out, entropy=zeros, mean_logits=zeros,
                                 is_top1=torch.zeros(mask.shape, dtype=torch.bool),
                                 log_sum_sq_probs=zeros, aux_loss=None)


def layout(lengths, offset_id=1):
  """input_ids / attention_mask / completion_mask [N, T] for right-padded prompt+completion rows."""
  n = len(lengths)
  t = PROMPT_LEN + max(lengths)
  input_ids = torch.zeros((n, t), dtype=torch.long)
  attention_mask = torch.zeros((n, t), dtype=torch.long)
  completion_mask = torch.zeros((n, t), dtype=torch.long)
  for i, ln in enumerate(lengths):
    input_ids[i, : PROMPT_LEN + ln] = offset_id + (torch.arange(PROMPT_LEN + ln) % 7)
    attention_mask[i, : PROMPT_LEN + ln] = 1
    completion_mask[i, PROMPT_LEN: PROMPT_LEN + ln] = 1
  return input_ids, attention_mask, completion_mask


@contextlib.contextmanager
def capture_locals(code, names):
  """Record the last value of each local in `names` seen while a frame of `code` runs.

  `per_sequence_loss` is recorded per `loss_type` (the DPO multi-loss loop reassigns it).
  """
  seen = {}
  per_type = {}
  prev = sys.gettrace()

  def local_tracer(frame, event, arg):
    loc = frame.f_locals
    for n in names:
      if n in loc:
        seen[n] = loc[n]
    if "per_sequence_loss" in loc and "loss_type" in loc and event == "line":
      # Only trust the value once the line after its assignment has run: the last write wins.
      per_type[loc["loss_type"]] = loc["per_sequence_loss"]
    return local_tracer

  def global_tracer(frame, event, arg):
    if frame.f_code is code:
      return local_tracer
    return None

  sys.settrace(global_tracer)
  try:
    yield seen, per_type
  finally:
    sys.settrace(prev)


def lst(t):
  v = t.detach().to(torch.float64).reshape(-1).tolist()
  assert all(math.isfinite(x) for x in v), v
  return v


def num(t):
  v = float(t.detach().to(torch.float64)) if isinstance(t, torch.Tensor) else float(t)
  assert math.isfinite(v), v
  return v


# --------------------------------------------------------------------------- #
# DPO family: DPOTrainer._compute_loss
# --------------------------------------------------------------------------- #

# (config name, loss_type list, loss_weights or None, extra settings)
DPO_CONFIGS = [
    ("sigmoid", ["sigmoid"], None, {}),
    ("hinge", ["hinge"], None, {}),
    ("ipo", ["ipo"], None, {}),
    ("exo_pair_ls0.001", ["exo_pair"], None, {"label_smoothing": 1e-3}),
    ("exo_pair_ls0.2", ["exo_pair"], None, {"label_smoothing": 0.2}),
    ("nca_pair", ["nca_pair"], None, {}),
    ("robust_ls0.1", ["robust"], None, {"label_smoothing": 0.1}),
    ("robust_ls0.3", ["robust"], None, {"label_smoothing": 0.3}),
    ("bco_pair", ["bco_pair"], None, {}),
    ("sppo_hard", ["sppo_hard"], None, {}),
    ("aot", ["aot"], None, {}),
    ("aot_ls0.1", ["aot"], None, {"label_smoothing": 0.1}),
    ("aot_unpaired", ["aot_unpaired"], None, {}),
    ("aot_unpaired_ls0.1", ["aot_unpaired"], None, {"label_smoothing": 0.1}),
    ("apo_zero", ["apo_zero"], None, {}),
    ("apo_down", ["apo_down"], None, {}),
    ("discopop", ["discopop"], None, {"discopop_tau": 0.05}),
    ("discopop_tau0.5", ["discopop"], None, {"discopop_tau": 0.5}),
    ("sigmoid_norm", ["sigmoid_norm"], None, {}),
    ("sft", ["sft"], None, {}),
    ("rpo", ["sigmoid", "sft"], [1.0, 1.0], {}),
    ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),
    ("fdiv_forward_kl", ["sigmoid"], None, {"f_divergence_type": "forward_kl"}),
    ("fdiv_js_divergence", ["sigmoid"], None, {"f_divergence_type": "js_divergence"}),
    ("fdiv_alpha0.5", ["sigmoid"], None, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ("fdiv_alpha0.3", ["sigmoid"], None, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ("ld_alpha0.5", ["sigmoid"], None, {"ld_alpha": 0.5}),
    ("ld_alpha0.0", ["sigmoid"], None, {"ld_alpha": 0.0}),
]
LD_CASES = ("random", "golden")  # per-token arrays are stored only for these (ld_alpha needs them)
ROW_ORDER_SORTED = {"aot", "aot_unpaired"}  # their per-sequence losses are over batch-sorted rows


def run_dpo(case, loss_types, loss_weights, settings, dtype):
  """Run DPOTrainer._compute_loss on the case; returns the record fields."""
  lengths = case["nc"] + case["nr"]  # batch is [chosen; rejected]
  input_ids, attention_mask, completion_mask = layout(lengths)
  tok = case["tokens"]
  policy = FusedLMStandIn([(input_ids, tok["pc"] + tok["pr"])], dtype)
  ref = FusedLMStandIn([(input_ids, tok["qc"] + tok["qr"])], dtype)
  trainer_self = types.SimpleNamespace(
      model=policy,
      ref_model=ref,
      accelerator=Accelerator(),
      aux_loss_enabled=False,
      precompute_ref_logps=False,  # the reference goes through the same ld_alpha / summation code
      beta=case["beta"],
      loss_types=list(loss_types),
      loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types),
      ld_alpha=settings.get("ld_alpha"),
      f_divergence_type=settings.get("f_divergence_type", "reverse_kl"),
      f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 0.5),
      label_smoothing=settings.get("label_smoothing", 0.0),
      use_weighting=False,
      args=types.SimpleNamespace(discopop_tau=settings.get("discopop_tau", 0.05),
                                 gradient_checkpointing_kwargs=None),
      _metrics=defaultdict(lambda: defaultdict(list)),
      _total_train_tokens=0,
      _tp_size=1,
  )
  inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
  names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
           "chosen_rewards", "rejected_rewards", "delta_score")
  with capture_locals(DPOTrainer._compute_loss.__code__, names) as (seen, per_type):
    loss = DPOTrainer._compute_loss(trainer_self, policy, inputs, return_outputs=False)
  assert loss.dtype == dtype, loss.dtype
  assert set(per_type) == set(loss_types), (per_type.keys(), loss_types)
  weights = trainer_self.loss_weights
  # The returned loss is sum_k w_k mean(per_sequence_loss_k): check the capture against it.
  recomb = sum(w * per_type[lt].double().mean() for lt, w in zip(loss_types, weights))
  tol = 1e-12 if dtype == torch.float64 else 1e-6
  assert abs(float(recomb) - float(loss)) <= tol * max(1.0, abs(float(loss))), (recomb, loss)
  if settings.get("ld_alpha") is None:  # TRL saw exactly the case's summed inputs
    for k, n in (("pc", "chosen_logps"), ("pr", "rejected_logps"), ("qc", "ref_chosen_logps"),
                 ("qr", "ref_rejected_logps")):
      assert seen[n].double().tolist() == case[k], (k, seen[n], case[k])
  rec = {
      "loss": num(loss),
      "per_example_loss": {lt: lst(per_type[lt]) for lt in loss_types},
      "chosen_rewards": lst(seen["chosen_rewards"]),
      "rejected_rewards": lst(seen["rejected_rewards"]),
  }
  if settings.get("ld_alpha") is not None:
    rec["trl_logps"] = {k: lst(seen[n]) for k, n in (("pc", "chosen_logps"), ("pr", "rejected_logps"),
                                                      ("qc", "ref_chosen_logps"), ("qr", "ref_rejected_logps"))}
  m = trainer_self._metrics["train"]  # TRL's logged reward means agree with the captured vectors
  assert abs(m["rewards/chosen"][-1] - float(seen["chosen_rewards"].double().mean())) <= 1e-6
  assert abs(m["rewards/rejected"][-1] - float(seen["rejected_rewards"].double().mean())) <= 1e-6
  return rec


# --------------------------------------------------------------------------- #
# KTO: KTOTrainer._compute_loss
# --------------------------------------------------------------------------- #


def kto_cases(rng):
  cases = []
  # METHODS.md kto golden: desirable u = [.5, -.25], undesirable u = [1, -3], z0 = .5, lamU = 1.33.
  cases.append({
      "name": "kto_golden", "note": "METHODS.md kto golden (u desirable [.5,-.25], undesirable [1,-3], "
      "z0 = .5 from KL rows with log-ratio .5 each)",
      "beta": 0.1, "label": [True, False, True, False],
      "logp": [-11.5, -12.0, -7.25, -25.0], "ref_logp": [-12.0, -13.0, -7.0, -22.0], "n": [4, 5, 3, 9],
      "kl_logp": [-10.0, -11.0, -9.5, -12.0], "ref_kl_logp": [-10.5, -11.5, -10.0, -12.5], "kl_n": [5, 4, 3, 6],
  })
  for name, beta, scale, kl_shift, note in (
      ("kto_random", 0.1, 2.0, 0.75, "seeded random, positive mean KL"),
      ("kto_negkl", 0.5, 6.0, -2.0, "seeded random, negative mean KL (TRL clamps z0 at 0), beta .5"),
  ):
    b = 8
    label = [True, False, True, True, False, True, False, True]
    ref = q64(rng.uniform(-55, -8, b))
    logp = q64(np.minimum(ref + rng.normal(0, scale, b), -1.0))
    ref_kl = q64(rng.uniform(-55, -8, b))
    kl = q64(np.minimum(ref_kl + kl_shift + rng.normal(0, 1.0, b), -1.0))
    cases.append({"name": name, "note": note, "beta": beta, "label": label,
                  "logp": logp.tolist(), "ref_logp": ref.tolist(), "n": rng.integers(3, 21, b).tolist(),
                  "kl_logp": kl.tolist(), "ref_kl_logp": ref_kl.tolist(), "kl_n": rng.integers(3, 21, b).tolist()})
  for c in cases:
    c["B"] = len(c["label"])
    c["tokens"] = {k: [split_tokens(float(s), int(n), rng) for s, n in zip(c[k], c[nk])]
                   for k, nk in (("logp", "n"), ("kl_logp", "kl_n"))}
  return cases


KTO_CONFIGS = [
    ("kto", "kto", {"desirable_weight": 1.0, "undesirable_weight": 1.0}),
    ("kto_lamu1.33", "kto", {"desirable_weight": 1.0, "undesirable_weight": 1.33}),
    ("kto_lamd1.2", "kto", {"desirable_weight": 1.2, "undesirable_weight": 0.9}),
    ("apo_zero_unpaired", "apo_zero_unpaired", {"desirable_weight": 1.0, "undesirable_weight": 1.0}),
]


def run_kto(case, loss_type, settings):
  input_ids, attention_mask, completion_mask = layout(case["n"], offset_id=1)
  kl_ids, kl_attn, kl_cmask = layout(case["kl_n"], offset_id=11)
  tok = case["tokens"]
  policy = FusedLMStandIn([(input_ids, tok["logp"]), (kl_ids, tok["kl_logp"])])
  calculate_kl = loss_type not in ["apo_zero_unpaired"]  # as in KTOTrainer.__init__
  trainer_self = types.SimpleNamespace(
      model=policy,
      ref_model=None,
      accelerator=Accelerator(),
      aux_loss_enabled=False,
      precompute_ref_logps=True,  # reference sums are given as `ref_logps` / `ref_KL_logps`
      beta=case["beta"],
      loss_type=loss_type,
      desirable_weight=settings["desirable_weight"],
      undesirable_weight=settings["undesirable_weight"],
      calculate_KL=calculate_kl,
      args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
      _metrics=defaultdict(lambda: defaultdict(list)),
      _total_train_tokens=0,
      _tp_size=1,
  )
  trainer_self._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, trainer_self)
  batch = {
      "input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
      "label": torch.tensor(case["label"]),
      "ref_logps": torch.tensor(case["ref_logp"], dtype=DTYPE),
  }
  if calculate_kl:
    batch.update({"KL_input_ids": kl_ids, "KL_attention_mask": kl_attn, "KL_completion_mask": kl_cmask,
                  "ref_KL_logps": torch.tensor(case["ref_kl_logp"], dtype=DTYPE)})
  names = ("losses", "kl", "chosen_idx", "rejected_idx", "chosen_rewards", "rejected_rewards",
           "chosen_logratios", "rejected_logratios", "completion_logps", "KL_logps")
  with capture_locals(KTOTrainer._compute_loss.__code__, names) as (seen, _):
    loss = KTOTrainer._compute_loss(trainer_self, policy, batch, return_outputs=False)
  assert loss.dtype == DTYPE
  assert seen["completion_logps"].tolist() == case["logp"]
  idx = torch.cat([seen["chosen_idx"], seen["rejected_idx"]]).tolist()
  losses = seen["losses"]
  assert abs(float(losses.mean()) - float(loss)) <= 1e-15 * max(1, abs(float(loss)))
  per_row = [0.0] * case["B"]
  for pos, row in enumerate(idx):  # TRL concatenates [desirable rows, undesirable rows]
    per_row[row] = float(losses[pos])
  u = [0.0] * case["B"]
  rewards = [0.0] * case["B"]
  for ids, lr, rw in ((seen["chosen_idx"], seen["chosen_logratios"], seen["chosen_rewards"]),
                      (seen["rejected_idx"], seen["rejected_logratios"], seen["rejected_rewards"])):
    for j, row in enumerate(ids.tolist()):
      u[row] = float(lr[j])
      rewards[row] = float(rw[j])
  rec = {
      "loss": num(loss),
      "per_example_loss": {loss_type: per_row},
      "trl_order": idx,
      "u": u,
      "rewards": rewards,
      "z0": num(seen["kl"].reshape(-1)[0]),
  }
  if calculate_kl:
    rec["kl_logps"] = lst(seen["KL_logps"])
  return rec


# --------------------------------------------------------------------------- #
# CPO / SimPO and ORPO: get_batch_loss_metrics with a logits stand-in
# --------------------------------------------------------------------------- #


class LogitsStandIn:
  """Stand-in causal LM returning `logits` [2B, T, 2] for the concatenated chosen+rejected batch.

  With two symbols, logits `[a, log(-expm1(a))]` give log_softmax `[a, log(1 - e^a)]`, so the
  label-0 token has log-prob `a` (to an ulp). Every token (prompt and completion) is id 0; prompt
  tokens get logits `[0, -1e4]` (log-prob exactly 0). Positions whose label is padding get 0.
  """

  training = True

  def __init__(self, logits):
    self.logits = logits

  def __call__(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
    assert input_ids.shape == self.logits.shape[:2]
    return types.SimpleNamespace(logits=self.logits)


def pair_batch(case):
  """The CPO/ORPO tokenized batch: [B, T] chosen_* and rejected_* with a shared width."""
  b = case["B"]
  t = PROMPT_LEN + max(case["nc"] + case["nr"])
  batch = {}
  logits = torch.zeros((2 * b, t, 2), dtype=DTYPE)
  for side_i, side in enumerate(("chosen", "rejected")):
    lens = case["nc"] if side == "chosen" else case["nr"]
    toks = case["tokens"]["pc" if side == "chosen" else "pr"]
    ids = torch.zeros((b, t), dtype=torch.long)
    attn = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    for i, ln in enumerate(lens):
      attn[i, : PROMPT_LEN + ln] = 1
      labels[i, PROMPT_LEN: PROMPT_LEN + ln] = 0
      row = side_i * b + i
      for p in range(1, PROMPT_LEN):  # logits at p-1 predict prompt token p
        logits[row, p - 1] = torch.tensor([0.0, -1e4], dtype=DTYPE)
      for k in range(ln):
        a = torch.tensor(toks[i][k], dtype=DTYPE)
        logits[row, PROMPT_LEN + k - 1, 0] = a
        logits[row, PROMPT_LEN + k - 1, 1] = torch.log(-torch.expm1(a))
    batch[f"{side}_input_ids"] = ids
    batch[f"{side}_attention_mask"] = attn
    batch[f"{side}_labels"] = labels
  return batch, LogitsStandIn(logits)


CPO_CONFIGS = [
    ("simpo_b2_g0.5", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0}),
    ("simpo_b10_g3", {"loss_type": "simpo", "beta": 10.0, "simpo_gamma": 3.0, "cpo_alpha": 0.0}),
    ("simpo_b2_g0.5_ls0.1", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0,
                             "label_smoothing": 0.1}),
    ("cpo_sigmoid_b0.1_alpha1", {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0}),
    ("alphapo_b2_g0.5_a0.25", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0,
                               "alpha": 0.25}),
]


def run_cpo(case, settings):
  batch, model = pair_batch(case)
  trainer_self = types.SimpleNamespace(
      accelerator=Accelerator(), is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False,
      beta=settings["beta"], loss_type=settings["loss_type"], label_smoothing=settings.get("label_smoothing", 0.0),
      cpo_alpha=settings["cpo_alpha"], simpo_gamma=settings.get("simpo_gamma", 0.5), alpha=settings.get("alpha", 0.0),
      concatenated_inputs=CPOTrainer.concatenated_inputs, get_batch_logps=CPOTrainer.get_batch_logps,
  )
  trainer_self.concatenated_forward = functools.partial(CPOTrainer.concatenated_forward, trainer_self)
  trainer_self.cpo_loss = functools.partial(CPOTrainer.cpo_loss, trainer_self)
  names = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps", "policy_rejected_logps",
           "policy_nll_loss")
  with capture_locals(CPOTrainer.get_batch_loss_metrics.__code__, names) as (seen, _):
    loss, metrics = CPOTrainer.get_batch_loss_metrics(trainer_self, model, batch)
  assert loss.dtype == DTYPE and seen["losses"].dtype == DTYPE
  nll = num(seen["policy_nll_loss"])
  check = float(seen["losses"].mean()) + settings["cpo_alpha"] * nll
  assert abs(check - float(loss)) <= 1e-12 * max(1, abs(float(loss)))
  rec = {
      "loss": num(loss),
      "per_example_loss": {settings["loss_type"]: lst(seen["losses"])},
      "nll_loss": nll,
      "chosen_rewards": lst(seen["chosen_rewards"]),
      "rejected_rewards": lst(seen["rejected_rewards"]),
  }
  if settings.get("alpha", 0.0) == 0.0 and settings.get("label_smoothing", 0.0) == 0.0:
    rec["trl_policy_logps"] = {"chosen": lst(seen["policy_chosen_logps"]),
                               "rejected": lst(seen["policy_rejected_logps"])}
  return rec


# TRL 1.16's DPOTrainer has no cDPO (its "sigmoid" ignores label_smoothing). The cDPO expression
# -(1-e) logsig(beta z) - e logsig(-beta z) lives in CPOTrainer.cpo_loss (loss_type "sigmoid"), where
# z = policy_chosen_logps - policy_rejected_logps; passing the log-ratios uc, ur makes z = D.
CDPO_CONFIGS = [("cdpo_ls0.1", {"loss_type": "sigmoid", "label_smoothing": 0.1}),
                ("cdpo_ls0.25", {"loss_type": "sigmoid", "label_smoothing": 0.25})]


def run_cdpo(case, settings):
  beta = case["beta"]
  trainer_self = types.SimpleNamespace(accelerator=Accelerator(), alpha=0.0, beta=beta,
                                       loss_type=settings["loss_type"],
                                       label_smoothing=settings["label_smoothing"])
  t = {k: torch.tensor(case[k], dtype=DTYPE) for k in ("pc", "pr", "qc", "qr")}
  uc, ur = t["pc"] - t["qc"], t["pr"] - t["qr"]  # exact: dyadic inputs
  losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer_self, uc, ur)
  assert losses.dtype == DTYPE
  return {"loss": num(losses.mean()), "per_example_loss": {"cdpo": lst(losses)},
          "chosen_rewards": lst(chosen_rewards), "rejected_rewards": lst(rejected_rewards)}


ORPO_CONFIGS = [("orpo_b0.1", {"beta": 0.1}), ("orpo_b0.5", {"beta": 0.5})]


def run_orpo(case, settings):
  batch, model = pair_batch(case)
  trainer_self = types.SimpleNamespace(
      accelerator=Accelerator(), is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
      beta=settings["beta"],
      concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps,
  )
  trainer_self.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, trainer_self)
  trainer_self.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, trainer_self)
  names = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps", "policy_rejected_logps",
           "policy_nll_loss", "log_odds_ratio", "log_odds_chosen")
  with capture_locals(ORPOTrainer.get_batch_loss_metrics.__code__, names) as (seen, _):
    loss, metrics = ORPOTrainer.get_batch_loss_metrics(trainer_self, model, batch)
  nll = num(seen["policy_nll_loss"])
  # odds_ratio_loss casts its inputs with .float(): the ratio term is computed in float32 by TRL.
  assert seen["losses"].dtype == torch.float32
  return {
      "loss": num(loss),
      "per_example_loss": {"odds_ratio": lst(seen["losses"])},
      "log_odds_ratio_mean": num(seen["log_odds_ratio"]),
      "log_odds_chosen_mean": num(seen["log_odds_chosen"]),
      "nll_loss": nll,
      "trl_policy_logps": {"chosen": lst(seen["policy_chosen_logps"]), "rejected": lst(seen["policy_rejected_logps"])},
      "chosen_rewards": lst(seen["chosen_rewards"]),
      "rejected_rewards": lst(seen["rejected_rewards"]),
  }


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def dumps(obj, indent=0):
  """JSON with lists of scalars on one line (keeps the file small and diffable)."""
  pad = " " * indent
  if isinstance(obj, dict):
    if not obj:
      return "{}"
    items = [f'{pad}  {json.dumps(k)}: {dumps(v, indent + 2)}' for k, v in obj.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
  if isinstance(obj, list):
    if all(not isinstance(v, (dict, list)) for v in obj) or all(
        isinstance(v, list) and all(not isinstance(w, (dict, list)) for w in v) for v in obj):
      return json.dumps(obj, separators=(", ", ": "))
    items = [f"{pad}  {dumps(v, indent + 2)}" for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + pad + "]"
  return json.dumps(obj)


def main():
  torch.manual_seed(0)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  rng = np.random.default_rng(SEED)
  cases = make_cases(rng)
  kcases = kto_cases(rng)

  results = []
  for case in cases:
    for cname, loss_types, weights, settings in (DPO_CONFIGS if "only" not in case else []):
      if "ld_alpha" in settings and case["name"] not in LD_CASES:
        continue
      dtype = torch.float64
      note = None
      if settings.get("f_divergence_type") == "alpha_divergence":
        # TRL's alpha-divergence branch looks up a clamp for the dtype in {fp16: 11, bf16: 80, fp32: 80}:
        # float64 raises KeyError, so these rows are run by TRL in float32 (inputs are exact in float32).
        try:
          run_dpo(case, loss_types, weights, settings, torch.float64)
          raise AssertionError("alpha_divergence now works in float64: drop the float32 fallback")
        except KeyError:
          dtype = torch.float32
          note = "float32: TRL's alpha_divergence has no float64 clamp entry (KeyError)"
      rec = run_dpo(case, loss_types, weights, settings, dtype)
      full = {"case": case["name"], "config": cname, "trainer": "DPOTrainer",
              "loss_type": loss_types, "loss_weights": weights or [1.0] * len(loss_types),
              "settings": {"beta": case["beta"], **settings}, "dtype": str(dtype).replace("torch.", "")}
      if loss_types[0] in ROW_ORDER_SORTED:
        full["per_example_order"] = "sorted"
      if note:
        full["note"] = note
      full.update(rec)
      results.append(full)

    for cname, settings in (CDPO_CONFIGS if "only" not in case else []):
      rec = run_cdpo(case, settings)
      results.append({"case": case["name"], "config": cname, "trainer": "CPOTrainer.cpo_loss",
                      "loss_type": ["sigmoid"], "settings": settings, "dtype": "float64", **rec})
    for cname, settings in CPO_CONFIGS:
      rec = run_cpo(case, settings)
      results.append({"case": case["name"], "config": cname, "trainer": "CPOTrainer",
                      "loss_type": [settings["loss_type"]], "settings": settings, "dtype": "float64", **rec})
    for cname, settings in ORPO_CONFIGS:
      rec = run_orpo(case, settings)
      results.append({"case": case["name"], "config": cname, "trainer": "ORPOTrainer",
                      "loss_type": ["orpo"], "settings": settings,
                      "dtype": "float32", **rec})

  for case in kcases:
    for cname, loss_type, settings in KTO_CONFIGS:
      rec = run_kto(case, loss_type, settings)
      results.append({"case": case["name"], "config": cname, "trainer": "KTOTrainer",
                      "loss_type": [loss_type], "settings": {"beta": case["beta"], **settings},
                      "dtype": "float64", **rec})

  def strip(c, keep_tokens):
    c = dict(c)
    if not keep_tokens:
      c.pop("tokens")
    return c

  doc = {
      "generated_by": "third_party/trl_fixtures/generate.py",
      "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                   "numpy": np.__version__, "python": platform.python_version()},
      "seed": SEED,
      "functions": {
          "DPOTrainer": "trl.trainer.dpo_trainer.DPOTrainer._compute_loss",
          "KTOTrainer": "trl.trainer.kto_trainer.KTOTrainer._compute_loss",
          "CPOTrainer": "trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics",
          "ORPOTrainer": "trl.experimental.orpo.ORPOTrainer.get_batch_loss_metrics",
      },
      "conventions": [
          "pc, pr, qc, qr: summed completion log-probs (policy chosen/rejected, reference chosen/rejected); "
          "nc, nr: completion lengths. All log-probs are multiples of 1/64 (exact in float32).",
          "loss = the scalar TRL returns; per_example_loss[loss_type] = TRL's per-example vector "
          "(DPO: per_sequence_loss; the returned loss is sum_k loss_weights[k] * mean(per_example_loss[k])).",
          "DPO chosen/rejected_rewards = beta * (policy - reference) log-ratios, row order.",
          "tokens (stored for the golden and random cases only) hold the per-token log-probs the stand-in models returned; "
          "every other case used the same kind of split, which only matters for ld_alpha.",
          "KTO: per_example_loss is in the case's row order (TRL orders [desirable, undesirable]; trl_order "
          "gives TRL's order); z0 = TRL's clamped KL estimate.",
          "ORPO: per_example_loss['odds_ratio'] = TRL's `losses` = beta*logsigmoid(log_odds) (<= 0; "
          "TRL's loss = nll_loss - mean(losses)); nll_loss is TRL's token-mean over prompt+completion "
          "tokens of the stand-in (prompt tokens have log-prob 0), so only the ratio term is comparable.",
          "cdpo_* results: TRL 1.16's DPOTrainer has no cDPO ('sigmoid' ignores label_smoothing); they are "
          "CPOTrainer.cpo_loss(loss_type='sigmoid', label_smoothing=e) called directly on the log-ratios "
          "(policy_chosen_logps := pc - qc, policy_rejected_logps := pr - qr), i.e. cDPO on D.",
          "per_example_order 'sorted': aot / aot_unpaired per-sequence losses are over TRL's batch-sorted rows.",
          "dtype float32: TRL's alpha_divergence branch looks its exp clamp up in {fp16, bf16, fp32} and raises "
          "KeyError for float64, so those rows ran in float32; ORPO's odds_ratio_loss casts to .float() itself "
          "(its log-prob averages and nll_loss are float64).",
          "CPO: inputs to cpo_loss are TRL's own length-averaged log-probs (simpo/ipo) or sums (sigmoid/hinge), "
          "recorded in trl_policy_logps; nll_loss is TRL's token-mean NLL over the chosen completions.",
      ],
      "cases": [strip(c, c["name"] in LD_CASES) for c in cases],
      "kto_cases": [strip(c, False) for c in kcases],
      "results": results,
  }
  text = dumps(doc) + "\n"
  OUT.write_text(text, encoding="utf-8")
  print(f"wrote {OUT} ({len(text) / 1024:.1f} KB, {len(results)} results)")


if __name__ == "__main__":
  main()

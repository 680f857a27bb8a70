"""Preference-optimisation losses on paired policy log-probs (METHODS.md section 2, DPO family).

Contract (as in `reward.py`; see `docs/losses.md`):
- pure and jittable; data arrays positional, hyper-parameters keyword-only, string and bool
  options static (plain Python values); inputs are cast to float32;
- the positional parameter names are the inputs the trainer computes and passes by keyword
  (vocabulary: `INPUTS`; `required_inputs(fn)`). A kernel that names no reference input is
  reference-free and the trainer skips the reference model (`uses_reference(fn)`);
- `mask [B]` float (1 = valid pair, default all valid); masked rows are zeroed before any
  arithmetic, so whatever they hold (inf, NaN) they change neither values nor gradients;
- returns `(loss_sum, denom, metrics)`, float32 scalars: the batch loss is
  `loss_sum / max(denom, eps)` and `denom` is the number of valid pairs unless a docstring
  says otherwise (a weighted mean: `denom` is the weight sum);
- `metrics` hold only loss-specific extras (the trainer adds the implicit-reward metrics),
  as sums over the units of `denom` (keys `num_*` are totals), without gradient;
- an all-masked batch gives `(0, 0, metrics)` and zero gradients; `-logsig(x)` is written
  `softplus(-x)` and exponentials are capped, so log-probs of +-1e4 stay finite.

Notation (METHODS.md): `uc = pc - qc`, `ur = pr - qr`, `D = uc - ur`, `x = beta * D`.
"""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import mask_rows as _mask, rows as _rows, wsum as _wsum
from alignjax.losses.registry import register

_f32 = jnp.float32
sp = jax.nn.softplus
sig = jax.nn.sigmoid
logsig = jax.nn.log_sigmoid
sg = jax.lax.stop_gradient
EXP_MAX = 80.0  # cap on exponent arguments (float32; e^80 ~ 5.5e34)

INPUTS = {
    "pc": "[B] summed completion log-prob of the chosen response under the policy",
    "pr": "[B] summed completion log-prob of the rejected response under the policy",
    "qc": "[B] summed completion log-prob of the chosen response under the frozen reference",
    "qr": "[B] summed completion log-prob of the rejected response under the frozen reference",
    "nc": "[B] chosen completion token count (clamped to >= 1 in the kernel)",
    "nr": "[B] rejected completion token count (clamped to >= 1 in the kernel)",
    "tlp_c": "[B,T] per-token policy log-probs of the chosen completion",
    "tlp_r": "[B,T] per-token policy log-probs of the rejected completion",
    "tq_c": "[B,T] per-token reference log-probs of the chosen completion",
    "tq_r": "[B,T] per-token reference log-probs of the rejected completion",
    "tmask_c": "[B,T] chosen completion-token mask",
    "tmask_r": "[B,T] rejected completion-token mask",
    "rt_c": "[B,T] token rewards of the chosen completion (T-REG; computed offline)",
    "rt_r": "[B,T] token rewards of the rejected completion (T-REG; computed offline)",
    "score_c": "[B] reward-model score of the chosen response (frozen RM)",
    "score_r": "[B] reward-model score of the rejected response (frozen RM)",
    "consistency": "[B] or scalar CREAM consistency C in [0, 1] (from cream_consistency)",
    "y0_ratio": "[B] logpi(y0|x) - logpi_ref(y0|x) for one reference sample y0 per prompt",
}


def required_inputs(fn) -> tuple[str, ...]:
  """Names of `fn`'s positional parameters: the inputs the trainer must pass (see INPUTS)."""
  return tuple(p.name for p in inspect.signature(fn).parameters.values()
               if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                             inspect.Parameter.POSITIONAL_OR_KEYWORD))


def uses_reference(fn) -> bool:
  """True if `fn` needs the frozen reference model (qc, qr, tq_*, or y0_ratio)."""
  return any(n.startswith(("q", "tq_")) or n == "y0_ratio" for n in required_inputs(fn))


# ---------------------------------------------------------------------------- helpers


def _batch(mask, **xs):
  """(mask [B], *xs as float32 [B] with masked rows set to 0); scalars are broadcast."""
  first = next(iter(xs.values()))
  chex.assert_rank(first, 1)
  b = first.shape[0]
  mask_B = _mask(mask, b)
  keep_B = mask_B != 0
  return (mask_B, *(jnp.where(keep_B, _rows(x, b, name), 0.0) for name, x in xs.items()))


def _logratios(pc, pr, qc, qr, mask):
  """(mask, uc, ur, D) [B]."""
  mask_B, pc_B, pr_B, qc_B, qr_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr)
  uc_B, ur_B = pc_B - qc_B, pr_B - qr_B
  return mask_B, uc_B, ur_B, uc_B - ur_B


def _lengths(n_B):
  return jnp.maximum(n_B, 1.0)


def _out(l_B, mask_B, **metrics):
  return _wsum(mask_B, l_B), jnp.sum(mask_B), sg(metrics)


def _smooth(x_B, eps):
  """(1 - eps) softplus(-x) + eps softplus(x): label smoothing as in cDPO."""
  return (1.0 - eps) * sp(-x_B) + eps * sp(x_B)


def _check(cond, msg):
  if not cond:
    raise ValueError(msg)


def _concrete(x):
  return isinstance(x, (int, float))


def _cap_exp(z):
  return jnp.exp(jnp.minimum(z, EXP_MAX))


# ---------------------------------------------------------------------------- DPO family


@register("dpo_sigmoid", "dpo")
def dpo_sigmoid(pc, pr, qc, qr, *, beta=0.1, mask=None):
  """DPO (sigmoid) loss: l = softplus(-beta D), D = (pc - qc) - (pr - qr).

  *Direct Preference Optimization: Your Language Model is Secretly a Reward Model*; method
  id `dpo_sigmoid`. Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, _, _, d_B = _logratios(pc, pr, qc, qr, mask)
  return _out(sp(-beta * d_B), mask_B)


@register("dpo_cdpo", "dpo")
def dpo_cdpo(pc, pr, qc, qr, *, beta=0.1, eps=0.1, mask=None):
  """Conservative DPO (label smoothing): l = (1-eps) softplus(-x) + eps softplus(x), x = beta D.

  eps in [0, .5] (TRL's `label_smoothing`). cDPO: *A note on DPO with noisy preferences*;
  method id `dpo_cdpo`. Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  _check(not _concrete(eps) or 0 <= eps <= 0.5, f"dpo_cdpo: eps must be in [0, .5], got {eps}.")
  mask_B, _, _, d_B = _logratios(pc, pr, qc, qr, mask)
  return _out(_smooth(beta * d_B, eps), mask_B)


@register("dpo_robust", "dpo")
def dpo_robust(pc, pr, qc, qr, *, beta=0.1, eps=0.1, mask=None):
  """Robust DPO (unbiased under label-flip rate eps): l = ((1-eps) sp(-x) - eps sp(x)) / (1-2eps).

  x = beta D, eps in [0, .5); the loss can be negative. *Provably Robust DPO: Aligning
  Language Models with Noisy Feedback*; method id `dpo_robust`.
  Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  _check(not _concrete(eps) or 0 <= eps < 0.5, f"dpo_robust: eps must be in [0, .5), got {eps}.")
  mask_B, _, _, d_B = _logratios(pc, pr, qc, qr, mask)
  x_B = beta * d_B
  return _out(((1.0 - eps) * sp(-x_B) - eps * sp(x_B)) / (1.0 - 2.0 * eps), mask_B)


@register("ipo", "dpo")
def ipo(pc, pr, qc, qr, nc, nr, *, beta=0.1, length_norm=False, mask=None):
  """IPO: l = (D - 1/(2 beta))^2 on summed log-probs (original, OpenRLHF).

  `length_norm=True` (TRL's form): l = (uc/nc - ur/nr - 1/(2 beta))^2, uc = pc - qc,
  ur = pr - qr, n clamped to >= 1 (nc, nr are unused otherwise).
  *A General Theoretical Paradigm to Understand Learning from Human Preferences*; method id
  `ipo`. Shapes: pc, pr, qc, qr, nc, nr, mask [B]. Denominator: valid pairs.
  """
  mask_B, pc_B, pr_B, qc_B, qr_B, nc_B, nr_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr,
                                                      nc=nc, nr=nr)
  uc_B, ur_B = pc_B - qc_B, pr_B - qr_B
  if length_norm:
    uc_B, ur_B = uc_B / _lengths(nc_B), ur_B / _lengths(nr_B)
  return _out(jnp.square(uc_B - ur_B - 0.5 / beta), mask_B)


@register("hinge", "dpo")
def hinge(pc, pr, qc, qr, *, beta=0.1, mask=None):
  """Hinge (SLiC-style, with reference): l = relu(1 - beta D).

  *SLiC-HF: Sequence Likelihood Calibration with Human Feedback*; method id `hinge` (the
  reference-free original is `slic_ref_free`). Shapes: pc, pr, qc, qr, mask [B].
  Denominator: valid pairs.
  """
  mask_B, _, _, d_B = _logratios(pc, pr, qc, qr, mask)
  return _out(jax.nn.relu(1.0 - beta * d_B), mask_B)


@register("slic_ref_free", "dpo")
def slic_ref_free(pc, pr, *, delta=1.0, lam=0.1, mask=None):
  """Reference-free SLiC-HF: l = relu(delta - (pc - pr)) + lam * (-pc).

  The regulariser is the summed NLL of the chosen (target) response; lam = .1 is `proposed`
  (the paper tunes it). *SLiC-HF: Sequence Likelihood Calibration with Human Feedback*;
  method id `hinge` (`slic_ref_free`). Shapes: pc, pr, mask [B]. Denominator: valid pairs.
  Extra metric: `nll` (sum of -pc).
  """
  mask_B, pc_B, pr_B = _batch(mask, pc=pc, pr=pr)
  return _out(jax.nn.relu(delta - (pc_B - pr_B)) - lam * pc_B, mask_B,
              nll=_wsum(mask_B, -pc_B))


@register("exo_pair", "dpo")
def exo_pair(pc, pr, qc, qr, *, beta=0.1, eps=1e-3, mask=None):
  """EXO (pairwise): reverse KL from the policy's pair distribution to a smoothed label.

  l = sig(x) (logsig(x) - log(1-eps)) + sig(-x) (logsig(-x) - log eps), x = beta D,
  eps in (0, 1). *Towards Efficient Exact Optimization of Language Model Alignment*;
  method id `exo_pair`. Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  _check(not _concrete(eps) or 0 < eps < 1, f"exo_pair: eps must be in (0, 1), got {eps}.")
  mask_B, _, _, d_B = _logratios(pc, pr, qc, qr, mask)
  x_B = beta * d_B
  l_B = (sig(x_B) * (logsig(x_B) - jnp.log1p(-eps))
         + sig(-x_B) * (logsig(-x_B) - jnp.log(eps)))
  return _out(l_B, mask_B)


@register("nca_pair", "dpo")
def nca_pair(pc, pr, qc, qr, *, beta=0.1, mask=None):
  """NCA (pairwise): l = softplus(-beta uc) + .5 softplus(beta uc) + .5 softplus(beta ur).

  *Noise Contrastive Alignment of Language Models with Explicit Rewards*; method id
  `nca_pair`. Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, uc_B, ur_B, _ = _logratios(pc, pr, qc, qr, mask)
  return _out(sp(-beta * uc_B) + 0.5 * sp(beta * uc_B) + 0.5 * sp(beta * ur_B), mask_B)


@register("bco_pair", "dpo")
def bco_pair(pc, pr, qc, qr, *, beta=0.1, delta=0.0, mask=None):
  """BCO (pairwise): l = softplus(delta - beta uc) + softplus(beta ur - delta).

  `delta` defaults to 0 (older TRL used a running mean of the rewards; pass it as a scalar).
  *Binary Classifier Optimization for Large Language Model Alignment*; method id
  `bco_pair`. Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, uc_B, ur_B, _ = _logratios(pc, pr, qc, qr, mask)
  return _out(sp(delta - beta * uc_B) + sp(beta * ur_B - delta), mask_B)


@register("sppo_hard", "dpo")
def sppo_hard(pc, pr, qc, qr, *, beta=0.1, mask=None):
  """SPPO (hard labels): l = (uc - 1/(2 beta))^2 + (ur + 1/(2 beta))^2.

  *Self-Play Preference Optimization for Language Model Alignment*; method id `sppo_hard`.
  Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, uc_B, ur_B, _ = _logratios(pc, pr, qc, qr, mask)
  return _out(jnp.square(uc_B - 0.5 / beta) + jnp.square(ur_B + 0.5 / beta), mask_B)


@register("apo_zero", "dpo")
def apo_zero(pc, pr, qc, qr, *, beta=0.1, mask=None):
  """APO-zero (winner up, loser down): l = 1 - sig(beta uc) + sig(beta ur).

  *Anchored Preference Optimization and Contrastive Revisions*; method id `apo_zero`.
  Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, uc_B, ur_B, _ = _logratios(pc, pr, qc, qr, mask)
  return _out(1.0 - sig(beta * uc_B) + sig(beta * ur_B), mask_B)


@register("apo_down", "dpo")
def apo_down(pc, pr, qc, qr, *, beta=0.1, mask=None):
  """APO-down (both down, loser more): l = sig(beta uc) + 1 - sig(beta D).

  *Anchored Preference Optimization and Contrastive Revisions*; method id `apo_down`.
  Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, uc_B, _, d_B = _logratios(pc, pr, qc, qr, mask)
  return _out(sig(beta * uc_B) + 1.0 - sig(beta * d_B), mask_B)


@register("discopop", "dpo")
def discopop(pc, pr, qc, qr, *, beta=0.1, tau=0.05, mask=None):
  """DiscoPOP (log-ratio modulated loss): a sigmoid(x/tau) blend of logistic and exp losses.

  l = (1 - sig(x/tau)) softplus(-x) + exp(logsig(x/tau) - x), x = beta D (the second term
  is sig(x/tau) exp(-x) written without 0 * inf; its exponent is capped at 80).
  *Discovering Preference Optimization Algorithms with and for Large Language Models*;
  method id `discopop`. Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, _, _, d_B = _logratios(pc, pr, qc, qr, mask)
  x_B = beta * d_B
  return _out(sig(-x_B / tau) * sp(-x_B) + _cap_exp(logsig(x_B / tau) - x_B), mask_B)


def _sort_valid(x_B, keep_B):
  """x sorted ascending over kept rows; masked rows (already 0) are moved to the end."""
  order_B = jnp.argsort(jnp.where(keep_B, x_B, jnp.inf), stable=True)
  return x_B[order_B]


def _aot_out(a_B, b_B, mask_B, beta, eps):
  keep_B = mask_B != 0
  valid_B = (jnp.arange(a_B.shape[0]) < jnp.sum(keep_B)).astype(_f32)
  x_B = beta * (_sort_valid(a_B, keep_B) - _sort_valid(b_B, keep_B))
  return _out(_smooth(x_B, eps), valid_B)


@register("aot", "dpo")
def aot(pc, pr, qc, qr, *, beta=0.1, eps=0.0, mask=None):
  """AOT (paired): DPO on the batch-sorted policy and reference log-ratio margins.

  l_i = (1-eps) softplus(-x_i) + eps softplus(x_i), x = beta (sort(pc - pr) - sort(qc - qr)),
  `eps` as in cDPO. The sort runs over the rows passed to the kernel (in-batch: per
  micro-batch and, inside shard_map, per shard, as TRL sorts per process); masked rows are
  excluded from the sort (mask used as 0/1: rows are re-paired, so row weights do not apply).
  *Distributional Preference Alignment of LLMs via Optimal Transport*; method id `aot`.
  Shapes: pc, pr, qc, qr, mask [B]. Denominator: valid pairs.
  """
  mask_B, pc_B, pr_B, qc_B, qr_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr)
  return _aot_out(pc_B - pr_B, qc_B - qr_B, mask_B, beta, eps)


@register("aot_unpaired", "dpo")
def aot_unpaired(pc, pr, qc, qr, *, beta=0.1, eps=0.0, mask=None):
  """AOT (unpaired): DPO on batch-sorted chosen and rejected log-ratios (TRL's former aot_pair).

  l_i = (1-eps) softplus(-x_i) + eps softplus(x_i), x = beta (sort(uc) - sort(ur)); sort
  scope and masking as in `aot`. *Distributional Preference Alignment of LLMs via Optimal
  Transport*; method id `aot_unpaired`. Shapes: pc, pr, qc, qr, mask [B].
  Denominator: valid pairs.
  """
  mask_B, uc_B, ur_B, _ = _logratios(pc, pr, qc, qr, mask)
  return _aot_out(uc_B, ur_B, mask_B, beta, eps)


@register("simpo", "dpo")
def simpo(pc, pr, nc, nr, *, beta=2.0, gamma=0.5, mask=None):
  """SimPO (reference-free, length-normalised): l = softplus(gamma - beta (pc/nc - pr/nr)).

  Defaults beta = 2, gamma = .5 (TRL; the paper's default gamma is 1, `recalled - verify`).
  *SimPO: Simple Preference Optimization with a Reference-Free Reward*; method id `simpo`.
  Shapes: pc, pr, nc, nr, mask [B] (n clamped to >= 1). Denominator: valid pairs.
  """
  mask_B, pc_B, pr_B, nc_B, nr_B = _batch(mask, pc=pc, pr=pr, nc=nc, nr=nr)
  return _out(sp(gamma - beta * (pc_B / _lengths(nc_B) - pr_B / _lengths(nr_B))), mask_B)


def _log_odds(a_B):
  """log(p / (1 - p)) for log p = a, with a clamped to <= -1e-6."""
  a_B = jnp.minimum(a_B, -1e-6)
  return a_B - jnp.log(-jnp.expm1(a_B))


@register("orpo", "dpo")
def orpo(pc, pr, nc, nr, *, lam=0.1, mask=None):
  """ORPO (reference-free): per-token NLL plus an odds-ratio term.

  a = p/n clamped to <= -1e-6, lo(a) = a - log(-expm1(a));
  l = -a_c + lam softplus(-(lo(a_c) - lo(a_r))).
  *ORPO: Monolithic Preference Optimization without Reference Model*; method id `orpo`.
  Shapes: pc, pr, nc, nr, mask [B] (n clamped to >= 1). Denominator: valid pairs.
  Extra metrics: `nll` (sum of -a_c), `log_odds_ratio` (sum of lo(a_c) - lo(a_r)).
  """
  mask_B, pc_B, pr_B, nc_B, nr_B = _batch(mask, pc=pc, pr=pr, nc=nc, nr=nr)
  ac_B, ar_B = pc_B / _lengths(nc_B), pr_B / _lengths(nr_B)
  lor_B = _log_odds(ac_B) - _log_odds(ar_B)
  return _out(lam * sp(-lor_B) - ac_B, mask_B, nll=_wsum(mask_B, -ac_B),
              log_odds_ratio=_wsum(mask_B, lor_B))


RPO_NLL_NORMS = ("completion", "none")


@register("rpo", "dpo")
def rpo(pc, pr, qc, qr, nc, *, beta=0.1, alpha=1.0, nll_norm="completion", mask=None):
  """RPO: DPO plus an NLL term on the chosen response, l = softplus(-beta D) + alpha nll.

  nll = -pc / nc with `nll_norm="completion"` (METHODS form; nc clamped to >= 1) or -pc
  with "none". TRL's NLL is a batch token mean, sum(-pc) / sum(nc): equal when all nc are
  equal, else `nll_norm="none", alpha=alpha * B / sum(nc)`. The paper normalises by |x| + |y| (`recalled - verify`); the prompt length is
  not an input here. *Iterative Reasoning Preference Optimization*; method id `rpo`.
  Shapes: pc, pr, qc, qr, nc, mask [B]. Denominator: valid pairs. Extra metric: `nll`.
  """
  _check(nll_norm in RPO_NLL_NORMS, f"rpo: nll_norm must be one of {RPO_NLL_NORMS}, "
         f"got {nll_norm!r}.")
  mask_B, pc_B, pr_B, qc_B, qr_B, nc_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr, nc=nc)
  d_B = (pc_B - qc_B) - (pr_B - qr_B)
  nll_B = -pc_B / _lengths(nc_B) if nll_norm == "completion" else -pc_B
  return _out(sp(-beta * d_B) + alpha * nll_B, mask_B, nll=_wsum(mask_B, nll_B))


FDIV_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


@register("dpo_fdiv", "dpo")
def dpo_fdiv(pc, pr, qc, qr, *, beta=0.1, divergence="reverse_kl", alpha=0.5, mask=None):
  """f-DPO: DPO with an f-divergence constraint, l = softplus(-beta (psi(uc) - psi(ur))).

  psi(u): reverse_kl u (= `dpo_sigmoid`); forward_kl -exp(-u); js logsig(u);
  alpha (1 - exp(-alpha u)) / alpha with alpha in (0, 1] (-> reverse KL as alpha -> 0,
  forward KL at 1; TRL's alpha_T is 1 - alpha). Exponents are capped at 80.
  *Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
  Constraints*; method id `dpo_fdiv`. Shapes: pc, pr, qc, qr, mask [B].
  Denominator: valid pairs.
  """
  _check(divergence in FDIV_DIVERGENCES, f"dpo_fdiv: divergence must be one of "
         f"{FDIV_DIVERGENCES}, got {divergence!r}.")
  if divergence == "alpha":
    _check(not _concrete(alpha) or 0 < alpha <= 1,
           f"dpo_fdiv: alpha must be in (0, 1], got {alpha}.")
  psi = {"reverse_kl": lambda u: u,
         "forward_kl": lambda u: -_cap_exp(-u),
         "js": logsig,
         "alpha": lambda u: -jnp.expm1(jnp.minimum(-alpha * u, EXP_MAX)) / alpha}[divergence]
  mask_B, uc_B, ur_B, _ = _logratios(pc, pr, qc, qr, mask)
  return _out(sp(-beta * (psi(uc_B) - psi(ur_B))), mask_B)


DYNAMIC_BETA_MODES = ("beta", "margin", "weight")


@register("dpo_dynamic_beta", "dpo")
def dpo_dynamic_beta(pc, pr, qc, qr, score_c, score_r, *, beta=0.1, w=0.1, k=1.0,
                     mode="beta", mask=None):
  """DPO with a per-pair beta driven by a frozen reward model's margin.

  delta = sg(score_c - score_r), f = 1 + w (1 - exp(-k max(delta, 0))) (delta clipped at 0);
  mode "beta" (default; alias "margin"): beta_i = max(1e-3, beta f), l = softplus(-beta_i D);
  mode "weight" (the abstract's literal wording): l = f softplus(-beta D).
  *MM-RLHF: The Next Step Forward in Multimodal LLM Alignment*; method id
  `dpo_dynamic_beta` (formula `recalled - verify`). Shapes: pc, pr, qc, qr, score_c,
  score_r, mask [B]. Denominator: valid pairs. Extra metric: `beta` (sum of beta_i) or,
  in weight mode, `scale` (sum of f).
  """
  _check(mode in DYNAMIC_BETA_MODES, f"dpo_dynamic_beta: mode must be one of "
         f"{DYNAMIC_BETA_MODES}, got {mode!r}.")
  mask_B, pc_B, pr_B, qc_B, qr_B, sc_B, sr_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr,
                                                      score_c=score_c, score_r=score_r)
  d_B = (pc_B - qc_B) - (pr_B - qr_B)
  delta_B = sg(jnp.maximum(sc_B - sr_B, 0.0))
  f_B = 1.0 - w * jnp.expm1(-k * delta_B)
  if mode == "weight":
    return _out(f_B * sp(-beta * d_B), mask_B, scale=_wsum(mask_B, f_B))
  beta_B = jnp.maximum(1e-3, beta * f_B)
  return _out(sp(-beta_B * d_B), mask_B, beta=_wsum(mask_B, beta_B))


GAPO_MODES = ("margin", "weight")


@register("gapo", "dpo")
def gapo(pc, pr, qc, qr, score_c, score_r, *, beta=0.1, gamma=1.0, g_scale=1.0,
         mode="margin", mask=None):
  """GAPO (`proposed` form): DPO with a reward-gap margin or weight.

  gh = sg(clip(max(0, score_c - score_r) / g_scale, 0, 1)) (scores averaged over RM
  dimensions upstream). mode "margin" (default): l = softplus(-(beta D - gamma gh)), mean
  over pairs. mode "weight": sum(gh softplus(-beta D)) / sum(gh), so denom = sum(mask gh)
  (`gamma` unused). Closest published analogue: ODPO, *Direct Preference Optimization with
  an Offset*. *Aligning Anime Video Generation with Human Feedback*; method id `gapo`.
  Shapes: pc, pr, qc, qr, score_c, score_r, mask [B]. Extra metric (margin mode): `gap`
  (sum of gh).
  """
  _check(mode in GAPO_MODES, f"gapo: mode must be one of {GAPO_MODES}, got {mode!r}.")
  mask_B, pc_B, pr_B, qc_B, qr_B, sc_B, sr_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr,
                                                      score_c=score_c, score_r=score_r)
  d_B = (pc_B - qc_B) - (pr_B - qr_B)
  gh_B = sg(jnp.clip(jnp.maximum(sc_B - sr_B, 0.0) / g_scale, 0.0, 1.0))
  if mode == "weight":
    return _out(sp(-beta * d_B), mask_B * gh_B)
  return _out(sp(gamma * gh_B - beta * d_B), mask_B, gap=_wsum(mask_B, gh_B))


@register("cream", "dpo")
def cream(pc, pr, qc, qr, consistency, *, beta=0.1, mask=None):
  """CREAM: consistency-weighted DPO, l = C softplus(-beta D) + (1 - C) softplus(beta D).

  C = `consistency` [B] or a dataset-wide scalar (from `cream_consistency`); equals
  `dpo_cdpo` with eps = 1 - C. *CREAM: Consistency Regularized Self-Rewarding Language
  Models*; method id `cream`. Shapes: pc, pr, qc, qr, consistency, mask [B].
  Denominator: valid pairs.
  """
  mask_B, pc_B, pr_B, qc_B, qr_B, c_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr,
                                               consistency=consistency)
  d_B = (pc_B - qc_B) - (pr_B - qr_B)
  return _out(_smooth(beta * d_B, 1.0 - sg(c_B)), mask_B)


@register("selm", "dpo")
def selm(pc, pr, qc, qr, y0_ratio, *, beta=0.01, alpha=1e-3, mask=None):
  """SELM: DPO plus an optimism term, l = softplus(-beta D) + alpha beta y0_ratio.

  y0_ratio = logpi(y0|x) - logpi_ref(y0|x) for one sample y0 ~ pi_ref per prompt;
  minimising lowers the likelihood of reference samples. Defaults alpha = 1e-3, beta = .01.
  *Self-Exploring Language Models: Active Preference Elicitation for Online Alignment*;
  method id `selm`. Shapes: pc, pr, qc, qr, y0_ratio, mask [B]. Denominator: valid pairs.
  Extra metric: `y0_ratio` (its sum).
  """
  mask_B, pc_B, pr_B, qc_B, qr_B, y0_B = _batch(mask, pc=pc, pr=pr, qc=qc, qr=qr,
                                                y0_ratio=y0_ratio)
  d_B = (pc_B - qc_B) - (pr_B - qr_B)
  return _out(sp(-beta * d_B) + alpha * beta * y0_B, mask_B, y0_ratio=_wsum(mask_B, y0_B))


def _tokens(keep_B, tmask, *xs):
  """Token mask and arrays [B,T] as float32, zero outside valid rows and completion tokens."""
  chex.assert_rank(tmask, 2)
  chex.assert_equal_shape([tmask, *xs])
  tm_BxT = jnp.asarray(tmask, _f32)
  keep_BxT = keep_B[:, None] & (tm_BxT != 0)
  return (jnp.where(keep_BxT, tm_BxT, 0.0),
          *(jnp.where(keep_BxT, jnp.asarray(x, _f32), 0.0) for x in xs))


@register("t_reg", "dpo")
def t_reg(tlp_c, tlp_r, tq_c, tq_r, tmask_c, tmask_r, rt_c, rt_r, *, beta=0.1, alpha=1.0,
          mask=None):
  """T-REG: DPO plus a token-reward-weighted sequence DPO regulariser (`proposed` form).

  ell = tlp - tq (token log-ratio); om_c = 2 sig(rt_c), om_r = 2 sig(-rt_r) (rt under sg);
  R = sum_t tmask om ell; D = sum_t tmask_c ell_c - sum_t tmask_r ell_r;
  l = softplus(-beta D) + alpha softplus(-beta (R_c - R_r)).
  *T-REG: Preference Optimization with Token-Level Reward Regularization*; method id
  `t_reg`. Shapes: tlp_*, tq_*, tmask_*, rt_* [B,T_c] / [B,T_r]; mask [B].
  Denominator: valid pairs. Extra metric: `regularizer` (sum of the softplus term).
  """
  chex.assert_rank(tlp_c, 2)
  b = tlp_c.shape[0]
  chex.assert_axis_dimension(tlp_r, 0, b)
  mask_B = _mask(mask, b)
  keep_B = mask_B != 0
  tm_c, lp_c, q_c, r_c = _tokens(keep_B, tmask_c, tlp_c, tq_c, rt_c)
  tm_r, lp_r, q_r, r_r = _tokens(keep_B, tmask_r, tlp_r, tq_r, rt_r)
  ell_c, ell_r = tm_c * (lp_c - q_c), tm_r * (lp_r - q_r)
  d_B = jnp.sum(ell_c, axis=1) - jnp.sum(ell_r, axis=1)
  reg_c = jnp.sum(2.0 * sig(sg(r_c)) * ell_c, axis=1)
  reg_r = jnp.sum(2.0 * sig(-sg(r_r)) * ell_r, axis=1)
  reg_B = sp(-beta * (reg_c - reg_r))
  return _out(sp(-beta * d_B) + alpha * reg_B, mask_B, regularizer=_wsum(mask_B, reg_B))

"""Reward-model evaluation: metrics on precomputed scores (`metrics`) and reports with plots
(`report`). See docs/evaluation.md."""

from alignjax.evaluation.metrics import (
    REWARDBENCH_COUNTS,
    REWARDBENCH_SECTIONS,
    alignment_gap,
    best_of_k_acc,
    by_language,
    contrast_consistency,
    derangement_pairs,
    ece,
    filler_delta,
    fit_temperature,
    idealized_ranking_acc,
    kendall_tau,
    length_bias_flag,
    length_bias_probe,
    length_slope,
    offtopic_long_rate,
    one_vs_many_mrr,
    pairwise_acc,
    ranking_acc,
    rb_score,
    reliability,
    reward_histogram,
    wilson_ci,
)
from alignjax.evaluation.report import compare_report, headline, write_report

"""Policy-gradient RL pieces (METHODS.md section 3).

`advantages`: advantage estimators (registry `ESTIMATORS`); `filters`: DAPO extras and
sample selection (dynamic sampling, overlong shaping, RAFT, online-DPO pairs).
See `docs/rl_advantages.md`.
"""

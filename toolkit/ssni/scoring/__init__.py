"""SSNI scoring: the score-norm statistic, its calibration, and the reweighting functions."""
from .calibration import (Calibration, CalibrationMismatchError, calibrate, compute_norms,
                          model_fingerprint, summarize)
from .learned import LearnedFitConfig, fit_learned, oracle_t_star, pgd_linf
from .reweight import (REWEIGHTS, ConstantReweight, LearnedReweight, LinearReweight, Reweight,
                       ReweightConfig, SigmoidReweight, build_reweight, list_reweights,
                       round_to_grid, soft_ramp)
from .score_norm import ScoreNorm, ScoreNormConfig, eps_statistic, score_norm, score_times

__all__ = ["Calibration", "CalibrationMismatchError", "calibrate", "compute_norms",
           "model_fingerprint", "summarize", "LearnedFitConfig", "fit_learned", "oracle_t_star",
           "pgd_linf", "REWEIGHTS", "ConstantReweight", "LearnedReweight", "LinearReweight",
           "Reweight", "ReweightConfig", "SigmoidReweight", "build_reweight", "list_reweights",
           "round_to_grid", "soft_ramp", "ScoreNorm", "ScoreNormConfig", "eps_statistic",
           "score_norm", "score_times"]

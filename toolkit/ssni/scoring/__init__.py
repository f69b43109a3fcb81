"""SSNI scoring: the score-norm statistic, its calibration, and the reweighting functions."""
from .calibration import (
                          Calibration,
                          CalibrationMismatchError,
                          calibrate,
                          compute_norms,
                          histogram,
                          model_fingerprint,
                          summarize,
)
from .learned import RobustFitConfig, fit_robust, interpolate_accuracy, oracle_t_star, table_scores
from .plots import plot_reweight
from .reweight import (
                          REWEIGHTS,
                          ConstantReweight,
                          LearnedReweight,
                          LinearReweight,
                          Reweight,
                          ReweightConfig,
                          SigmoidReweight,
                          build_reweight,
                          list_reweights,
                          reweight_options,
                          round_to_grid,
                          soft_ramp,
)
from .score_norm import ScoreNorm, ScoreNormConfig, mean_score, score_norm, score_times

__all__ = ["Calibration", "CalibrationMismatchError", "calibrate", "compute_norms", "histogram",
           "model_fingerprint", "summarize", "RobustFitConfig", "fit_robust", "interpolate_accuracy",
           "table_scores", "oracle_t_star", "plot_reweight", "REWEIGHTS", "ConstantReweight", "LearnedReweight",
           "LinearReweight", "Reweight", "ReweightConfig", "SigmoidReweight", "build_reweight",
           "list_reweights", "reweight_options", "round_to_grid", "soft_ramp", "ScoreNorm",
           "ScoreNormConfig", "mean_score", "score_norm", "score_times"]

"""`ssni evaluate`: defenses x attacks on a data split, with a report (see ssni.evaluate)."""
from __future__ import annotations

from typing import Any, Dict

from ..config import save_config
from ..evaluate.runner import EvaluateConfig, Evaluation
from .registry import command


@command("evaluate", EvaluateConfig,
         "evaluate defenses under attacks (expected and worst-of-N accuracy, report)")
def run_evaluate(cfg: EvaluateConfig) -> Dict[str, Any]:
    """Run the evaluation; prints the table and flags, writes the report under cfg.run_dir."""
    evaluation = Evaluation(cfg)  # checks the config and loads everything before writing anything
    if evaluation.dist.is_main:
        save_config(cfg, cfg.run_dir)
    result = evaluation.run()
    if evaluation.dist.is_main:  # under torchrun: one report on the console, not one per rank
        print(result["table"])
        for f in result["flags"]:
            print(f"FLAG: {f}")
    evaluation.dist.close()
    return {"report": result["report"], "results": result["results"], "flags": result["flags"],
            "computed_batches": result["computed_batches"], "reused_batches": result["reused_batches"]}

#!/usr/bin/env bash
# The Fashion-MNIST study, every stage in order; each one resumes where it stopped, so after a stop
# (or a new session) the same command carries on. Logs: runs/fmnist/logs/<stage>.log.
# It first restores what is committed in results/fmnist/state (tools/study_state.py; `python
# tools/study_state.py save` puts it there; STUDY_RESTORE=0 skips this): both trained networks (their
# EMA weights: a retraining on another machine gives other weights, other CPU kernels), the fitted
# reweight and the finished evaluation batches. So on a machine without runs/ the same command goes on
# where the last one stopped (the networks stage finds the restored trainings finished, and calibrates):
#
#   SSNI_THREADS=2 bash tools/fmnist_study.sh                          # every stage
#   SSNI_THREADS=2 bash tools/fmnist_study.sh networks eval autoattack # a replaced machine, mid-study
#   python tools/fmnist_results.py                                     # tables and plots into results/fmnist/
#
# Every evaluation's finished batches are carried (those of tstar and lownoise, made before carrying
# existed, were lost with their machine: naming them runs them again). The reweight stage is skipped
# while runs/fmnist/reweight/reweight.json exists (delete it to fit again: about 3 h on 2 cores).
#
# Stages: networks (score network, classifier, calibration), tstar (DBP's t* on validation images),
# reweight (the learned curve), convergence (doubling iterations / EOT), lownoise (the low-noise attack's
# weight lam: 1, 4, 16), eval (n = 512), autoattack.
# Convergence runs before the n = 512 evaluation: if doubling the budget changed robust accuracy,
# the evaluation's budget would have to change first; the low-noise stage does the same for its lam.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the project's venv (tools/venv.sh) when there is one, else `ssni` on PATH; SSNI=... to choose
if [ -z "${SSNI:-}" ]; then
    if [ -x .venv/bin/ssni ]; then SSNI=.venv/bin/ssni; else SSNI=ssni; fi
fi
LOGS=runs/fmnist/logs
mkdir -p "$LOGS"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(networks tstar reweight convergence lownoise eval autoattack)

failed=()
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "${STUDY_RESTORE:-1}" != 0 ]; then
    # a clash (this machine's state differs from the committed one) is reported and the stages still
    # run on this machine's own state; an evaluation whose inputs differ from the restored state's
    # refuses it and names what changed (then: STUDY_RESTORE=0 and a fresh runs/fmnist/<stage>)
    "$PY" tools/study_state.py restore --runs runs/fmnist --into results/fmnist/state || failed+=(restore)
fi
run() {  # run <stage> <ssni args...>: one command, its output appended to the stage's log
    local stage=$1
    shift
    echo "[study] $(date -u +%FT%TZ) $stage: ssni $*" | tee -a "$LOGS/$stage.log"
    local t0=$SECONDS
    # a failed stage is reported and the next one still runs (an unattended night is not lost to one
    # error); the script exits non-zero at the end
    if "$SSNI" "$@" >>"$LOGS/$stage.log" 2>&1; then
        echo "[study] $(date -u +%FT%TZ) $stage: done in $((SECONDS - t0)) s" | tee -a "$LOGS/$stage.log"
    else
        echo "[study] $(date -u +%FT%TZ) $stage: FAILED after $((SECONDS - t0)) s (see $LOGS/$stage.log)" \
            | tee -a "$LOGS/$stage.log"
        failed+=("$stage")
    fi
}

train_one() {  # train_one <stage> <ssni args...>: one thread, in a subshell of its own; fails if it failed
    (failed=(); SSNI_THREADS=1 run "$@"; [ ${#failed[@]} -eq 0 ])
}

for stage in "${stages[@]}"; do
    case $stage in
        networks)
            # at the thread counts the committed results record (results/fmnist/*config.yaml: one per
            # network, two for the calibration; the same count on the same machine gives the same
            # weights); the two networks train side by side. Restored trainings are finished: no-ops
            train_one networks-score train-score recipes/fmnist/score.yaml &
            score_pid=$!
            train_one networks-classifier train-classifier recipes/fmnist/classifier.yaml &
            classifier_pid=$!
            # a stopped study stops both trainings (a rerun would otherwise race them on the checkpoints)
            trap 'kill "$score_pid" "$classifier_pid" 2>/dev/null; exit 130' INT TERM
            trained=1
            wait "$score_pid" || { failed+=(networks-score); trained=0; }
            wait "$classifier_pid" || { failed+=(networks-classifier); trained=0; }
            trap - INT TERM
            if [ "$trained" = 1 ] && [ ! -f runs/fmnist/calibration/calibration.json ]; then
                SSNI_THREADS=2 run networks calibrate recipes/fmnist/calibrate.yaml
            fi ;;
        tstar) run tstar evaluate recipes/fmnist/dbp_tstar.yaml ;;
        reweight)
            if [ -f runs/fmnist/reweight/reweight.json ]; then
                echo "[study] reweight: runs/fmnist/reweight/reweight.json exists (fitted, or restored); delete it to fit again"
            else
                run reweight fit-reweight recipes/fmnist/reweight.yaml
            fi ;;
        convergence) run convergence evaluate recipes/fmnist/convergence.yaml ;;
        lownoise) run lownoise evaluate recipes/fmnist/lownoise_strength.yaml ;;
        eval) run eval evaluate recipes/fmnist/eval.yaml ;;
        autoattack) run autoattack evaluate recipes/fmnist/eval_autoattack.yaml ;;
        *) echo "unknown stage '$stage'; stages: networks tstar reweight convergence lownoise eval autoattack" >&2; exit 2 ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "[study] failed stages: ${failed[*]}" >&2
    exit 1
fi

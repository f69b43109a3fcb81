"""`ssni <command> RECIPE [key=value ...]`: load a recipe, apply overrides, build, run one call.

Errors caused by the input (a recipe, an override, a file) are printed as one line,
`ssni COMMAND: error: ...`, with exit status 2; `--debug` (anywhere on the command line) or the
environment variable SSNI_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from .checkpoint import CheckpointError
from .commands import COMMANDS
from .config import ConfigError, load_config
from .help import config_help, options_text, print_config
from .io import UnsafeCheckpointError
from .registry import UnknownNameError
from .training.loop import NonFiniteLossError

# Errors that mean "the input is wrong" (all with one-line messages): shown without a traceback.
# OSError covers files that cannot be read or written (missing, a directory, no permission);
# ImportError an optional extra that is missing (the message names it) or installed but broken (the
# message is its own import error).
INPUT_ERRORS = (ConfigError, UnknownNameError, ValueError, OSError, CheckpointError,
                UnsafeCheckpointError, NonFiniteLossError, ImportError)


def _busy_cores(interval: float = 0.2, windows: int = 3) -> int:
    """Cores kept busy by other work (/proc/stat; the least over a few short windows, so a
    passing process does not count); falls back to the load average."""
    def sample():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)  # idle + iowait, total

    try:
        cores, counts = os.cpu_count() or 1, []
        i0, t0 = sample()
        for _ in range(windows):
            time.sleep(interval)
            i1, t1 = sample()
            if t1 > t0:
                counts.append(int((1.0 - (i1 - i0) / (t1 - t0)) * cores + 0.25))
            i0, t0 = i1, t1
        if counts:
            return min(counts)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(round(os.getloadavg()[0]))
    except OSError:
        return 0


def cpu_threads() -> int:
    """Threads for CPU work: $SSNI_THREADS (a positive integer, or `auto`), else every core.

    The thread count changes how floating-point sums are split, so it changes trained weights and
    every number after them: it is a fixed choice (all cores, or what SSNI_THREADS says), recorded
    in each run's config.yaml, never measured from the machine's load. `SSNI_THREADS=auto` opts in
    to the cores that look idle at start: faster on a busy machine (oversubscribed threads wait for
    each other), but then the result depends on the load.
    """
    env = os.environ.get("SSNI_THREADS", "").strip()
    if env == "auto":
        return max(1, (os.cpu_count() or 1) - _busy_cores())
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"SSNI_THREADS must be a positive integer or 'auto', got {env!r}")
        return int(env)
    return os.cpu_count() or 1


def _looks_like_override(arg: str) -> bool:
    """`key=value` (a dotted key) that is not the name of an existing recipe file."""
    return re.match(r"^[A-Za-z_][\w.\-]*=", arg) is not None and not Path(arg).is_file()


def debug_requested(argv: List[str]) -> bool:
    """Whether tracebacks are wanted: `--debug` anywhere in argv, or SSNI_DEBUG set (not 0/false/no)."""
    env = os.environ.get("SSNI_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no", "off")


def error_line(e: BaseException, limit: int = 600) -> str:
    """An exception's message as one line (lines joined; very long ones cut, pointing to --debug)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    msg = " ".join(lines) or type(e).__name__
    if len(msg) > limit:
        msg = msg[:limit].rstrip() + " ... (run with --debug for the whole message)"
    return msg


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `ssni` console command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after the command
    parser = argparse.ArgumentParser(prog="ssni", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: SSNI_DEBUG=1); anywhere on the line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS.names():
        meta = COMMANDS.meta(name)
        p = sub.add_parser(name, help=meta["help"], description=f"{meta['help']}\n\n{config_help(meta['config'], name)}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); optional")
        p.add_argument("overrides", nargs="*", help="key=value overrides of the keys below")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (recipe + overrides + defaults) as YAML and exit")
    opts = sub.add_parser("options", help="list registered parts (models, samplers, attacks, ...) and their options")
    opts.add_argument("kind", nargs="?", help="e.g. sampler, attack, reweight, model, dataset")
    opts.add_argument("name", nargs="?", help="a registered name of that kind, e.g. ddpm")
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "options":
        try:
            print(options_text(args.kind, args.name))
        except (ValueError, UnknownNameError) as e:
            print(f"ssni options: error: {error_line(e)}", file=sys.stderr)
            return 2
        return 0
    overrides = list(args.overrides) + extra
    recipe = args.recipe
    if recipe is not None and _looks_like_override(recipe):
        overrides.insert(0, recipe)
        recipe = None
    run = COMMANDS.get(args.command)
    config_cls = COMMANDS.meta(args.command)["config"]
    try:
        import torch

        torch.set_num_threads(cpu_threads())
        # Denormal floats are up to ~20x slower on CPUs. Gradients through a saturated smooth
        # reweight are that tiny and flow through the whole score network: flush them to zero.
        torch.set_flush_denormal(True)
        cfg = load_config(config_cls, recipe, overrides)
        if args.print_config:
            print(print_config(cfg), end="")
            return 0
        result = run(cfg)
    except INPUT_ERRORS as e:
        if debug:
            raise
        print(f"ssni {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

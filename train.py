"""Trains one InfiniteVL stage, or runs the embedded demo.

    python train.py --config configs/stage2_sft.yaml [key=value ...] [--profile-steps 10:15]
    python train.py --config configs/stage2_sft.yaml mesh=2,-1,1      # a device mesh (default: all devices on fsdp)
    python train.py --config configs/demo.yaml

Several hosts: the same command on each (SLURM / TPU pods are detected; else ``INFINITEVL_COORDINATOR``,
``INFINITEVL_NUM_PROCESSES``, ``INFINITEVL_PROCESS_ID``); ``distributed.initialize()`` starts the runtime first.
"""

import argparse
import logging
import sys

from infinitevl_jax.training import config as tc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML training config")
    p.add_argument("--profile-steps", default=None, help="START:STOP, a jax.profiler trace window")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = p.parse_args(argv)
    from infinitevl_jax import distributed

    if distributed.initialize() == "single":  # multi-process runtime when the environment asks for one
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        distributed.setup_logging()  # process 0 logs; the others only warnings
    try:
        cfg = tc.load(args.config, args.overrides)
    except tc.TrainConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.demo is not None:
        from infinitevl_jax.training.demo import run_demo
        run_demo(cfg)
        return 0
    from infinitevl_jax.training.trainer import run
    prof = tuple(int(x) for x in args.profile_steps.split(":")) if args.profile_steps else None
    result = run(cfg, profile_steps=prof)
    return 0 if not result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())

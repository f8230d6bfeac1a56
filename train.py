"""Train (and evaluate) an open-vocabulary detector.

    python train.py --config=configs/demo.py --workdir=runs/demo
    python train.py --config=configs/regionclip.py:coco_ovd --workdir=runs/rc \
        --config.data.train_instances=... --config.train.batch_size=64

Re-running with the same --workdir resumes from its newest checkpoint.

Multi-process (one process per host or GPU; every process runs the same command):
    python train.py --config=... --workdir=runs/x --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=0      # and --process_id=1 on the other
Without these flags the layout comes from the environment with --distributed (TPU pods, SLURM),
else a single process.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ovd_jax.training import cli, launch

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics go.", required=True)
cli.define_runtime_flags()
flags.adopt_module_key_flags(cli)  # listed by --help


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax/JAX log a lot at INFO; --verbosity=0 shows it
        logging.set_verbosity(logging.WARNING)
    launch.setup_runtime_from_flags()
    launch.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.parse_flags)

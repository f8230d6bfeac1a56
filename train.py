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

from ovd_jax.training import launch
from ovd_jax.training.cli import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics go.", required=True)
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() with the layout detected from the environment "
                  "(TPU pods, SLURM, Open MPI); implied by the three flags below.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process: host:port of process 0 (jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0-based.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax/JAX log a lot at INFO; --verbosity=0 shows it
        logging.set_verbosity(logging.WARNING)
    launch.setup_runtime(distributed=FLAGS.distributed,
                         coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    launch.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)

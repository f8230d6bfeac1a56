"""Evaluate a detector checkpoint, or score a detections file against ground truth.

Model mode (newest checkpoint of a run, or a given one):
    python eval.py --workdir=runs/demo
    python eval.py --config=configs/demo.py --checkpoint=runs/demo/checkpoints/800
    python eval.py --workdir=runs/demo --protocol=gt_boxes   # RegionCLIP zero-shot, GT boxes
Metrics-only mode (no model):
    python eval.py --gt instances.json --detections results.json --metric coco|lvis \
        [--fixed_ap] [--split_file ovd_split.json] --output metrics.json
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ovd_jax.training import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file (default: the run's config.json).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training run directory (newest checkpoint is used).")
flags.DEFINE_string("checkpoint", None, "A checkpoint directory (overrides --workdir's newest).")
flags.DEFINE_string("output_dir", None, "Where metrics/detections go (model mode).")
flags.DEFINE_enum("protocol", "detection", ["detection", "gt_boxes"],
                  "Model mode: full detection, or RegionCLIP's zero-shot classification of "
                  "ground-truth boxes (region accuracy + AP).")
flags.DEFINE_string("gt", None, "Metrics-only: ground-truth instances JSON.")
flags.DEFINE_string("detections", None, "Metrics-only: COCO-format results JSON.")
flags.DEFINE_enum("metric", "coco", ["coco", "lvis"], "Metrics-only: which protocol.")
flags.DEFINE_bool("fixed_ap", False, "Metrics-only, LVIS: the 'fixed AP' protocol.")
flags.DEFINE_string("split_file", None, "Metrics-only: base/novel split JSON.")
flags.DEFINE_string("output", None, "Metrics-only: metrics JSON to write.")
cli.define_runtime_flags()
flags.adopt_module_key_flags(cli)  # listed by --help


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax/JAX log a lot at INFO; --verbosity=0 shows it
        logging.set_verbosity(logging.WARNING)
    if FLAGS.gt or FLAGS.detections:
        if not (FLAGS.gt and FLAGS.detections):
            raise app.UsageError("metrics-only mode needs both --gt and --detections")
        from ovd_jax.evaluation import metrics_only

        metrics_only.run(FLAGS.gt, FLAGS.detections, FLAGS.metric, FLAGS.fixed_ap, FLAGS.output,
                         split_file=FLAGS.split_file)
        return
    from ovd_jax.training import launch

    launch.setup_runtime_from_flags()
    launch.evaluate_model(FLAGS.config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
                          output_dir=FLAGS.output_dir, protocol=FLAGS.protocol,
                          progress=FLAGS.progress)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

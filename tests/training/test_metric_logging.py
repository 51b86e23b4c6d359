"""metrics.jsonl across resumes: torn lines from a killed run, and non-local (gfile) workdirs."""
import json

import tensorflow as tf

from coyo_vit.tools.sweep_summary import latest_checkpoint_step, read_metrics
from coyo_vit.training import metric_logging
from coyo_vit.training.metric_logging import METRICS_FILE, MetricLogger

TORN = '{"step": 10, "train/loss": 3.0}\n{"step": 20, "train/loss": 2.5}\n{"step": 30, "train/lo'


def test_resume_drops_a_half_written_last_line_and_the_steps_past_the_checkpoint(tmp_path):
    (tmp_path / METRICS_FILE).write_text(TORN)
    logger = MetricLogger(str(tmp_path), is_main=True, resume_step=10)
    logger.write(20, {"train/loss": 2.4})
    logger.close()
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 10, "train/loss": 3.0},
                                                    {"step": 20, "train/loss": 2.4}]


def test_metric_logger_writes_and_resumes_through_tf_gfile(monkeypatch):
    # MetricLogger itself in a ram:// workdir (clu's TensorBoard writer, which cannot take ram://
    # paths, replaced by a recorder): the jsonl part must not fall back to local open().
    written = []

    class Recorder:
        def write_scalars(self, step, scalars):
            written.append(step)

        def flush(self):
            pass

        close = flush

    monkeypatch.setattr(metric_logging.metric_writers, "create_default_writer",
                        lambda *args, **kwargs: Recorder())
    workdir = "ram://coyo_vit_metric_logger"
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(f"{workdir}/{METRICS_FILE}", "w") as f:
        f.write(TORN)
    logger = MetricLogger(workdir, is_main=True, resume_step=20)
    logger.write(30, {"train/loss": 2.0})
    logger.close()
    assert written == [30]
    assert [r["step"] for r in read_metrics(f"{workdir}/{METRICS_FILE}")] == [10, 20, 30]


def test_metrics_file_goes_through_tf_gfile():
    # TensorFlow's in-memory file system stands in for gs://: os.open would make a local
    # "ram:" directory instead (as it made "gs:" ones before).
    path = f"ram://coyo_vit_metric_logging/{METRICS_FILE}"
    tf.io.gfile.makedirs("ram://coyo_vit_metric_logging")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(TORN)
    metric_logging._truncate_after(path, 20)
    with tf.io.gfile.GFile(path, "a") as f:
        f.write('{"step": 30, "train/loss": 2.0}\n')
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]


def test_sweep_finds_complete_checkpoints_in_a_gfile_workdir():
    # sweep --print_commands must see finished points of gs:// workdirs (it listed none before).
    root = "ram://coyo_vit_sweep_point"
    for step, items in ((10, ("state", "meta")), (20, ("state", "meta")), (30, ("state",))):
        for item in items:
            tf.io.gfile.makedirs(f"{root}/checkpoints/{step}/{item}")
    assert latest_checkpoint_step(root) == 20  # 30 lacks its meta: still being written

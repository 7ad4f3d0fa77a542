"""libjpeg's per-image stderr messages are folded into the counted-skip summary (issue 16)."""

import os
import subprocess
import sys
import textwrap

import pytest

from tfscale.data import jpeg_messages

_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np, tensorflow as tf
    from tfscale.data import jpeg_messages, pipeline, records
    good = tf.io.encode_jpeg(np.full((32, 32, 3), 90, np.uint8)).numpy()
    examples = [records.make_example(good, i + 1, 32, 32, 3).SerializeToString() for i in range(3)]
    examples.append(records.make_example(good[: len(good) // 2], 4, 32, 32, 3).SerializeToString())  # truncated
    path = sys.argv[1] + "/r.tfrecord"
    with tf.io.TFRecordWriter(path) as w:
        for e in examples:
            w.write(e)
    counter = pipeline.SkippedRecordCounter()

    def epoch():
        ds = pipeline.imagenet_dataset(path, False, 16, 4, skip_counter=counter, dtype="uint8")
        return sorted(int(v) for _, y in ds for v in y.numpy())

    if sys.argv[2] == "filter":
        with jpeg_messages.LibjpegMessageFilter() as f:
            labels = epoch()
            os.write(2, b"an ordinary stderr line\\n")
            logger = pipeline.SkippedRecordsLogger(counter, print_fn=lambda line: os.write(2, (line + "\\n").encode()))
            counter.reset()
            logger.on_epoch_begin(0)
            epoch()
            logger.on_epoch_end(0, {})
        print("suppressed", f.count, file=sys.stderr)
    else:
        labels = epoch()
    print("labels", labels, "skipped", counter.result())
""")


def _run(tmp_path, mode):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), mode], capture_output=True, text=True,
                          timeout=300, env=env)


def test_filter_counts_libjpeg_lines_and_passes_the_others(tmp_path):
    plain = _run(tmp_path, "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "labels [0, 1, 2] skipped 1" in plain.stdout
    assert jpeg_messages.LIBJPEG_MESSAGE.search(b"") is None
    noisy = [line for line in plain.stderr.splitlines() if jpeg_messages.LIBJPEG_MESSAGE.match(line.encode())]
    assert noisy, "expected libjpeg to print a line for the truncated JPEG without the filter"

    filtered = _run(tmp_path, "filter")
    assert filtered.returncode == 0, filtered.stderr[-2000:]
    assert "labels [0, 1, 2] skipped 1" in filtered.stdout
    lines = filtered.stderr.splitlines()
    assert not [line for line in lines if jpeg_messages.LIBJPEG_MESSAGE.match(line.encode())]
    assert "an ordinary stderr line" in lines
    # The epoch line of the skipped-record logger and the final summary carry the count instead.
    assert any("skipped 1 bad input records" in line and "libjpeg's stderr messages about them suppressed: 2"
               in line for line in lines), lines
    assert any(line.startswith("tfscale: suppressed 2 libjpeg messages") for line in lines)
    assert "suppressed 2" in lines[-1]


@pytest.mark.parametrize("line, match", [
    (b"Corrupt JPEG data: premature end of data segment", True),
    (b"Improper call to JPEG library in state 201", True),
    (b"Premature end of JPEG file", True),
    (b"Epoch 1/2", False),
    (b"W0000 some TensorFlow warning", False),
])
def test_message_table(line, match):
    assert bool(jpeg_messages.LIBJPEG_MESSAGE.match(line)) is match

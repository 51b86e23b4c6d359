"""Where the crop op's resize time goes: one 370x380 uint8 crop (the fixture's mean Inception
crop is about this size) to 224x224, each candidate in its own tf.function on one thread,
minus the cost of calling an empty function. Run from the repository root:
    python docs/results/cpu_2026-11-26/resize_parts.py
"""
import time

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
IMAGE = tf.constant(np.random.RandomState(0).randint(0, 256, (370, 380, 3)).astype(np.uint8))


def cpu_ms(fn, calls: int = 400) -> float:
    graph = tf.function(fn)
    graph(IMAGE)
    started = time.process_time()
    for _ in range(calls):
        graph(IMAGE)
    return 1000 * (time.process_time() - started) / calls


def bilinear(x):
    return tf.raw_ops.ResizeBilinear(images=x[None], size=[224, 224], half_pixel_centers=True)


CANDIDATES = {
    "cast uint8 -> float32": lambda x: tf.cast(x, tf.float32),
    "cast + ResizeBilinear (float32 kernel)": lambda x: bilinear(tf.cast(x, tf.float32)),
    "ResizeBilinear on uint8 (converts per read)": bilinear,
    "round back: cast(x + 0.5) to uint8, 224px": lambda x: tf.cast(
        tf.cast(x[:224, :224], tf.float32) + 0.5, tf.uint8),
    "crop_and_resize, whole image": lambda x: tf.image.crop_and_resize(
        x[None], [[0.0, 0.0, 1.0, 1.0]], [0], [224, 224]),
    "ScaleAndTranslate, triangle, no antialias": lambda x: tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(x, tf.float32)[None], size=[224, 224], scale=[224 / 370, 224 / 380],
        translation=[0.0, 0.0], kernel_type="triangle", antialias=False),
    "gather 224 columns (3-byte slices)": lambda x: tf.gather(x, tf.range(224), axis=1),
    "gather 224 rows": lambda x: tf.gather(x, tf.range(224)),
    "transpose H and W": lambda x: tf.transpose(x, [1, 0, 2]),
}

if __name__ == "__main__":
    empty = cpu_ms(lambda x: tf.size(x))
    for name, fn in CANDIDATES.items():
        print(f"{name:45s} {cpu_ms(fn) - empty:6.3f} ms")

import glob, io, time, numpy as np, tensorflow as tf
from PIL import Image
from input_pipeline import pp_parser, ops_image
files = sorted(glob.glob("/work/shared/fixtures/coyo_shards/shards/*.tfrecord"))
jp = [tf.io.parse_single_example(r, {"jpg": tf.io.FixedLenFeature([], tf.string)})["jpg"].numpy() for r in tf.data.TFRecordDataset(files)]
def up(b):
    im = Image.open(io.BytesIO(b)).convert("RGB"); im = im.resize((im.width*2, im.height*2), Image.BICUBIC)
    o = io.BytesIO(); im.save(o, "JPEG", quality=90); return o.getvalue()
data = [up(b) for b in jp[:60]]
opts = tf.data.Options(); opts.threading.private_threadpool_size = 1; opts.threading.max_intra_op_parallelism = 1
pps = {"exact": "decode|resize_small(256)|central_crop(224)", "reduced": "decode_and_resize_small(256)|central_crop(224)",
       "decode": "decode", "scaled_only": None, "scaled_resize": "X", "scaled_resize_nocond": "Y"}
res = {}
for rnd in range(6):
  for name, pp in pps.items():
    def sr(x, cond=True):
        shape = tf.image.extract_jpeg_shape(x)[:2]; ns = ops_image.resize_small_shape(shape, 256)
        img = ops_image.decode_jpeg_scaled(x, shape, ns)
        if not cond: return tf.size(tf.image.resize(tf.cast(img, tf.float32), ns))
        return tf.size(ops_image.resize_uint8(img, ns))
    if pp == "X": fn = sr
    elif pp == "Y": fn = lambda x: sr(x, False)
    elif pp is None:
        fn = lambda x: tf.size(ops_image.decode_jpeg_scaled(x, tf.image.extract_jpeg_shape(x)[:2], ops_image.resize_small_shape(tf.image.extract_jpeg_shape(x)[:2], 256)))
    else:
        p = pp_parser.parse(pp); fn = lambda x, p=p: tf.size(p({"jpg": x})["image"])
    d = tf.data.Dataset.from_tensor_slices(data).map(fn).with_options(opts)
    t = time.process_time(); n = sum(1 for _ in d); res.setdefault(name, []).append((time.process_time() - t) / n * 1000)
print({k: round(min(v), 3) for k, v in res.items()}, {k: round(float(np.median(v)), 3) for k, v in res.items()})

import glob, numpy as np, tensorflow as tf
from input_pipeline import ops_image, sources, pp_parser
files = sorted(glob.glob("/work/shared/fixtures/coyo_shards/shards/*.tfrecord"))
recs = [sources.parse_example(r)["jpg"] for r in tf.data.TFRecordDataset(files)]
def psnr(a, b):
    mse = np.mean((a - b) ** 2); return 10 * np.log10(255**2 / mse) if mse else np.inf
for out, amin, seeds in ((224, 5, 8), (112, 5, 3)):
    new = ops_image.decode_jpeg_and_inception_crop(out, area_min=amin)
    old = ops_image.decode_jpeg_and_inception_crop(out, area_min=amin, exact=True)
    rows = []
    for i, jpg in enumerate(recs):
        for s in range(seeds):
            rng = tf.constant([i, s], tf.int64)
            seed = ops_image.op_seed({"rng": rng}, "decode_jpeg_and_inception_crop")
            win = ops_image.jpeg_crop_window(jpg, seed, amin, 100)
            r = int(ops_image.dct_ratio(win[2:], (out, out)))
            if r == 1: continue
            a = new({"jpg": jpg, "rng": rng})["image"].numpy().astype(np.float64)
            b = old({"jpg": jpg, "rng": rng})["image"].numpy().astype(np.float64)
            full = tf.image.decode_and_crop_jpeg(jpg, win, channels=3)
            aa = tf.image.resize(tf.cast(full, tf.float32), (out, out), antialias=True).numpy().round().clip(0, 255)
            rows.append((r, np.abs(a - b).mean(), psnr(a, b), np.abs(a - aa).mean(), np.abs(b - aa).mean(), psnr(a, aa)))
    rows = np.array(rows)
    print(out, "engaged", len(rows), "of", len(recs) * seeds, "ratios", np.unique(rows[:, 0], return_counts=True))
    print(" MAE reduced-vs-exact mean %.2f max %.2f; PSNR min %.1f median %.1f" % (rows[:,1].mean(), rows[:,1].max(), rows[:,2].min(), np.median(rows[:,2])))
    print(" MAE vs antialiased: reduced mean %.2f max %.2f, exact mean %.2f; reduced closer in %d/%d; PSNR reduced-vs-aa min %.1f" % (rows[:,3].mean(), rows[:,3].max(), rows[:,4].mean(), (rows[:,3] < rows[:,4]).sum(), len(rows), rows[:,5].min()))
e_new = ops_image.decode_and_resize_small(256); e_old = pp_parser.parse("decode|resize_small(256)")
rows = []
for jpg in recs:
    a = e_new({"jpg": jpg})["image"].numpy().astype(float); b = e_old({"jpg": jpg})["image"].numpy().astype(float)
    assert a.shape == b.shape
    if (a != b).any(): rows.append((np.abs(a-b).mean(), psnr(a, b)))
rows = np.array(rows); print("eval differing", len(rows), "MAE mean %.2f max %.2f PSNR min %.1f median %.1f" % (rows[:,0].mean(), rows[:,0].max(), rows[:,1].min(), np.median(rows[:,1])))

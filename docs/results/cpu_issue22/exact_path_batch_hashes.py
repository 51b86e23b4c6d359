"""Hashes of the recipe train (2 start positions) and eval batches on the fixture x2; argv[2] == 'exact' passes exact=True."""
import os, sys, json, hashlib, tempfile, inspect
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, os.getcwd())
import numpy as np, tensorflow as tf
from benchmarks import input_pipeline as bip
from input_pipeline import pipeline
tmp = tempfile.mkdtemp()
files = bip.repeated_shards(str(bip.FIXTURE_SHARDS), 2, tmp)
kw = {"exact": True} if sys.argv[2:] == ["exact"] else {}
cfg = bip.recipe_input_config(files, image_size=224, shuffle_buffer=64, cycle_length=4, **kw)
print(cfg["pp_train"], "||", cfg["pp_eval"])
out = {}
for start in (0, 333):
    ds = pipeline.build_train_dataset(cfg, batch_size=32, seed=7, skip_counts=True, start_position=start)
    out[f"train {start}"] = [{k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12] for k, v in sorted(b.items())} for b in ds.take(9).as_numpy_iterator()]
ds = pipeline.build_eval_dataset(cfg, split="all", batch_size=50)
out["eval"] = [{k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12] for k, v in sorted(b.items())} for b in ds.as_numpy_iterator()]
json.dump(out, open(sys.argv[1], "w"), indent=0)
print("batches", sum(len(v) for v in out.values()))

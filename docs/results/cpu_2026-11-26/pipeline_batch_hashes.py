"""Hashes of the first 123 batches of the recipe train (3 label modes x 2 start positions) and eval
pipelines on the fixture x3, to check that a pipeline change alters no bit. Run it from the
checkout to hash (it imports the packages of the current directory), e.g.

    cd /tmp/base && python /work/main/docs/results/cpu_2026-11-26/pipeline_batch_hashes.py /tmp/a.json
    cd /work/main && python docs/results/cpu_2026-11-26/pipeline_batch_hashes.py /tmp/b.json
    cmp /tmp/a.json /tmp/b.json

Seventh session: c79c4b4 and the final tree gave identical files (2026-11-26 ~19:58 UTC).
"""
import os, sys, json, hashlib, tempfile
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, os.getcwd())
import numpy as np, tensorflow as tf
from benchmarks import input_pipeline as bip
from input_pipeline import pipeline
tmp = tempfile.mkdtemp()
files = bip.repeated_shards(str(bip.FIXTURE_SHARDS), 3, tmp)
out = {}
for label_mode in ("threshold', 0.1", "soft'", "topk', 3"):
    cfg = bip.recipe_input_config(files, image_size=224, shuffle_buffer=64, cycle_length=4)
    cfg["pp_train"] = cfg["pp_train"].replace("threshold', 0.1", label_mode)
    cfg["pp_eval"] = cfg["pp_eval"].replace("threshold', 0.1", label_mode)
    for start in (0, 333):
        ds = pipeline.build_train_dataset(cfg, batch_size=32, seed=7, skip_counts=True, start_position=start)
        h = []
        for b in ds.take(16).as_numpy_iterator():
            h.append({k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12] + str(v.dtype) + str(v.shape) for k, v in sorted(b.items())})
        out[f"train {label_mode} {start}"] = h
    ds = pipeline.build_eval_dataset(cfg, split="all", batch_size=50)
    out[f"eval {label_mode}"] = [{k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12] for k, v in sorted(b.items())} for b in ds.as_numpy_iterator()]
json.dump(out, open(sys.argv[1], "w"), indent=0)
print("batches", sum(len(v) for v in out.values()))

"""TFDS builder `coyo_labeled_300m`, from local img2dataset shards (manual download).

    python -m input_pipeline.tools.tfds_coyo --shards /data/coyo/shards --data_dir /data/tfds

then, in Python (importing this module registers the builder with TFDS):

    import input_pipeline.tools.tfds_coyo
    ds = tfds.load("coyo_labeled_300m", split="train", data_dir="/data/tfds")

Features: `image` (the encoded bytes img2dataset stored, decoded by TFDS to uint8 [H, W, 3]),
`labels` int64 [n] (ImageNet-21k indices, coyo_vit/data/imagenet21k_classes.tsv), `label_probs` float32 [n], `key`, `url`.
The records store the image under `image`, the name the features declare: COYO's own
conversion declared `image` but kept the shards' `jpg`, so its metadata did not describe its
records. Here TFDS itself writes the records from the declared features, so they cannot differ.

Splits: `holdout` = the first `holdout_shards` shards in sorted order, `train` = the rest,
the convention of `config.input.holdout.files`. Damaged records (validate_shards' checks,
images decoded) are left out; their counts per reason go into the dataset's metadata
(`info.metadata["skipped"]`) and the log.

The training pipeline reads these records directly (it accepts `image` where img2dataset
writes `jpg`): set `config.input.data.files` to `split_files(data_dir, "train")`, e.g.
`/data/tfds/coyo_labeled_300m/default/1.0.0/coyo_labeled_300m-train.tfrecord*`.

Generation is one Python process over all records: fine for subsets and tests, days for the
full 300M images (training does not need TFDS: it reads the img2dataset shards directly).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import sources
from input_pipeline.tools import validate_shards

NAME = "coyo_labeled_300m"
DEFAULT_HOLDOUT_SHARDS = 5


class CoyoConfig(tfds.core.BuilderConfig):
    """Which shards form the holdout split."""

    def __init__(self, *, holdout_shards: int = DEFAULT_HOLDOUT_SHARDS, **kwargs):
        if not isinstance(holdout_shards, int) or holdout_shards < 0:
            raise ValueError(f"holdout_shards must be an int >= 0, got {holdout_shards!r}")
        super().__init__(**kwargs)
        self.holdout_shards = holdout_shards


# Run as `python -m input_pipeline.tools.tfds_coyo`, this file is `__main__`: that copy must not
# register (TFDS looks builders up by package), main() uses the imported module's builder.
class CoyoLabeled300m(tfds.core.GeneratorBasedBuilder,
                      skip_registration=__name__ == "__main__"):
    """COYO-Labeled-300M images with their top-50 ImageNet-21k machine labels."""

    name = NAME
    # TFDS (4.9.10) derives this from the package with the `importlib_resources` backport, which
    # it does not install; this file's path is the same answer without it.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From img2dataset TFRecord shards; image stored as `image`."}
    BUILDER_CONFIGS = [CoyoConfig(name="default", holdout_shards=DEFAULT_HOLDOUT_SHARDS,
                                  description=f"holdout = the first {DEFAULT_HOLDOUT_SHARDS} "
                                              f"img2dataset shards")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download COYO-Labeled-300M with img2dataset (docs/data.md) into a folder of NNNNN.tfrecord
    shards, with the labels saved (--save_additional_columns '["labels","label_probs"]', or
    python -m input_pipeline.tools.join_labels afterwards), and pass that folder as manual_dir
    (tfds.download.DownloadConfig(manual_dir=...), or --shards of
    python -m input_pipeline.tools.tfds_coyo).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="COYO-Labeled-300M: 300M web images machine-labeled with the top-50 of "
                        "the 21,841 ImageNet-21k classes and their probabilities.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "label_probs": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                "key": tfds.features.Text(),
                "url": tfds.features.Text(),
            }),
            homepage="https://github.com/kakaobrain/coyo-dataset",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = sources.list_files(os.fspath(dl_manager.manual_dir))
        holdout = self.builder_config.holdout_shards
        if holdout >= len(files):
            raise ValueError(f"holdout_shards={holdout} leaves no training shard out of "
                             f"{len(files)} in {dl_manager.manual_dir}")
        self._skipped: collections.Counter = collections.Counter()
        self.info.metadata["skipped"] = {}
        return {"train": self._generate_examples(files[holdout:]),
                "holdout": self._generate_examples(files[:holdout])}

    def _generate_examples(self, files: Sequence[str]) -> Iterator[tuple[str, dict]]:
        for path in files:
            name = os.path.basename(path)
            for index, record, problem in validate_shards.iter_records(path):
                reason = problem or validate_shards.check_record(record)
                if reason:
                    self._note_skip(name, index, reason)
                    continue
                feature = tf.train.Example.FromString(record).features.feature
                image = next(feature[k].bytes_list.value[0] for k in ("jpg", "image")
                             if k in feature and feature[k].bytes_list.value)
                yield f"{name}#{index}", {
                    "image": image,
                    "labels": np.asarray(feature["labels"].int64_list.value, np.int64),
                    "label_probs": np.asarray(feature["label_probs"].float_list.value,
                                              np.float32),
                    "key": _text(feature, "key"),
                    "url": _text(feature, "url"),
                }

    def _note_skip(self, name: str, index: int, reason: str) -> None:
        self._skipped[reason] += 1
        logging.warning("coyo_labeled_300m: skipped %s record %d: %s", name, index, reason)
        self.info.metadata["skipped"] = dict(self._skipped)


def _text(feature, name: str) -> str:
    if name in feature and feature[name].bytes_list.value:
        return feature[name].bytes_list.value[0].decode("utf-8", "replace")
    return ""


def split_files(data_dir: str, split: str, config: str = "default") -> str:
    """Glob of a built split's TFRecord files, for `config.input.data.files`."""
    if split not in ("train", "holdout"):
        raise ValueError(f"unknown split {split!r}; valid: train, holdout")
    version = str(CoyoLabeled300m.VERSION)
    return os.path.join(os.path.expanduser(data_dir), NAME, config, version,
                        f"{NAME}-{split}.tfrecord*")


def build(shards_dir: str, data_dir: str, holdout_shards: int | None = None
          ) -> tfds.core.DatasetBuilder:
    """Builds the dataset from a folder of img2dataset shards into data_dir; returns the builder.

    A holdout_shards other than the default makes a config named `holdout{N}`; once built,
    tfds.load("coyo_labeled_300m/holdout{N}", data_dir=...) reads it (TFDS takes the config from
    the files written).
    """
    builder = tfds.builder(NAME, data_dir=data_dir, config=config_for(holdout_shards))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=shards_dir))
    return builder


def config_for(holdout_shards: int | None) -> CoyoConfig | str:
    """The default config, or one named holdout{N} for another number of holdout shards."""
    if holdout_shards is None or holdout_shards == DEFAULT_HOLDOUT_SHARDS:
        return "default"
    return CoyoConfig(name=f"holdout{holdout_shards}", holdout_shards=holdout_shards,
                      description=f"holdout = the first {holdout_shards} img2dataset shards")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m input_pipeline.tools.tfds_coyo",
        description="Build the TFDS dataset coyo_labeled_300m from img2dataset shards.")
    parser.add_argument("--shards", required=True, help="folder of NNNNN.tfrecord shards")
    parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--holdout_shards", type=int, default=DEFAULT_HOLDOUT_SHARDS)
    args = parser.parse_args(argv)
    builder = build(args.shards, args.data_dir, args.holdout_shards)
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples:,} examples, files "
              f"{split_files(args.data_dir, split, builder.builder_config.name)}")
    skipped = builder.info.metadata.get("skipped") if builder.info.metadata else None
    print(f"skipped damaged records: {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    from input_pipeline.tools import tfds_coyo as registered  # the importable copy of this module

    sys.exit(registered.main())

"""The typed configuration: nested sections and flat names give the same config, every flag is a field,
every default lives in one place."""
import dataclasses

import pytest

from microsnoop_ray.cli import build_parser
from microsnoop_ray.crop.windows import RESCALE_CONSTANT
from microsnoop_ray.pipeline.config import SECTIONS, ProfileConfig, merge_options


def test_flat_and_nested_options_give_the_same_config():
    flat = ProfileConfig.from_mapping({"inputs": ["p.zarr"], "segmenter": "classical", "diameter": 20,
                                       "rescale_constant": 2.0, "batch_size": 32, "encoder_actors": 2,
                                       "crop_resources": {"cropper": 1}, "sphering_scope": "batch",
                                       "segment_gpu_share": 0.25, "retry_skipped": True})
    nested = ProfileConfig.from_mapping({"inputs": ["p.zarr"],
                                         "segmentation": {"segmenter": "classical", "diameter": 20, "gpu_share": 0.25},
                                         "crop": {"rescale_constant": 2.0, "resources": {"cropper": 1}},
                                         "encode": {"batch_size": 32, "actors": 2}, "sphering": {"scope": "batch"},
                                         "run": {"retry_skipped": True}})
    assert flat == nested
    # run_config.yaml (the job adds model_id) given back as --config gives the same config
    assert ProfileConfig.from_mapping({**nested.to_dict(), "model_id": "microsnoop-x"}) == nested
    assert ProfileConfig().crop.rescale_constant == RESCALE_CONSTANT
    with pytest.raises(dataclasses.FrozenInstanceError):
        nested.crop.mode = "tiles"
    assert nested.replace(crop__mode="tiles").crop.mode == "tiles" and nested.crop.mode == "cells"
    assert ProfileConfig.from_mapping({"inputs": ["p.zarr"], "device": "cuda:1"}).encode.device == "cuda:1"


@pytest.mark.parametrize("bad, message", [
    ({"segmenter": "magic"}, "segmentation.segmenter must be one of auto, cellpose, classical"),
    ({"crop": {"modes": "cells"}}, "unknown option.s.: crop.modes"),
    ({"colour": 1}, "unknown option.s.: colour"),
    ({"sphering": {"epsilon": 1e-3, "regularization": "shrinkage"}}, "only used with regularization 'epsilon'"),
    ({"segment_gpu_share": 1.0}, "gpu_share must lie in"),
    ({"device": "tpu"}, "encode.device must be auto, cpu, cuda or cuda:N"),
])
def test_bad_options_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ProfileConfig.from_mapping({"inputs": ["p.zarr"], **bad})


def test_every_profile_flag_is_a_config_field_and_overrides_the_file():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["profile"]
    dests = {a.dest for a in sub._actions}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag") is not None:
                assert f"{sec}.{f.name}" in dests, (sec, f.name)
    args = parser.parse_args(["profile", "p.zarr", "--diameter", "12", "--sphering-scope", "none", "--compile",
                              "--channel-names", "a,b"])
    from microsnoop_ray.pipeline.config import options_from_args
    given = options_from_args(args)
    assert given == {"segmentation": {"diameter": 12.0}, "sphering": {"scope": "none"}, "encode": {"compile": True},
                     "channel_names": ["a", "b"]}
    merged = merge_options({"segmentation": {"diameter": 30, "segmenter": "classical"}, "batch_size": 8}, given)
    cfg = ProfileConfig.from_mapping({**merged, "inputs": ["p.zarr"]})
    assert (cfg.segmentation.diameter, cfg.segmentation.segmenter, cfg.encode.batch_size) == (12.0, "classical", 8)
    assert cfg.channel_names == ("a", "b") and cfg.encode.compile is True
    # fields and embed take the same flags for the sections they use
    fields = parser.parse_args(["fields", "f.tif", "--out", "o", "--rescale-constant", "2", "--normalization",
                                "faithful"])
    assert options_from_args(fields)["crop"] == {"rescale_constant": 2.0}
    embed = parser.parse_args(["embed", "x.npy", "--out", "o.parquet", "--precision", "bf16"])
    assert options_from_args(embed)["encode"] == {"precision": "bf16"}


def test_cpu_encoders_take_a_core_each_and_leave_the_crop_actor_and_reads_room():
    from microsnoop_ray.pipeline.executors import CPU_ENCODER_BYTES, cpu_encoders
    enc, crop_cpus = ProfileConfig().encode, ProfileConfig().crop.cpus
    # 2 cores, pre-cropped cells: two one-thread encoders; with one crop actor and two reads
    # (0.25 CPU each, the executor's rule) the logical CPUs add up to the 2 there are
    n, threads, each = cpu_encoders(2, 16e9, enc, crop_cpus, segmenting=False)
    assert (n, threads) == (2, 1) and n * each + crop_cpus + 2 * 0.25 == pytest.approx(2)
    # segmenting: a two-thread actor per two cores asking for half the logical CPUs, the rest to the crop actors
    assert cpu_encoders(16, 64e9, enc, crop_cpus, segmenting=True) == (8, 2, 1.0)
    assert cpu_encoders(2, 16e9, enc, crop_cpus, segmenting=True) == (1, 2, 1.0)
    assert cpu_encoders(1, 16e9, enc, crop_cpus, segmenting=True)[:2] == (1, 1)  # a one-core node
    # no more actors than Ray's memory holds at this batch size, never none, and then more threads each
    per_actor = CPU_ENCODER_BYTES[0] + CPU_ENCODER_BYTES[1] * enc.batch_size
    assert cpu_encoders(16, 3.5 * per_actor, enc, crop_cpus, segmenting=False)[:2] == (3, 5)
    assert cpu_encoders(16, 0.5 * per_actor, enc, crop_cpus, segmenting=False)[:2] == (1, 16)
    # what the user says wins: threads, actors, logical CPUs
    two = dataclasses.replace(enc, threads=2, cpus=1.5)
    assert cpu_encoders(8, 64e9, two, crop_cpus, segmenting=False) == (4, 2, 1.5)
    assert cpu_encoders(8, 64e9, enc, crop_cpus, segmenting=False, actors=3)[:2] == (3, 2)
    one = dataclasses.replace(enc, threads=1)
    assert cpu_encoders(8, 64e9, one, crop_cpus, segmenting=False, actors=3)[:2] == (3, 1)
    # logical CPUs given per actor bound the count, so that every actor can be placed
    assert cpu_encoders(2, 16e9, dataclasses.replace(enc, cpus=1.0), crop_cpus, segmenting=False)[0] == 1

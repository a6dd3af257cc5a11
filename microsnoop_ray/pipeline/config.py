"""The typed configuration of ``profile``, ``fields`` and ``embed``: nested frozen dataclasses.

Each default lives here once, next to its help text and its choices (taken from the module
that uses the value). Config files (YAML/TOML) may nest the sections::

    segmentation: {segmenter: cellpose, diameter: 25}
    crop: {rescale_constant: 2.0}
    encode: {batch_size: 128, precision: bf16}
    sphering: {scope: batch}

or use the flat names of the command-line flags (``diameter: 25``, ``sphering_scope: batch``);
both give the same :class:`ProfileConfig`. The command-line flags are derived from the fields
(:func:`add_arguments`), so a flag and its config key cannot drift apart. The sections travel
to the stage actors as they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Mapping

from ..config import add_field_argument, flag_of, option
from ..crop.windows import BORDER_MODES, RESCALE_CONSTANT, TILE_OVERLAP
from ..encode.precision import PRECISIONS
from ..features.cellprofiler import parse_feature_sets
from ..crop.field import MODES
from ..io.sources import CELLS_PER_CHUNK
from ..model.preprocess import NORMALIZATION_MODES as NORMALIZATIONS
from ..profiles.aggregate import METHODS as AGGREGATIONS
from ..profiles.recipe import DEFAULT_RECIPE, NORMALIZE_METHODS, parse_recipe
from ..profiles.sphering import DEFAULT_REGULARIZATION, REGULARIZATIONS, SCOPES
from ..segment import DIAMETER, SEGMENTERS

DEVICES = ("auto", "cpu", "cuda")
#: the sphering scopes, and "none" for profiles left unsphered
SPHERING_SCOPES = SCOPES + ("none",)
#: who writes the site files of ``profile`` on Ray (:class:`RunConfig`)
SITE_WRITERS = ("workers", "driver")


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    """How fields become label images (cells mode)."""

    segmenter: str = option("auto", "auto: Cellpose when weights are given, else classical (logged)", SEGMENTERS)
    cellpose_model: str | None = option(None, "local Cellpose weights file (never downloaded)")
    diameter: float = option(DIAMETER, "typical nucleus diameter in pixels")
    nuclei_channel: str | int = option(0, "channel segmented: name or index")
    cell_channel: str | None = option(None, "a cytoplasmic channel (e.g. AGP): cells are segmented on it with the "
                                            "nuclei channel (Cellpose, two channels) and matched to their nuclei; "
                                            "cellprofiler features then measure Nuclei, Cells and Cytoplasm")
    cell_diameter: float | None = option(None, "typical cell diameter in pixels with --cell-channel (default: twice "
                                               "the nucleus diameter)")
    locations: str | None = option(None, "folder of supplied nucleus centres, <plate>/<well>-<site>-Nuclei.csv "
                                         "(CellProfiler's Nuclei_Location_Center_X/Y; DeepProfiler's layout): crop "
                                         "around them instead of segmenting")
    labels: str | None = option(None, "use this NGFF label image of each Zarr field instead of segmenting")
    gpu_share: float = option(0.0, "share of each GPU for Cellpose in the crop actors (0: segment on CPUs)",
                              flag="--segment-gpu-share")
    fields_per_batch: int = option(1, "fields a crop actor segments together (Cellpose batches them)",
                                   flag="--fields-per-crop-batch")


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """How fields become encoder inputs, and the crop actors that do it."""

    mode: str = option("cells", "cells: a crop per object; tiles: overlapping 224 tiles; rescale: the field "
                                "resized to 224", MODES)
    rescale_constant: float = option(RESCALE_CONSTANT, "Rc of the crop window (2 BBBC021, 1 LIVECell)")
    border: str = option("drop", "objects touching the border: drop, faithful (the reference's test), keep",
                         BORDER_MODES)
    tile_overlap: float = option(TILE_OVERLAP, "overlap of neighbouring tiles (tiles mode)")
    max_cells_per_site: int | None = option(None, "random subsample of cells per site (seeded)")
    seed: int = option(0, "seed of the subsample")
    actors: int | None = option(None, "crop actors (default: the cluster's spare CPUs)", flag="--crop-actors")
    cpus: float = option(0.5, "CPUs per crop actor", flag="--crop-cpus")
    resources: dict | None = option(None, "custom Ray resources per crop actor", flag=None)
    reads_in_flight: int | None = option(None, "read tasks running at once (default: two per crop actor, "
                                               "enough to keep each fed; more for slow object storage)")


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """The encoder: weights, preprocessing rule, arithmetic, and the actors that run it."""

    weights: str | None = option(None, "weights file (default: the shipped weights)")
    normalization: str = option("default", "degenerate-case rule of the 1-99 percentile normalisation",
                                NORMALIZATIONS)
    input_size: str = option("auto", "side single cells are padded to: auto (pre-cropped cells: their side "
                                     "rounded to 16, at least 64, at most 224; fields: 224) or a multiple of 16 "
                                     "(224: the published contract)")
    batch_size: int = option(64, "one-channel crops per encoder call")
    device: str = option("auto", "auto (CUDA when the cluster has GPUs), cpu, cuda or cuda:N")
    compile: bool = option(False, "torch.compile the encoder (worth it for long runs)")
    precision: str = option("auto", "encoder arithmetic: auto is bf16 where the CPU or GPU runs it natively "
                                    "(recorded in the provenance), else fp32; fp32 for the reference arithmetic",
                            PRECISIONS)
    actors: int | None = option(None, "encoder actors (default: one per GPU; without GPUs one per core, one "
                                      "per two cores when cells are segmented, as many as the memory holds)",
                                flag="--encoder-actors")
    cpus: float | None = option(None, "logical CPUs per encoder actor on CPU nodes (default: the cores less "
                                      "room for the crop actors, shared out)", flag="--encoder-cpus")
    threads: int | None = option(None, "torch threads per encoder actor (default in a Ray pipeline without "
                                       "GPUs: 1, or 2 when cells are segmented; in one process, the node's CPUs)",
                                 flag="--encoder-threads")
    batches_in_flight: int = option(4, "batches queued per encoder actor (>= 2)", flag="--encoder-batches-in-flight")
    resources: dict | None = option(None, "custom Ray resources per encoder actor", flag=None)


    def __post_init__(self):
        from ..model.contract import INPUT_SIZE, input_size_for

        input_size_for(INPUT_SIZE, self.input_size)  # a ValueError names a bad value

@dataclasses.dataclass(frozen=True)
class SpheringConfig:
    """Sphering of well profiles on the negative controls (``Metadata_pert_type`` negcon)."""

    scope: str = option("plate", "fit per plate, per batch, once, or not at all", SPHERING_SCOPES)
    method: str = option("zca-cor", "whitening transform", ("zca-cor", "zca"))
    regularization: str = option(DEFAULT_REGULARIZATION, "mean-eigenvalue: epsilon = the controls' mean "
                                 "eigenvalue; shrinkage: Ledoit-Wolf; epsilon: fixed (1e-6 is pycytominer's); "
                                 "faithful: the reference code's knee floor", REGULARIZATIONS)
    epsilon: float | None = option(None, "fixed epsilon (implies regularization epsilon)")
    fit_on: str = option("wells", "profiles the fit uses", ("wells", "sites", "cells"))
    fallback: str | None = option("global", "scope used when a plate has too few controls (recorded)",
                                  ("batch", "global"))
    required: bool = option(False, "fail when there are no negative controls (default: profile unsphered, "
                                   "and say so)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the job runs: resumption, progress, chunking."""

    retry_skipped: bool = option(False, "profile again the sites a previous run skipped")
    progress: bool = option(True, "a live line per plate while it runs", flag=None)
    cells_chunk: int = option(CELLS_PER_CHUNK, "cells per work item of a cell array", flag=None)
    items_per_block: int | None = option(None, "work items per Ray Data block (default: the items spread over "
                                         "at most 1,000 blocks). Each block is one task per stage for the "
                                         "driver to schedule: more items per block, less driver work per site",
                                         flag=None)
    site_writes: str = option("workers", "who writes the site files: workers (each encoder actor writes the "
                              "sites it finishes; OUT must be visible on every node, as the inputs are) or "
                              "driver (every plane's features come back to the driver, which writes)",
                              SITE_WRITERS)


SECTIONS = {"segmentation": SegmentationConfig, "crop": CropConfig, "encode": EncodeConfig,
            "sphering": SpheringConfig, "run": RunConfig}
#: flat names that differ from ``<section field>``: the flags' names, accepted in config files too
_ALIASES = {"segment_gpu_share": ("segmentation", "gpu_share"),
            "fields_per_crop_batch": ("segmentation", "fields_per_batch"),
            "crop_actors": ("crop", "actors"), "crop_cpus": ("crop", "cpus"), "crop_resources": ("crop", "resources"),
            "encoder_actors": ("encode", "actors"), "encoder_cpus": ("encode", "cpus"),
            "encoder_threads": ("encode", "threads"), "encode_resources": ("encode", "resources"),
            "encoder_batches_in_flight": ("encode", "batches_in_flight")}


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Everything a profiling job is told: inputs, outputs, and one section per stage."""

    inputs: tuple = option((), "inputs", flag=None)
    out: str = option("profiles-out", "output root", flag=None)
    platemap: str | None = option(None, "plate map (CSV/Parquet): well -> Metadata_ annotations")
    batch: str = option("default", "Metadata_Batch of the plates")
    cell_table: str | None = option(None, "metadata table of a cell array (default: cells.csv beside it)")
    channel_names: tuple | None = option(None, "channel names, comma-separated (cell arrays, image files)")
    aggregation: str = option("mean", "cells -> sites -> wells -> treatments", AGGREGATIONS)
    treatment_keys: tuple = option(("Metadata_Compound", "Metadata_Concentration"),
                                   "plate-map columns that name a treatment", flag=None)
    drop_constant: bool = option(False, "remove features constant over a plate (an empty channel) from the "
                                        "profiles")
    features: str = option("microsnoop", "feature sets per cell, comma list: microsnoop (the embedding), "
                                         "cellprofiler (cp-measure on each cell's own object, CellProfiler names)")
    recipe: str = option(DEFAULT_RECIPE, "the profiling recipe after aggregation, steps in order (JUMP's: "
                                         "normalize to the negative controls, feature_select, sphere), or none")
    normalize: str = option("mad_robustize", "the recipe's normalisation (pycytominer)", NORMALIZE_METHODS,
                            flag="--normalize-method")
    evaluate: bool = option(True, "copairs mAP of the treatments' replicates (against the negative controls, "
                                  "and against each other) per feature set, in summary.json")
    illum: str = option("none", "illumination correction: none, compute (per plate and channel, written to "
                                "OUT/illum) or a folder of <plate>/<plate>_Illum<Channel>.npy")
    segmentation: SegmentationConfig = dataclasses.field(default_factory=SegmentationConfig)
    crop: CropConfig = dataclasses.field(default_factory=CropConfig)
    encode: EncodeConfig = dataclasses.field(default_factory=EncodeConfig)
    sphering: SpheringConfig = dataclasses.field(default_factory=SpheringConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], require_inputs: bool = True) -> "ProfileConfig":
        """Build and check a configuration from nested sections and/or flat names.

        Raises
        ------
        ValueError
            Naming every unknown option, a value outside its choices, or a bad combination.
        """
        top, sections = _split(d)
        if isinstance(top.get("features"), (list, tuple)):
            top["features"] = ",".join(map(str, top["features"]))
        for name, value in list(top.items()):
            if name in ("inputs", "treatment_keys", "channel_names") and value is not None:
                top[name] = tuple(str(v) for v in ([value] if isinstance(value, str) else value))
        sph = sections["sphering"]
        if sph.get("epsilon") is not None and "regularization" not in sph:
            sph["regularization"] = "epsilon"  # a fixed epsilon asks for the epsilon mode
        cfg = cls(**top, **{k: SECTIONS[k](**v) for k, v in sections.items()})
        cfg.check(require_inputs)
        return cfg

    def check(self, require_inputs: bool = True) -> None:
        if require_inputs and not self.inputs:
            raise ValueError("no inputs given")
        for obj in (self, *(getattr(self, k) for k in SECTIONS)):
            for f in dataclasses.fields(obj):
                choices, value = f.metadata.get("choices"), getattr(obj, f.name)
                if choices and value is not None and value not in choices:
                    raise ValueError(f"{_name(obj, f.name)} must be one of {', '.join(map(str, choices))}, "
                                     f"not {value!r}")
        dev = self.encode.device
        if not (dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"encode.device must be auto, cpu, cuda or cuda:N, not {dev!r}")
        sph = self.sphering
        if sph.epsilon is not None and sph.regularization != "epsilon":
            raise ValueError(f"sphering.epsilon {sph.epsilon} is only used with regularization 'epsilon', "
                             f"not {sph.regularization!r}")
        if not 0.0 <= self.segmentation.gpu_share < 1.0:
            raise ValueError(f"segmentation.gpu_share must lie in [0, 1), not {self.segmentation.gpu_share}")
        sets = self.feature_sets
        steps = parse_recipe(self.recipe)
        if self.sphering.fit_on != "wells" and "sphere" in steps and steps.index("sphere") > 0:
            raise ValueError(f"sphering.fit_on {self.sphering.fit_on} fits on raw profiles: the recipe must then "
                             "sphere first (or fit on wells)")
        seg = self.segmentation
        if seg.cell_channel is not None and (seg.locations or seg.labels):
            raise ValueError("segmentation.cell_channel segments cells and nuclei; it cannot be combined with "
                             "supplied locations or labels")
        if seg.cell_channel is not None and seg.segmenter == "classical":
            raise ValueError("segmentation.cell_channel needs the Cellpose segmenter (--segmenter cellpose "
                             "--cellpose-model FILE of a two-channel cytoplasm model)")
        if "cellprofiler" in sets and self.crop.mode != "cells":
            raise ValueError(f"features cellprofiler measures cells: it needs crop.mode cells, not {self.crop.mode!r}")
        if min(self.encode.batch_size, self.run.cells_chunk, self.run.items_per_block or 1,
               self.crop.reads_in_flight or 1) < 1:
            raise ValueError("encode.batch_size, run.cells_chunk, run.items_per_block and crop.reads_in_flight "
                             "must be at least 1")

    @property
    def feature_sets(self) -> tuple[str, ...]:
        """``features`` as a checked tuple (:func:`~microsnoop_ray.features.cellprofiler.parse_feature_sets`)."""
        return parse_feature_sets(self.features)

    def to_dict(self) -> dict:
        """Plain nested dict (JSON types), as written to ``run_config.yaml``; ``from_mapping`` reads it back."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def work(self, **extra):
        """The work items of ``inputs`` (:func:`~microsnoop_ray.io.sources.list_sources` with this
        config's options; ``extra``: masks, centres and object size of loose image files)."""
        from ..io.sources import list_sources

        seg = self.segmentation
        if seg.locations:
            extra = {"locations": seg.locations, "object_size": seg.diameter, **extra}
        if seg.cell_channel is not None:
            extra = {"cell_channel": seg.cell_channel, **extra}
        return list_sources(self.inputs, batch=self.batch, nuclei_channel=seg.nuclei_channel, labels=seg.labels,
                            cell_table=self.cell_table, channel_names=self.channel_names,
                            max_cells_per_site=self.crop.max_cells_per_site, seed=self.crop.seed,
                            cells_per_chunk=self.run.cells_chunk, **extra)

    def replace(self, **changes) -> "ProfileConfig":
        """A copy with top-level fields or whole sections replaced, or ``section__field=value`` changes."""
        nested: dict[str, dict] = {}
        for k in [k for k in changes if "__" in k]:
            sec, name = k.split("__", 1)
            nested.setdefault(sec, {})[name] = changes.pop(k)
        for sec, vals in nested.items():
            changes[sec] = dataclasses.replace(getattr(self, sec), **vals)
        return dataclasses.replace(self, **changes)


def _name(obj, field: str) -> str:
    sec = next((k for k, v in SECTIONS.items() if isinstance(obj, v)), None)
    return f"{sec}.{field}" if sec else field


#: keys the job adds to ``run_config.yaml``: ignored when that file is given back as ``--config``
_WRITTEN_BY_THE_JOB = {"model_id"}


def _split(d: Mapping[str, Any]) -> tuple[dict, dict[str, dict]]:
    """Top-level options and one dict per section, from nested sections and flat names."""
    top_names = {f.name for f in dataclasses.fields(ProfileConfig)} - set(SECTIONS)
    fields = {sec: {f.name for f in dataclasses.fields(cls)} for sec, cls in SECTIONS.items()}
    top: dict = {}
    sections: dict[str, dict] = {k: {} for k in SECTIONS}
    unknown = []
    for key, value in d.items():
        if key in _WRITTEN_BY_THE_JOB:
            continue
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{key} must be a mapping of options, not {value!r}")
            bad = sorted(set(value) - fields[key])
            unknown += [f"{key}.{b}" for b in bad]
            sections[key].update({k: v for k, v in value.items() if k not in bad})
        elif key in top_names:
            top[key] = value
        elif key in _ALIASES:
            sec, name = _ALIASES[key]
            sections[sec][name] = value
        elif key.startswith("sphering_") and key[9:] in fields["sphering"]:
            sections["sphering"][key[9:]] = value
        else:
            sec = next((s for s in ("segmentation", "crop", "encode", "run") if key in fields[s]), None)
            if sec is None:
                unknown.append(key)
            else:
                sections[sec][key] = value
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return top, sections


# --------------------------------------------------------------------------- command-line flags

def add_arguments(parser: argparse.ArgumentParser, sections=("top", *SECTIONS), top=None) -> None:
    """Add one flag per config field of ``sections`` (``"top"``: the top-level options; ``top``: only
    these of them, and implies ``"top"``). Every flag defaults to None (not given), so a config file's
    value stands unless the flag overrides it."""
    if top is not None:
        sections = ("top", *[s for s in sections if s != "top"])
    hints = {"top": typing.get_type_hints(ProfileConfig),
             **{k: typing.get_type_hints(v) for k, v in SECTIONS.items()}}
    for sec in sections:
        cls = ProfileConfig if sec == "top" else SECTIONS[sec]
        group = parser if sec == "top" else parser.add_argument_group(f"{sec} options (config section {sec})",
                                                                      cls.__doc__.strip().splitlines()[0])
        for f in dataclasses.fields(cls):
            if sec == "top" and (f.name in SECTIONS or (top is not None and f.name not in top)):
                continue
            flag = flag_of(f, "sphering-" if sec == "sphering" else "")
            if flag is None:
                continue
            add_field_argument(group, f, flag, f.name if sec == "top" else f"{sec}.{f.name}", hints[sec][f.name])


def options_from_args(args: argparse.Namespace) -> dict:
    """The config options the flags of :func:`add_arguments` gave (nested sections), without the
    flags that were not given."""
    out: dict = {}
    for dest, value in vars(args).items():
        if value is None:
            continue
        if "." in dest:
            sec, name = dest.split(".", 1)
            if sec in SECTIONS:
                out.setdefault(sec, {})[name] = value
        elif dest in {f.name for f in dataclasses.fields(ProfileConfig)}:
            out[dest] = str(value) if isinstance(value, Path) else value
    if isinstance(out.get("channel_names"), str):
        out["channel_names"] = out["channel_names"].split(",")
    return out


def merge_options(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Config-file options updated by flag options (sections merged key by key)."""
    top, sections = _split(base)
    otop, osections = _split(override)
    merged = {**top, **otop}
    for sec in SECTIONS:
        vals = {**sections[sec], **osections[sec]}
        if vals:
            merged[sec] = vals
    return merged

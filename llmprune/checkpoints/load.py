"""``llmprune.load(path_or_hub_id)``: a checkpoint folder or Hub repo -> a normal transformers model.

Both formats (``docs/checkpoint-format.md``, versions 1 and 2) come back as a regular
``PreTrainedModel`` with dense weights, bitwise equal to what was saved (``-0.0`` comes back
as ``+0.0`` from compressed storage; quantized matrices of version 2 are dequantized,
``(code - zero) * scale`` in fp32 cast to the model dtype, which is bitwise the in-memory
model that was saved), or, with ``kernels=True``, with the pruned ``Linear`` modules replaced
by ``llmprune.kernels.linear.SparseLinear``.

Checks, each failing with a one-line :class:`llmprune.errors.CheckpointError` naming
the file and the tensor: ``llmprune.json`` present, its format known and its
``format_version`` supported; every shard present, its header sound and not truncated;
every tensor the index lists present and every tensor the model needs found; shapes and
dtypes as declared; packed metadata valid (``from_tensors``); quantized weights' grids
(bits, group size dividing K, scales and zeros of the right shape, finite positive scales,
integer zero points and codes in range); every pruned weight's nonzero count equal to the
declared one and its N:M pattern respected; the version equal in llmprune.json, the index and
every shard.

Memory. A compressed checkpoint is loaded by building the model on the meta device
(accelerate ``init_empty_weights``; buffers stay real) and reading each tensor's bytes
straight into the buffer that becomes its parameter, shard by shard; packed weights are
decompressed one at a time. Peak: the final model plus one decompressed matrix and its
packed form (``evals/load_memory.py`` measures it). A dense checkpoint is loaded by
``transformers`` (which streams shards the same way) after the same file checks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from llmprune.checkpoints import format as fmt
from llmprune.checkpoints.save import METADATA_FILE
from llmprune.checkpoints import safetensors_io as st
from llmprune.checkpoints.files import PICKLE_SUFFIXES
from llmprune.errors import CheckpointError, UsageError
from llmprune.runtime.devices import parse_dtype
from llmprune.models.skeleton import get_tensor, set_tensor, share_tensor

logger = logging.getLogger(__name__)

_HUB_IGNORE = [f"*{suffix}" for suffix in (*PICKLE_SUFFIXES, ".gguf", ".h5", ".msgpack", ".onnx")]
DENSE_WEIGHTS = "model.safetensors"
DENSE_INDEX = "model.safetensors.index.json"


def load(
    path_or_hub_id: str | os.PathLike,
    *,
    kernels: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    backend: str = "auto",
    min_bitmap_sparsity: float | None = None,
):
    """Load an llmprune checkpoint (folder or Hub repo id) as a ``transformers`` model in eval mode.

    kernels: replace each pruned matrix that is 2:4, or bitmap with sparsity at least
        ``min_bitmap_sparsity`` (default: ``llmprune.kernels.linear.DEFAULT_MIN_BITMAP_SPARSITY``),
        by a ``SparseLinear`` (``backend`` as in ``SparseLinear``); packed weights of a
        compressed checkpoint are used as stored, without re-packing. Quantized 2:4 and
        bitmap weights of a version 2 checkpoint (the bitmap ones under the same sparsity
        rule) stay integer codes, ``QuantPacked24`` / ``QuantPackedBitmap`` in a quantized
        ``SparseLinear``; quantized weights stored as dense codes (no kernel reads them), or
        from a dense checkpoint, are dequantized and then treated as dense pruned weights
        (packed as float values if sparse enough; logged).
    dtype: None keeps the stored dtypes; else ``float32 | float16 | bfloat16`` (or a torch
        dtype) casts floating tensors after they were checked.
    device: where the parameters are materialized (one tensor at a time).
    revision: branch, tag or commit of a Hub repo (not for local folders).
    Raises UsageError (CheckpointError for bad files) with a one-line message.
    """
    cast = _parse_cast(dtype)
    folder = _resolve(path_or_hub_id, revision)
    meta = read_metadata(folder)
    if min_bitmap_sparsity is None:
        from llmprune.kernels.linear import DEFAULT_MIN_BITMAP_SPARSITY

        min_bitmap_sparsity = DEFAULT_MIN_BITMAP_SPARSITY
    if not 0.0 <= float(min_bitmap_sparsity) <= 1.0:
        raise UsageError(f"min_bitmap_sparsity must be in [0, 1], got {min_bitmap_sparsity!r}")
    entries = meta["pruned_weights"]
    if meta["format"] == fmt.FORMAT_COMPRESSED:

        def keep_packed(entry: dict) -> bool:
            if not kernels:
                return False
            if entry["storage"] == "2:4":
                return True
            size = entry["shape"][0] * entry["shape"][1]
            return entry["storage"] == "bitmap" and 1 - entry["nnz"] / size >= min_bitmap_sparsity

        model, packed = _load_compressed(folder, meta, cast, torch.device(device), trust_remote_code, keep_packed)
    else:
        model, packed = _load_dense(folder, meta, cast, torch.device(device), trust_remote_code), {}
    if kernels:
        _use_sparse_linear(model, entries, packed, backend=backend, min_bitmap_sparsity=min_bitmap_sparsity)
    model.to(device)  # the non-persistent buffers; parameters are already there
    model.eval()
    return model


# ------------------------------------------------------------------------------ resolving


def _parse_cast(dtype) -> torch.dtype | None:
    """None or "auto": keep the stored dtypes; else the dtype to cast floating tensors to."""
    parsed = "auto" if dtype is None else parse_dtype(dtype)
    return None if parsed == "auto" else parsed


def _resolve(source: str | os.PathLike, revision: str | None) -> Path:
    """A local folder, or the snapshot folder of a Hub repo (downloaded or from the HF cache)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UsageError(f"revision {revision!r} applies only to Hub repo ids, not to the folder {text!r}")
        return path
    if path.exists():
        raise UsageError(f"{text!r} is a file; pass the checkpoint folder (with {METADATA_FILE})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise HFValidationError(text)
        validate_repo_id(text)
    except HFValidationError:
        raise UsageError(f"checkpoint {text!r} is neither an existing folder nor a Hub repo id (owner/name)") from None
    try:
        return Path(snapshot_download(text, revision=revision, ignore_patterns=_HUB_IGNORE))
    except Exception as error:  # network, auth, missing repo: one line, the cause named
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UsageError(f"could not fetch {text!r} from the Hugging Face Hub: {type(error).__name__}: {first}") from None


def read_metadata(folder: Path) -> dict:
    """Read and check ``folder/llmprune.json``: format, version and pruned-weight entries."""
    path = folder / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: not an llmprune checkpoint (no {METADATA_FILE}); load a plain Hugging Face folder "
            "with transformers' AutoModelForCausalLM.from_pretrained"
        )
    meta = _read_json(path)
    if meta.get("format") not in (fmt.FORMAT_DENSE, fmt.FORMAT_COMPRESSED):
        raise CheckpointError(
            f"{path}: unknown format {meta.get('format')!r} (expected {fmt.FORMAT_DENSE} or {fmt.FORMAT_COMPRESSED})"
        )
    version = fmt.check_version(meta.get("format_version"), str(path))
    entries = meta.get("pruned_weights")
    if entries is None and meta["format"] == fmt.FORMAT_DENSE:
        entries = {}  # nothing declared: nothing to verify
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: pruned_weights must be a JSON object")
    meta["pruned_weights"] = {name: fmt.check_entry(e, f"{path}: tensor {name}", version) for name, e in entries.items()}
    return meta


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON (truncated?): {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------ dense


def _load_dense(folder: Path, meta: dict, cast, device, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if (folder / DENSE_INDEX).is_file():
        index = _read_json(folder / DENSE_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / DENSE_INDEX}: no weight_map")
    elif (folder / DENSE_WEIGHTS).is_file():
        weight_map = None
    else:
        raise CheckpointError(f"{folder}: a dense llmprune checkpoint needs {DENSE_WEIGHTS} or {DENSE_INDEX}")
    files = sorted(set(weight_map.values())) if weight_map is not None else [DENSE_WEIGHTS]
    headers = {f: st.read_header(_inside(folder, f)) for f in files}
    for key, file in (weight_map or {}).items():
        if key not in headers[file].tensors:
            raise CheckpointError(f"{folder / file}: tensor {key} is missing (listed in {DENSE_INDEX})")
    where = {key: file for file, header in headers.items() for key in header.tensors}

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto", use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True
    )
    for problem in ("missing_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(problem) or [])
        if keys:
            what = "is missing" if problem == "missing_keys" else "has the wrong shape"
            raise CheckpointError(f"{folder / (files[0] if len(files) == 1 else DENSE_INDEX)}: tensor {keys[0]} {what}")
    params = model.state_dict()
    for name, entry in meta["pruned_weights"].items():
        label = f"{folder / where.get(name, files[0])}: tensor {name}"
        if name not in params:
            raise CheckpointError(f"{label}: declared pruned in {METADATA_FILE} but not a parameter of the model")
        _check_declared(params[name], entry, label)
    if cast is not None:
        model.to(cast)  # parameter by parameter: peak is the model plus one tensor
    return model.to(device)


def _inside(folder: Path, name: object) -> Path:
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise CheckpointError(f"{folder}: bad shard name {name!r} in the index")
    return folder / name


def _check_declared(param: torch.Tensor, entry: dict, label: str) -> None:
    if list(param.shape) != entry["shape"] or fmt.dtype_name(param.dtype) != entry["dtype"]:
        raise CheckpointError(
            f"{label}: is {list(param.shape)} {fmt.dtype_name(param.dtype)} but declared "
            f"{entry['shape']} {entry['dtype']}"
        )
    fmt.verify_matrix(param.transpose(-2, -1) if entry["transposed"] else param, entry, label)


# ------------------------------------------------------------------------------ compressed


def _load_compressed(folder: Path, meta: dict, cast, device, trust_remote_code: bool, keep_packed):
    """Stream a compressed checkpoint into a meta-built model. Returns ``(model, {name: packed kept})``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    # 1. Every file check before any weight is read.
    index_path, headers, described, packed_keys, tied = _check_compressed_files(folder, meta)
    # 2. The skeleton: parameters on the meta device, buffers real (they are not all in the file).
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    expected = model.state_dict(keep_vars=True)
    # 3. Stream: one tensor (or one packed weight) at a time.
    kept: dict[str, object] = {}
    since_trim = 0  # bytes decompressed since freed heap memory was last given back
    for file, header in headers.items():
        label = str(folder / file)
        plain = [k for k in header.tensors if k not in packed_keys]
        for key, tensor in st.iter_tensors(header, plain, label):
            where = f"{label}: tensor {key}"
            target = expected.get(key)
            if target is None:
                raise CheckpointError(f"{where}: not a parameter or buffer of {type(model).__name__}")
            if tensor.shape != target.shape:
                raise CheckpointError(f"{where}: shape {list(tensor.shape)}, the model expects {list(target.shape)}")
            if key in described:
                _check_declared(tensor, described[key][1], where)
            set_tensor(model, key, _cast(tensor, cast).to(device))
        for name, (shard, entry) in described.items():
            if shard == file and fmt.entry_fields(entry):
                since_trim += _read_packed(model, expected, header, name, entry, label, cast, device, keep_packed, kept)
                if since_trim >= _TRIM_EVERY_BYTES:
                    _release_freed_memory()
                    since_trim = 0
    _release_freed_memory()
    # 4. Ties, then nothing may be left on the meta device.
    model.tie_weights()
    for alias, source in tied.items():
        if alias in expected and get_tensor(model, alias).is_meta and not get_tensor(model, source).is_meta:
            share_tensor(model, alias, source)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta and name not in kept:
            raise CheckpointError(f"{index_path}: tensor {name} is missing (no shard holds it)")
    _load_generation_config(model, folder)
    model.config._name_or_path = str(folder)
    return model, kept  # still holds meta weights where a packed one was kept: moved by load()


def _check_compressed_files(folder: Path, meta: dict):
    """The index, the shard headers and their weight descriptions, all checked against each
    other and ``llmprune.json``. Returns ``(index path, {file: header}, {weight: (file, entry)},
    packed tensor keys, tied aliases)``."""
    index_path = folder / fmt.INDEX_FILE
    index = _read_json(index_path)
    imeta = index.get("metadata") or {}
    if imeta.get("format") != fmt.FORMAT_COMPRESSED:
        raise CheckpointError(f"{index_path}: metadata.format is {imeta.get('format')!r}, expected {fmt.FORMAT_COMPRESSED}")
    version = fmt.check_version(imeta.get("format_version"), str(index_path))
    if version != int(meta["format_version"]):
        raise CheckpointError(f"{index_path}: format_version {version} differs from {METADATA_FILE}'s {meta['format_version']}")
    weight_map = index.get("weight_map")
    tied = imeta.get("tied") or {}
    if not isinstance(weight_map, dict) or not isinstance(tied, dict):
        raise CheckpointError(f"{index_path}: weight_map and metadata.tied must be JSON objects")
    headers = {f: st.read_header(_inside(folder, f)) for f in sorted(set(weight_map.values()))}
    for key, file in weight_map.items():
        if key not in headers[file].tensors:
            raise CheckpointError(f"{folder / file}: tensor {key} is missing (listed in {fmt.INDEX_FILE})")
    for file, header in headers.items():
        unlisted = sorted(k for k in header.tensors if weight_map.get(k) != file)
        if unlisted:
            raise CheckpointError(f"{folder / file}: tensor {unlisted[0]} is not listed in {fmt.INDEX_FILE}")
    described: dict[str, tuple[str, dict]] = {}
    for file, header in headers.items():
        for name, entry in fmt.shard_weights(header, str(folder / file), version).items():
            described[name] = (file, entry)
    declared = meta["pruned_weights"]
    for name in sorted(set(declared) | set(described)):
        if name not in described:
            raise CheckpointError(f"{index_path}: tensor {name}: declared pruned in {METADATA_FILE} but no shard describes it")
        file, entry = described[name]
        if declared.get(name) != entry:
            raise CheckpointError(f"{folder / file}: tensor {name}: its shard metadata {entry} differs from {METADATA_FILE}")
    packed_keys: set[str] = set()
    for name, (file, entry) in described.items():
        fields = fmt.entry_fields(entry)
        keys = [fmt.packed_key(name, f) for f in fields] if fields else [name]
        for key in keys:
            if weight_map.get(key) != file:
                what = entry["storage"] + (f" {entry['quant']['bits']}-bit codes" if entry.get("quant") else "")
                raise CheckpointError(f"{folder / file}: tensor {key} is missing (weight {name} is stored as {what})")
        if fields:
            packed_keys.update(keys)
    for name in described:
        if fmt.entry_fields(described[name][1]) and name in weight_map:
            raise CheckpointError(f"{folder / weight_map[name]}: tensor {name} is stored packed and must not also be a plain tensor")
    stray = sorted(k for k in weight_map if fmt.PACKED_SEP in k and k not in packed_keys)
    if stray:
        raise CheckpointError(f"{folder / weight_map[stray[0]]}: tensor {stray[0]} belongs to no described weight")
    return index_path, headers, described, packed_keys, tied


def _read_packed(model, expected: dict, header, name: str, entry: dict, label: str, cast, device, keep_packed,
                 kept: dict) -> int:
    """Read, check and decode one packed weight into ``model`` (or, with ``keep_packed``, into
    ``kept``). Returns the bytes of the decoded matrix."""
    where = f"{label}: tensor {name}"
    target = expected.get(name)
    if target is None or list(target.shape) != entry["shape"]:
        got = "no such parameter" if target is None else f"the model expects {list(target.shape)}"
        raise CheckpointError(f"{where}: declared shape {entry['shape']}, {got}")
    shape = fmt.matrix_shape(entry)
    # What stays (the dense matrix, or the packed tensors with kernels=True) is allocated
    # before what is freed, so the freed memory is at the top of the heap, reused by the
    # next weight (measured for SmolLM2 2:4 fp16: 1.17x -> 1.10x of the model before
    # trimming was added; with kernels=True, 1.28x -> 1.11x).
    keep = keep_packed(entry)
    keys = {fmt.packed_key(name, f): f for f in fmt.entry_fields(entry)}
    dtype = fmt.parse_dtype_name(entry["dtype"], where)
    matrix = None if keep else torch.empty(shape, dtype=dtype)  # [out, in]
    fields = {keys[k]: t for k, t in st.iter_tensors(header, list(keys), label)}
    if matrix is None:
        matrix = torch.empty(shape, dtype=dtype)
    if entry.get("quant"):
        fmt.decode_quantized(entry["storage"], fields, shape, entry["quant"], dtype, where, out=matrix)  # validated
    else:
        fmt.decode_packed(entry["storage"], fields, shape, where, out=matrix)  # validated
    fmt.verify_matrix(matrix, entry, where)
    if keep and entry.get("quant"):  # validated above: the constructor's shape checks suffice
        kept[name] = _cast_packed(_quant_packed(entry, fields, shape, dtype), cast).to(device)
    elif keep:  # blocks validated above: the constructor's shape checks suffice
        kept[name] = _cast_packed(fmt.packed_from_fields(entry["storage"], fields, shape), cast).to(device)
    else:
        weight = matrix.t().contiguous() if entry["transposed"] else matrix
        set_tensor(model, name, _cast(weight, cast).to(device))
        del weight
    return matrix.numel() * matrix.element_size()


_TRIM_EVERY_BYTES = 16 * 2**20
_MALLOC_TRIM: list = []


def _release_freed_memory() -> None:
    """Give the heap memory freed by decompression back to the OS (glibc ``malloc_trim``).

    Decoding leaves many small freed blocks between the model's tensors, and glibc keeps
    them: without this the process ended 20-50 MB above the model for SmolLM2-135M 2:4
    fp16 (up to 1.26x its size, varying run to run); trimming every 16 MB of decoded
    weights keeps the peak at 1.04-1.10x (``evals/load_memory.py``). A no-op without glibc.
    """
    if not _MALLOC_TRIM:
        trim = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                trim = None
        _MALLOC_TRIM.append(trim)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _quant_packed(entry: dict, fields: dict, shape: tuple[int, int], dtype: torch.dtype):
    """The kernels' ``QuantPacked24`` / ``QuantPackedBitmap`` over a quantized weight's validated
    tensors (the bitmap's nnz from the entry, so that no mask is expanded again)."""
    from llmprune.kernels.quantized import QuantPacked24, QuantPackedBitmap

    quant = entry["quant"]
    common = dict(shape=shape, bits=quant["bits"], groupsize=quant["groupsize"], dtype=dtype)
    if entry["storage"] == "2:4":
        return QuantPacked24(**fields, **common)
    return QuantPackedBitmap(**fields, **common, nnz=entry["nnz"])


def _cast_packed(packed, dtype: torch.dtype | None):
    """``packed`` with its values in ``dtype``: float values are cast; a quantized weight keeps
    its codes, scales and zeros and is dequantized to ``dtype`` instead."""
    if dtype is None or packed.dtype == dtype:
        return packed
    from llmprune.kernels.quantized import QuantPackedBitmap

    if hasattr(packed, "bits"):
        extra = {"nnz": packed.nnz} if isinstance(packed, QuantPackedBitmap) else {}
        return type(packed)(**packed.to_tensors(), shape=packed.shape, bits=packed.bits, groupsize=packed.groupsize,
                            dtype=dtype, **extra)
    tensors = packed.to_tensors()
    tensors["values"] = tensors["values"].to(dtype)
    return type(packed)(**tensors, shape=packed.shape)


def _load_generation_config(model, folder: Path) -> None:
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s: %s", folder / "generation_config.json", error)


# ------------------------------------------------------------------------------ kernels


def _kernel_format(matrix: torch.Tensor, min_bitmap_sparsity: float) -> str | None:
    from llmprune.kernels.formats import is_24, sparsity

    if matrix.shape[1] % 4 == 0 and is_24(matrix):
        return "2:4"
    return "bitmap" if sparsity(matrix) >= min_bitmap_sparsity else None


def _use_sparse_linear(model, entries: dict, kept: dict, *, backend: str, min_bitmap_sparsity: float) -> None:
    """Replace pruned modules by ``SparseLinear``: packed ones as loaded, dense ones packed now."""
    from llmprune.kernels.linear import SparseLinear

    converted = 0
    quantized = [name for name, entry in entries.items() if entry.get("quant") and name not in kept]
    if quantized:
        logger.info("kernels: %d quantized matrices are not kept as codes (dense codes, a bitmap below "
                    "min_bitmap_sparsity, or a dense checkpoint): their dequantized values are packed like a dense "
                    "checkpoint's matrices", len(quantized))
    for name, entry in entries.items():
        if len(entry["shape"]) != 2:
            continue  # fused MoE experts (3-D): no sparse kernel for them; they stay dense
        module_name = name.rpartition(".")[0]
        parent_name, _, child = module_name.rpartition(".")
        module = model.get_submodule(module_name)
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        if name in kept:
            new = SparseLinear(kept[name], bias, backend=backend)
        else:
            weight = module.weight.detach()
            fmt_name = _kernel_format(weight.t() if entry["transposed"] else weight, min_bitmap_sparsity)
            if fmt_name is None:
                continue
            new = SparseLinear.from_linear(module, fmt_name, backend, transposed=entry["transposed"])
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        converted += 1
    logger.info("kernels: %d of %d pruned matrices use SparseLinear", converted, len(entries))

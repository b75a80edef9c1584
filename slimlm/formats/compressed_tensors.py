"""Export a `slimlm quantize` folder to the compressed-tensors format of the vLLM ecosystem.

What is written (the tensors packed by our code; the config by compressed-tensors itself):
- one `model.safetensors`: every tensor of the slimlm folder that is not a quantized layer's weight,
  plus per quantized layer NAME: `NAME.weight_packed` (int32 (out, ceil(in·b/32)): the codes offset
  to unsigned, q + 2^(b-1), element i of a row at bits i·b.. of the row's little-endian int32 words),
  `NAME.weight_scale` (out, in/group or out × 1) and `NAME.weight_shape` ([out, in]);
- `config.json` with `quantization_config`, built from compressed-tensors' own models
  (`QuantizationConfig`, `QuantizationScheme`, `QuantizationArgs`) and written by its
  `ModelCompressor.update_config`: format `pack-quantized`, status `compressed`, one config group
  targeting exactly the quantized layers by name, weights {num_bits, type int, symmetric, strategy
  group (group_size) or channel}, no activation quantization (weight-only); the library adds
  `quant_method`, its `version` and an empty `sparsity_config`.

Faithful: the codes and scales are the ones slimlm stored, symmetric with zero-point 0, in natural column
order (slimlm's GPTQ has no act-order), so w = q · scale exactly. The scales are written as float32 holding
the float16 values slimlm computed with, so decompressing gives bit for bit the weights `slimlm.load`
rebuilds. 2:4 zeros are code 0 and come back as exact zeros, but they are stored densely: compressed-tensors
dropped its 2:4 sparse formats (sparse-24-bitmask) after 0.14, so the pattern is not declared.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import models
from . import quantized
from ..errors import SlimlmError
from ..output import move_into_place, open_up, staging_dir


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (out, in) in [-2^(b-1), 2^(b-1)) -> int32 words (out, ceil(in·b/32)), 32/b codes per
    word, the first code of a word in its lowest bits; rows are zero-padded to whole words."""
    if bits not in (4, 8):
        raise SlimlmError(f"compressed-tensors export supports 4- and 8-bit codes, not {bits}")
    per_word = 32 // bits
    unsigned = codes.to(torch.int64) + (1 << (bits - 1))
    pad = -unsigned.shape[1] % per_word
    unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned.reshape(unsigned.shape[0], -1, per_word) << shifts).sum(-1)  # < 2^32, exact in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, signed int32


def check_installed() -> None:
    _library()


def _library():
    try:
        from compressed_tensors import quantization
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import CompressionFormat
    except ImportError:
        raise SlimlmError("--format compressed-tensors needs the compressed-tensors package: run "
                          "`pip install --no-deps compressed-tensors==0.20.0 pydantic loguru psutil`") from None
    return quantization, ModelCompressor, CompressionFormat


def quantization_config(spec: dict):
    """compressed-tensors' own `QuantizationConfig` for the layers of a slimlm quantize spec: one
    weight-only scheme (symmetric int codes, per group or per channel) over exactly those layers."""
    q, _, CompressionFormat = _library()
    group = quantized.group_size_of(spec["group_size"])
    strategy = q.QuantizationStrategy.CHANNEL if group is None else q.QuantizationStrategy.GROUP
    weights = q.QuantizationArgs(num_bits=spec["bits"], type=q.QuantizationType.INT, symmetric=True,
                                 strategy=strategy, group_size=group)
    scheme = q.QuantizationScheme(targets=sorted(spec["layers"]), weights=weights,
                                  format=CompressionFormat.pack_quantized)
    return q.QuantizationConfig(config_groups={"group_0": scheme}, format=CompressionFormat.pack_quantized.value,
                                quantization_status=q.QuantizationStatus.COMPRESSED)


def convert(source: Path, destination: Path) -> dict:
    """Write the compressed-tensors form of the slimlm quantize folder `source` into the new folder
    `destination`. Returns the quantization_config written."""
    config = json.loads((source / "config.json").read_text())
    spec = config.pop("slimlm_quant", None)
    if spec is None:
        raise SlimlmError(f"{source} is not a `slimlm quantize` output (no slimlm_quant in config.json)")
    # compressed-tensors is a format transformers loads: give the folder its real model type back
    config["model_type"] = config.pop(models.SLIMLM_MODEL_TYPE, config["model_type"])
    state = {}
    for path in sorted(source.glob("*.safetensors")):
        if path.name not in (quantized.FILENAME, "slorb.safetensors"):
            state.update(load_file(str(path)))
    if any(".slorb." in key for key in state) or (source / "slorb.safetensors").exists():
        raise SlimlmError(f"{source} has SLoRB side paths, which compressed-tensors cannot express: "
                          "export a model without SLoRB")
    for name, (codes, scales) in quantized.read_codes(source, spec).items():
        state[f"{name}.weight_packed"] = pack_int32(codes, spec["bits"])
        state[f"{name}.weight_scale"] = scales.float().contiguous()  # float16 values, kept exact
        state[f"{name}.weight_shape"] = torch.tensor(list(codes.shape))
    qconfig = quantization_config(spec)
    save_file({k: v.contiguous() for k, v in state.items()}, str(destination / "model.safetensors"),
              metadata={"format": "pt"})
    (destination / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _, ModelCompressor, _ = _library()
    ModelCompressor(quantization_config=qconfig).update_config(str(destination))  # adds quantization_config
    for path in source.iterdir():  # tokenizer, generation config, chat template; the model card and report
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, destination / path.name)
    return json.loads((destination / "config.json").read_text())["quantization_config"]


def export(source: Path, output: Path, overwrite: bool = False) -> dict:
    """convert() into a temporary folder next to `output`, then rename it into place."""
    tmp = staging_dir(output)
    try:
        if output.exists() and not overwrite:
            raise SlimlmError(f"output folder {output} already exists: pass --overwrite")
        written = convert(source, tmp)
        open_up(tmp)
        move_into_place(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written

"""The quantization job: load, select targets, quantize their weights (RTN, or GPTQ block by block on
calibration windows), evaluate the model as it will run (dequantized), publish packed codes.

The zero-point is 0, so the exact zeros of a 2:4 (or any) pruned model stay exact. Output folder:
the stock checkpoint without the target weights, and `quant.safetensors` with, per target layer,
its scales (fp16) and either packed 2:4 codes (NAME.values, NAME.positions) or plain codes
(NAME.codes, two per byte at 4 bits); `config.json` names the layers under `slimlm_quant`.
`slimlm.load(DIR)` rebuilds the float weights. The format is described in docs/formats.md.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import ctexport, data, devices, models, oneshot, output, quant
from .errors import SlimlmError
from .prune.blockwise import prune_blockwise
from .sparsity import is_valid_nm

FILENAME = "quant.safetensors"
DEFAULTS = {
    "model": None, "bits": 4, "group_size": 128, "method": "rtn", "calib": None, "nsamples": 128, "seqlen": None,
    "seed": 0, "include": None, "ignore": None, "percdamp": 0.01, "blocksize": 128, "eval": None,
    "eval_dense": False, "eval_seqlen": None, "eval_windows": None, "device": "auto", "format": "slimlm",
}
METHODS = ("rtn", "gptq")
FORMATS = ("slimlm", "compressed-tensors")


def resolve_settings(**given) -> dict:
    return oneshot.resolve_settings(DEFAULTS, **given)


def run(settings: dict, output_dir: str | None = None, overwrite: bool = False) -> dict:
    if settings["method"] not in METHODS:
        raise SlimlmError(f"unknown quantization method '{settings['method']}': choose rtn or gptq")
    if settings["format"] not in FORMATS:
        raise SlimlmError(f"unknown output format '{settings['format']}': choose slimlm or compressed-tensors")
    if settings["bits"] not in quant.BITS:
        raise SlimlmError(f"--bits {settings['bits']} is not supported: choose 4 or 8")
    out_path = output.check_output_dir(output_dir, overwrite) if output_dir else None
    group = group_size_of(settings["group_size"])
    settings["device"] = devices.resolve(settings["device"], announce=True)
    loaded = models.load(settings["model"], device=settings["device"])
    if settings["calib"] or settings["eval"]:
        oneshot.fit_windows(loaded, settings)
    targets = models.find_targets(loaded.model, settings["include"], settings["ignore"])
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    evaluation = {}
    eval_stream = data.load_tokens(loaded.tokenizer, settings["eval"]) if settings["eval"] else None
    if eval_stream is not None and settings["eval_dense"]:
        evaluation["before"] = oneshot.evaluate(loaded, eval_stream, settings)

    @torch.no_grad()
    def quantize_layer(name, module, stats=None):
        W = models.weight_matrix(module)
        if group and W.shape[1] % group:
            raise SlimlmError(f"layer '{name}' has input width {W.shape[1]}, not divisible by --group-size {group}: "
                              "choose a group size that divides it, or -1 for one scale per output channel")
        if stats is None:
            codes, scales = quant.rtn(W, settings["bits"], group)
        else:
            try:
                codes, scales = quant.gptq(W, stats.hessian, settings["bits"], group, mask=W != 0,
                                           damp=settings["percdamp"], block_size=settings["blocksize"])
            except torch.linalg.LinAlgError:
                raise SlimlmError(f"GPTQ: the Hessian of '{name}' is not positive definite even after dampening "
                                  f"by {settings['percdamp']}: raise --percdamp or use more calibration data") from None
        scales = scales.half().float()  # stored as fp16: compute with exactly what is stored
        W.copy_(quant.dequantize(codes, scales, group).to(W.dtype))
        layers[name] = (codes, scales)

    start = time.perf_counter()
    windows = None
    if settings["method"] == "gptq":
        if not settings["calib"]:
            raise SlimlmError("--method gptq needs calibration data: pass --calib")
        calib = data.load_tokens(loaded.tokenizer, settings["calib"], split="train")
        windows = data.calibration_windows(calib, settings["nsamples"], settings["seqlen"], settings["seed"])
        prune_blockwise(loaded.model, targets, windows, quantize_layer, hessian=True, desc="quantizing blocks (GPTQ)")
    else:
        for name, module in targets.items():
            quantize_layer(name, module)
    seconds = time.perf_counter() - start
    if eval_stream is not None:
        evaluation["quantized"] = oneshot.evaluate(loaded, eval_stream, settings)

    tensors, kinds = pack(layers, settings["bits"], group)
    report = {
        "command": "quantize", "base_model": settings["model"], "settings": settings, "seconds": seconds,
        "layers": kinds, "sizes": sizes(loaded.model, layers, tensors), "evaluation": evaluation,
        "calibration": None if windows is None else {"data": settings["calib"], "windows": len(windows),
                                                       "seqlen": settings["seqlen"], "seed": settings["seed"]},
        "model_kind": loaded.kind, "versions": output.versions(),
    }
    if out_path is not None:
        loaded.model.config.slimlm_quant = {"bits": settings["bits"], "group_size": group or -1,
                                            "method": settings["method"], "layers": kinds}

        def save_codes(folder: Path) -> None:
            save_file(tensors, str(folder / FILENAME))

        probe = (windows[0] if windows is not None else torch.arange(32))[:64].unsqueeze(0)
        publish = lambda folder, replace, shown_path=None: output.publish(  # noqa: E731
            loaded, folder, replace, settings, report, _card(report), list(targets), None,
            probe.to(next(loaded.model.parameters()).device), extra_save=save_codes,
            drop=[f"{name}.weight" for name in targets], shown_path=shown_path)
        if settings["format"] == "slimlm":
            publish(out_path, overwrite)
        else:
            # the slimlm folder is written and reload-checked first, then converted from it
            staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.staging-", dir=out_path.parent))
            try:
                publish(staging / "slimlm", False, shown_path=out_path)
                ctexport.export(staging / "slimlm", out_path, overwrite)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return report


def pack(layers: dict, bits: int, group: int | None) -> tuple[dict, dict]:
    """Tensors for quant.safetensors and each layer's storage kind ('2:4' packed or 'dense')."""
    tensors, kinds = {}, {}
    for name, (codes, scales) in layers.items():
        if codes.shape[1] % 4 == 0 and is_valid_nm(codes, 2, 4):
            packed = quant.pack_24(codes, bits)
            tensors[f"{name}.values"], tensors[f"{name}.positions"] = packed["values"], packed["positions"]
            kinds[name] = "2:4"
        else:
            tensors[f"{name}.codes"] = quant.pack_dense(codes, bits)
            kinds[name] = "dense"
        tensors[f"{name}.scales"] = scales.half().contiguous()
    return {k: v.cpu() for k, v in tensors.items()}, kinds


def sizes(model, layers: dict, tensors: dict) -> dict:
    """Bytes of the target layers' weights: dense fp16, 2:4 fp16 (values + 2-bit positions), and as stored."""
    numel = sum(codes.numel() for codes, _ in layers.values())
    return {"target_weights": numel, "dense_fp16_bytes": 2 * numel, "sparse_24_fp16_bytes": numel + numel // 8,
            "stored_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "other_parameters": sum(p.numel() for p in model.parameters()) - numel}


def read_codes(folder: Path, spec: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{NAME: (int8 codes (out, in), float32 scales)} of the quantized layers, unpacked from quant.safetensors."""
    path = folder / FILENAME
    if not path.is_file():
        raise SlimlmError(f"{folder}: config.json lists quantized layers but {FILENAME} is missing")
    tensors = load_file(str(path))
    layers = {}
    for name, kind in spec["layers"].items():
        if kind == "2:4":
            values = tensors[f"{name}.values"]  # 2 of every 4 columns; 4-bit: two per byte
            shape = (values.shape[0], values.shape[1] * (2 if values.dtype == torch.int8 else 4))
            codes = quant.unpack_24({"values": values, "positions": tensors[f"{name}.positions"]}, shape)
        else:
            codes = quant.unpack_dense(tensors[f"{name}.codes"])
        layers[name] = (codes, tensors[f"{name}.scales"].float())
    return layers


def group_size_of(group_size: int | None) -> int | None:
    """A --group-size (or config.slimlm_quant's) as quant.py takes it: None for one scale per output
    channel, which the options spell -1 (or 0, or nothing)."""
    return None if group_size in (None, -1, 0) else group_size


def describe_group(group_size: int | None) -> str:
    group = group_size_of(group_size)
    return "per channel" if group is None else f"group {group}"


def load_into(model, folder: Path, spec: dict) -> None:
    """Rebuild the float weights of the quantized layers (slimlm.load calls this)."""
    codes = read_codes(folder, spec)
    with torch.no_grad():
        for name, (layer_codes, scales) in codes.items():
            W = models.weight_matrix(model.get_submodule(name))
            if tuple(W.shape) != tuple(layer_codes.shape):
                raise SlimlmError(f"{folder}: layer {name} is {tuple(W.shape)} but its codes are {tuple(layer_codes.shape)}")
            W.copy_(quant.dequantize(layer_codes, scales, group_size_of(spec["group_size"])).to(W.dtype))


def _card(report: dict) -> str:
    s, z = report["settings"], report["sizes"]
    summary = [f"`{report['base_model']}` with the weights of {len(report['layers'])} layers quantized to "
               f"**int{s['bits']}** ({describe_group(s['group_size'])}, "
               f"{s['method'].upper()}, symmetric, zeros kept exact).",
               f"Target weights: {z['stored_bytes']:,} bytes stored (fp16 dense: {z['dense_fp16_bytes']:,}; "
               f"2:4 fp16: {z['sparse_24_fp16_bytes']:,}); layers packed as 2:4: "
               f"{sum(k == '2:4' for k in report['layers'].values())}."]
    results = {f"perplexity ({k}, {v['data']}, {v['windows']}x{v['seqlen']})": v["perplexity"]
               for k, v in report["evaluation"].items()}
    how = "import slimlm\nmodel = slimlm.load(\"PATH\")  # dequantizes the packed codes (quant.safetensors)"
    if s.get("format") == "compressed-tensors":
        how = ("# compressed-tensors pack-quantized, the format vLLM reads (not tested with vLLM here)\n"
               "from transformers import AutoModelForCausalLM, CompressedTensorsConfig\n"
               "model = AutoModelForCausalLM.from_pretrained(\"PATH\", quantization_config="
               "CompressedTensorsConfig(dequantize=True))")
    return output.model_card(f"{report['base_model']} — int{s['bits']} {s['method']}", report,
                             summary, results, how, ["slimlm", "quantization", f"int{s['bits']}", s["method"]],
                             slimlm_only=s.get("format") != "compressed-tensors")

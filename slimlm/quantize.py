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
from safetensors.torch import save_file

from . import data, devices, models, output, pruning
from . import markdown as md
from .errors import SlimlmError
from .formats import compressed_tensors
from .formats.quantized import FILENAME, describe_group, group_size_of, pack, sizes
from .ops import quant
from .ops.sparsity import parse_sparsity
from .prune.blockwise import prune_blockwise

DEFAULTS = {
    "model": None, "bits": 4, "group_size": 128, "method": "rtn", "calib": None, "nsamples": 128, "seqlen": None,
    "seed": 0, "include": None, "ignore": None, "percdamp": 0.01, "blocksize": 128, "eval": None,
    "eval_dense": False, "eval_seqlen": None, "eval_windows": None, "eval_bos": "auto", "device": "auto", "format": "slimlm",
}
METHODS = ("rtn", "gptq")
FORMATS = ("slimlm", "compressed-tensors")


def resolve_settings(**given) -> dict:
    return pruning.resolve_settings(DEFAULTS, **given)


def run(settings: dict, output_dir: str | None = None, overwrite: bool = False) -> dict:
    if settings["method"] not in METHODS:
        raise SlimlmError(f"unknown quantization method '{settings['method']}': choose rtn or gptq")
    if settings["format"] not in FORMATS:
        raise SlimlmError(f"unknown output format '{settings['format']}': choose slimlm or compressed-tensors")
    if settings["bits"] not in quant.BITS:
        raise SlimlmError(f"--bits {settings['bits']} is not supported: choose 4 or 8")
    out_path = output.check_output_dir(output_dir, overwrite) if output_dir else None
    if settings["format"] == "compressed-tensors":
        compressed_tensors.check_installed()  # before any work, not after quantizing
    group = group_size_of(settings["group_size"])
    settings["device"] = devices.resolve(settings["device"], announce=True)
    loaded = models.load(settings["model"], device=settings["device"])
    if settings["calib"] or settings["eval"]:
        pruning.fit_windows(loaded, settings)
    targets = models.find_targets(loaded.model, settings["include"], settings["ignore"])
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    evaluation = {}
    eval_stream = data.load_tokens(loaded.tokenizer, settings["eval"]) if settings["eval"] else None
    if eval_stream is not None and settings["eval_dense"]:
        evaluation["before"] = pruning.evaluate(loaded, eval_stream, settings)

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
        evaluation["quantized"] = pruning.evaluate(loaded, eval_stream, settings)

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
        # the layers stored as packed 2:4 codes are checked to be exact 2:4 again after the reload
        packed_24 = [name for name, kind in kinds.items() if kind == "2:4"]
        publish = lambda folder, replace, shown_path=None: output.publish(  # noqa: E731
            loaded, folder, replace, settings, report, _card(report), packed_24,
            parse_sparsity("2:4") if packed_24 else None,
            probe.to(next(loaded.model.parameters()).device), extra_save=save_codes,
            drop=[f"{name}.weight" for name in targets], shown_path=shown_path)
        if settings["format"] == "slimlm":
            publish(out_path, overwrite)
        else:
            # the slimlm folder is written and reload-checked first, then converted from it
            staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.staging-", dir=out_path.parent))
            try:
                publish(staging / "slimlm", False, shown_path=out_path)
                compressed_tensors.export(staging / "slimlm", out_path, overwrite)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return report


def _card(report: dict) -> str:
    s, z = report["settings"], report["sizes"]
    summary = [f"{md.code(report['base_model'])} with the weights of {len(report['layers'])} layers quantized to "
               f"**int{s['bits']}** ({describe_group(s['group_size'])}, "
               f"{s['method'].upper()}, symmetric, zeros kept exact).",
               f"Target weights: {z['stored_bytes']:,} bytes stored (fp16 dense: {z['dense_fp16_bytes']:,}; "
               f"2:4 fp16: {z['sparse_24_fp16_bytes']:,}); layers packed as 2:4: "
               f"{sum(k == '2:4' for k in report['layers'].values())}."]
    results = {f"perplexity ({k}, {v['data']}, {v['windows']}x{v['seqlen']}, {pruning.bos_label(v)})": v["perplexity"]
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

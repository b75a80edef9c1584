"""compressed-tensors export: the folder written by `slimlm quantize --format compressed-tensors`, loaded by
transformers through compressed-tensors' own decompression, holds exactly the weights slimlm rebuilds."""
import json

import pytest
import torch

import slimlm
from slimlm.formats import compressed_tensors as ctexport
from slimlm.cli import main
from slimlm.models import find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm

compressed_tensors = pytest.importorskip("compressed_tensors", reason="pip install --no-deps compressed-tensors (make install)")


def load_with_compressed_tensors(folder):
    import transformers

    config = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)


@pytest.mark.parametrize("bits,group", [(4, 16), (8, -1)])
def test_export_round_trips_exactly_through_compressed_tensors(model_dirs, tmp_path, bits, group):
    sparse = tmp_path / "sparse"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--sparsity", "2:4",
                 "--output", str(sparse)]) == 0
    common = ["--model", str(sparse), "--bits", str(bits), "--group-size", str(group), "--method", "rtn"]
    assert main(["quantize", *common, "--output", str(tmp_path / "ours")]) == 0
    assert main(["quantize", *common, "--format", "compressed-tensors", "--output", str(tmp_path / "ct")]) == 0

    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and weights["num_bits"] == bits and weights["symmetric"]
    assert weights["strategy"] == ("channel" if group == -1 else "group")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folders left behind
    # written by compressed-tensors itself, and its own model reads it back
    from compressed_tensors.quantization import QuantizationConfig

    assert config["version"] == compressed_tensors.__version__ and config["quant_method"] == "compressed-tensors"
    fields = QuantizationConfig.model_fields
    parsed = QuantizationConfig.model_validate({k: v for k, v in config.items() if k in fields})
    assert parsed.quantization_status == "compressed" and parsed.config_groups["group_0"].input_activations is None

    ours = slimlm.load(str(tmp_path / "ours"))
    theirs = load_with_compressed_tensors(tmp_path / "ct")
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[key]), key  # bit-exact, every tensor
    targets = find_targets(theirs)
    assert parsed.config_groups["group_0"].targets == sorted(targets)  # exactly the quantized layers, by name
    for name, module in targets.items():
        assert is_valid_nm(weight_matrix(module), 2, 4), name  # the 2:4 zeros survive as exact zeros
    probe = torch.arange(24).unsqueeze(0)
    assert torch.equal(ours(probe).logits, theirs(probe).logits)


def test_packing_matches_compressed_tensors_helpers():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    torch.manual_seed(0)
    for bits, width in ((4, 40), (8, 36)):  # widths that leave a partial last word
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, width), dtype=torch.int8)
        packed = ctexport.pack_int32(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (5, -(-width * bits // 32))
        assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, width])), codes)


def test_export_refuses_a_folder_that_is_not_quantized(model_dirs, tmp_path):
    with pytest.raises(slimlm.errors.SlimlmError, match="not a `slimlm quantize` output"):
        ctexport.export(model_dirs["llama"], tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and not list(tmp_path.iterdir())

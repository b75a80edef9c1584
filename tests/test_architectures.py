"""The architecture matrix: a tiny random model of every family users bring (LLaMA-3, Mistral with a
sliding window, Qwen2 with max_window_layers, Qwen3 with q/k norms, Gemma-2/3 with sandwich norms,
alternating attention, tied embeddings and soft-capping, Phi-3 with fused qkv/gate_up, GPT-NeoX with
fused query_key_value, GPT-2's Conv1D, OPT, BERT), each through the CLI: prune with every method, AST,
quantize (RTN int8/int4, GPTQ), and a reload with identical outputs. docs/architecture.md lists the result.

Unmarked (every family, seconds each): Wanda 2:4, then int4 RTN of the pruned model. Slow: the rest."""
import json

import pytest
import torch
import transformers

import slimlm
from conftest import VOCAB, assert_transformers_refuses
from slimlm.cli import main
from slimlm.models import find_targets, weight_matrix
from slimlm.ops.sparsity import is_valid_nm
from slimlm.output import outputs_of

T = transformers
# widths divisible by 4 (2:4) and by the quantization group (16); 4 heads of 16
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama3": lambda: T.LlamaConfig(**DECODER, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": lambda: T.MistralConfig(**DECODER, sliding_window=16),  # shorter than the 32-token windows
    "qwen2": lambda: T.Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "qwen3": lambda: T.Qwen3Config(**DECODER, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**DECODER, head_dim=16, sliding_window=16),
    "gemma3": lambda: T.Gemma3TextConfig(**DECODER, head_dim=16, sliding_window=16,
                                         layer_types=["sliding_attention", "full_attention"],
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "phi3": lambda: T.Phi3Config(**{**DECODER, "num_key_value_heads": 4}, pad_token_id=4),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
    "bert": lambda: T.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256),
}
CALIB = ["--nsamples", "4", "--seqlen", "32"]
PROBE = torch.randint(5, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    """{family: folder}, each built on first use."""
    built = {}

    def get(family):
        if family not in built:
            torch.manual_seed(0)
            config = FAMILIES[family]()
            model = T.BertModel(config) if family == "bert" else T.AutoModelForCausalLM.from_config(config)
            folder = tmp_path_factory.mktemp(f"arch-{family}")
            model.eval().save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[family] = folder
        return built[family]
    return get


def auto_class(family):
    return T.AutoModel if family == "bert" else T.AutoModelForCausalLM


def report_of(folder):
    report = json.loads((folder / "report.json").read_text())
    assert report["reload_check"]["max_abs_output_diff"] == 0.0  # the job's own reload check: identical outputs
    return report


@torch.no_grad()
def check_plain(folder, family, sparsity=(2, 4)):
    """A plain checkpoint: transformers and slimlm.load give the same model, every target layer 2:4."""
    report_of(folder)
    plain = auto_class(family).from_pretrained(folder).eval()
    targets = find_targets(plain)
    assert targets and all(is_valid_nm(weight_matrix(m), *sparsity) for m in targets.values())
    assert torch.equal(outputs_of(plain, PROBE), outputs_of(slimlm.load(str(folder)), PROBE))


@torch.no_grad()
def check_quantized(folder, family):
    report = report_of(folder)
    assert report["layers"]
    model = slimlm.load(str(folder))
    assert torch.isfinite(outputs_of(model, PROBE)).all()
    assert_transformers_refuses(folder, auto_class(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wanda_then_int4(family, family_dirs, text_file, tmp_path):
    pruned, quantized = tmp_path / "wanda", tmp_path / "int4"
    assert main(["prune", "--model", str(family_dirs(family)), "--method", "wanda", "--calib", str(text_file),
                 *CALIB, "--output", str(pruned)]) == 0
    check_plain(pruned, family)
    assert main(["quantize", "--model", str(pruned), "--bits", "4", "--group-size", "16",
                 "--output", str(quantized)]) == 0
    check_quantized(quantized, family)
    assert set(report_of(quantized)["layers"].values()) == {"2:4"}  # the zeros of 2:4 packed as such


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("job", ["magnitude", "sparsegpt", "reconstruct", "ast", "int8", "gptq"])
def test_matrix(family, job, family_dirs, text_file, tmp_path, capsys):
    folder, out = family_dirs(family), tmp_path / job
    if job in ("magnitude", "sparsegpt", "reconstruct"):
        method = ["--method", "sparsegpt", "--reconstruct", "--reconstruct-steps", "8", "--reconstruct-batch", "2",
                  "--reconstruct-lr", "1e-3"] if job == "reconstruct" else ["--method", job]
        assert main(["prune", "--model", str(folder), *method, "--calib", str(text_file), *CALIB,
                     "--output", str(out)]) == 0
        check_plain(out, family)
        if job == "reconstruct":
            rec = report_of(out)["reconstruction"]
            assert len(rec["blocks"]) == 2 and rec["mean_error_after"] <= rec["mean_error_before"]
            assert any(b["kept"] == "trained" for b in rec["blocks"])
    elif job == "ast":
        rc = main(["train", "--recipe", "ast", "--output", str(out), "--model", str(folder),
                   f"data.train={text_file}", "data.seqlen=32", "train.batch_size=2", "train.steps=4",
                   "method.nsamples=4", "data.eval_windows=2"])
        if family == "bert":  # AST trains causal language models; encoders get a clear refusal
            assert rc == 2 and "encoder model, which the ast method does not train" in capsys.readouterr().err
            return
        assert rc == 0
        check_plain(out, family)
    else:
        extra = ["--bits", "8"] if job == "int8" else ["--bits", "4", "--method", "gptq", "--calib", str(text_file), *CALIB]
        assert main(["quantize", "--model", str(folder), "--group-size", "16", *extra, "--output", str(out)]) == 0
        check_quantized(out, family)


def test_tied_lm_head_is_refused(family_dirs, tmp_path, capsys):
    """Gemma's LM head is the embedding matrix: compressing it alone would silently compress both."""
    rc = main(["prune", "--model", str(family_dirs("gemma2")), "--method", "magnitude", "--include", "^lm_head$",
               "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "'lm_head' shares its weight with 'model.embed_tokens' (tied embeddings)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_image_text_and_encoder_decoder_models_are_refused(tmp_path, capsys):
    """Gemma-3 4B+ checkpoints are Gemma3ForConditionalGeneration: they would load as a headless base model."""
    text = T.Gemma3TextConfig(**DECODER, head_dim=16)
    config = T.Gemma3Config(text_config=text.to_dict())
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(tmp_path / "g3")
    config = T.T5Config(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2)
    config.architectures = ["T5ForConditionalGeneration"]
    config.save_pretrained(tmp_path / "t5")
    for name, extra in (("g3", "its language model alone"), ("t5", "encoder-decoder")):
        assert main(["prune", "--model", str(tmp_path / name), "--method", "magnitude",
                     "--output", str(tmp_path / f"{name}-out")]) == 2
        err = capsys.readouterr().err
        assert "ForConditionalGeneration (encoder-decoder or image-text)" in err and extra in err

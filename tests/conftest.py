"""Tiny random models of real architectures (LLaMA, GPT-2, OPT, BERT) with a tiny BPE tokenizer
trained on real text from ../shared/data, saved as ordinary HF folders."""
from pathlib import Path

import pytest
import torch
import transformers

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():  # a checkout with shared/ inside it
    DATA = Path(__file__).resolve().parents[1] / "shared" / "data"

VOCAB = 384


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (DATA / "sotu" / "valid.txt").read_text()[:100_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "[CLS]", "[SEP]", "[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="[PAD]")


def tiny_config(arch: str, hidden: int = 32, intermediate: int = 64, layers: int = 2):
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, tie_word_embeddings=True)
    if arch in ("mistral", "qwen2"):
        cls = transformers.MistralConfig if arch == "mistral" else transformers.Qwen2Config
        return cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512)
    if arch == "opt":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=hidden)
    if arch == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                       num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=512)
    raise ValueError(arch)


def build_model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = tiny_config(arch, **kw)
    cls = transformers.BertModel if arch == "bert" else transformers.AutoModelForCausalLM
    model = cls(config) if arch == "bert" else cls.from_config(config)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def token_cache(tmp_path_factory):
    """Every test's token cache in a temporary folder (never ~/.cache); subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("token-cache")
    old, os.environ["SLIMLM_TOKEN_CACHE"] = os.environ.get("SLIMLM_TOKEN_CACHE"), str(folder)
    yield folder
    if old is None:
        os.environ.pop("SLIMLM_TOKEN_CACHE")
    else:
        os.environ["SLIMLM_TOKEN_CACHE"] = old


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} for every architecture, saved once per test session."""
    dirs = {}
    for arch in ("llama", "gpt2", "opt", "bert"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        build_model(arch).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[arch] = folder
    return dirs


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """About 60k characters of real text."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text((DATA / "sotu" / "test.txt").read_text()[:60_000])
    return path


def assert_transformers_refuses(folder, auto_class=None):
    """A folder only slimlm can rebuild: plain transformers must fail (its message says to use
    slimlm.load), never load a model with randomly initialised layers."""
    auto_class = auto_class or transformers.AutoModelForCausalLM
    with pytest.raises(ValueError, match=r"slimlm\.load"):
        auto_class.from_pretrained(folder)

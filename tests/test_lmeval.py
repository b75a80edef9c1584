"""The lm-evaluation-harness adapter and `slimlm eval --tasks` on a local task built from real text."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from conftest import DATA, build_model  # noqa: E402
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.eval.lmeval import SlimlmLM, encode_pair, rolling_pairs, score_pairs
from slimlm.models import LoadedModel
from slimlm.eval.tasks import run_tasks

TEXT = (DATA / "sotu" / "test.txt").read_text()[:20_000]


def task_builder():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sotu_next_task.py"
    spec = importlib.util.spec_from_file_location("sotu_next_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@torch.no_grad()
def direct_logprob(model, context_ids, continuation_ids):
    """Sum of log p(continuation | context) from one unbatched, unpadded forward pass."""
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(context_ids)
    return sum(logprobs[n - 1 + k, t].item() for k, t in enumerate(continuation_ids))


@pytest.fixture(scope="module")
def llama():
    return build_model("llama", seed=0)


def test_loglikelihood_matches_a_direct_forward_pass(llama, tokenizer):
    # sentences of different lengths, so the batches are padded; one empty context
    sentences = [s.strip() + "." for s in TEXT.split(".")[:12] if s.strip()]
    pairs = [(" ".join(sentences[:i]), " " + sentences[i]) for i in range(1, 7)]  # all under 512 tokens
    pairs += [("The people of this country ", "continue to enjoy great prosperity."), ("", sentences[0])]
    lm = SlimlmLM(llama, tokenizer, max_length=512, batch_size=3, progress=False)
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got):
        if context:
            whole = tokenizer.encode(context.rstrip() + context[len(context.rstrip()):] + continuation)
            n = len(tokenizer.encode(context.rstrip()))
            ctx, cont = whole[:n], whole[n:]
        else:
            ctx, cont = [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
        assert len(ctx + cont) <= 512
        assert logprob == pytest.approx(direct_logprob(llama, ctx, cont), abs=1e-4)
    # the trailing space moved to the continuation: the continuation starts with the space-word token
    ctx, cont = encode_pair(tokenizer, "The people of this country ", "continue", tokenizer.bos_token_id)
    assert tokenizer.decode(cont).startswith(" ") and not tokenizer.decode(ctx).endswith(" ")


def test_is_greedy_and_left_truncation(llama, tokenizer):
    context = tokenizer.encode(TEXT[:300])
    greedy = []
    ids = list(context)
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(greedy[-1])
    other = [(greedy[0] + 1) % 384] + greedy[1:]
    (lp_greedy, is_greedy), (lp_other, not_greedy) = score_pairs(llama, [(context, greedy), (context, other)], 512)
    assert is_greedy and not not_greedy and lp_greedy > lp_other

    # inputs longer than max_length keep their last max_length tokens (the continuation and the context's end)
    (truncated, _), = score_pairs(llama, [(context, greedy)], max_length=20)
    assert truncated == pytest.approx(direct_logprob(llama, context[-(20 + 1 - len(greedy)):], greedy), abs=1e-4)
    assert truncated != pytest.approx(lp_greedy, abs=1e-4)


def test_rolling_loglikelihood_predicts_every_token_once(llama, tokenizer):
    ids = tokenizer.encode(TEXT[:400], add_special_tokens=False)
    bos = tokenizer.bos_token_id
    pairs = rolling_pairs(ids, bos, max_length=64)
    assert sum(len(c) for _, c in pairs) == len(ids)
    assert [t for _, c in pairs for t in c] == ids
    assert all(len(ctx) + len(c) <= 65 for ctx, c in pairs) and len(pairs[-1][0]) + len(pairs[-1][1]) == 65

    lm = SlimlmLM(llama, tokenizer, max_length=512, batch_size=2, progress=False)
    short = TEXT[:200]
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,)]))
    short_ids = tokenizer.encode(short, add_special_tokens=False)
    assert len(short_ids) < 512
    assert total == pytest.approx(direct_logprob(llama, [bos], short_ids), abs=1e-4)
    # windowed: the sum over windows equals scoring each window's targets with its own context
    lm.max_length = 64
    (windowed,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT[:400],)]))
    assert windowed == pytest.approx(sum(direct_logprob(llama, ctx, c) for ctx, c in pairs), abs=1e-3)


def test_generate_until_is_greedy_and_stops(llama, tokenizer):
    lm = SlimlmLM(llama, tokenizer, max_length=512, batch_size=2, progress=False)
    contexts = [TEXT[:120], TEXT[200:260], TEXT[400:700]]
    free = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 6}) for c in contexts]))
    for context, text in zip(contexts, free):
        ids = tokenizer.encode(context)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        expected = tokenizer.decode(ids[len(tokenizer.encode(context)):])
        assert text == expected.split("</s>")[0]
    # a stop string taken from the free generation cuts it there
    stop = free[0].strip()[-2:]
    assert stop.strip()
    (cut,) = lm.generate_until(requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 6})]))
    assert cut == free[0].split(stop)[0] and len(cut) < len(free[0])


def test_local_task_end_to_end(model_dirs, text_file, tmp_path, tokenizer, capfd, monkeypatch):
    task_yaml = task_builder().write_task(tmp_path / "tasks", (DATA / "sotu" / "test.txt").read_text(), n=30, seed=0)
    docs = [json.loads(line) for line in (tmp_path / "tasks" / "sotu_next.jsonl").read_text().splitlines()][:10]
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--output", str(pruned)]) == 0
    out = tmp_path / "scores.json"
    monkeypatch.chdir(tmp_path)  # outside a git repository, where lm-eval's `git describe` fails
    capfd.readouterr()
    assert main(["eval", "--model", str(pruned), "--tasks", "sotu_next", "--include-path", str(task_yaml.parent),
                 "--limit", "10", "--seqlen", "512", "--json", str(out)]) == 0
    printed = capfd.readouterr()  # file descriptors: git's stderr too
    assert "sotu_next" in printed.out and "acc" in printed.out
    assert "fatal" not in printed.err and "warning" not in printed.err.lower()

    # accuracy recomputed from direct forward passes of the saved 2:4 model
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(pruned).eval()
    correct = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["context"] + " " + choice)
            n = len(tokenizer.encode(doc["context"]))
            assert len(whole) <= 512
            scores.append(direct_logprob(model, whole[:n], whole[n:]))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    result = json.loads(out.read_text())["tasks"]["sotu_next"]
    assert result["samples"] == 10 and result["num_fewshot"] == 0 and result["limit"] == 10
    assert result["metrics"]["acc"] == pytest.approx(correct / 10)
    assert result["stderr"]["acc"] > 0 and 0 <= result["metrics"]["acc_norm"] <= 1

    # the run's report and model card now carry the scores
    report = json.loads((pruned / "report.json").read_text())
    assert report["lm_eval"]["sotu_next"]["metrics"] == result["metrics"]
    card = (pruned / "README.md").read_text()
    assert f"| sotu_next | acc | {correct / 10:.4f} |" in card
    assert card.index("lm-evaluation-harness") < card.index("## How to load")
    # a second evaluation replaces the section rather than adding another one
    assert main(["eval", "--model", str(pruned), "--tasks", str(task_yaml), "--limit", "4", "--seqlen", "512"]) == 0
    card = (pruned / "README.md").read_text()
    assert card.count("## lm-evaluation-harness") == 1 and "| 4 |" in card


def test_task_errors_name_the_problem(model_dirs, tmp_path, monkeypatch):
    loaded = LoadedModel(build_model("llama"), None, "tiny", "causal-lm")
    with pytest.raises(SlimlmError, match="no-such-task.yaml"):
        run_tasks(loaded, ["no-such-task.yaml"])
    with pytest.raises(SlimlmError, match="missing-folder"):
        run_tasks(loaded, ["x"], include_path=[str(tmp_path / "missing-folder")])
    with pytest.raises(SlimlmError, match="causal LM"):
        run_tasks(LoadedModel(build_model("bert"), None, "bert", "encoder"), ["boolq"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(SlimlmError, match=r"pip install 'slimlm\[eval\]'"):
        run_tasks(loaded, ["boolq"])
    assert main(["eval", "--model", str(model_dirs["llama"])]) == 2  # neither --data nor --tasks


@pytest.mark.slow  # indexes lm-eval's ~15,000 built-in task files (tens of seconds)
def test_unknown_task_name_is_named(tmp_path):
    loaded = LoadedModel(build_model("llama"), None, "tiny", "causal-lm")
    with pytest.raises(SlimlmError, match="boolqq"):
        run_tasks(loaded, ["boolq", "boolqq"])


def test_library_future_warnings_are_dropped_but_slimlm_ones_are_not(llama, tokenizer, tmp_path, monkeypatch):
    import warnings

    import lm_eval.evaluator

    task_builder().write_task(tmp_path / "tasks", (DATA / "sotu" / "test.txt").read_text(), n=6, seed=0)
    original = lm_eval.evaluator.add_env_info

    def warning_env_info(results):  # as a deprecated transformers call inside lm-eval would warn
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
        warnings.warn_explicit("ours", FutureWarning, "tasks.py", 1, module="slimlm.eval.tasks")
        original(results)

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", warning_env_info)
    with pytest.warns(FutureWarning) as caught:
        run_tasks(LoadedModel(llama, tokenizer, "tiny", "causal-lm"), ["sotu_next"], [str(tmp_path / "tasks")],
                  limit=2, seqlen=128)
    assert [str(w.message) for w in caught] == ["ours"]

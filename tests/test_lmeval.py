"""lm-eval's HFLM over slimlm's in-memory model (`slimlm.eval.lmeval`) and `slimlm eval --tasks` on a local
task built from real text. Every score is checked against direct, unbatched forward passes."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from conftest import DATA, build_model, train_tokenizer  # noqa: E402
from slimlm.cli import main  # noqa: E402
from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.eval.lmeval import make_lm  # noqa: E402
from slimlm.models import LoadedModel  # noqa: E402
from slimlm.eval.tasks import run_tasks  # noqa: E402

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


def direct_rolling(model, ids, prefix_id, max_length):
    """Every token of a document predicted once: in blocks of `max_length`, each block from the
    `max_length` inputs that end just before its last token (the first block from the prefix token)."""
    seq, total = [prefix_id] + list(ids), 0.0
    for start in range(1, len(seq), max_length):
        end = min(len(seq), start + max_length)
        total += direct_logprob(model, seq[max(0, end - 1 - max_length):start], seq[start:end])
    return total


@pytest.fixture(scope="module")
def llama():
    return build_model("llama", seed=0)


def test_loglikelihood_matches_a_direct_forward_pass(llama, tokenizer):
    # sentences of different lengths, so the batches are padded; one empty context
    sentences = [s.strip() + "." for s in TEXT.split(".")[:12] if s.strip()]
    pairs = [(" ".join(sentences[:i]), " " + sentences[i]) for i in range(1, 7)]  # all under 512 tokens
    pairs += [("The people of this country ", "continue to enjoy great prosperity."), ("", sentences[0])]
    lm = make_lm(llama, tokenizer, max_length=512, batch_size=3)
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, got):
        if context:  # context and continuation tokenized together; the trailing space goes with the continuation
            whole = tokenizer.encode(context + continuation)
            n = len(tokenizer.encode(context.rstrip()))
            ctx, cont = whole[:n], whole[n:]
        else:
            ctx, cont = [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
        assert len(ctx + cont) <= 512
        assert logprob == pytest.approx(direct_logprob(llama, ctx, cont), abs=1e-4)
    cont = tokenizer.encode("The people of this country continue")[len(tokenizer.encode("The people of this country")):]
    assert tokenizer.decode(cont[:1]).startswith(" ")


def test_is_greedy_and_left_truncation(llama, tokenizer):
    context = tokenizer.encode(TEXT[:300])
    greedy = []
    ids = list(context)
    with torch.no_grad():
        for _ in range(4):
            greedy.append(int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(greedy[-1])
    other = [(greedy[0] + 1) % 384] + greedy[1:]
    lm = make_lm(llama, tokenizer, max_length=512)
    (lp_greedy, is_greedy), (lp_other, not_greedy) = lm._loglikelihood_tokens(
        [(None, context, greedy), (None, context, other)], disable_tqdm=True)
    assert is_greedy and not not_greedy and lp_greedy > lp_other

    # inputs longer than max_length keep their last max_length tokens (the continuation and the context's end)
    ((truncated, _),) = make_lm(llama, tokenizer, max_length=20)._loglikelihood_tokens([(None, context, greedy)],
                                                                                      disable_tqdm=True)
    assert truncated == pytest.approx(direct_logprob(llama, context[-(20 + 1 - len(greedy)):], greedy), abs=1e-4)
    assert truncated != pytest.approx(lp_greedy, abs=1e-4)


def test_rolling_loglikelihood_predicts_every_token_once(llama, tokenizer):
    bos = tokenizer.bos_token_id
    short = TEXT[:200]
    short_ids = tokenizer.encode(short, add_special_tokens=False)
    assert len(short_ids) < 512
    (total,) = make_lm(llama, tokenizer, max_length=512, batch_size=2).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(short,)]), disable_tqdm=True)
    assert total == pytest.approx(direct_logprob(llama, [bos], short_ids), abs=1e-4)
    # windowed: a longer document than max_length, in windows of 64 inputs
    ids = tokenizer.encode(TEXT[:400], add_special_tokens=False)
    assert len(ids) > 2 * 64
    (windowed,) = make_lm(llama, tokenizer, max_length=64, batch_size=2).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(TEXT[:400],)]), disable_tqdm=True)
    assert windowed == pytest.approx(direct_rolling(llama, ids, bos, 64), abs=1e-3)


def test_rolling_does_not_score_the_tokenizers_bos(llama):
    """A tokenizer that adds BOS itself (like LLaMA's): the document is still predicted from one BOS,
    each of its tokens once. lm-eval 0.4.13's HFLM alone also scores log p(BOS | BOS) (the one place
    slimlm changes HFLM); if this assertion on plain HFLM fails, lm-eval has fixed it upstream."""
    from lm_eval.models.huggingface import HFLM
    from tokenizers import processors

    tok = train_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                  special_tokens=[("<s>", tok.bos_token_id)])
    assert tok.encode("Hello")[0] == tok.bos_token_id
    doc = TEXT[:200]
    ids = tok.encode(doc, add_special_tokens=False)
    (ours,) = make_lm(llama, tok, max_length=512).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)
    assert ours == pytest.approx(direct_logprob(llama, [tok.bos_token_id], ids), abs=1e-4)
    (plain,) = HFLM(pretrained=llama, tokenizer=tok, max_length=512).loglikelihood_rolling(
        requests("loglikelihood_rolling", [(doc,)]), disable_tqdm=True)
    assert plain == pytest.approx(direct_logprob(llama, [tok.bos_token_id], [tok.bos_token_id] + ids), abs=1e-4)


def test_generate_until_is_greedy_and_stops(llama, tokenizer):
    lm = make_lm(llama, tokenizer, max_length=512, batch_size=2)
    contexts = [TEXT[:120], TEXT[200:260], TEXT[400:700]]
    free = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 6}) for c in contexts]),
                             disable_tqdm=True)
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
    (cut,) = lm.generate_until(requests("generate_until", [(contexts[0], {"until": [stop], "max_gen_toks": 6})]),
                               disable_tqdm=True)
    assert cut == free[0].split(stop)[0] and len(cut) < len(free[0])


def test_local_task_end_to_end(model_dirs, text_file, tmp_path, tokenizer, capfd, monkeypatch):
    task_yaml = task_builder().write_task(tmp_path / "tasks", (DATA / "sotu" / "test.txt").read_text(), n=30, seed=0)
    docs = [json.loads(line) for line in (tmp_path / "tasks" / "sotu_next.jsonl").read_text().splitlines()][:10]
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dirs["llama"]), "--method", "magnitude", "--output", str(pruned)]) == 0
    out, logs = tmp_path / "scores.json", tmp_path / "lm-eval-logs"
    monkeypatch.chdir(tmp_path)  # outside a git repository, where lm-eval's `git describe` fails
    capfd.readouterr()
    assert main(["eval", "--model", str(pruned), "--tasks", "sotu_next", "--include-path", str(task_yaml.parent),
                 "--limit", "10", "--seqlen", "512", "--json", str(out), "--output-path", str(logs),
                 "--log-samples"]) == 0
    printed = capfd.readouterr()  # file descriptors: git's stderr too
    assert "sotu_next" in printed.out and "acc" in printed.out
    assert "fatal" not in printed.err and "warning" not in printed.err.lower()

    # accuracy recomputed from direct forward passes of the saved 2:4 model
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(pruned).eval()
    correct, direct = 0, []
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(doc["context"] + " " + choice)
            n = len(tokenizer.encode(doc["context"]))
            assert len(whole) <= 512
            scores.append(direct_logprob(model, whole[:n], whole[n:]))
        direct.append(scores)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    result = json.loads(out.read_text())["tasks"]["sotu_next"]
    assert result["samples"] == 10 and result["num_fewshot"] == 0 and result["limit"] == 10
    assert result["metrics"]["acc"] == pytest.approx(correct / 10)
    assert result["stderr"]["acc"] > 0 and 0 <= result["metrics"]["acc_norm"] <= 1

    # --output-path / --log-samples: lm-eval's own files, as its CLI names them, with the same scores
    (model_dir,) = logs.iterdir()
    assert model_dir.name == str(pruned).replace("/", "__")
    (results_file,) = model_dir.glob("results_*.json")
    written = json.loads(results_file.read_text())
    assert written["results"]["sotu_next"]["acc,none"] == result["metrics"]["acc"]
    assert written["config"]["model_args"] == {"pretrained": str(pruned)} and written["config"]["batch_size"] == 8
    (samples_file,) = model_dir.glob("samples_sotu_next_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [s["doc"] for s in samples] == docs
    for sample, scores in zip(samples, direct):  # each choice's log-likelihood, as scored directly
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(scores, abs=1e-4)

    # --batch-size auto: lm-eval finds the batch size; the scores do not change
    auto = tmp_path / "auto.json"
    assert main(["eval", "--model", str(pruned), "--tasks", "sotu_next", "--include-path", str(task_yaml.parent),
                 "--limit", "10", "--seqlen", "512", "--batch-size", "auto", "--no-report", "--json", str(auto)]) == 0
    assert json.loads(auto.read_text())["tasks"]["sotu_next"]["metrics"] == result["metrics"]

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
    with pytest.raises(SlimlmError, match="--output-path"):  # lm-eval's CLI also wants one with --log_samples
        run_tasks(loaded, ["x.yaml"], log_samples=True)
    assert main(["eval", "--model", str(model_dirs["llama"]), "--data", "x.txt", "--batch-size", "auto"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(model_dirs["llama"]), "--tasks", "x", "--batch-size", "0"])


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

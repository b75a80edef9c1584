"""Zero-shot / few-shot tasks of EleutherAI's lm-evaluation-harness on a loaded slimlm model.

Task names go straight to lm-eval (`boolq`, `arc_easy`, a group such as `ai2_arc`, or a YAML file);
`include_path` adds folders of custom task YAML. lm-eval is an optional extra: `pip install 'slimlm[eval]'`.
"""
from __future__ import annotations

import datetime
import logging
import subprocess
import warnings
from pathlib import Path
from unittest import mock

from ..errors import SlimlmError
from .. import models
from ..models import LoadedModel

INSTALL_HINT = "lm-evaluation-harness is not installed: run `pip install 'slimlm[eval]'`"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from . import lmeval
    except ImportError:
        raise SlimlmError(INSTALL_HINT) from None
    return lm_eval, TaskManager, lmeval


def task_manager(names: list[str], include_path: list[str] | None):
    """A TaskManager that knows every name in `names`, or an error naming those it does not.
    Indexing lm-eval's own ~15,000 task files takes tens of seconds on a small CPU, so when every
    name is a custom task (under `include_path` or a YAML file) they are left out."""
    _, TaskManager, _ = _lm_eval()
    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise SlimlmError(f"task folder {folder} does not exist")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury our output
    files = {n for n in names if n.endswith((".yaml", ".yml"))}
    for f in files:
        if not Path(f).is_file():
            raise SlimlmError(f"task file {f} does not exist")
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if any(n not in manager.all_tasks for n in set(names) - files):
        manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in files and n not in manager.all_tasks]
    if unknown:
        where = " or the folders given with --include-path" if include_path else ""
        raise SlimlmError(f"unknown lm-eval task(s): {', '.join(unknown)}: not a task, group or tag of "
                          f"lm-eval{where} (`lm_eval ls tasks` lists them)")
    return manager


def max_context(model, seqlen: int) -> int:
    """The longest input we give the model: `seqlen`, or less if its position table is shorter."""
    limit = models.max_positions(model.config)
    return min(seqlen, limit) if limit else seqlen


def summarize(results: dict, settings: dict) -> dict:
    """lm-eval's results as {task: {metrics, stderr, samples, ...}}. lm-eval keys metrics as
    'metric,filter'; the default filter ('none') is dropped from the name."""
    out = {}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for task, values in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key:
                continue  # 'alias', 'name'
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric},{filt}"
            if metric.endswith("_stderr"):
                stderr[label.replace("_stderr", "", 1)] = value if isinstance(value, (int, float)) else None
            else:
                metrics[label] = value
        samples = results.get("n-samples", {}).get(task, {})
        out[task] = {"metrics": metrics, "stderr": stderr, "samples": samples.get("effective"),
                     "samples_available": samples.get("original"),
                     "num_fewshot": results.get("n-shot", {}).get(task),
                     "version": results.get("versions", {}).get(task), **settings, "date": date}
    return out


def run_tasks(loaded: LoadedModel, names: list[str], include_path: list[str] | None = None,
              limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int | str = 8,
              seqlen: int = 2048, seed: int = 0, log_samples: bool = False,
              output_path: str | Path | None = None) -> dict:
    """Evaluate the in-memory model on lm-eval tasks; returns `summarize`'s dict. With `output_path`,
    lm-eval's own results file (and with `log_samples` its per-sample logs) go there, as its CLI
    writes them: OUTPUT_PATH/<model name>/results_<date>.json and samples_<task>_<date>.jsonl."""
    if loaded.kind != "causal-lm":
        raise SlimlmError(f"lm-eval tasks score text with a causal LM; '{loaded.source}' is a {loaded.kind} model")
    if not names:
        raise SlimlmError("no task names given: pass --tasks boolq,rte,... ")
    if log_samples and not output_path:
        raise SlimlmError("--log-samples writes lm-eval's per-sample logs into --output-path DIR: give one")
    lm_eval, _, lmeval = _lm_eval()
    manager = task_manager(names, include_path)
    max_length = max_context(loaded.model, seqlen)
    lm = lmeval.make_lm(loaded.model, loaded.tokenizer, max_length=max_length, batch_size=batch_size)
    tracker = None
    if output_path:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(output_path))
    try:
        # lm-eval records the working folder's commit with `git describe`, whose stderr would reach the
        # user ("fatal: not a git repository" outside one). FutureWarnings raised from transformers' and
        # lm-eval's own modules concern their internals, not anything the user can change: dropped here
        # (slimlm's own and other libraries' warnings still show)
        with warnings.catch_warnings(), mock.patch("lm_eval.evaluator.get_git_commit_hash", _git_commit):
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|lm_eval)(\.|$)")
            results = lm_eval.simple_evaluate(model=lm, model_args={"pretrained": loaded.source}, tasks=list(names),
                                              task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                              batch_size=batch_size, log_samples=log_samples,
                                              evaluation_tracker=tracker, random_seed=seed, numpy_random_seed=seed,
                                              torch_random_seed=seed, fewshot_random_seed=seed)
    except ConnectionError as err:  # a hub task whose data is not cached, without a network
        raise SlimlmError(f"lm-eval could not fetch a task's data set ({err}); real tasks need the "
                          "Hugging Face hub or its cache") from None
    if tracker is not None:
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else []:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    settings = {"limit": limit, "max_length": max_length, "seed": seed, "lm_eval": lm_eval.__version__}
    return summarize(results, settings)


def _git_commit() -> str | None:
    """What lm-eval's get_git_commit_hash records (the working folder's commit), with git's stderr dropped."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def scores(task_result: dict) -> list[tuple[str, float, float | None]]:
    """(metric, value, standard error or None) for each numeric metric of one task's result."""
    out = []
    for metric, value in task_result["metrics"].items():
        if isinstance(value, (int, float)):
            err = task_result["stderr"].get(metric)
            out.append((metric, value, err if isinstance(err, (int, float)) else None))
    return out


def format_table(tasks: dict) -> str:
    """One line per task and metric: value ± stderr (n examples)."""
    lines = []
    for task, r in tasks.items():
        for metric, value, err in scores(r):
            pm = f" ± {err:.4f}" if err is not None else ""
            lines.append(f"{task:<24} {metric:<12} {value:.4f}{pm}  ({r['samples']} examples)")
    return "\n".join(lines)

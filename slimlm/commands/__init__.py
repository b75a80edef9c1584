"""One module per `slimlm` sub-command: HELP, add_arguments(parser), run(args)."""


def add_calibrated_job_arguments(p, solver: str) -> None:
    """The options `prune` and `quantize` share: calibration windows, target layers, the OBS solver
    (`solver`: SparseGPT or GPTQ), evaluation, device and output folder."""
    p.add_argument("--calib", help="calibration text: .txt, .jsonl with a 'text' field, or dataset name")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, help="tokens per calibration (and evaluation) window (default: 2048, "
                   "or the model's position table if shorter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", action="append", help="regex of target layer names (repeatable; replaces the default "
                   "of every linear layer in the blocks)")
    p.add_argument("--ignore", action="append", help="regex of layer names to leave alone (repeatable)")
    p.add_argument("--blocksize", type=int, default=128, help=f"{solver} column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help=f"{solver} dampening, a fraction of the mean Hessian diagonal")
    p.add_argument("--eval", help="text to measure perplexity on afterwards")
    p.add_argument("--eval-dense", action="store_true", help="also measure the model before")
    p.add_argument("--eval-seqlen", type=int, help="evaluation window (default: --seqlen)")
    p.add_argument("--eval-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")


def settings_from(args, defaults: dict) -> dict:
    """The parsed options that a job's settings know (the job's resolve_settings fills in the rest)."""
    return {k: v for k, v in vars(args).items() if k in defaults}


def print_perplexities(report: dict) -> None:
    for name, ev in report["evaluation"].items():
        print(f"perplexity ({name}): {ev['perplexity']:.3f}")

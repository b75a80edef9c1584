from ..report.page import write


def add_arguments(p):
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of slimlm prune/train/finetune/quantize")
    p.add_argument("--output", required=True, help="the .md file to write; its PNGs go next to it "
                   "(OUTPUT-quality.png, OUTPUT-curves.png)")
    p.add_argument("--dense", help="`slimlm eval --data ... --json` result of the dense model: the reference line "
                   "where every run was evaluated the same way")


def run(args):
    page = write(args.runs, args.output, args.dense)
    print(f"wrote {page} ({len(args.runs)} runs)")

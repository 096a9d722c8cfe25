"""``opendaam nearest``: the vocabulary words whose embeddings are nearest an optimized token."""

from __future__ import annotations

from opendaam.cli._checks import check_model, check_token_file, in_range

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the ``nearest`` subcommand."""
    p = sub.add_parser("nearest", help="explain a token by its nearest vocabulary words", description=__doc__)
    p.add_argument("token", help="token file (.safetensors) from opendaam optimize")
    p.add_argument("--model", default="toy-urban", help="the pipeline the token was optimized for")
    p.add_argument("--k", type=int, default=10, help="how many nearest words to print, >= 1")
    p.add_argument("--threads", type=int, default=None, help="torch threads, >= 1 (default: torch's choice)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Print the nearest words with their cosine similarity."""
    in_range("--k", args.k, 1, integer=True)
    in_range("--threads", args.threads, 1, integer=True)
    check_token_file(args.token)
    check_model(args.model)
    from opendaam.models import load_pipeline, set_threads
    from opendaam.optimize import load_token, nearest_words

    set_threads(args.threads)
    pipe = load_pipeline(args.model)
    token = load_token(args.token, pipe=pipe)
    for word, sim in nearest_words(token, pipe, k=args.k):
        print(f"{sim:.3f}  {word}")
    return 0

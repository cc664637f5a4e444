"""MovieLens as a Yes/No instruction task, TALLRec-style: `python -m transfer.tasks.movielens --raw FOLDER`.

Reads ml-latest-small's ratings.csv and movies.csv and writes train/validation/test.jsonl
(fields prompt, completion, label, user_id, movie_id, rating) for `dataset=movielens`:

- For each user, ratings in time order. Each example's target is one rated movie; its prompt
  shows the `--history` movies the user rated just before it, as liked (rating >= 4) and
  disliked (below 4), and asks whether the user will like the target; the answer is "Yes"
  (rating >= 4) or "No". A user's last `--per-user` ratings become examples.
- Users, not ratings, are split (seeded): no user of the validation or test split is seen in
  training, so the task measures what transfers to new users.

An earlier build in `--out` is replaced only with `--overwrite`; a bad ratings file (a missing
column, a rating that is not a number) is refused in one line naming the file and line.

MovieLens is licensed for research use only, with redistribution under the same terms; the
built files stay on your machine (the default folder, data/, is not tracked by git).
"""

import argparse
import csv
import json
import math
import os
import random
import sys
from pathlib import Path

from transfer.errors import TransferError
from transfer.fmt import reader_may_leave

INSTRUCTION = (
    'Given the movies a user liked and the movies the user disliked, answer "Yes" if the user will '
    'like the target movie and "No" if not.'
)
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
WRITTEN = [f"{name}.jsonl" for name in SPLITS] + ["README.txt"]


def build(raw: Path, out: Path, history: int = 10, per_user: int = 8, seed: int = 0, liked: float = 4.0) -> dict:
    """Write the three splits; return the number of examples and the share of "Yes" in each.

    Everything is read and checked before anything is written; the files are written whole (a temporary file
    each, then renamed), so that a failure leaves what `out` held before."""
    ratings = _read(raw / "ratings.csv", {"userId": int, "movieId": int, "rating": _rating, "timestamp": int})
    movies = _read(raw / "movies.csv", {"movieId": int, "title": str})
    titles = {movie: title for _, (movie, title) in movies}
    by_user: dict[int, list] = {}
    for line, (user, movie, rating, timestamp) in ratings:
        if movie not in titles:
            raise TransferError(f"{raw / 'ratings.csv'} line {line}: movieId {movie} is not in {raw / 'movies.csv'}")
        by_user.setdefault(user, []).append((timestamp, movie, rating))
    users = sorted(by_user)
    random.Random(seed).shuffle(users)
    cut_train = round(len(users) * SPLITS["train"])
    cut_val = cut_train + round(len(users) * SPLITS["validation"])
    split_of = {u: "train" if i < cut_train else "validation" if i < cut_val else "test" for i, u in enumerate(users)}
    rows = {name: [] for name in SPLITS}
    for user in sorted(by_user):
        seen = [(movie, rating) for _, movie, rating in sorted(by_user[user], key=lambda r: r[:2])]
        for position in range(max(history, len(seen) - per_user), len(seen)):
            movie, rating = seen[position]
            before = seen[position - history : position]
            rows[split_of[user]].append(_example(before, movie, rating, titles, liked, user))
    empty = [name for name, examples in rows.items() if not examples]
    if empty:
        raise TransferError(
            f"{raw / 'ratings.csv'}: no {' or '.join(empty)} examples from its {len(users)} users; allowed: ratings "
            f"of enough users ({len(SPLITS)} or more) with more than --history {history} ratings each"
        )
    summary = {name: {"examples": len(examples), "yes_share": sum(e["label"] for e in examples) / len(examples)}
               for name, examples in rows.items()}  # fmt: skip
    texts = {f"{name}.jsonl": "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
             for name, examples in rows.items()}  # fmt: skip
    texts["README.txt"] = (
        f"Built by `python -m transfer.tasks.movielens` from {raw} (MovieLens ml-latest-small).\n"
        f"history={history} per_user={per_user} seed={seed} liked: rating >= {liked}\n"
        "License: GroupLens research-use terms (see the raw folder's README.txt); do not commit these files.\n"
        f"{json.dumps(summary)}\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    temporary = {name: out / f".{name}.{os.getpid()}.tmp" for name in texts}
    try:
        for name, text in texts.items():
            temporary[name].write_text(text)
        for name in texts:
            os.replace(temporary[name], out / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return summary


def _rating(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _read(path: Path, columns: dict) -> list[tuple[int, tuple]]:
    """The named columns of a MovieLens CSV file, converted, each row with its line: refused in one line naming the
    file, the line and the value that does not convert."""
    what = {int: "a whole number", _rating: "a number", str: "text"}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise TransferError(f"{path} is empty; allowed: MovieLens's {path.name} ({','.join(columns)})")
            lacking = [c for c in columns if c not in header]
            if lacking:
                raise TransferError(
                    f"{path} has no column {lacking[0]!r} (its header: {','.join(header)}); "
                    f"allowed: MovieLens's {path.name} ({','.join(columns)})"
                )
            where = [header.index(c) for c in columns]
            rows = []
            for cells in reader:
                if not cells:
                    continue
                values = []
                for (name, convert), i in zip(columns.items(), where, strict=True):
                    cell = cells[i] if i < len(cells) else ""
                    try:
                        values.append(convert(cell))
                    except ValueError:
                        raise TransferError(
                            f"{path} line {reader.line_num}: {name} {cell!r} is not {what[convert]}; "
                            f"allowed: MovieLens's {path.name} ({','.join(columns)})"
                        ) from None
                rows.append((reader.line_num, tuple(values)))
    except UnicodeDecodeError as e:
        raise TransferError(
            f"{path} is not UTF-8 ({e.reason}); allowed: MovieLens's CSV files, as GroupLens ships them"
        ) from None
    except OSError as e:
        raise TransferError(f"{path}: cannot read it ({e.strerror})") from None
    if not rows:
        raise TransferError(f"{path} holds a header and no rows; allowed: MovieLens's {path.name}")
    return rows


def _example(before, movie, rating, titles, liked, user) -> dict:
    likes = [f'"{titles[m]}"' for m, r in before if r >= liked]
    dislikes = [f'"{titles[m]}"' for m, r in before if r < liked]
    prompt = (
        f"{INSTRUCTION}\nLiked: {', '.join(likes) or 'none'}\nDisliked: {', '.join(dislikes) or 'none'}\n"
        f'Target movie: "{titles[movie]}"\nWill the user like it?'
    )
    yes = rating >= liked
    return {"prompt": prompt, "completion": "Yes" if yes else "No", "label": int(yes), "user_id": int(user),
            "movie_id": int(movie), "rating": float(rating)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transfer.tasks.movielens", description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, type=Path, help="the ml-latest-small folder (ratings.csv, movies.csv)")
    parser.add_argument(
        "--out", type=Path, default=Path("data/movielens"), help="where to write (default: data/movielens)"
    )
    parser.add_argument("--history", type=int, default=10, help="rated movies shown before each target")
    parser.add_argument("--per-user", type=int, default=8, help="examples per user: their last ratings")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the user split")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier build in --out")
    args = parser.parse_args(argv)
    try:
        summary = _checked_build(args)
    except TransferError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, s in summary.items():
        print(f"{name}: {s['examples']:,} examples, {100 * s['yes_share']:.1f}% Yes")
    print(f"written to {args.out}; run: python -m transfer objective=sft dataset=movielens")


def _checked_build(args) -> dict:
    for name in ("ratings.csv", "movies.csv"):
        if not (args.raw / name).is_file():
            raise TransferError(f"--raw {args.raw}: no {name} there; allowed: the ml-latest-small folder")
    if args.history < 1 or args.per_user < 1:
        raise TransferError(f"--history {args.history} and --per-user {args.per_user}: allowed 1 or more")
    existing = next((p for p in (args.out, *args.out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TransferError(f"--out {args.out}: {existing} is a file; allowed: a folder")
    built = [name for name in WRITTEN if (args.out / name).exists()]
    if built and not args.overwrite:
        raise TransferError(
            f"--out {args.out} holds {', '.join(built)} already (an earlier build); allowed: another folder, "
            "or --overwrite to replace them"
        )
    return build(args.raw, args.out, args.history, args.per_user, args.seed)


if __name__ == "__main__":
    sys.exit(reader_may_leave(main))

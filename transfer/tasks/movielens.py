"""MovieLens as a Yes/No instruction task, TALLRec-style: `python -m transfer.tasks.movielens --raw FOLDER`.

Reads ml-latest-small's ratings.csv and movies.csv and writes train/validation/test.jsonl
(fields prompt, completion, label, user_id, movie_id, rating) for `dataset=movielens`:

- For each user, ratings in time order. Each example's target is one rated movie; its prompt
  shows the `--history` movies the user rated just before it, as liked (rating >= 4) and
  disliked (below 4), and asks whether the user will like the target; the answer is "Yes"
  (rating >= 4) or "No". A user's last `--per-user` ratings become examples.
- Users, not ratings, are split (seeded): no user of the validation or test split is seen in
  training, so the task measures what transfers to new users.

MovieLens is licensed for research use only, with redistribution under the same terms; the
built files stay on your machine (the default folder, data/, is not tracked by git).
"""

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = (
    'Given the movies a user liked and the movies the user disliked, answer "Yes" if the user will '
    'like the target movie and "No" if not.'
)
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def build(raw: Path, out: Path, history: int = 10, per_user: int = 8, seed: int = 0, liked: float = 4.0) -> dict:
    """Write the three splits; return the number of examples and the share of "Yes" in each."""
    import pandas as pd

    ratings = pd.read_csv(raw / "ratings.csv")
    titles = pd.read_csv(raw / "movies.csv").set_index("movieId")["title"].to_dict()
    users = sorted(ratings["userId"].unique().tolist())
    random.Random(seed).shuffle(users)
    cut_train = round(len(users) * SPLITS["train"])
    cut_val = cut_train + round(len(users) * SPLITS["validation"])
    split_of = {u: "train" if i < cut_train else "validation" if i < cut_val else "test" for i, u in enumerate(users)}
    rows = {name: [] for name in SPLITS}
    for user, group in ratings.sort_values(["userId", "timestamp", "movieId"]).groupby("userId", sort=True):
        seen = list(zip(group["movieId"].tolist(), group["rating"].tolist(), strict=True))
        for position in range(max(history, len(seen) - per_user), len(seen)):
            movie, rating = seen[position]
            before = seen[position - history : position]
            rows[split_of[user]].append(_example(before, movie, rating, titles, liked, user))
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, examples in rows.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for example in examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
        summary[name] = {"examples": len(examples), "yes_share": sum(e["label"] for e in examples) / len(examples)}
    (out / "README.txt").write_text(
        f"Built by `python -m transfer.tasks.movielens` from {raw} (MovieLens ml-latest-small).\n"
        f"history={history} per_user={per_user} seed={seed} liked: rating >= {liked}\n"
        "License: GroupLens research-use terms (see the raw folder's README.txt); do not commit these files.\n"
        f"{json.dumps(summary)}\n"
    )
    return summary


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
    args = parser.parse_args(argv)
    for name in ("ratings.csv", "movies.csv"):
        if not (args.raw / name).is_file():
            parser.error(f"--raw {args.raw}: no {name} there; allowed: the ml-latest-small folder")
    if args.history < 1 or args.per_user < 1:
        parser.error(f"--history {args.history} and --per-user {args.per_user}: allowed 1 or more")
    summary = build(args.raw, args.out, args.history, args.per_user, args.seed)
    for name, s in summary.items():
        print(f"{name}: {s['examples']:,} examples, {100 * s['yes_share']:.1f}% Yes")
    print(f"written to {args.out}; run: python -m transfer objective=sft dataset=movielens")


if __name__ == "__main__":
    main()

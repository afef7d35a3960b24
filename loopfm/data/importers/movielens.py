"""MovieLens rating files, either layout of the GroupLens READMEs:

- ML-100K: `u.data` (tab: user id, item id, rating, timestamp), `u.user` (pipe: user id, age,
  gender, occupation, zip code), `u.item` (pipe, latin-1: movie id, title, release date,
  video release date, IMDb URL, then 19 genre flags);
- ML-1M: `ratings.dat` (UserID::MovieID::Rating::Timestamp), `users.dat`
  (UserID::Gender::Age::Occupation::Zip-code), `movies.dat` (MovieID::Title::Genres, latin-1).

A rating at or above the click threshold is a click. Genres become one `genre` column of
`|`-separated names (rule: `genre=Comedy`); an item's category is its first genre.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from loopfm.data.importers.canonical import DataFormatError, convert, numbers, one_row_per_id, read_table

GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
USER_COLUMNS_100K = ("user_id", "age", "gender", "occupation", "zip_code")
USER_COLUMNS_1M = ("user_id", "gender", "age", "occupation", "zip_code")
RATINGS = {"user_id": "user_id", "item_id": "item_id", "label": "rating", "timestamp": "timestamp"}
USERS = {"user_id": "user_id", "age": "age", "gender": "gender"}  # ML-1M ages are group codes: same buckets


def read_movielens(folder: Path, click_threshold: float) -> pd.DataFrame:
    if (folder / "u.data").is_file():
        ratings, users, items = _ml100k(folder)
    elif (folder / "ratings.dat").is_file():
        ratings, users, items = _ml1m(folder)
    else:
        raise DataFormatError(f"{folder}: neither u.data (MovieLens 100K) nor ratings.dat (MovieLens 1M) found")
    events = convert(ratings, RATINGS, integer_ids=True, click_threshold=click_threshold, time_unit="s")
    items = convert(items, {"item_id": "item_id"}, integer_ids=True)[["_item", "title", "genre"]]
    items["_category"] = items["genre"].str.split("|").str[0]
    users = convert(users, USERS, integer_ids=True).drop(columns="user_id")
    events = events.merge(one_row_per_id(items, "_item"), on="_item", how="left")
    return events.merge(one_row_per_id(users, "_user"), on="_user", how="left")


def _ml100k(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = read_table(folder / "u.data", [], sep="\t", names=RATING_COLUMNS)
    users = read_table(folder / "u.user", [], sep="|", names=USER_COLUMNS_100K)
    names = ("item_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES_100K)
    items = read_table(folder / "u.item", [], sep="|", names=names, encoding="latin-1")
    flags = pd.DataFrame({g: numbers(items, g, integer=True) == 1 for g in GENRES_100K})
    items["genre"] = flags.apply(lambda row: "|".join(row.index[row]), axis=1) if len(items) else []
    return ratings, users, items


def _ml1m(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = read_table(folder / "ratings.dat", [], sep="::", names=RATING_COLUMNS)
    users = read_table(folder / "users.dat", [], sep="::", names=USER_COLUMNS_1M)
    items = read_table(folder / "movies.dat", [], sep="::", names=("item_id", "title", "genre"), encoding="latin-1")
    return ratings, users, items
